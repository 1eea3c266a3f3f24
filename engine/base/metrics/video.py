"""Video-level metrics of G's ``eval_util.py`` (REFERENCE §8.4): hit@1, PERR, GAP, MAP.

Inputs are ``predictions`` of shape ``(B, C)`` (scores, higher is better) and ``labels``
of shape ``(B, C)`` (1 where the video has the class, else 0). Where G uses ``argmax`` or
``argpartition``, ties among equal scores go to the lower class index here, and pooled
lists keep video order then rank order: the tie rule of
``modloc.engine.base.metrics.average_precision``.

In segment mode (one row per rated segment) G first multiplies predictions by the label
weights; that is the caller's step, not done here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from modloc.engine.base.metrics.average_precision import average_precision, top_k_ranking


def hit_at_one(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of videos whose best-scored class is one of their labels: G's
    ``actual[argmax(pred)]``, with no condition on the score (unlike PERR), so an all-zero
    row counts a hit when class 0 is among its labels."""
    scores, positive = _check_batch(predictions, labels)
    best = scores.argmax(axis=1)  # the first maximum: the lowest class index among ties
    return float(positive[np.arange(len(best)), best].mean())


def precision_at_equal_recall_rate(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Mean over videos of the precision of its top-``m`` classes, ``m`` = its label count.

    As G, a class only counts as a hit if its score is > 0, and a video without labels
    scores 0.
    """
    scores, positive = _check_batch(predictions, labels)
    return float(_precision_at_equal_recall_rates(scores, positive).mean())


def gap(predictions: ArrayLike, labels: ArrayLike, top_k: int = 20) -> float:
    """Global average precision over each video's ``top_k`` predictions (GAP@top_k).

    The (score, label) pairs of every video's ``top_k`` classes are pooled into one ranked
    list; its AP takes as ``N`` all positives in ``labels``, including those outside any
    top-k, so missing a label costs recall.
    """
    scores, positive = _check_batch(predictions, labels)
    top = top_k_ranking(scores, top_k)
    return average_precision(
        np.take_along_axis(scores, top, axis=1).ravel(),
        np.take_along_axis(positive, top, axis=1).ravel(),
        num_positives=int(positive.sum()),
    )


@dataclass(frozen=True)
class VideoMetricsResult:
    """Metrics over every accumulated video (G ``EvaluationMetrics.get``, without loss)."""

    num_videos: int
    hit_at_one: float
    perr: float
    gap: float
    map: float  # mean of class_ap over classes with >= 1 positive; NaN if there is none
    class_ap: np.ndarray  # (C,) float64: AP over the class's top-k pool; NaN with no positive
    num_positives: np.ndarray  # (C,) int64: positives of each class in the labels


class VideoMetrics:
    """Accumulates video-level metrics batch by batch, as G's ``EvaluationMetrics``.

    Memory is bounded by ``top_k`` per video: only each video's top-k (class, score,
    label) triplets are kept, plus per-class positive counts, never a full ``(B, C)``
    matrix.
    """

    def __init__(self, num_classes: int, top_k: int = 20) -> None:
        if num_classes <= 0 or top_k <= 0:
            raise ValueError(f"num_classes and top_k must be positive, got {num_classes}, {top_k}")
        self.num_classes = num_classes
        self.top_k = top_k
        self.clear()

    def clear(self) -> None:
        """Forget everything accumulated."""
        self._num_videos = 0
        self._sum_hit_at_one = 0.0
        self._sum_perr = 0.0
        self._num_positives = np.zeros(self.num_classes, dtype=np.int64)
        self._top_classes: list[np.ndarray] = []  # each (B, k) int32
        self._top_scores: list[np.ndarray] = []  # each (B, k) float
        self._top_labels: list[np.ndarray] = []  # each (B, k) bool

    def accumulate(self, predictions: ArrayLike, labels: ArrayLike) -> None:
        """Add a batch: ``predictions`` (B, C) float scores, ``labels`` (B, C) 0/1."""
        scores, positive = _check_batch(predictions, labels)
        if scores.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} classes, got {scores.shape[1]}")
        batch_size = len(scores)
        self._num_videos += batch_size
        self._sum_hit_at_one += hit_at_one(scores, positive) * batch_size
        self._sum_perr += float(_precision_at_equal_recall_rates(scores, positive).sum())
        self._num_positives += positive.sum(axis=0)
        top = top_k_ranking(scores, self.top_k)
        self._top_classes.append(top.astype(np.int32))
        self._top_scores.append(np.take_along_axis(scores, top, axis=1))
        self._top_labels.append(np.take_along_axis(positive, top, axis=1))

    def get(self) -> VideoMetricsResult:
        """The metrics over all accumulated videos.

        Raises:
            ValueError: if nothing was accumulated.
        """
        if self._num_videos == 0:
            raise ValueError("no videos accumulated")
        # Pool order is video order, then rank within the video: it decides ties.
        classes = np.concatenate(self._top_classes).ravel()
        scores = np.concatenate(self._top_scores).ravel()
        positive = np.concatenate(self._top_labels).ravel()

        by_class = np.argsort(classes, kind="stable")  # keeps pool order within a class
        class_starts = np.searchsorted(classes[by_class], np.arange(self.num_classes + 1))
        class_ap = np.full(self.num_classes, np.nan)
        for class_id in np.flatnonzero(self._num_positives):
            members = by_class[class_starts[class_id] : class_starts[class_id + 1]]
            class_ap[class_id] = average_precision(
                scores[members],
                positive[members],
                num_positives=int(self._num_positives[class_id]),
            )
        scored_aps = class_ap[self._num_positives > 0]
        return VideoMetricsResult(
            num_videos=self._num_videos,
            hit_at_one=self._sum_hit_at_one / self._num_videos,
            perr=self._sum_perr / self._num_videos,
            gap=average_precision(scores, positive, num_positives=int(self._num_positives.sum())),
            map=math.fsum(scored_aps) / len(scored_aps) if len(scored_aps) else math.nan,
            class_ap=class_ap,
            num_positives=self._num_positives.copy(),
        )


def _check_batch(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``predictions`` as a float (B, C) array and ``labels`` as a bool (B, C) array."""
    scores = np.asarray(predictions)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    positive = np.asarray(labels) > 0
    if scores.ndim != 2 or scores.shape != positive.shape:
        raise ValueError(
            f"predictions and labels must both be (B, C); got {scores.shape} and {positive.shape}"
        )
    if scores.shape[0] == 0:
        raise ValueError("empty batch")
    if np.isnan(scores).any():
        raise ValueError("predictions contain NaN")
    return scores, positive


def _precision_at_equal_recall_rates(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per video (shape ``(B,)``): hits with score > 0 among its top-m classes, over m."""
    label_counts = positive.sum(axis=1)
    most_labels = int(label_counts.max())
    if most_labels == 0:
        return np.zeros(len(scores))
    top = top_k_ranking(scores, most_labels)
    hits = np.take_along_axis(positive & (scores > 0), top, axis=1)
    # hits_within[v, j]: hits among video v's best j classes (j = 0..most_labels).
    hits_within = np.concatenate(
        [np.zeros((len(scores), 1), dtype=np.int64), hits.cumsum(axis=1)], axis=1
    )
    row_hits = hits_within[np.arange(len(scores)), label_counts]
    return np.divide(row_hits, label_counts, out=np.zeros(len(scores)), where=label_counts > 0)
