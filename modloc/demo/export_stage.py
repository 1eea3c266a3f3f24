"""The ``export`` stage of ``modloc demo``: the trained models exported, then served by ONNX Runtime.

After the training stages have written a video-level and a segment-level checkpoint,
:func:`run_export_stage`

1. exports both (the distill leaf and the whole ensemble, fp32 and INT8, measured on the
   validate split) under ``<out>/export/{video,segment}/``;
2. scores the test split through ONNX Runtime with the fp32 ensembles (video candidates,
   5-frame windows, fusion; :func:`modloc.export.validation.fused_segment_map`), and again with
   the INT8 ones;
3. checks that the fp32 MAP@K equals PyTorch's (the checkpoints through
   :func:`modloc.training.evaluate.evaluate_segments`, or the values the demo's ``evaluate`` stage
   already has) to 1e-4, and fails the demo otherwise.

It returns the stage's ``report.json`` entry.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from modloc.engine.base.io.tfrecord import Patterns
from modloc.engine.base.metrics import MAX_SEGMENTS_PER_CLASS
from modloc.engine.runtime.artifacts import load_artifact
from modloc.engine.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from modloc.engine.runtime.fusion import FusionConfig
from modloc.export.exporter import ExportSettings, export_checkpoint
from modloc.export.validation import fused_segment_map

MAP_AGREEMENT = 1e-4


def run_export_stage(
    out_dir: str | os.PathLike,
    video_checkpoint: str | os.PathLike,
    segment_checkpoint: str | os.PathLike,
    validation: Patterns,
    test: Patterns,
    truth: Patterns,
    class_ids: Sequence[int] | None = None,
    pytorch: Mapping[str, float] | None = None,
    precisions: tuple[str, ...] = ("fp32", "int8"),
    k: int = MAX_SEGMENTS_PER_CLASS,
) -> dict:
    """Export both checkpoints and score the test split through ONNX Runtime.

    Args:
        out_dir: the demo's output directory; artifacts go to ``<out_dir>/export``.
        video_checkpoint, segment_checkpoint: the trained checkpoints.
        validation: the rated split measuring the variants (and choosing the leaf).
        test, truth: the test split and its ratings.
        class_ids: the classes ranked (submission rows); None: the 1000 segment classes.
        pytorch: PyTorch's MAP@K for the same checkpoints, split, classes and ``k``,
            ``{"fused": ..., "dummy": ...}``, if the demo has it already (its ``evaluate``
            stage); None computes it here with :func:`modloc.training.evaluate.evaluate_segments`.
        precisions: what is exported besides fp32 and scored.
        k: MAP@K's K (and the fusion's segments per class).

    Returns:
        ``{"artifacts": [...], "quality_gates": {variant: {measure: [fp32, value, threshold,
        passed]}}, "failed": [...], "onnxruntime": {precision: {"fused", "dummy"}},
        "pytorch": {"fused", "dummy"}, "max_difference", "seconds"}``; a precision whose
        ensembles failed their quality gate is not scored (``failed`` says why).

    Raises:
        ValueError: ONNX Runtime's fp32 MAP@K differs from PyTorch's by more than 1e-4.
    """
    started = time.perf_counter()
    root = Path(out_dir) / "export"
    settings = ExportSettings(graphs=("distill", "ensemble"), precisions=precisions,
                              validation=validation)
    artifacts = [*export_checkpoint(video_checkpoint, root / "video", settings),
                 *export_checkpoint(segment_checkpoint, root / "segment", settings)]
    failed = [item["failure"] for item in artifacts if not item["published"]]
    published = {(item["kind"], item["graph"], item["precision"]) for item in artifacts if item["published"]}
    fusion = FusionConfig(k=k)
    scores = {}
    for precision in ("fp32", *(p for p in precisions if p != "fp32")):
        if not {("video", "ensemble", precision), ("segment", "ensemble", precision)} <= published:
            continue  # a variant that failed its quality gate is not served
        video = OnnxRuntimeBackend(load_artifact(root / "video" / f"ensemble-{precision}"))
        segment = OnnxRuntimeBackend(load_artifact(root / "segment" / f"ensemble-{precision}"))
        result = fused_segment_map(video, segment, test, truth, class_ids, fusion, progress=True)
        scores[precision] = {name: result[name]["map"] for name in ("fused", "dummy")}
        scores[precision]["seconds"] = result["seconds"]
    reference = dict(pytorch) if pytorch is not None else _pytorch_segments(
        video_checkpoint, segment_checkpoint, test, truth, class_ids, fusion)
    difference = max(abs(scores["fp32"][name] - reference[name]) for name in reference)
    if difference > MAP_AGREEMENT:
        raise ValueError(f"ONNX Runtime's fp32 segment MAP@K {scores['fp32']} differs from "
                         f"PyTorch's {reference} by {difference:.2e} > {MAP_AGREEMENT}")
    return {"artifacts": artifacts, "quality_gates": _gates(artifacts), "failed": failed,
            "onnxruntime": scores, "pytorch": reference, "max_difference": difference,
            "seconds": round(time.perf_counter() - started, 2)}


def _gates(artifacts: list[dict]) -> dict:
    """Each variant's quality-gate values, by ``kind/graph-precision``: ``{metric: [fp32's,
    the variant's, the threshold, passed]}``."""
    return {f"{item['kind']}/{item['graph']}-{item['precision']}": {
        measure["metric"]: [measure["reference_value"], measure["value"], measure["threshold"],
                            measure["passed"]] for measure in item["quality_gate"]["measures"]}
        for item in artifacts if item["quality_gate"] is not None}


def _pytorch_segments(video_checkpoint, segment_checkpoint, test, truth, class_ids,
                      fusion: FusionConfig) -> dict[str, float]:
    from modloc.training.checkpoint import load_checkpoint
    from modloc.training.evaluate import evaluate_segments

    result = evaluate_segments(load_checkpoint(video_checkpoint), load_checkpoint(segment_checkpoint),
                               test, truth, class_ids=class_ids, fusion=fusion)
    return {name: result[name]["map"] for name in ("fused", "dummy")}


__all__ = ["MAP_AGREEMENT", "run_export_stage"]
