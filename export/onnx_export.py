"""PyTorch → ONNX: export an :class:`modloc.export.graph.ExportGraph`, check it, gate it on parity.

- :func:`export_program`: the graph captured once by ``torch.export`` with dynamic batch
  and frame axes (``torch.export.Dim``); the exporter saves this program as ``model.pt2``
  (the torch backend's file) and translates the same program to ONNX, so both files hold
  one computation.
- :func:`export_onnx`: the program translated to ONNX (opset 18 by default; 17 for
  TensorRT 8.6, by :func:`downgrade_to_opset_17`), checked with ``onnx.checker`` (full
  check, shape inference included) and saved, with its weights in ``model.onnx.data`` when
  they pass the 2 GB protobuf limit.
- :func:`check_parity`: a runner (ONNX Runtime) against PyTorch on several ``(B, M)``
  shapes, 1-frame inputs and partly masked rows included, with random bytes in the padded
  frames (they must not matter). The fp32 graph must reach a max relative error of the
  probabilities ≤ 1e-4 (:class:`ParityError` otherwise).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from modloc.engine.base.features import AUDIO_SIZE, FEATURE_SIZE, RGB_SIZE
from modloc.engine.runtime.artifacts import ONNX_DATA_FILE, TensorSpec
from modloc.export.graph import ExportGraph

DEFAULT_OPSET = 18
# TensorRT 8.6 (the last release for Pascal GPUs) parses ONNX up to opset 17
TENSORRT_8_OPSET = 17
SUPPORTED_OPSETS = (TENSORRT_8_OPSET, DEFAULT_OPSET)
# protobuf refuses messages over 2 GiB; leave room for the graph itself
_EXTERNAL_DATA_THRESHOLD = 1 << 30

PARITY_TOLERANCE = 1e-4
PARITY_SHAPES = ((1, 1), (2, 5), (3, 17), (4, 40))

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


class ParityError(ValueError):
    """An exported graph whose outputs differ from PyTorch's beyond the tolerance."""


