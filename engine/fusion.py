"""Video-level × segment-level score fusion into per-class segment rankings (REFERENCE §7).

For every video, given the video model's class scores and the segment model's scores of
its 5-frame windows:

1. **candidates** (:func:`top_candidates`): the video's ``top_n`` classes by video score
   (default 20, as the reference's video-level ``inference.py --top_k=20``);
2. **fusion** (:func:`fused_pairs`): each (window, candidate class) pair gets
   ``P_vid^a · P_seg^b`` (a = 0.05, b = 0.95). A class outside the video's candidates, or
   outside the segment model's classes, gets no pair, and nor does a pair of value 0: the
   reference ranks only values > 0;
3. **full windows only** by default: the reference never ranks a video's zero-padded last
   partial window (``include_partial=True`` ranks it too);
4. **ranking** (:class:`SegmentRanker`): per class, the ``k`` best pairs, best first.

The **dummy prediction** (:func:`dummy_pairs`, REFERENCE §9) needs no segment model: every
full window of a video gets the video's score for each of its candidate classes.

Ties (REFERENCE §7 step 4, "ties keep file order"): among equal values the video added
first comes first, then the earlier window. Rankings feed
:func:`engine.metrics.segment_map` and :func:`engine.submission.write_submission` directly.

Pure numpy, so the serving engine reuses it as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from engine.datasets import ClassSpace
from engine.features import SEGMENT_FRAMES
from engine.metrics.average_precision import top_k_ranking
from engine.metrics.segment import MAX_SEGMENTS_PER_CLASS, segment_id


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
        if self.video_exponent < 0 or self.segment_exponent < 0:
            raise ValueError("the exponents must be >= 0")


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
    """``P_vid^a · P_seg^b``: ``(n,)`` video scores × ``(S, n)`` segment scores → ``(S, n)`` float64."""
    video = np.asarray(video_scores, dtype=np.float64)
    segment = np.asarray(segment_scores, dtype=np.float64)
    return video[np.newaxis, :] ** video_exponent * segment ** segment_exponent


def fused_pairs(
    starts: ArrayLike,
    partial: ArrayLike,
    candidate_ids: ArrayLike,
    candidate_scores: ArrayLike,
    segment_scores: ArrayLike,
    segment_classes: ClassSpace,
    config: FusionConfig = FusionConfig(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One video's (window, class, fused value) pairs.

    Args:
        starts: ``(S,)`` first frame of each window.
        partial: ``(S,)`` bool, True for a window with fewer than 5 valid frames.
        candidate_ids: ``(n,)`` the video's candidate classes (vocabulary ids).
        candidate_scores: ``(n,)`` their video-level scores.
        segment_scores: ``(S, C)`` segment-model probabilities; column ``j`` scores
            ``segment_classes.class_ids[j]``.
        segment_classes: the segment model's class space.
        config: exponents and the partial-window rule.

    Returns:
        ``(m,)`` window starts, ``(m,)`` class ids and ``(m,)`` values, window-major; only
        candidates the segment model scores, only full windows unless
        ``config.include_partial``.
    """
    starts = np.asarray(starts, dtype=np.int64)
    segment_scores = np.asarray(segment_scores)
    if segment_scores.shape != (len(starts), segment_classes.num_classes):
        raise ValueError(f"segment_scores must be ({len(starts)}, {segment_classes.num_classes}), "
                         f"got {segment_scores.shape}")
    ids = np.asarray(candidate_ids, dtype=np.int64)
    columns = segment_classes.positions(ids)
    scored = columns >= 0
    rows = np.arange(len(starts)) if config.include_partial else np.flatnonzero(~np.asarray(partial))
    values = fuse(np.asarray(candidate_scores)[scored], segment_scores[np.ix_(rows, columns[scored])],
                  config.video_exponent, config.segment_exponent)
    return (np.repeat(starts[rows], int(scored.sum())), np.tile(ids[scored], len(rows)),
            values.ravel())


