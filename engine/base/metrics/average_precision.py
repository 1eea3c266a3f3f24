"""Non-interpolated average precision, the core of every YouTube-8M metric.

The formula is G's ``AveragePrecisionCalculator.ap_at_n`` (REFERENCE §8.3)::

    AP = (1 / numpos) * sum over ranks i < min(len, n) where item i is positive of
         (number of positives among ranks 0..i) / (i + 1)

with ``numpos`` the given total number of positives (or the number of positive labels
in the list), capped by ``n``; AP is 0 when ``numpos`` is 0.

Tie rule. G shuffles the list with ``random.seed(0)`` before a stable sort, so its ties
fall in an order that depends on Python's RNG. We do not reproduce that: items are ranked
by descending score and **equal scores keep their input order** (a stable sort). Callers
that want a particular tie order put the items in that order.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def ranking_order(scores: ArrayLike) -> np.ndarray:
    """Indices that rank ``scores`` (shape ``(L,)``) best first; ties keep input order.

    Returns an int64 array of shape ``(L,)``. NaN scores are rejected: they have no place
    in a ranking.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError("scores contain NaN")
    # Negating turns the ascending stable sort into a descending one that keeps the input
    # order among equal scores (sorting descending and reversing would flip ties).
    return np.argsort(-values, kind="stable")


def top_k_ranking(scores: ArrayLike, k: int) -> np.ndarray:
    """Per row, the indices of the ``k`` best scores, best first, by the same tie rule.

    Args:
        scores: shape ``(R, L)``.
        k: how many to keep per row (at most ``L`` are returned).

    Returns:
        int64 array of shape ``(R, min(k, L))``; among equal scores the lower index comes
        first, so the result is exactly ``ranking_order`` of each row cut to ``k``.
    """
    values = np.asarray(scores)
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    if values.ndim != 2:
        raise ValueError(f"scores must be 2-D, got shape {values.shape}")
    if k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    if np.isnan(values).any():
        raise ValueError("scores contain NaN")
    k = min(k, values.shape[1])
    negated = -values
    if k == values.shape[1]:
        return np.argsort(negated, axis=1, kind="stable")
    # argpartition finds a top-k set in O(L) per row but picks arbitrarily among items
    # tied with the k-th best; rows where such a tie crosses the cut are re-done with a
    # full stable sort, which keeps the lower indices.
    candidates = np.argpartition(negated, k - 1, axis=1)[:, :k]
    kth_best = np.take_along_axis(values, candidates, axis=1).min(axis=1, keepdims=True)
    ambiguous = (values >= kth_best).sum(axis=1) > k
    if ambiguous.any():
        candidates[ambiguous] = np.argsort(negated[ambiguous], axis=1, kind="stable")[:, :k]
    # Put each row's candidates in index order so that the stable sort by score below
    # breaks ties by index.
    candidates.sort(axis=1)
    order = np.argsort(np.take_along_axis(negated, candidates, axis=1), axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1)


def ranked_average_precision(relevant: ArrayLike, num_positives: int) -> float:
    """AP of a list that is already in rank order.

    Args:
        relevant: shape ``(L,)``, truthy where the item at that rank is positive.
        num_positives: the denominator N: all positives of the query, including any
            that are not in the list. Must be at least the number of relevant items.

    Returns:
        ``sum_i [relevant_i] * precision@(i+1) / num_positives``; 0.0 when
        ``num_positives`` is 0.
    """
    hit_ranks = np.flatnonzero(np.asarray(relevant, dtype=bool))  # 0-based ranks of hits
    if num_positives < len(hit_ranks):
        raise ValueError(
            f"num_positives={num_positives} is smaller than the {len(hit_ranks)} relevant "
            "items in the list"
        )
    if num_positives == 0:
        return 0.0
    # The j-th hit (1-based) at 0-based rank r contributes a precision of j / (r + 1).
    precisions = np.arange(1, len(hit_ranks) + 1) / (hit_ranks + 1)
    return float(precisions.sum() / num_positives)


def average_precision(
    scores: ArrayLike,
    labels: ArrayLike,
    num_positives: int | None = None,
    n: int | None = None,
) -> float:
    """Non-interpolated AP of scored items, as G's ``ap_at_n`` (tie rule in the module doc).

    Args:
        scores: shape ``(L,)``, higher is better.
        labels: shape ``(L,)``; an item is positive when its label is > 0.
        num_positives: total positives of the query, including those missing from the
            list (GAP passes all positives of the ground truth); defaults to the number of
            positive labels.
        n: consider only the top ``n`` items; also caps ``num_positives`` at ``n`` so a
            perfect top-``n`` scores 1.0. ``None`` means the whole list.

    Returns:
        AP in [0, 1].
    """
    positive = np.asarray(labels) > 0
    if positive.shape != np.shape(scores):
        raise ValueError(
            f"scores and labels differ in shape: {np.shape(scores)} vs {positive.shape}"
        )
    if num_positives is None:
        num_positives = int(positive.sum())
    elif num_positives < 0:
        raise ValueError(f"num_positives must be >= 0, got {num_positives}")
    relevant = positive[ranking_order(scores)]
    if n is not None:
        if n <= 0:
            raise ValueError(f"n must be a positive integer or None, got {n}")
        relevant = relevant[:n]
        num_positives = min(num_positives, n)
    return ranked_average_precision(relevant, num_positives)
