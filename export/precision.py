"""Precision variants of an fp32 graph, and how they are run and measured.

- fp16 / bf16: exported from PyTorch with the folded weights in that type
  (:func:`modloc.export.graph.export_module`); the graph keeps the L2 normalizations, softmaxes
  and long reductions in float32, so a strongly typed TensorRT build needs no flags.
- INT8 (:func:`quantize_int8`): static QDQ quantization of the fp32 graph with ONNX
  Runtime (``quantize_static``): the weight layers (MatMul and Gemm on an initializer,
  :func:`quantized_layers`) get per-channel symmetric int8 weights and per-tensor
  symmetric int8 activations (zero point 0, as TensorRT's explicit quantization
  requires), calibrated by MinMax over batches read from TFRecords
  (:func:`calibration_batches`): padded videos for a video model, the 5-frame windows of
  the videos for a segment model, i.e. what each model sees when it serves.
  Activation × activation products (the VLAD aggregation) stay float, and so do the
  classifiers: their outputs are the logits that rank segments across videos, the layer
  most sensitive to quantization (on the demo's video model, segment MAP@K -0.008 with it
  in int8, +0.001 without; percentile calibration instead fixed the leaf and broke the
  ensemble).

Every variant is measured against fp32 on the rated validation split and must pass the
quality gate of :mod:`modloc.export.gate` (agreement of the probabilities, MAP@K with every
class a candidate), or it is not published.

Runners: ONNX Runtime's CPU provider runs fp32, fp16 and INT8 graphs; it has no bf16
kernels, so a bf16 graph is measured with ONNX's reference evaluator
(:class:`ReferenceRunner`: slow, exact to the graph), recorded as such in the manifest.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from modloc.engine.base.features import MAX_FRAMES
from modloc.engine.base.io.tfrecord import Patterns
from modloc.engine.base.windows import pack_segment_windows
from modloc.engine.runtime.artifacts import ONNX_DATA_FILE, Artifact
from modloc.engine.runtime.backends import Backend, graph_inputs
from modloc.engine.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from modloc.engine.runtime.offline_eval import video_batches
from modloc.export.gate import FLOAT_LAYERS, WEIGHT_LAYERS

QUANTIZED_OPS = ("MatMul", "Gemm")


class ReferenceRunner(Backend):
    """An artifact run by ``onnx.reference.ReferenceEvaluator`` (numpy; any type, bf16 too).

    For measuring graphs no installed runtime executes on this machine; not for serving.
    """

    name = "onnx-reference"

    def __init__(self, artifact: Artifact):
        from onnx.reference import ReferenceEvaluator

        super().__init__(artifact)
        self.evaluator = ReferenceEvaluator(str(artifact.onnx_path))

    def run(self, features: np.ndarray, mask: np.ndarray | None = None,
            num_frames: np.ndarray | None = None) -> np.ndarray:
        inputs = graph_inputs(self.artifact, features, mask, num_frames)
        # exp overflows to inf in the sigmoids of very negative values: 1 / (1 + inf) = 0 is
        # the right answer, and numpy's warning about it is noise
        with np.errstate(over="ignore"):
            return np.asarray(self.evaluator.run(["probabilities"], inputs)[0], np.float32)

    def close(self) -> None:
        self.evaluator = None


def open_runner(artifact: Artifact, threads: int | None = None) -> Backend:
    """The runner that measures ``artifact`` here: ONNX Runtime (CPU), or the reference
    evaluator for bf16."""
    if artifact.precision == "bf16":
        return ReferenceRunner(artifact)
    return OnnxRuntimeBackend(artifact, threads=threads)


def calibration_batches(patterns: Patterns, kind: str, batch_size: int = 16,
                        max_batches: int = 8) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Up to ``max_batches`` ``(features, num_frames)`` batches of what the model serves.

    A video model gets videos capped and padded to 300 frames; a segment model the
    non-overlapping 5-frame windows of the videos (partial last windows included).
    """
    produced = 0
    for videos, features, num_frames in video_batches(patterns, batch_size):
        if kind == "video":
            batches: Iterable[tuple[np.ndarray, np.ndarray]] = [(features, num_frames)]
        else:
            packed = pack_segment_windows(videos, max_frames=MAX_FRAMES)
            batches = ((packed.features[i:i + batch_size], packed.num_frames[i:i + batch_size])
                       for i in range(0, len(packed), batch_size))
        for batch in batches:
            yield batch
            produced += 1
            if produced == max_batches:
                return


class _Feeds(CalibrationDataReader):
    """ONNX Runtime's calibration interface over a list of input feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def quantized_layers(model: onnx.ModelProto, float_layers: Iterable[str] = ()) -> list[str]:
    """Names of the nodes INT8 quantizes: MatMul/Gemm nodes whose second operand is a weight
    (an initializer), except the classifiers and ``float_layers`` (of :data:`WEIGHT_LAYERS`;
    weights are named ``…<layer>.weight`` after :class:`modloc.export.graph.FoldedLeaf`'s
    layers)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    kept = tuple(f"{layer}.weight" for layer in (*FLOAT_LAYERS, *float_layers))
    return [node.name for node in model.graph.node
            if node.op_type in QUANTIZED_OPS and len(node.input) > 1
            and node.input[1] in initializers and not node.input[1].endswith(kept)]


def quantize_int8(fp32: Artifact, output: str | os.PathLike,
                  batches: Iterable[tuple[np.ndarray, np.ndarray]],
                  float_layers: tuple[str, ...] = ()) -> dict:
    """Write the INT8 QDQ graph of the fp32 artifact ``fp32`` to ``output``.

    Args:
        fp32: the verified fp32 artifact.
        output: the ONNX file to write.
        batches: calibration ``(features, num_frames)`` batches (:func:`calibration_batches`).
        float_layers: layers kept in float besides the classifiers (:func:`quantized_layers`).

    Returns:
        How it was quantized, for the manifest.
    """
    feeds = [graph_inputs(fp32, features, num_frames=num_frames) for features, num_frames in batches]
    if not feeds:
        raise ValueError("no calibration batch: the calibration files hold no video")
    unknown = set(float_layers) - set(WEIGHT_LAYERS)
    if unknown:
        raise ValueError(f"unknown layer(s) {sorted(unknown)} to keep in float; the weight layers "
                         f"are {', '.join(WEIGHT_LAYERS)}")
    layers = quantized_layers(onnx.load(fp32.onnx_path, load_external_data=False), float_layers)
    with _without_preprocessing_advice():
        quantize_static(
            fp32.onnx_path, output, _Feeds(feeds), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=layers, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=(fp32.path / ONNX_DATA_FILE).exists(),
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    onnx.checker.check_model(str(output), full_check=True)
    return {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "weights": "int8, per channel, symmetric", "activations": "int8, per tensor, symmetric",
            "calibration": "MinMax", "calibration_batches": len(feeds),
            "calibration_examples": int(sum(len(feed["mask"]) for feed in feeds)),
            "quantized_layers": len(layers),
            "float_layers": ", ".join((*FLOAT_LAYERS, *float_layers)) + ", VLAD aggregation"}


@contextlib.contextmanager
def _without_preprocessing_advice():
    """quantize_static logs (to the root logger) advice to run its shape-inference and
    optimization pre-pass first; the exporter's graphs come out of both already (the pass
    leaves them unchanged), so the advice is dropped."""
    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


__all__ = ["ReferenceRunner", "calibration_batches", "open_runner", "quantize_int8", "quantized_layers"]
