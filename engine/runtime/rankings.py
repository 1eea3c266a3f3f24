"""Stage 4, in one place: the per-class rankings of every video localized, and the Kaggle CSV.

:class:`Rankings` is what every caller ranks through: ``modloc infer`` and the
:class:`~modloc.engine.runtime.localizer.Localizer`, the service's durable ingestion
(:mod:`modloc.engine.service.core`), the offline MAP@K loop
(:func:`~modloc.engine.runtime.offline_eval.localize_split`) and the export checks
(:mod:`modloc.export.validation`). It decides what enters (a localized video's fused pairs,
full windows only unless ``include_partial``; the expansion cut of REFERENCE §7 step 3 when
one is set; the id rule of :func:`~modloc.engine.base.submission.check_rankable_id`), keeps
the fallback state (REFERENCE §7 step 5), and reads the result back as rows, one class's
ranks, or the CSV.

The rankings live in a store (:mod:`modloc.engine.runtime.ranking_stores`): by default the
native per-class top-K (:class:`~modloc.engine.runtime.topk.TopK`) in this process, or, with
a directory, its durable form (:class:`~modloc.engine.runtime.topk.DurableTopK`: insert log
+ snapshots, nothing acknowledged lost); with :class:`RedisSettings`, sorted sets in Redis
shared by a fleet of servers (:class:`~modloc.engine.runtime.redis_rankings.RedisStore`).
Durable adds are durable once :meth:`Rankings.commit` returns, and re-adding a video is a
no-op (idempotent ingestion). Every store ranks by the same rule, so the rows do not depend
on where they are kept.

Each video carries an ``order``, the tie key among equal scores: by default the order the
rankings saw the videos; sharded runs give a global one (file, record), and merging the
shards' states (:meth:`Rankings.merge_state`) then gives exactly the single-process rows.

**Fallback fill** (off by default): a class with fewer than ``k`` ranked segments is filled
from its videos in video-score order (each video's top 1000 classes, as the reference's
``…_test_k1000.csv``), each expanded into its full windows, skipping segments already
ranked, up to ``k``. A video's full windows are counted from its audio frames, uncapped,
as the reference's expansion does (and :mod:`modloc.engine.runtime.expansion`): a video
of 310 frames offers ``:300`` and ``:305`` too.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
from numpy.typing import ArrayLike

from modloc.engine.base.features import SEGMENT_FRAMES
from modloc.engine.base.metrics.segment import MAX_SEGMENTS_PER_CLASS, segment_id
from modloc.engine.base.submission import check_rankable_id, write_submission
from modloc.engine.base.vocab import default_segment_class_ids
from modloc.engine.runtime.expansion import ExpansionCut
from modloc.engine.runtime.pipeline import VideoLocalization
from modloc.engine.runtime.ranking_stores import (
    NativeStore,
    RankingStore,
    RedisSettings,
    VideoPairs,
)
from modloc.engine.runtime.topk import StatePolicy, TopK, TopKStats

# REFERENCE §7 step 5: the fallback file (…_test_k1000.csv) holds each video's top 1000 classes
FALLBACK_CLASSES_PER_VIDEO = 1000


class Rankings:
    """Per class, the ``k`` best (video, window, fused score) of every video added.

    Args:
        class_ids: the ranked classes, vocabulary ids, which are the CSV's rows in this
            order (default: the 1000 segment classes).
        k: segments kept per class (Kaggle's 100,000 by default).
        include_partial: rank each video's zero-padded last partial window too (the
            reference does not).
        fallback: keep the state of the fallback fill (REFERENCE §7 step 5).
        directory: keep the rankings durable in this directory (created if absent;
            restored if it holds them): see :meth:`commit`, and
            :class:`~modloc.engine.runtime.topk.DurableTopK` for the directory's rules.
        redis: keep them in Redis instead, shared with every process that opens the same
            ones (durable, see :class:`~modloc.engine.runtime.redis_rankings.RedisStore`).
        settings: what fills the rankings besides ``include_partial`` (the models' hashes,
            the fusion settings), recorded in the directory and checked when it is reopened.
        policy: what reopening a directory may do beyond restoring intact state (accept a
            loss, other settings, or start fresh).

    ``expansion`` (default None) may be set to an :class:`ExpansionCut` before videos are
    added: only the pairs it allows enter (REFERENCE §7 step 3; every video then needs its
    order).
    """

    def __init__(self, class_ids: Sequence[int] | np.ndarray | None = None,
                 k: int = MAX_SEGMENTS_PER_CLASS, *, include_partial: bool = False,
                 fallback: bool = False, directory: str | os.PathLike | None = None,
                 redis: RedisSettings | None = None,
                 settings: dict | None = None, policy: StatePolicy | None = None):
        self.class_ids = [int(c) for c in (default_segment_class_ids() if class_ids is None else class_ids)]
        self.k = k
        self.include_partial = include_partial
        if fallback and (directory is not None or redis is not None):
            raise ValueError("the fallback fill keeps no durable state: use it in memory only")
        if directory is not None and redis is not None:
            raise ValueError("the rankings live in a directory or in Redis, not both")
        if directory is None and (settings is not None or policy not in (None, StatePolicy())):
            raise ValueError("settings and a state policy apply to rankings in a directory only")
        if redis is not None:
            from modloc.engine.runtime.redis_rankings import RedisStore

            self.store: RankingStore = RedisStore(redis, self.class_ids, k)
        else:
            self.store = NativeStore(
                self.class_ids, k, directory,
                settings={**(settings or {}), "include_partial": include_partial}, policy=policy)
        # per class, videos by video score; an entry's "start" holds the video's number of
        # full windows, so this state merges like the rankings themselves
        self._fallback = TopK(self.class_ids, k) if fallback else None
        self.expansion: ExpansionCut | None = None

    @property
    def durable(self) -> bool:
        return self.store.durable

    @property
    def shared(self) -> bool:
        """Whether the rankings live outside this process (Redis), shared by a fleet."""
        return self.store.shared

    @property
    def snapshots(self) -> bool:
        """Whether :meth:`snapshot` applies: durable rankings of the embedded store."""
        return self.durable and isinstance(self.store, NativeStore)

    @property
    def videos(self) -> int:
        """Videos added so far (a durable store's restored ones, and a shared store's others',
        included)."""
        return self.store.videos

    def stats(self) -> TopKStats:
        return self.store.stats()

    def contains(self, video_id: str) -> bool:
        return self.store.contains(video_id)

    def ping(self) -> None:
        """Raise :class:`~modloc.engine.runtime.ranking_stores.StoreUnavailable` when the
        store cannot be reached (the embedded one always can)."""
        self.store.ping()

    def __repr__(self) -> str:
        where = f", {self.store!r}" if self.shared else f", {self.videos} videos" + (
            ", durable" if self.durable else "")
        return f"Rankings({len(self.class_ids)} classes, k={self.k}{where}{', fallback' if self._fallback else ''})"

    # --- adding -----------------------------------------------------------------------

    def add(self, result: VideoLocalization, order: int | None = None) -> bool:
        """Rank one localized video's fused pairs; False when it was added before.

        Durable rankings then change nothing (adding is idempotent, so a client may resend
        what was not acknowledged); in memory, a video may be added in several calls.
        Raises ValueError, adding nothing, for an id a segment id cannot carry.
        """
        [added] = self.add_videos([result], None if order is None else [order])
        return added is not None

    def add_videos(self, results: Sequence[VideoLocalization],
                   orders: Sequence[int] | None = None) -> list[int | None]:
        """:meth:`add` for a group of videos, all or nothing on their ids, in one call to the
        store (one round trip per Redis node for the group); per video its order, None when
        durable rankings held it already."""
        if orders is not None and len(orders) != len(results):
            raise ValueError(f"{len(orders)} orders for {len(results)} videos")
        for result in results:  # a refused id leaves the rankings as they were
            check_rankable_id(result.video_id)
        videos = []
        for row, result in enumerate(results):
            order = None if orders is None else int(orders[row])
            starts, class_ids, values = result.ranking_pairs(self.include_partial)
            if self.expansion is not None:
                if order is None:
                    raise ValueError("the expansion cut names videos by their order: give every video's")
                keep = self.expansion.allowed(order, class_ids, starts)
                starts, class_ids, values = starts[keep], class_ids[keep], values[keep]
            videos.append(VideoPairs(result.video_id, starts, class_ids, values, order))
        added = self.store.add_videos(videos)
        if self._fallback is not None:
            for result, video in zip(results, videos, strict=True):
                top = np.argsort(-result.video_scores, kind="stable")[:FALLBACK_CLASSES_PER_VIDEO]
                full_windows = np.full(len(top), result.audio_frames // SEGMENT_FRAMES)
                self._fallback.add(result.video_id, full_windows, result.video_class_ids[top],
                                   result.video_scores[top].astype(np.float64), order=video.order)
        return added

    def add_all(self, results: Sequence[VideoLocalization],
                orders: Sequence[int] | None = None) -> list[bool]:
        """:meth:`add` for many videos, all or nothing on their ids; one flag per video."""
        return [order is not None for order in self.add_videos(results, orders)]

    def add_pairs(self, video_id: str, starts: ArrayLike, class_ids: ArrayLike, scores: ArrayLike,
                  order: int | None = None) -> bool:
        """Rank raw ``(m,)`` (window start, class id, score) pairs of one video (the dummy
        prediction, a segment model's own scores); False when durable rankings hold the
        video already (nothing changes then)."""
        [added] = self.store.add_videos([VideoPairs(video_id, np.asarray(starts), np.asarray(class_ids),
                                                    np.asarray(scores), order)])
        return added is not None

    # --- durability -------------------------------------------------------------------

    def commit(self) -> None:
        """Make every add so far durable (flush + fsync of the insert log; Redis adds are
        durable when they return); acknowledge after this. A no-op in memory."""
        self.store.commit()

    def snapshot(self) -> Path:
        """Write a snapshot of durable rankings and start a new log; returns its path."""
        if not self.snapshots:
            raise ValueError("only durable rankings in a directory have snapshots (give a directory)")
        return self.store.durable_topk.snapshot()

    @property
    def failure(self) -> BaseException | None:
        """The write that failed a durable directory (nothing more is durable until it is
        reopened), or None."""
        durable = self.store.durable_topk if isinstance(self.store, NativeStore) else None
        return durable.failure if durable is not None else None

    def close(self) -> None:
        """Commit and release a durable directory or Redis connections (nothing for
        in-memory rankings)."""
        self.store.close()

    def _native(self) -> TopK:
        if not isinstance(self.store, NativeStore):
            raise ValueError("shard states exist for the embedded store only (Redis rankings "
                             "are shared already)")
        return self.store.topk

    # --- shards -----------------------------------------------------------------------

    def state(self) -> dict:
        """This shard's state, bytes only (for a gather across ranks)."""
        return {"ranking": self._native().to_bytes(),
                "fallback": self._fallback.to_bytes() if self._fallback is not None else None}

    def merge_state(self, state: dict) -> None:
        """Add another shard's :meth:`state`: the result is exactly the rows of one process
        that saw both shards' videos (given global orders)."""
        self._native().merge(TopK.from_bytes(state["ranking"]))
        if self._fallback is not None:
            self._fallback.merge(TopK.from_bytes(state["fallback"]))

    # --- reading ----------------------------------------------------------------------

    def rows(self) -> dict[int, list[str]]:
        """Class id → up to ``k`` segment ids, best first, for every ranked class (with the
        fallback fill if on): the submission's rows."""
        rows = self.store.rows()
        if self._fallback is None:
            return rows
        for class_id, segments in rows.items():
            if len(segments) >= self.k:
                continue
            present = set(segments)
            for video_id, full_windows, _ in self._fallback.ranking(class_id):
                for window in range(full_windows):
                    segment = segment_id(video_id, window * SEGMENT_FRAMES)
                    if segment not in present:
                        segments.append(segment)
                        present.add(segment)
                        if len(segments) == self.k:
                            break
                if len(segments) == self.k:
                    break
        return rows

    def ranking(self, class_id: int, limit: int | None = None,
                offset: int = 0) -> list[tuple[str, int, float]]:
        """``(video id, start, fused score)`` of one class's ranks ``[offset, offset +
        limit)``, best first, without the fallback fill. KeyError for a class not ranked."""
        return self.store.ranking(class_id, limit, offset)

    def write_submission(self, path_or_file: str | os.PathLike | TextIO) -> None:
        """The Kaggle CSV of :meth:`rows` (one row per ranked class, in ``class_ids`` order)."""
        if not isinstance(path_or_file, io.TextIOBase):
            Path(path_or_file).parent.mkdir(parents=True, exist_ok=True)
        write_submission(path_or_file, self.rows(), class_ids=self.class_ids, max_segments=self.k)

    def submission_csv(self) -> str:
        """:meth:`write_submission`'s text."""
        text = io.StringIO()
        self.write_submission(text)
        return text.getvalue()

    def __enter__(self) -> Rankings:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["FALLBACK_CLASSES_PER_VIDEO", "Rankings", "RedisSettings"]