def dummy_pairs(
    num_frames: int,
    candidate_ids: ArrayLike,
    candidate_scores: ArrayLike,
    include_partial: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dummy prediction of one video: each window gets the video's candidate scores.

    Windows start at 0, 5, 10, ...: the ``num_frames // 5`` full ones (plus the partial
    last one with ``include_partial``). Returns starts, class ids and values as
    :func:`fused_pairs` does.
    """
    end = num_frames if include_partial else num_frames - num_frames % SEGMENT_FRAMES
    window_starts = np.arange(0, end, SEGMENT_FRAMES, dtype=np.int64)
    ids = np.asarray(candidate_ids, dtype=np.int64)
    scores = np.asarray(candidate_scores, dtype=np.float64)
    return np.repeat(window_starts, len(ids)), np.tile(ids, len(window_starts)), np.tile(scores, len(window_starts))


class SegmentRanker:
    """Per class, the ``k`` best segments among the pairs added, video by video.

    Memory stays bounded: pending pairs are merged into the per-class top-``k`` whenever
    they outnumber the pairs kept (and at least ``compact_every`` are pending), so the
    ranker holds at most about twice the final rankings plus one batch.
    """

    def __init__(self, class_ids: Sequence[int] | np.ndarray, k: int = MAX_SEGMENTS_PER_CLASS,
                 compact_every: int = 1 << 22):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.class_space = ClassSpace(class_ids)
        self.k = k
        self.compact_every = compact_every
        self._video_ids: list[str] = []
        self._video_index: dict[str, int] = {}
        # parallel columns: class position, video index, window start, value
        self._kept = _empty_pairs()
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._pending_size = 0

    def add(self, video_id: str, starts: ArrayLike, class_ids: ArrayLike, values: ArrayLike) -> None:
        """Add one video's pairs: ``(m,)`` window starts, class ids and values.

        Pairs of classes outside the ranker's, or with a value <= 0, are left out. A video
        may be added in several calls; its tie rank is that of its first call.
        """
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        classes = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if not len(starts) == len(classes) == len(values):
            raise ValueError(f"starts ({len(starts)}), class_ids ({len(classes)}) and values "
                             f"({len(values)}) differ in length")
        if np.isnan(values).any():
            raise ValueError(f"video {video_id!r}: a value is NaN")
        video = self._video_index.setdefault(video_id, len(self._video_ids))
        if video == len(self._video_ids):
            self._video_ids.append(video_id)
        positions = self.class_space.positions(classes)
        keep = (positions >= 0) & (values > 0)
        if not keep.any():
            return
        count = int(keep.sum())
        self._pending.append((positions[keep], np.full(count, video, np.int64), starts[keep],
                              values[keep]))
        self._pending_size += count
        if self._pending_size >= max(self.compact_every, len(self._kept[0])):
            self._compact()

    def rankings(self) -> dict[int, list[str]]:
        """Class id → up to ``k`` segment ids, best first, for every class of the ranker."""
        self._compact()
        positions, videos, starts, _ = self._kept
        bounds = np.searchsorted(positions, np.arange(self.class_space.num_classes + 1))
        rows: dict[int, list[str]] = {}
        for position, class_id in enumerate(self.class_space.class_ids.tolist()):
            members = slice(bounds[position], bounds[position + 1])
            rows[class_id] = [segment_id(self._video_ids[v], s)
                              for v, s in zip(videos[members].tolist(), starts[members].tolist(), strict=True)]
        return rows

    def _compact(self) -> None:
        """Merge the pending pairs into the kept ones, keeping each class's ``k`` best."""
        if not self._pending:
            return
        columns = [np.concatenate([kept, *(pairs[i] for pairs in self._pending)])
                   for i, kept in enumerate(self._kept)]
        self._pending, self._pending_size = [], 0
        positions, videos, starts, values = columns
        # by class, then value descending, then video, then start (the tie rule)
        order = np.lexsort((starts, videos, -values, positions))
        positions = positions[order]
        rank = np.arange(len(order)) - np.searchsorted(positions, positions, side="left")
        keep = order[rank < self.k]
        self._kept = tuple(column[keep] for column in columns)


def _empty_pairs() -> tuple[np.ndarray, ...]:
    return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))


__all__ = ["FusionConfig", "SegmentRanker", "dummy_pairs", "fuse", "fused_pairs", "top_candidates"]
