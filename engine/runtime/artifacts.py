"""Artifact directories: the contract between ``modloc export`` and the engine.

An artifact is one exported model in a directory::

    model.onnx      the graph: uint8 frames + frame mask in, probabilities + logits out;
                    dequantization, RGB un-whitening and BatchNorm folded into its layers
    model.onnx.data its weights, only for graphs past protobuf's 2 GB limit
    model.pt2       the program model.onnx was translated from (``torch.export.save``), for
                    the torch backend; fp32, fp16 and bf16 artifacts (INT8 is a QDQ graph that
                    ONNX Runtime quantized: it exists only as ONNX). Optional: artifacts
                    exported before modloc wrote it lack it and still run on ONNX Runtime and
                    TensorRT, so the format version did not change
    model.plan      a TensorRT engine built from model.onnx (only after ``modloc build``)
    live_encoder.onnx, live_head.onnx
                    a video-level fp32 model split for live localization: frames + mask →
                    sums, sums → probabilities (:mod:`modloc.engine.runtime.live`); each
                    with a ``.data`` file beside it past protobuf's 2 GB limit
    manifest.json   what the files are (schema below); the engine trusts nothing else
    README          one human-readable line saying what the artifact is

``manifest.json`` (``format`` = :data:`FORMAT`, ``format_version`` = :data:`FORMAT_VERSION`):

- ``model``: ``kind`` (``"video"`` | ``"segment"``), ``graph`` (``"distill"``: one leaf of
  a MOD tree; ``"ensemble"``: the whole tree, output = the root's gated mixture;
  ``"single"``: a plain NeXtVLAD checkpoint), ``tree`` (``{"branching", "leaves"}`` or
  null), ``leaf`` (``{"index", "path", "selection", "scores"}`` for a distill graph),
  ``preset`` and ``config`` (the checkpoint's model config);
- ``classes``: vocabulary ids of the outputs, in output order;
- ``inputs`` / ``outputs``: ``[{"name", "dtype", "shape"}]``; a dimension is an int or
  the name of a dynamic axis (``"batch"``, ``"frames"``);
- ``preprocessing``: what the graph folds (``folded``: true, the input transform, the
  eigenvalues' sha256, the padding rule) and ``use_mask`` (video mode masks padded
  frames in the attention; segment mode does not); its ``max_frames`` is the training
  crop, not a limit of the graph;
- ``frames``: what the graph needs per example. ``pad_to``: null when the outputs do not
  depend on padding (any number of frames ≥ 1 gives the same outputs: video-mode distill
  graphs, and ensembles whose gates read the reference's mean), else the exact number of
  frames every example must be padded to (5 for a segment-mode graph, whose padded frames
  count as the reference's zero-padded last window; 300 for an ensemble exported from a
  checkpoint with the older ``"padded_mean"`` gates). ``gate_input``: an ensemble's gate
  form (``"reference"`` or ``"padded_mean"``; null without gates). ``gate_frames``: ``R``
  of ``"reference"`` gates, which read ``(Σ real frames + (R − n) · p) / R``, the
  reference's mean over a video padded to ``R`` = 300 frames (5 for a segment-mode
  window), computed from the ``n`` real frames; a video longer than ``R`` frames gets the
  mean of its real frames (divisor ``max(n, R)``), where the reference would crop it to
  ``R`` (the engine crops videos to 300 frames before the video model, as the reference's
  reader does). ``training_max_frames``: the frames per video the checkpoint was trained
  on. Absent in artifacts exported before it existed: :attr:`Artifact.pad_to` then
  applies the rule of that time (300 for a video-level ensemble, 5 for a segment model);
- ``precision``: ``"fp32"`` | ``"fp16"`` | ``"bf16"`` | ``"int8"``, with how the variant
  was made and its segment MAP@K on the validation split (``map_at_k``: every class a
  candidate, its ceiling, the ``difference`` from fp32's);
- ``quality_gate``: null for fp32 (the reference); for a variant, ``passed`` and its
  ``measures`` against fp32, each ``{"metric", "reference_value", "value", "ceiling",
  "threshold", "passed", "rule"}`` (:mod:`modloc.export.gate`), the split and the examples
  measured. An artifact exported before the gate existed lacks it;
- ``onnx``: ``opset``, ``ir_version``, ``sha256``;
- ``pt2``: ``{"file": "model.pt2", "parity"}`` (the saved program, loaded back, against
  PyTorch, as ``parity`` records the ONNX graph), or ``{"file": null, "reason"}`` (INT8),
  or absent (an artifact exported before model.pt2 existed). ``model.pt2`` holds
  :data:`PT2_METADATA` (``torch.export.save``'s ``extra_files``): the ``kind``, ``graph``,
  ``leaf`` index and ``precision`` it was exported as, and the names of its ``inputs`` and
  ``outputs`` in order (an ExportedProgram keeps input names but not output names);
- ``files``: ``{name: {"sha256", "bytes"}}`` for every file of the artifact but the
  manifest itself;
- ``source``: the checkpoint's path, weights sha256 and config sha256;
- ``versions``: the exporter's (modloc, torch, onnx, onnxscript, onnxruntime);
- ``parity``: the fp32 graph against PyTorch (max relative error per shape, tolerance);
- ``plan``: null, or the TensorRT engine's build record (TensorRT version, device name
  and compute capability, optimization profiles, the ONNX sha256 it was built from);
- ``live``: null or absent (segment models, precisions other than fp32, artifacts exported
  before it), or the live graphs: ``encoder`` and ``head`` (``{"file", "inputs",
  "outputs"}``), ``sums`` (``{"size", "layout"}``: the pieces of the sums vector, the frame
  count last), ``gate_frames`` (the ``R`` of the head's gates, null without gates) and
  ``parity`` (encoder + head against model.onnx, whole and in chunks of frames).

:func:`load_artifact` checks the manifest against the files (every sha256, the class ids
against the output shape, a plan against the graph it came from) and refuses with an
:class:`ArtifactError` that says which one differs. Backends then check the graph's or
engine's actual inputs and outputs against the manifest with :func:`check_io`.

Pure Python and numpy: the engine loads artifacts without training code or torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modloc.engine.base.features import MAX_FRAMES, SEGMENT_FRAMES

FORMAT = "modloc-artifact"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"  # the graph's weights, when they pass protobuf's 2 GB limit
PT2_FILE = "model.pt2"
PT2_METADATA = "modloc.json"  # inside model.pt2: what the program is (see the module docstring)
PLAN_FILE = "model.plan"
README_FILE = "README"
LIVE_ENCODER_FILE = "live_encoder.onnx"
LIVE_HEAD_FILE = "live_head.onnx"
LIVE_DATA_SUFFIX = ".data"  # a live graph's weights past protobuf's 2 GB limit
# every file an artifact may hold besides its manifest
ARTIFACT_FILES = (ONNX_FILE, ONNX_DATA_FILE, PT2_FILE, PLAN_FILE, LIVE_ENCODER_FILE,
                  LIVE_ENCODER_FILE + LIVE_DATA_SUFFIX, LIVE_HEAD_FILE, LIVE_HEAD_FILE + LIVE_DATA_SUFFIX)

KINDS = ("video", "segment")
GRAPHS = ("distill", "ensemble", "single")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")

# The code a padding frame stands for: padding is 0.0 after dequantization (REFERENCE §1.2),
# and q * 4/255 + (4/512 - 2) = 0 at q = (255/128) * (255/4) = 65025/512 = 127.001953125,
# exact in float32. The graphs center the codes on it (a masked frame is exactly 0), so
# that every folded layer sees the reference's padding input.
PADDING_CODE = 65025 / 512


class ArtifactError(ValueError):
    """An artifact directory whose manifest does not describe its files, or does not fit."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape (ints and axis names)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_json(cls, data: dict) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def describe(self) -> str:
        return f"{self.name} {self.dtype}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True, eq=False)
