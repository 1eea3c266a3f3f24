"""The writer's side of the artifact contract (the reader's is :mod:`modloc.engine.runtime.artifacts`).

:func:`new_manifest` assembles a manifest from the checkpoint and the graph;
:func:`write_manifest` records every file's sha256, writes the README line and then
``manifest.json``; :func:`modloc.engine.base.atomic.replace_directory` then moves a finished staging
directory into place in one rename, so that a reader never sees half an artifact.

Only :func:`new_manifest` and the records it builds touch the checkpoint (and so import
training code and torch, inside them): :mod:`modloc.export.trt` rewrites manifests with the rest
of this module on machines that hold TensorRT and no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from modloc._version import __version__
from modloc.engine.base.atomic import write_atomically
from modloc.engine.runtime.artifacts import (
    ARTIFACT_FILES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    ONNX_FILE,
    PADDING_CODE,
    PT2_FILE,
    README_FILE,
    TensorSpec,
    describe_manifest,
    file_record,
)

if TYPE_CHECKING:
    import onnx

    from modloc.training.checkpoint import Checkpoint


def exporter_versions() -> dict[str, str]:
    """Versions of the tools that produced a graph."""
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    return {"modloc": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def source_record(checkpoint: Checkpoint) -> dict:
    """Which checkpoint the graph came from: its path, weights sha256 and config sha256."""
    from modloc.training.checkpoint import CONFIG_FILE

    config_path = Path(checkpoint.path) / CONFIG_FILE
    config = json.loads(config_path.read_text())
    state = checkpoint.state
    return {"checkpoint": str(checkpoint.path), "weights_sha256": config["weights"]["sha256"],
            "config_sha256": hashlib.sha256(config_path.read_bytes()).hexdigest(),
            "phase": state.phase if state else None, "step": state.step if state else None}


def preprocessing_record(checkpoint: Checkpoint, use_mask: bool) -> dict:
    """What the graph folds, so that clients send the raw bytes of the YouTube-8M format."""
    return {
        "folded": True,
        "input": "uint8 quantized features, RGB (1024) then audio (128), as the TFRecords hold them",
        "dequantize": "q * 4/255 + (4/512 - 2)",
        "input_transform": checkpoint.preprocessing["input_transform"],
        "rgb": "(x - 4/512) * (sqrt(eigenvalue) + 1e-4)",
        "audio": "x",
        "eigenvalues_sha256": checkpoint.preprocessing.get("eigenvalues_sha256"),
        "centering": f"the first layers take codes minus {PADDING_CODE}, the code of a "
                     "dequantized 0.0",
        "padding": "frames where mask == 0 are padding (0.0 after dequantization); their bytes "
                   "are ignored",
        "use_mask": use_mask,
        "batchnorm": "folded into the linear layers",
        "max_frames": checkpoint.preprocessing.get("max_frames"),
        "segment_frames": checkpoint.preprocessing.get("segment_frames"),
    }


def frames_record(checkpoint: Checkpoint, pad_to: int | None, gate_frames: int | None,
                  gated: bool) -> dict:
    """The manifest's ``frames``: what the graph needs per example, apart from how the
    checkpoint was trained (:mod:`modloc.engine.runtime.artifacts` documents the keys).

    Args:
        pad_to: :attr:`modloc.export.graph.ExportGraph.pad_to`.
        gate_frames: its gates' ``R`` (None: no gates, or the ``"padded_mean"`` form).
        gated: the graph has gates (an ensemble).
    """
    config = checkpoint.model_config
    return {"pad_to": pad_to,
            "gate_input": getattr(config, "gate_input", None) if gated else None,
            "gate_frames": gate_frames,
            "training_max_frames": checkpoint.preprocessing.get("max_frames")}


def new_manifest(
    *,
    checkpoint: Checkpoint,
    kind: str,
    graph: str,
    leaf: dict | None,
    precision: dict,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    use_mask: bool,
    frames: dict,
    onnx_model: onnx.ModelProto,
    live: dict | None = None,
) -> dict:
    """A manifest without its ``files``, ``onnx.sha256`` and ``parity`` (set when written).

    ``pt2`` names model.pt2: every graph exported from PyTorch is saved as a program too
    (an INT8 variant, quantized from the ONNX graph, replaces the record).
    """
    from modloc.training.checkpoint import model_config_to_dict

    config = checkpoint.model_config
    branching = getattr(config, "branching", None)
    tree = None if branching is None else {"branching": list(branching),
                                           "leaves": math.prod(branching)}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"kind": kind, "graph": graph, "tree": tree, "leaf": leaf,
                  "preset": checkpoint.preset, "config": model_config_to_dict(config)},
        "classes": [int(c) for c in checkpoint.class_ids],
        "inputs": [spec.to_json() for spec in inputs],
        "outputs": [spec.to_json() for spec in outputs],
        "preprocessing": preprocessing_record(checkpoint, use_mask),
        "frames": frames,
        "precision": precision,
        "onnx": onnx_record(onnx_model),
        "pt2": {"file": PT2_FILE, "parity": None},
        "files": {},
        "source": source_record(checkpoint),
        "versions": exporter_versions(),
        "parity": None,
        "plan": None,
        "live": live,
    }


def write_manifest(directory: str | os.PathLike, manifest: dict) -> dict:
    """Hash the artifact's files into ``manifest``, write README and ``manifest.json``.

    ``manifest`` is updated in place (``files``, ``onnx.sha256``) and returned.
    """
    directory = Path(directory)
    files = {name: file_record(directory / name) for name in ARTIFACT_FILES
             if (directory / name).is_file()}
    manifest["files"] = files
    manifest["onnx"]["sha256"] = files[ONNX_FILE]["sha256"]
    (directory / README_FILE).write_text(describe_manifest(manifest) + "\n")
    files[README_FILE] = file_record(directory / README_FILE)
    write_atomically(directory / MANIFEST_FILE, _manifest_text(manifest))
    return manifest


def staging_directory(destination: Path) -> Path:
    """A fresh, empty directory beside ``destination`` to build it in."""
    staging = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _manifest_text(manifest: dict) -> str:
    """Indented JSON with the (up to 3862) class ids on one line."""
    placeholder = '"@classes@"'
    text = json.dumps({**manifest, "classes": placeholder[1:-1]}, indent=2)
    return text.replace(placeholder, json.dumps(manifest["classes"])) + "\n"


def onnx_record(model: onnx.ModelProto) -> dict:
    """The manifest's ``onnx`` entry of a graph (its sha256 is set when written)."""
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    return {"file": ONNX_FILE, "opset": opset, "ir_version": model.ir_version, "sha256": None}


__all__ = ["exporter_versions", "frames_record", "new_manifest", "onnx_record", "preprocessing_record",
           "source_record", "staging_directory", "write_manifest"]
