"""Video-level × segment-level score fusion into per-class segment rankings (REFERENCE §7).

For every video, given the video model's class scores and the segment model's scores of
its 5-frame windows:

1. **candidates** (:func:`top_candidates`): the video's ``top_n`` classes by video score
   (default 20, as the reference's video-level ``inference.py --top_k=20``);
2. **fusion** (:func:`fuse`, applied to a batch by :class:`modloc.engine.runtime.pipeline.Pipeline`): each
   (window, candidate class) pair gets
   ``P_vid^a · P_seg^b`` (a = 0.05, b = 0.95). A class outside the video's candidates, or
   outside the segment model's classes, gets no pair, and nor does a pair of value 0: the
   reference ranks only values > 0;
3. **full windows only** by default: the reference never ranks a video's zero-padded last
   partial window (``include_partial=True`` ranks it too);
4. **ranking** (:class:`modloc.engine.runtime.topk.TopK`, the native accumulator): per class, the ``k``
   best pairs, best first.

The **dummy prediction** (:func:`dummy_pairs`, REFERENCE §9) needs no segment model: every
full window of a video gets the video's score for each of its candidate classes.

Ties (REFERENCE §7 step 4, "ties keep file order"): among equal values the video added
first comes first, then the earlier window (:mod:`modloc.engine.runtime.topk`). Rankings feed
:func:`modloc.engine.base.metrics.segment_map` and :func:`modloc.engine.base.submission.write_submission` directly.

Pure numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from modloc.engine.base.features import SEGMENT_FRAMES
from modloc.engine.base.metrics.average_precision import top_k_ranking
from modloc.engine.base.metrics.segment import MAX_SEGMENTS_PER_CLASS


@dataclass(frozen=True)
class FusionConfig:
    """The fusion's settings; defaults are the final system's (REFERENCE §7).

    Attributes:
        top_n: candidate classes per video.
        video_exponent: ``a`` in ``P_vid^a · P_seg^b`` (earlier systems: 0.2, 0.1).
        segment_exponent: ``b``.
        include_partial: also rank each video's zero-padded last partial window.
        k: segments kept per class (Kaggle's MAP@K row limit).
    """

    top_n: int = 20
    video_exponent: float = 0.05
    segment_exponent: float = 0.95
    include_partial: bool = False
    k: int = MAX_SEGMENTS_PER_CLASS

    def __post_init__(self):
        if self.top_n < 1 or self.k < 1:
            raise ValueError(f"top_n and k must be >= 1, got {self.top_n}, {self.k}")
        for name, value in (("video", self.video_exponent), ("segment", self.segment_exponent)):
            # not (value >= 0) also refuses NaN, which would fuse every score to NaN
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"the {name} exponent must be a finite number >= 0, got {value}")


def top_candidates(
    video_scores: ArrayLike, class_ids: ArrayLike, top_n: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Each video's ``top_n`` classes by score.

    Args:
        video_scores: ``(V, C)`` probabilities; column ``j`` scores class ``class_ids[j]``.
        class_ids: ``(C,)`` vocabulary ids.
        top_n: candidates per video (all ``C`` if fewer).

    Returns:
        ``(V, n)`` int64 vocabulary ids and ``(V, n)`` their scores, best first; among equal
        scores the lower column comes first.
    """
    scores = np.asarray(video_scores)
    ids = np.asarray(class_ids, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[1] != len(ids):
        raise ValueError(f"video_scores must be (V, {len(ids)}), got {scores.shape}")
    if len(scores) == 0:
        return np.zeros((0, min(top_n, len(ids))), np.int64), scores[:, : min(top_n, len(ids))]
    top = top_k_ranking(scores, top_n)
    return ids[top], np.take_along_axis(scores, top, axis=1)


def fuse(video_scores: ArrayLike, segment_scores: ArrayLike, video_exponent: float = 0.05,
         segment_exponent: float = 0.95) -> np.ndarray:
    """``P_vid^a · P_seg^b`` in float64: ``(n,)`` (or per window ``(S, n)``) video scores ×
    ``(S, n)`` segment scores → ``(S, n)``."""
    video = np.asarray(video_scores, dtype=np.float64)
    segment = np.asarray(segment_scores, dtype=np.float64)
    return video ** video_exponent * segment ** segment_exponent


def dummy_pairs(
    num_frames: int,
    candidate_ids: ArrayLike,
    candidate_scores: ArrayLike,
    include_partial: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dummy prediction of one video: each window gets the video's candidate scores.

    Windows start at 0, 5, 10, ...: the ``num_frames // 5`` full ones (plus the partial
    last one with ``include_partial``). Returns starts, class ids and values as
    :meth:`modloc.engine.runtime.pipeline.VideoLocalization.ranking_pairs` does.
    """
    end = num_frames if include_partial else num_frames - num_frames % SEGMENT_FRAMES
    window_starts = np.arange(0, end, SEGMENT_FRAMES, dtype=np.int64)
    ids = np.asarray(candidate_ids, dtype=np.int64)
    scores = np.asarray(candidate_scores, dtype=np.float64)
    return np.repeat(window_starts, len(ids)), np.tile(ids, len(window_starts)), np.tile(scores, len(window_starts))


__all__ = ["FusionConfig", "dummy_pairs", "fuse", "top_candidates"]
