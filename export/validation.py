"""Segment MAP@K of exported models, computed from any scorer (ONNX Runtime, TensorRT, PyTorch).

A scorer maps a uint8 batch to probabilities: ``(features (B, M, 1152), num_frames (B,))
→ (B, C)``; a backend's ``run`` is one (:func:`modloc.engine.runtime.pipeline.backend_scorer`).

- :func:`validation_map`: the measure of the precision variants and of the leaf choice.
  Several scorers read the same batches of a rated split (the synthetic ``validate``
  split), and each one's rankings are scored with the Kaggle segment MAP@K against the
  split's own ratings. What a model ranks depends on its kind:

  - a **segment** model ranks every full 5-frame window of every video for each of its
    classes by its own window score (no video model, so the number measures the segment
    model alone);
  - a **video** model gives the dummy prediction: each full window gets its video's score
    for each of the video's top-N classes.

- :func:`fused_segment_map`: the inference pipeline of REFERENCE §7 on a test split with a
  video-level and a segment-level scorer: :func:`modloc.engine.runtime.offline_eval.localize_split`, the
  loop :func:`modloc.training.evaluate.evaluate_segments` runs with PyTorch, so the two MAP@K
  values compare directly.

Videos are capped at 300 frames and a video-level batch is padded to 300 frames, as the
reference's reader does (a tree's gates average over padded frames too).

Pure numpy: the engine's fusion, ranking and metric code, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modloc.engine.base.features import MAX_FRAMES
from modloc.engine.base.io.tfrecord import Patterns, count_records, expand_paths
from modloc.engine.base.metrics import MAX_SEGMENTS_PER_CLASS, SegmentTruth, segment_map
from modloc.engine.base.metrics.segment import SegmentMAPResult, VideoRatings
from modloc.engine.base.progress import Progress
from modloc.engine.base.windows import pack_segment_windows
from modloc.engine.runtime.backends import Backend
from modloc.engine.runtime.fusion import FusionConfig, dummy_pairs, top_candidates
from modloc.engine.runtime.offline_eval import (
    MultiScorer,
    localize_split,
    score_windows,
    video_batches,
)
from modloc.engine.runtime.pipeline import PipelineConfig, ScoringModel
from modloc.engine.runtime.rankings import Rankings


def validation_map(score: MultiScorer, kind: str, class_ids: Sequence[int], patterns: Patterns,
                   **options) -> dict[str, float]:
    """``{name: MAP@K}`` of every output of ``score`` (:func:`validation_results`)."""
    results = validation_results(score, kind, class_ids, patterns, **options)
    return {name: result.map for name, result in results.items()}


def validation_results(
    score: MultiScorer,
    kind: str,
    class_ids: Sequence[int],
    patterns: Patterns,
    k: int = MAX_SEGMENTS_PER_CLASS,
    top_n: int = 20,
    batch_size: int = 32,
    window_batch_size: int = 1024,
    progress: bool | None = False,
) -> dict[str, SegmentMAPResult]:
    """Segment MAP@K of every output of ``score`` on a rated split (module doc), with its
    ceiling and bookkeeping.

    Args:
        score: ``(features, num_frames) → {name: (B, C) probabilities}``.
        kind: ``"video"`` (dummy prediction from the video scores) or ``"segment"``
            (windows ranked by their own scores).
        class_ids: vocabulary ids of the columns.
        patterns: frame-level TFRecords with segment ratings (a validate split).
        k: MAP@K's K; top_n: candidate classes per video (video kind).
        progress: report the progress over the split's videos (False: silent).

    Returns:
        ``{name: SegmentMAPResult}``.
    """
    if kind not in ("video", "segment"):
        raise ValueError(f"kind must be 'video' or 'segment', got {kind!r}")
    ids = np.asarray(class_ids, dtype=np.int64)
    systems: dict[str, Rankings] = {}
    ratings: list[VideoRatings] = []
    with Progress("validation", count_records(expand_paths(patterns)), "video",
                  enabled=progress) as bar:
        for videos, features, num_frames in video_batches(patterns, batch_size):
            ratings.extend(VideoRatings.of(v) for v in videos)
            bar.update(len(videos))
            if kind == "video":
                for name, probabilities in score(features, num_frames).items():
                    rankings = systems.setdefault(name, Rankings(ids, k))
                    candidate_ids, candidate_scores = top_candidates(probabilities, ids, top_n)
                    for row, video in enumerate(videos):
                        rankings.add_pairs(video.id, *dummy_pairs(int(num_frames[row]), candidate_ids[row],
                                                          candidate_scores[row]))
                continue
            packed = pack_segment_windows(videos, max_frames=MAX_FRAMES)
            scores = score_windows(score, packed.features, packed.num_frames, window_batch_size)
            for name, probabilities in scores.items():
                rankings = systems.setdefault(name, Rankings(ids, k))
                for row, video in enumerate(videos):
                    own = packed.windows(row)
                    full = np.flatnonzero(~own.partial)
                    window_scores = probabilities[packed.offsets[row]: packed.offsets[row + 1]]
                    rankings.add_pairs(video.id, np.repeat(own.starts[full], len(ids)), np.tile(ids, len(full)),
                               window_scores[full].ravel())
    if not ratings:
        raise ValueError(f"no video in {patterns}")
    truth = SegmentTruth.from_videos(ratings)
    return {name: segment_map(rankings.rows(), truth, k=k) for name, rankings in systems.items()}


def fused_segment_map(
    video: Backend,
    segment: Backend,
    test: Patterns,
    truth: Patterns,
    class_ids: Sequence[int] | None = None,
    fusion: FusionConfig | None = None,
    batch_size: int = 32,
    window_batch_size: int = 1024,
    progress: bool | None = False,
) -> dict:
    """Segment MAP@K of the fused system and of the dummy prediction on a test split, with
    two loaded backends: :func:`modloc.engine.runtime.offline_eval.localize_split`, the serving
    pipeline, with ``batch_size`` videos per video-model call (``progress``: report it)."""
    config = PipelineConfig(fusion=fusion or FusionConfig(), video_batch_size=batch_size,
                            window_batch_size=window_batch_size)
    return localize_split(ScoringModel.from_backend(video), ScoringModel.from_backend(segment),
                          test, truth, class_ids, config, progress=progress)


__all__ = ["fused_segment_map", "validation_map", "validation_results"]