def io_specs(graph: ExportGraph, num_classes: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs as the manifest records them."""
    streams = {"features": FEATURE_SIZE, "rgb": RGB_SIZE, "audio": AUDIO_SIZE}
    inputs = [TensorSpec(name, "uint8", ("batch", "frames", streams[name]))
              for name in graph.input_names if name != "mask"]
    inputs.append(TensorSpec("mask", "float32", ("batch", "frames")))
    outputs = [TensorSpec(name, "float32", ("batch", num_classes)) for name in graph.output_names]
    return inputs, outputs


def _dynamic_shapes(graph: nn.Module) -> tuple[dict[int, torch.export.Dim], ...]:
    """Each input's dynamic axes (``graph.dynamic_axes``: input → {axis: name}), one
    ``torch.export.Dim`` (any size ≥ 1) per name, shared by the inputs that name it."""
    dims: dict[str, torch.export.Dim] = {}
    return tuple({axis: dims.setdefault(name, torch.export.Dim(name, min=1))
                  for axis, name in graph.dynamic_axes[input_name].items()}
                 for input_name in graph.input_names)


def export_program(graph: nn.Module) -> torch.export.ExportedProgram:
    """``graph`` captured by ``torch.export`` (non-strict) from its ``example_inputs()``,
    its ``dynamic_axes`` dynamic (an :class:`ExportGraph`: batch and frames, ≥ 1; the live
    graphs of :mod:`modloc.export.live` too).

    The program's inputs carry the graph's input names; its outputs are the graph's
    ``output_names`` by position.
    """
    with torch.no_grad():
        return torch.export.export(graph, graph.example_inputs(),
                                   dynamic_shapes=_dynamic_shapes(graph), strict=False)


def export_onnx(graph: nn.Module, program: torch.export.ExportedProgram, path: str | os.PathLike,
                opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None,
                data_file: str = ONNX_DATA_FILE) -> onnx.ModelProto:
    """Translate ``program`` to ONNX at ``path`` (plus ``data_file`` beside it for
    > 1 GiB of weights).

    Args:
        graph: the module ``program`` was captured from (its input and output names, its
            ``description``).
        program: :func:`export_program` of ``graph``.
        path: the ONNX file to write.
        opset: 18, or 17 for TensorRT 8.6.
        metadata: ``metadata_props`` of the model (the graph describes itself too).
        data_file: the name of the external weights file, when there is one.

    Returns:
        The model as written, without its external weights.
    """
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset {opset} is not supported; choose one of {SUPPORTED_OPSETS}")
    path = Path(path)
    with torch.no_grad(), _quiet_exporter():
        # the translator ignores dynamic_shapes for a captured program except to name the
        # dynamic axes: without them the ONNX axes would be torch's symbols (s31, s64)
        onnx_program = torch.onnx.export(
            program, dynamo=True, dynamic_shapes=_dynamic_shapes(graph), opset_version=DEFAULT_OPSET,
            verbose=False, input_names=list(graph.input_names),
            output_names=list(graph.output_names))
    model = onnx_program.model_proto
    if opset == TENSORRT_8_OPSET:
        model = downgrade_to_opset_17(model)
    model.producer_name = "modloc"
    model.doc_string = graph.description
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    external = sum(t.ByteSize() for t in model.graph.initializer) > _EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path, save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_file, size_threshold=0)
    # by path, so that a model with external data is checked whole
    onnx.checker.check_model(str(path), full_check=True)
    return onnx.load(path, load_external_data=False)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its progress, warns that optional packages (torchvision) are
    missing and logs every optimizer pass at INFO; none of it is news to the user of a
    finished export. Errors still show."""
    quieter = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING, "torch.onnx": logging.ERROR}
    loggers = [logging.getLogger(name) for name in quieter]
    levels = [logger.level for logger in loggers]
    try:
        for logger, level in zip(loggers, quieter.values(), strict=True):
            logger.setLevel(level)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def downgrade_to_opset_17(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` at opset 17, for TensorRT 8.6.

    Between 17 and 18 only the reductions' signature changed in what these graphs use
    (``axes`` moved from an attribute to an input); the node is rewritten back. Any other
    operator whose definition changed at 18 is refused by name. (``onnx.version_converter``
    leaves ``noop_with_empty_axes`` on the rewritten nodes, which opset 17 rejects.)
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    constants = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    for node in model.graph.node:
        schema = onnx.defs.get_schema(node.op_type, DEFAULT_OPSET, node.domain)
        if schema.since_version <= TENSORRT_8_OPSET:
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if not node.op_type.startswith("Reduce") or attributes.get("noop_with_empty_axes", 0):
            raise ValueError(f"cannot express {node.op_type} (node {node.name}) at opset 17")
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in constants:
                raise ValueError(f"{node.op_type} node {node.name} has computed axes")
            axes = [int(axis) for axis in constants[node.input[1]].reshape(-1)]
            del node.input[1]
            node.attribute.append(onnx.helper.make_attribute("axes", axes))
        kept = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
        del node.attribute[:]
        node.attribute.extend(kept)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = TENSORRT_8_OPSET
    # initializers that only held axes are now unused
    used = {name for node in model.graph.node for name in node.input}
    kept_initializers = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_initializers)
    return model


def parity_batches(shapes: Sequence[tuple[int, int]] = PARITY_SHAPES,
                   seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(features, num_frames)`` batches of each ``(B, M)``: random bytes everywhere, the
    first row whole and the others cut at a random length (1-frame rows included)."""
    rng = np.random.default_rng(seed)
    batches = []
    for batch, frames in shapes:
        features = rng.integers(0, 256, (batch, frames, FEATURE_SIZE), dtype=np.uint8)
        num_frames = rng.integers(1, frames + 1, batch).astype(np.int32)
        num_frames[0] = frames
        if batch > 1:
            num_frames[-1] = 1
        batches.append((features, num_frames))
    return batches


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |actual - expected| / |expected|`` (the denominator floored at float32's tiny)."""
    expected = np.asarray(expected, np.float64)
    error = np.abs(np.asarray(actual, np.float64) - expected)
    return float((error / np.maximum(np.abs(expected), np.finfo(np.float32).tiny)).max())


def check_parity(run: Scorer, reference: Scorer, shapes: Sequence[tuple[int, int]] = PARITY_SHAPES,
                 tolerance: float | None = PARITY_TOLERANCE, seed: int = 0) -> dict:
    """Compare ``run`` with ``reference`` (both ``(features, num_frames) → probabilities``).

    Args:
        run: the exported graph's runner.
        reference: PyTorch's probabilities for the same batches.
        shapes: the ``(B, M)`` batches (see :func:`parity_batches`).
        tolerance: the max relative error allowed; None only measures (reduced precision).

    Returns:
        ``{"shapes": [{"batch", "frames", "num_frames", "max_rel_error", "max_abs_error"}],
        "max_rel_error", "max_abs_error", "tolerance", "passed"}``.

    Raises:
        ParityError: the error exceeds ``tolerance``, naming the worst shape.
    """
    rows = []
    for features, num_frames in parity_batches(shapes, seed):
        actual, expected = run(features, num_frames), reference(features, num_frames)
        if actual.shape != expected.shape:
            raise ParityError(f"output shape {actual.shape} differs from PyTorch's {expected.shape}")
        rows.append({"batch": int(features.shape[0]), "frames": int(features.shape[1]),
                     "num_frames": num_frames.tolist(),
                     "max_rel_error": max_relative_error(actual, expected),
                     "max_abs_error": float(np.abs(actual.astype(np.float64) - expected).max())})
    worst = max(rows, key=lambda row: row["max_rel_error"])
    result = {"reference": "pytorch", "output": "probabilities", "shapes": rows,
              "max_rel_error": worst["max_rel_error"],
              "max_abs_error": max(row["max_abs_error"] for row in rows),
              "tolerance": tolerance,
              "passed": tolerance is None or worst["max_rel_error"] <= tolerance}
    if not result["passed"]:
        raise ParityError(f"parity with PyTorch failed: max relative error of the probabilities "
                          f"{worst['max_rel_error']:.3g} > {tolerance:g} at batch {worst['batch']}, "
                          f"frames {worst['frames']} (num_frames {worst['num_frames']})")
    return result


__all__ = ["DEFAULT_OPSET", "PARITY_SHAPES", "PARITY_TOLERANCE",
           "SUPPORTED_OPSETS", "TENSORRT_8_OPSET", "ParityError", "check_parity",
           "downgrade_to_opset_17", "export_onnx", "export_program", "io_specs", "max_relative_error",
           "parity_batches"]
