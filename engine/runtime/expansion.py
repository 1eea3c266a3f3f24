"""REFERENCE §7 step 3's expansion cut: which windows of a class may be ranked at all.

In the reference pipeline (V3 ``ValueModel.exp_merge`` over ``DummyVideoPrediction``) a
window's video score counts for class ``c`` only when the window lies within the first
``limit`` (100,000) segments of ``c``'s *video-ranked expansion*: the videos that have ``c``
among their top-N candidates, sorted by their score for ``c`` (ties: the videos' order),
each expanded into its full windows ``range(0, L - L % 5, 5)`` with ``L`` its audio frames.
Anything past that prefix gets ``P_vid = 0``, hence a fused value of 0, and is never ranked,
however well the segment model scores it; the video where the prefix ends keeps its first
windows only.

The cut depends on every video's score, so it is known only once the video model has seen
all of them: ``modloc infer --expansion-cut`` scores the videos first (:func:`entries_of`,
on every rank), builds the cut (:meth:`ExpansionCut.build`) and then localizes, ranking
only what the cut allows (:meth:`ExpansionCut.allowed`). A streaming service cannot know it
and does not apply it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modloc.engine.base.features import SEGMENT_FRAMES
from modloc.engine.base.io.examples import Video


def entries_of(videos: Sequence[Video], orders: Sequence[int], candidate_ids: np.ndarray,
               candidate_scores: np.ndarray, ranked: set[int]) -> np.ndarray:
    """The expansion entries of a batch: one ``(class id, video score, order, full
    windows)`` row per (video, candidate class among ``ranked``), as a ``(n, 4)`` float64
    array (class ids, orders and window counts are exact in float64: they are < 2^53)."""
    rows = []
    for row, (video, order) in enumerate(zip(videos, orders, strict=True)):
        windows = video.audio_frames // SEGMENT_FRAMES  # the reference expands audio frames
        for class_id, score in zip(candidate_ids[row].tolist(), candidate_scores[row].tolist(),
                                   strict=True):
            if class_id in ranked:
                rows.append((class_id, score, order, windows))
    return np.array(rows, np.float64).reshape(-1, 4)


class ExpansionCut:
    """Per (class, video order): how many of the video's first full windows the class may
    rank (absent: none)."""

    def __init__(self, allowed_windows: dict[tuple[int, int], int], limit: int):
        self.allowed_windows = allowed_windows
        self.limit = limit

    @classmethod
    def build(cls, entries: np.ndarray, limit: int) -> ExpansionCut:
        """The cut of ``(n, 4)`` entries (:func:`entries_of`, from every video once): per
        class, videos by score descending then order ascending, their windows counted until
        ``limit``."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        class_ids, scores, orders, windows = (entries[:, column] for column in range(4))
        # np.lexsort sorts by the last key first: class, then score descending, then order
        ranked = np.lexsort((orders, -scores, class_ids))
        allowed: dict[tuple[int, int], int] = {}
        current, used = None, 0
        for index in ranked.tolist():
            class_id = int(class_ids[index])
            if class_id != current:
                current, used = class_id, 0
            take = min(int(windows[index]), limit - used)
            if take > 0:
                allowed[(class_id, int(orders[index]))] = take
                used += take
        return cls(allowed, limit)

    def allowed(self, order: int, class_ids: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """``(m,)`` bool: which of one video's ``(start, class)`` pairs the cut lets through."""
        classes, inverse = np.unique(class_ids, return_inverse=True)
        windows = np.array([self.allowed_windows.get((int(c), order), 0) for c in classes.tolist()],
                           np.int64)
        return starts // SEGMENT_FRAMES < windows[inverse]


__all__ = ["ExpansionCut", "entries_of"]