class Artifact:
    """A verified artifact directory.

    Attributes:
        path: the directory.
        manifest: ``manifest.json`` as loaded.
        kind: ``"video"`` or ``"segment"``.
        graph: ``"distill"``, ``"ensemble"`` or ``"single"``.
        precision: ``"fp32"``, ``"fp16"``, ``"bf16"`` or ``"int8"``.
        class_ids: ``(C,)`` vocabulary ids of the outputs, in output order.
        inputs, outputs: the graph's tensors, in order.
        use_mask: whether the graph masks padded frames in its attention (video mode).
        pad_to: the frames every example must be padded to, or None when the outputs do
            not depend on padding (the manifest's ``frames.pad_to``).
    """

    path: Path
    manifest: dict
    kind: str
    graph: str
    precision: str
    class_ids: tuple[int, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    use_mask: bool
    pad_to: int | None

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def pt2_path(self) -> Path | None:
        """model.pt2 when the artifact holds the torch.export program."""
        return self.path / PT2_FILE if PT2_FILE in self.manifest["files"] else None

    @property
    def plan_path(self) -> Path | None:
        """model.plan when the artifact holds a TensorRT engine."""
        return self.path / PLAN_FILE if self.manifest.get("plan") else None

    @property
    def plan(self) -> dict | None:
        return self.manifest.get("plan")

    @property
    def live(self) -> dict | None:
        """The manifest's ``live`` record (the encoder and head graphs), or None."""
        return self.manifest.get("live")

    @property
    def split_streams(self) -> bool:
        """True when the graph takes ``rgb`` and ``audio`` as two inputs, not ``features``."""
        return any(spec.name == "rgb" for spec in self.inputs)

    def describe(self) -> str:
        """One line: what this artifact is (the README line)."""
        return describe_manifest(self.manifest)


def describe_manifest(manifest: dict) -> str:
    """The README line of an artifact: kind, graph, precision, classes, files, source."""
    model = manifest["model"]
    if model["graph"] == "distill":
        leaf = model["leaf"]
        what = (f"NeXtVLAD_distill: leaf {leaf['index']} of a "
                f"{'x'.join(map(str, model['tree']['branching']))} MOD tree ({leaf['selection']})")
    elif model["graph"] == "ensemble":
        what = f"MOD ensemble: the whole {'x'.join(map(str, model['tree']['branching']))} tree"
    else:
        what = "NeXtVLAD"
    files = [name for name in (ONNX_FILE, PT2_FILE, PLAN_FILE, LIVE_ENCODER_FILE, LIVE_HEAD_FILE)
             if name in manifest["files"]]
    return (f"modloc {model['kind']}-level model, {what}, {manifest['precision']['name']}, "
            f"{len(manifest['classes'])} classes; {' + '.join(files)} (ONNX opset "
            f"{manifest['onnx']['opset']}) from checkpoint {manifest['source']['checkpoint']}")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    """``{"sha256", "bytes"}`` of a file, as the manifest's ``files`` holds it."""
    return {"sha256": file_sha256(path), "bytes": os.path.getsize(path)}


def read_manifest(directory: str | os.PathLike) -> dict:
    """``manifest.json`` of an artifact directory, after checking its format."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory}: not an artifact directory (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path}: not valid JSON ({error})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a {FORMAT} manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')}, this "
                            f"engine reads version {FORMAT_VERSION}: re-export the checkpoint")
    return manifest


def load_artifact(directory: str | os.PathLike, verify: bool = True) -> Artifact:
    """Read an artifact directory and check its manifest against its files.

    Args:
        directory: the artifact directory.
        verify: hash every file (model.onnx, model.pt2, model.plan, README) against the
            manifest.

    Raises:
        ArtifactError: naming the file or field that does not match.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    try:
        artifact = Artifact(
            path=directory,
            manifest=manifest,
            kind=manifest["model"]["kind"],
            graph=manifest["model"]["graph"],
            precision=manifest["precision"]["name"],
            class_ids=tuple(int(c) for c in manifest["classes"]),
            inputs=tuple(TensorSpec.from_json(spec) for spec in manifest["inputs"]),
            outputs=tuple(TensorSpec.from_json(spec) for spec in manifest["outputs"]),
            use_mask=bool(manifest["preprocessing"]["use_mask"]),
            pad_to=_pad_to(manifest),
        )
        files = manifest["files"]
        onnx_sha256 = manifest["onnx"]["sha256"]
        # absent in artifacts exported before model.pt2 existed: the same as none written
        pt2_file = (manifest.get("pt2") or {}).get("file")
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{directory / MANIFEST_FILE}: malformed manifest ({error!r})") from None
    problems = _field_problems(artifact)
    problems += _file_problems(directory, files, onnx_sha256, pt2_file, manifest.get("plan"),
                               verify)
    for part in ("encoder", "head"):
        name = (artifact.live or {}).get(part, {}).get("file")
        if artifact.live and name not in files:
            problems.append(f"live.{part}.file {name!r} is not among the manifest's files")
    if problems:
        raise ArtifactError(f"{directory}: the manifest does not match the artifact: "
                            + "; ".join(problems))
    return artifact


def _pad_to(manifest: dict) -> int | None:
    """``frames.pad_to``; for a manifest written before ``frames`` existed, the rule of that
    time: ensembles averaged every input frame in their gates (300, as the reference pads
    a video), segment models score 5-frame windows."""
    if "frames" in manifest:
        pad_to = manifest["frames"]["pad_to"]
        return None if pad_to is None else int(pad_to)
    if manifest["model"]["kind"] == "segment":
        return SEGMENT_FRAMES
    return MAX_FRAMES if manifest["model"]["graph"] == "ensemble" else None


def _field_problems(artifact: Artifact) -> list[str]:
    problems = []
    for name, value, allowed in (("model.kind", artifact.kind, KINDS),
                                 ("model.graph", artifact.graph, GRAPHS),
                                 ("precision.name", artifact.precision, PRECISIONS)):
        if value not in allowed:
            problems.append(f"{name} is {value!r}, expected one of {allowed}")
    if len(set(artifact.class_ids)) != len(artifact.class_ids):
        problems.append("classes holds repeated ids")
    for spec in artifact.outputs:
        if spec.shape and spec.shape[-1] != len(artifact.class_ids):
            problems.append(f"output {spec.describe()} has {spec.shape[-1]} columns for "
                            f"{len(artifact.class_ids)} class ids")
    if artifact.pad_to is not None and artifact.pad_to < 1:
        problems.append(f"frames.pad_to is {artifact.pad_to}, expected null or >= 1")
    names = [spec.name for spec in artifact.inputs]
    if names not in (["features", "mask"], ["rgb", "audio", "mask"]):
        problems.append(f"inputs are {names}, expected [features, mask] or [rgb, audio, mask]")
    return problems


def _file_problems(directory: Path, files: dict, onnx_sha256: str, pt2_file: str | None,
                   plan: dict | None, verify: bool) -> list[str]:
    problems = []
    for name in ARTIFACT_FILES:
        if (directory / name).exists() and name not in files:
            problems.append(f"{name} is present but the manifest does not describe it")
    if ONNX_FILE not in files:
        problems.append(f"the manifest lists no {ONNX_FILE}")
    elif files[ONNX_FILE]["sha256"] != onnx_sha256:
        problems.append(f"files.{ONNX_FILE}.sha256 differs from onnx.sha256")
    if pt2_file not in (None, PT2_FILE):
        problems.append(f"pt2.file is {pt2_file!r}, expected {PT2_FILE!r} or null")
    elif (pt2_file is None) != (PT2_FILE not in files):
        problems.append(f"{PT2_FILE}: the manifest's pt2 record and file list disagree")
    if (plan is None) != (PLAN_FILE not in files):
        problems.append(f"{PLAN_FILE}: the manifest's plan record and file list disagree")
    if plan is not None and plan.get("onnx_sha256") != onnx_sha256:
        problems.append(f"{PLAN_FILE} was built from ONNX sha256 {plan.get('onnx_sha256')}, "
                        f"not from this {ONNX_FILE} ({onnx_sha256}): rebuild it (modloc build)")
    for name, record in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != record["bytes"]:
            problems.append(f"{name} holds {path.stat().st_size} bytes, the manifest "
                            f"{record['bytes']}")
        elif verify and file_sha256(path) != record["sha256"]:
            problems.append(f"{name} sha256 {file_sha256(path)} differs from the manifest's "
                            f"{record['sha256']}")
    return problems


def check_io(artifact: Artifact, role: str, actual: Sequence[TensorSpec], source: str) -> None:
    """Refuse a graph or engine whose inputs or outputs differ from the manifest's.

    Args:
        artifact: the loaded artifact.
        role: ``"inputs"`` or ``"outputs"``.
        actual: what the runtime reports, in order; a named axis must carry the same name,
            or be reported as unnamed and dynamic (-1 or None, as TensorRT does).
        source: what reported them (e.g. ``"ONNX Runtime session"``), for the message.
    """
    expected = artifact.inputs if role == "inputs" else artifact.outputs
    problems = []
    if [spec.name for spec in actual] != [spec.name for spec in expected]:
        problems.append(f"names {[s.name for s in actual]} instead of {[s.name for s in expected]}")
    else:
        for want, got in zip(expected, actual, strict=True):
            if want.dtype != got.dtype or not _same_shape(want.shape, got.shape):
                problems.append(f"{got.describe()} instead of {want.describe()}")
    if problems:
        raise ArtifactError(f"{artifact.path}: the {source}'s {role} do not match the manifest: "
                            + "; ".join(problems))


def _same_shape(expected: tuple, actual: tuple) -> bool:
    """Equal dimensions; a named axis also matches an unnamed dynamic one (-1 or None)."""
    if len(expected) != len(actual):
        return False
    return all(want == got or (isinstance(want, str) and got in (-1, None))
               for want, got in zip(expected, actual, strict=True))


def frame_mask(num_frames: np.ndarray, frames: int) -> np.ndarray:
    """``(B,)`` valid frame counts → ``(B, frames)`` float32 mask, 1.0 at valid frames."""
    counts = np.asarray(num_frames).reshape(-1, 1)
    return (np.arange(frames)[None, :] < counts).astype(np.float32)


__all__ = [
    "ARTIFACT_FILES", "LIVE_DATA_SUFFIX", "LIVE_ENCODER_FILE", "LIVE_HEAD_FILE",
    "FORMAT", "FORMAT_VERSION", "GRAPHS", "KINDS", "MANIFEST_FILE", "ONNX_DATA_FILE",
    "ONNX_FILE", "PADDING_CODE", "PLAN_FILE", "PRECISIONS", "PT2_FILE", "PT2_METADATA", "README_FILE",
    "Artifact", "ArtifactError",
    "TensorSpec", "check_io", "describe_manifest", "file_record", "file_sha256", "frame_mask",
    "load_artifact", "read_manifest",
]
