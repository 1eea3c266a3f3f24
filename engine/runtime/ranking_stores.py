"""Where stage 4's rankings live: the store interface :class:`Rankings` ranks through, and
the embedded store.

:class:`~modloc.engine.runtime.rankings.Rankings` decides what enters the rankings and reads
them back; a :class:`RankingStore` keeps them. Two stores exist:

- :class:`NativeStore` (the default, no server): the native per-class top-K in this process
  (:class:`~modloc.engine.runtime.topk.TopK`), or with a directory its durable form
  (:class:`~modloc.engine.runtime.topk.DurableTopK`: insert log + snapshots).
- :class:`~modloc.engine.runtime.redis_rankings.RedisStore` (selected by
  :class:`RedisSettings`): one sorted set per class in a Redis server or Redis Cluster,
  shared by every ``modloc serve`` replica of a fleet.

Both rank by the same rule (score descending, then the video's order, then its id, then the
window start: :mod:`modloc.engine.runtime.topk`'s "Rank order"), keep a video's pairs once
(adding a video a durable store holds is a no-op that reports False), and so return the same
rows for the same videos and orders, byte for byte in the CSV.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from modloc.engine.runtime.topk import DurableTopK, StatePolicy, TopK, TopKStats


class StoreUnavailable(RuntimeError):
    """The rankings' store cannot be reached now (a Redis server down, a cluster failing
    over): nothing of the call was acknowledged; the same call may be retried later."""


@dataclass(frozen=True)
class VideoPairs:
    """One video's ``(m,)`` window starts, class ids and fused scores, and its tie key
    (``order`` None: the store gives the next one, in the order it sees videos)."""

    video_id: str
    starts: np.ndarray
    class_ids: np.ndarray
    scores: np.ndarray
    order: int | None = None


@dataclass(frozen=True)
class RedisSettings:
    """Rankings in Redis (:class:`~modloc.engine.runtime.redis_rankings.RedisStore`).

    Attributes:
        url: ``redis://[user:password@]host:port`` (``rediss://`` for TLS) of a server or of
            any node of a Redis Cluster (told apart by asking the server).
        wait_replicas: acknowledge a group of videos only once this many replicas of every
            master it wrote to hold it (Redis ``WAIT``); 0 relies on the masters alone.
        wait_timeout: seconds ``WAIT`` may block before the group fails (not acknowledged).
        prefix: the keys' prefix, so that several rankings can share a server.
        threshold_refresh_seconds: how often a replica re-reads every class's K-th score
            (its cached thresholds are raised by its own writes in between).
        socket_timeout: seconds a connection or a reply may take before the store counts as
            unreachable (a ``WAIT`` gets ``wait_timeout`` on top).
        filter_pairs: send only pairs at or above the cached thresholds (False sends every
            pair, as a baseline to measure against: the rankings are the same).
    """

    url: str
    wait_replicas: int = 0
    wait_timeout: float = 1.0
    prefix: str = "modloc"
    threshold_refresh_seconds: float = 5.0
    socket_timeout: float = 5.0
    filter_pairs: bool = True

    def __post_init__(self):
        problems = []
        if not self.url.startswith(("redis://", "rediss://")):
            problems.append(f"url: {self.url!r} is not redis://host:port or rediss://host:port")
        if not isinstance(self.wait_replicas, int) or not 0 <= self.wait_replicas <= 64:
            problems.append(f"wait_replicas: {self.wait_replicas!r} is not an integer in 0..64")
        for name in ("wait_timeout", "threshold_refresh_seconds", "socket_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                problems.append(f"{name}: {value!r} is not a finite number > 0")
        if not self.prefix or any(c in self.prefix for c in "{}") or not self.prefix.isprintable():
            problems.append(f"prefix: {self.prefix!r} must be printable, non-empty, without braces")
        if problems:
            raise ValueError("invalid Redis rankings settings: " + "; ".join(problems))


class RankingStore(Protocol):
    """What :class:`~modloc.engine.runtime.rankings.Rankings` needs of a store.

    ``class_ids`` and ``k`` are fixed at creation. ``durable``: adds survive this process
    once :meth:`commit` returns (and a video added before is refused). ``shared``: the
    rankings live outside this process, shared by every process that opens them (reads see
    the others' adds).
    """

    class_ids: list[int]
    k: int
    durable: bool
    shared: bool

    @property
    def videos(self) -> int:
        """Videos added (by every process, for a shared store)."""

    def add_videos(self, videos: Sequence[VideoPairs]) -> list[int | None]:
        """Add each video's pairs in turn; per video its order (tie key), or None when a
        durable store held it already (nothing changed). Pairs of a class not ranked or with a
        score <= 0 are dropped; a NaN score or a start outside ``[0, 2^31)`` is a
        ValueError."""

    def commit(self) -> None:
        """Every add before this call is durable once it returns."""

    def contains(self, video_id: str) -> bool: ...

    def stats(self) -> TopKStats: ...

    def rows(self) -> dict[int, list[str]]:
        """Class id → up to ``k`` segment ids ``"<video id>:<start>"``, best first."""

    def ranking(self, class_id: int, limit: int | None, offset: int) -> list[tuple[str, int, float]]:
        """``(video id, start, score)`` of ranks ``[offset, offset + limit)``; KeyError for a
        class not ranked."""

    def ping(self) -> None:
        """Raise :class:`StoreUnavailable` when the store cannot be reached now."""

    def close(self) -> None: ...


class NativeStore:
    """The embedded store: the native top-K, in memory or (``directory``) durable.

    In memory a video may be added in several calls (each reports whether the video was new);
    durable, a second add of a video changes nothing.
    """

    shared = False

    def __init__(self, class_ids: Sequence[int], k: int,
                 directory: str | os.PathLike | None = None, *,
                 settings: dict | None = None, policy: StatePolicy | None = None):
        self.class_ids = list(class_ids)
        self.k = k
        self.durable_topk = None if directory is None else DurableTopK.open(
            directory, self.class_ids, k, settings=settings, policy=policy or StatePolicy())
        self.topk = self.durable_topk.topk if self.durable_topk is not None else TopK(self.class_ids, k)
        self._order_lock = threading.Lock()  # a default order is the count before the add

    @property
    def durable(self) -> bool:
        return self.durable_topk is not None

    @property
    def videos(self) -> int:
        return self.topk.stats().videos

    def add_videos(self, videos: Sequence[VideoPairs]) -> list[int | None]:
        orders = []
        with self._order_lock:
            for video in videos:
                order = self.videos if video.order is None else video.order
                if self.durable_topk is not None:
                    added = self.durable_topk.add(video.video_id, video.starts, video.class_ids,
                                                  video.scores, video.order)
                else:
                    added = not self.topk.contains(video.video_id)
                    self.topk.add(video.video_id, video.starts, video.class_ids, video.scores, video.order)
                orders.append(order if added else None)
        return orders

    def commit(self) -> None:
        if self.durable_topk is not None:
            self.durable_topk.commit()

    def contains(self, video_id: str) -> bool:
        return self.topk.contains(video_id)

    def stats(self) -> TopKStats:
        return self.topk.stats()

    def rows(self) -> dict[int, list[str]]:
        return self.topk.rankings()

    def ranking(self, class_id: int, limit: int | None, offset: int) -> list[tuple[str, int, float]]:
        return self.topk.ranking(class_id, limit, offset)

    def ping(self) -> None:
        """Always reachable."""

    def close(self) -> None:
        if self.durable_topk is not None:
            self.durable_topk.close()


__all__ = ["NativeStore", "RankingStore", "RedisSettings", "StoreUnavailable", "VideoPairs"]
