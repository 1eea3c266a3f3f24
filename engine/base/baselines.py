"""Reference systems that need no model: bounds for every MAP@K the project reports.

- :func:`oracle_rankings`: each class's positively rated segments, from the truth. Its
  segment MAP@K is exactly 1.0 (a sanity check of the metric and of the truth files).
- :func:`random_rankings`: every class ranks the same candidate segments in a random order
  (seeded): the floor any model must clear.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from modloc.engine.base.features import SEGMENT_FRAMES
from modloc.engine.base.io.examples import Video
from modloc.engine.base.metrics.segment import segment_id


def video_segment_ids(videos: Iterable[Video], include_partial: bool = False) -> list[str]:
    """Segment ids of non-overlapping 5-frame windows of every video.

    The reference pipeline only ranks full windows (REFERENCE §7); ``include_partial`` adds
    each video's zero-padded last partial window.
    """
    ids: list[str] = []
    for video in videos:
        frames = video.num_frames
        end = frames if include_partial else frames - frames % SEGMENT_FRAMES
        ids.extend(segment_id(video.id, start) for start in range(0, end, SEGMENT_FRAMES))
    return ids


def oracle_rankings(truth: Iterable[Video]) -> dict[int, list[str]]:
    """Per class, its positively rated segments (in file order): a perfect submission."""
    rankings: dict[int, list[str]] = {}
    for video in truth:
        for class_id, start, score in zip(video.segment_labels.tolist(),
                                          video.segment_start_times.tolist(),
                                          video.segment_scores.tolist(), strict=True):
            if score > 0.5:
                rankings.setdefault(class_id, []).append(segment_id(video.id, start))
    return {class_id: list(dict.fromkeys(ids)) for class_id, ids in rankings.items()}


def random_rankings(segment_ids: Sequence[str], class_ids: Iterable[int], k: int = 100_000,
                    seed: int = 0) -> dict[int, list[str]]:
    """Per class, up to ``k`` of ``segment_ids`` in an independent random order."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(segment_ids, dtype=object)
    return {int(class_id): pool[rng.permutation(len(pool))[:k]].tolist() for class_id in class_ids}
