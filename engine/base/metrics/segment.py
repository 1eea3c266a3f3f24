"""Segment MAP@K, the Kaggle 2019 YouTube-8M metric (REFERENCE §8.1).

A submission ranks, for each of the segment classes, segment ids ``"<video id>:<start>"``
best first. For each class ``c`` the score is::

    AP_c = (1 / N_c) * sum over ranks k of P(k) * rel(k)

over the class's list after these steps, in this order:

1. **truncate** the submitted list to its first ``K`` entries (a Kaggle row holds at most
   K = 100,000 segments, so anything past K was never part of a valid submission);
2. **drop repeated** segments, keeping the first occurrence (Kaggle leaves duplicates
   unspecified; counting a positive twice would reward repeating it);
3. **drop unrated** segments, those without a human rating for class ``c``, so P(k)
   counts rated items only.

Steps 2 and 3 commute (both keep an entry or not by a rule that does not depend on the
others' fate), so the implementation filters unrated entries first, which is the cheap
direction: most of a 100,000-long row is unrated. ``N_c`` is the number of positive
ratings of ``c`` in the ground truth, all of them, whether submitted or not.

The MAP is the mean of ``AP_c`` over the classes with at least one positive rating; such a
class missing from the submission scores 0. Submitted classes with no positive rating do
not enter the mean (they are reported).

The result also holds the **ceiling**: the MAP of the same rows with every submitted
positive moved to the top, ``(1 / C) * sum_c (submitted positives of c) / N_c``, the most
that any re-ordering of the submitted segments could score. In the engine's pipeline the
rows hold every window of the videos whose top-N candidates include the class, so the
ceiling is what the candidate stage leaves to the segment model: how far a segment model's
MAP is from it says how much better its ordering could still get.

This is not G's ``segment_eval_inference.py`` (REFERENCE §8.2), which neither dedupes nor
counts missing classes, and drops the last segment of every row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

from modloc.engine.base.metrics.average_precision import ranked_average_precision, top_k_ranking

MAX_SEGMENTS_PER_CLASS = 100_000
"""K of MAP@K: the most segments a Kaggle submission row may hold."""


def segment_id(video_id: str, start_time: int) -> str:
    """The id of a 5-second segment: ``"<video id>:<start time in seconds>"``."""
    return f"{video_id}:{start_time}"


class RatedVideo(Protocol):
    """What ``SegmentTruth.from_videos`` reads from a decoded v3 validate video.

    The three arrays are parallel, one entry per rated (segment, class) pair.
    """

    id: str
    segment_labels: np.ndarray
    segment_start_times: np.ndarray
    segment_scores: np.ndarray


@dataclass(frozen=True)
class VideoRatings:
    """A video's segment ratings without its frames (a :class:`RatedVideo` to keep while the
    frames are dropped)."""

    id: str
    segment_labels: np.ndarray
    segment_start_times: np.ndarray
    segment_scores: np.ndarray

    @classmethod
    def of(cls, video: RatedVideo) -> VideoRatings:
        return cls(video.id, video.segment_labels, video.segment_start_times, video.segment_scores)


class SegmentTruth:
    """Human ratings of (segment, class) pairs: the ground truth of segment MAP.

    A rating is (video id, start time, class id, score) with score 0 (negative) or 1
    (positive). A (segment, class) pair rated more than once with the same score counts
    once; rated with both scores it is a ValueError naming the video, start and class,
    since no single truth exists for it.
    """

    def __init__(
        self,
        video_ids: Sequence[str],
        start_times: ArrayLike,
        class_ids: ArrayLike,
        scores: ArrayLike,
    ) -> None:
        """Build from parallel arrays, each of shape ``(R,)``, one entry per rating."""
        starts = _as_int_array(start_times, "start_times")
        classes = _as_int_array(class_ids, "class_ids")
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
        lengths = {len(video_ids), len(starts), len(classes), len(values)}
        if len(lengths) != 1:
            raise ValueError(
                f"ratings arrays differ in length: video_ids {len(video_ids)}, start_times "
                f"{len(starts)}, class_ids {len(classes)}, scores {len(values)}"
            )
        if (starts < 0).any() or (classes < 0).any():
            raise ValueError("start times and class ids must be non-negative")
        invalid = ~np.isin(values, (0.0, 1.0))
        if invalid.any():
            raise ValueError(f"segment scores must be 0 or 1, got {values[invalid][0]}")

        self._ratings: dict[int, dict[str, bool]] = {}
        for video_id, start, class_id, score in zip(
            video_ids, starts.tolist(), classes.tolist(), (values > 0).tolist(), strict=True
        ):
            if not isinstance(video_id, str):
                raise TypeError(f"video ids must be str, got {type(video_id).__name__}")
            class_ratings = self._ratings.setdefault(class_id, {})
            key = segment_id(video_id, start)
            previous = class_ratings.setdefault(key, score)
            if previous != score:
                raise ValueError(
                    f"conflicting ratings for video {video_id!r}, start {start}, class "
                    f"{class_id}: both positive and negative"
                )
        self._num_positives = {
            class_id: sum(ratings.values()) for class_id, ratings in self._ratings.items()
        }
        self._video_ids = frozenset(video_ids)

    @classmethod
    def from_videos(cls, videos: Iterable[RatedVideo]) -> SegmentTruth:
        """Collect the ratings of decoded videos (see ``RatedVideo``)."""
        video_ids: list[str] = []
        starts: list[np.ndarray] = []
        classes: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        for video in videos:
            labels = np.asarray(video.segment_labels).reshape(-1)
            video_starts = np.asarray(video.segment_start_times).reshape(-1)
            video_scores = np.asarray(video.segment_scores).reshape(-1)
            if not len(labels) == len(video_starts) == len(video_scores):
                raise ValueError(
                    f"video {video.id!r}: segment_labels ({len(labels)}), "
                    f"segment_start_times ({len(video_starts)}) and segment_scores "
                    f"({len(video_scores)}) differ in length"
                )
            video_ids.extend([video.id] * len(labels))
            starts.append(video_starts)
            classes.append(labels)
            scores.append(video_scores)
        return cls(
            video_ids,
            np.concatenate(starts) if starts else [],
            np.concatenate(classes) if classes else [],
            np.concatenate(scores) if scores else [],
        )

    def __len__(self) -> int:
        """Number of distinct rated (segment, class) pairs."""
        return sum(len(ratings) for ratings in self._ratings.values())

    @property
    def num_positives(self) -> Mapping[int, int]:
        """Class id -> number of positively rated segments, for every rated class."""
        return self._num_positives

    @property
    def video_ids(self) -> frozenset[str]:
        """The ids of the videos with at least one rating."""
        return self._video_ids

    def positive_classes(self) -> list[int]:
        """Ascending ids of the classes with at least one positive rating."""
        return sorted(c for c, count in self._num_positives.items() if count > 0)

    def ratings(self, class_id: int) -> Mapping[str, bool]:
        """Segment id -> positive?, for the segments rated for ``class_id``."""
        return self._ratings.get(class_id, {})


@dataclass(frozen=True)
class SegmentMAPResult:
    """Segment MAP@K and the bookkeeping behind it.

    The entry counts cover the rows of scored classes only and partition them:
    ``submitted = truncated + unrated + duplicates + scored``.
    """

    map: float
    classes: int  # classes averaged over: those with >= 1 positive rating
    class_ap: dict[int, float]  # AP of each averaged class
    ceiling: float  # MAP with each row's submitted positives ranked first (module doc)
    found_positives: int  # distinct positives within the first k of the scored rows
    missing_classes: tuple[int, ...]  # averaged but absent from the submission (AP 0)
    ignored_classes: tuple[int, ...]  # submitted but without a positive rating: not scored
    submitted: int  # entries in the scored rows as submitted
    truncated: int  # entries past position k, cut
    unrated: int  # entries within k without a rating for the row's class
    duplicates: int  # rated entries repeating an earlier one in the same row
    scored: int  # entries that entered an AP


def segment_map(
    submission: Mapping[int, Sequence[str]],
    truth: SegmentTruth,
    k: int = MAX_SEGMENTS_PER_CLASS,
) -> SegmentMAPResult:
    """Kaggle segment MAP@k of ``submission`` against ``truth`` (rules in the module doc).

    Args:
        submission: class id -> segment ids, best first.
        truth: the ratings.
        k: entries of each row that count (Kaggle: 100,000).

    Raises:
        ValueError: if ``k`` is not positive or no class has a positive rating (the mean
            would be over nothing).
    """
    if k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    scored_classes = truth.positive_classes()
    if not scored_classes:
        raise ValueError("the ground truth has no positive rating: segment MAP is undefined")

    class_ap: dict[int, float] = {}
    class_ceiling: dict[int, float] = {}
    missing: list[int] = []
    submitted = truncated = unrated = duplicates = found_positives = 0
    for class_id in scored_classes:
        row = submission.get(class_id)
        if row is None:
            missing.append(class_id)
            class_ap[class_id] = class_ceiling[class_id] = 0.0
            continue
        ratings = truth.ratings(class_id)
        head = row[:k]
        # filter() with the mapping's own __contains__ runs in C: twice as fast as a
        # comprehension on a 100,000-long row that is mostly unrated.
        rated = list(filter(ratings.__contains__, head))
        first_occurrences = list(dict.fromkeys(rated))
        relevant = np.fromiter(
            (ratings[segment] for segment in first_occurrences),
            dtype=bool,
            count=len(first_occurrences),
        )
        class_ap[class_id] = ranked_average_precision(relevant, truth.num_positives[class_id])
        # the same positives at ranks 1..n: each adds a precision of 1
        class_ceiling[class_id] = int(relevant.sum()) / truth.num_positives[class_id]
        found_positives += int(relevant.sum())
        submitted += len(row)
        truncated += len(row) - len(head)
        unrated += len(head) - len(rated)
        duplicates += len(rated) - len(first_occurrences)

    scored = submitted - truncated - unrated - duplicates
    scored_set = set(scored_classes)
    ignored = tuple(sorted(int(c) for c in submission if c not in scored_set))
    return SegmentMAPResult(
        # fsum keeps a mean of equal APs exact: a perfect submission scores exactly 1.0.
        map=math.fsum(class_ap.values()) / len(class_ap),
        classes=len(class_ap),
        class_ap=class_ap,
        ceiling=math.fsum(class_ceiling.values()) / len(class_ceiling),
        found_positives=found_positives,
        missing_classes=tuple(missing),
        ignored_classes=ignored,
        submitted=submitted,
        truncated=truncated,
        unrated=unrated,
        duplicates=duplicates,
        scored=scored,
    )


def rank_segments(
    segment_ids: Sequence[str],
    scores: ArrayLike,
    class_ids: Sequence[int],
    k: int = MAX_SEGMENTS_PER_CLASS,
) -> dict[int, list[str]]:
    """Turn a score matrix into submission rows: per class, the ``k`` best segments.

    Scoring arrays is then ``segment_map(rank_segments(ids, scores, classes), truth)``.

    Args:
        segment_ids: shape ``(S,)``, the id of each scored segment.
        scores: shape ``(S, C)``; column ``j`` scores class ``class_ids[j]``.
        class_ids: shape ``(C,)``.
        k: length of each row (fewer when ``S < k``).

    Returns:
        class id -> segment ids, best first; equal scores keep the order of
        ``segment_ids`` (the tie rule of ``modloc.engine.base.metrics.average_precision``).
    """
    matrix = np.asarray(scores)
    if matrix.ndim != 2 or matrix.shape != (len(segment_ids), len(class_ids)):
        raise ValueError(
            f"scores must have shape (len(segment_ids), len(class_ids)) = "
            f"({len(segment_ids)}, {len(class_ids)}), got {matrix.shape}"
        )
    if len(set(class_ids)) != len(class_ids):
        raise ValueError("class_ids has repeated classes")
    ids = np.asarray(segment_ids, dtype=object)
    rows: dict[int, list[str]] = {}
    for column, class_id in enumerate(class_ids):
        # One column at a time: the full (S, C) ranking would not fit in memory for the
        # 1.7M test segments.
        best = top_k_ranking(matrix[:, column][np.newaxis, :], k)[0]
        rows[int(class_id)] = ids[best].tolist()
    return rows


def _as_int_array(values: ArrayLike, name: str) -> np.ndarray:
    """``values`` as a 1-D int64 array; an empty input of any dtype is accepted."""
    array = np.asarray(values).reshape(-1)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
    return array.astype(np.int64)
