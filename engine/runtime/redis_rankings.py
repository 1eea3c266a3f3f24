"""Stage 4's rankings in Redis: one sorted set per class, shared by a fleet of servers.

Per-class top-K is Redis's leaderboard pattern, and Redis Cluster shards and replicates it,
so a fleet of stateless ``modloc serve`` replicas can rank into one durable, highly
available set of rankings (``modloc serve --rankings redis://host:port``, a server or any
node of a cluster). :class:`RedisStore` is the
:class:`~modloc.engine.runtime.ranking_stores.RankingStore` it does so with.

**Keys** (``<p>`` = :attr:`RedisSettings.prefix`):

- ``<p>:{c<class id>}:top``: a class's sorted set, trimmed to K members (the ``{…}`` hash tag
  keeps everything of a class on one shard);
- ``<p>:{videos}:order`` (video id → its order), ``<p>:{videos}:done`` (video id → order, once
  its pairs are durable: the ingested-video set behind DUPLICATE) and ``<p>:{videos}:meta``
  (K, the class ids and the member format, checked by every replica that opens the
  rankings): one hash tag, so one shard, so that a Lua script can update them together.

**Ties, and how both stores give one order.** The native accumulator ranks by score
descending, then the video's order (a signed 64-bit tie key) ascending, then its id (UTF-8
bytes), then the window start (:mod:`modloc.engine.runtime.topk`). A sorted set orders by
score, then by member bytes. So the score is the *negated* fused score (ascending = best
first; fused scores are positive, so no zero arises) and the member puts the tie key first,
in a form whose byte order is its numeric order::

    member = hex16(order + 2^63) ‖ UTF-8 id ‖ 0x00 ‖ hex8(start)

``hex16`` / ``hex8``: fixed-width lower-case hexadecimal (``%016x``, ``%08x``); the offset
2^63 maps signed orders onto unsigned ones. The NUL ends the id, and since no id holds one
(refused: a ValueError), a shorter id sorts before a longer one it is a prefix of, as in the
native comparison; an id ends before the start, so equal orders compare ids, then starts.
``ZRANGE key 0 K-1`` therefore is the native ranking, entry for entry, and trimming to K
(``ZREMRANGEBYRANK key K -1``) drops what the native accumulator drops. Scores travel as
Python's shortest round-trip repr and come back as ``%.17g``: exact doubles.

**A video's order** is, as natively, the number of videos registered before it: here the
videos any replica claimed before it, fleet-wide (from 0); or the order the caller gives. It is claimed once and kept (``order``): a re-sent
video writes the very same members again, so ``ZADD`` changes nothing and trimming again is
a no-op: writes are idempotent, and a video whose ingestion broke off halfway is completed
by re-sending it.

**One group of videos** (one call of :meth:`RedisStore.add_videos`) goes in three steps,
each one pipeline per master, each ending with ``WAIT wait_replicas`` on the connection that
wrote (``WAIT`` counts that connection's writes only):

1. claim the videos' orders (a Lua script on the ``{videos}`` shard; a video in ``done``
   is a DUPLICATE and is not written again);
2. per class, ``ZADD`` the members, ``ZREMRANGEBYRANK`` to K, and read the K-th score back;
3. mark the videos done (``HSETNX``; 0 means another replica finished the same video first:
   reported as a duplicate).

A step starts only after the previous one is acknowledged, so a video is never marked done
before its pairs are, and (with ``wait_replicas`` >= 1) no pair is written under an order
that a failover could lose. With ``wait_replicas`` = 0 a failover of the ``{videos}`` shard
can lose a claim whose pairs were written: the re-sent video then gets a new order and its
earlier members stay beside the new ones (one segment twice in a class's ranking), so a
deployment with failover should wait for a replica.

**Durability: what an acknowledgement means.** A video is acknowledged after step 3 returns.
With ``appendfsync always`` on the masters (the deployment's setting; the store logs what
each master runs with), every write is in the master's append-only file, on disk, before
the master answers, so a master that crashes and restarts loses nothing acknowledged. A
*failover* (a replica promoted in the master's place) keeps what that replica had received:
with ``wait_replicas`` = N >= 1 a group is acknowledged only once N replicas of each
master it wrote to hold it, so a failover to one of them loses nothing acknowledged; Redis
Cluster promotes the replica with the most replicated data, which is one of them unless
more replicas than N exist and the cluster's election picks another (possible with
N < replicas per master). The replicas hold the data in memory when ``WAIT`` returns, not
necessarily on their disk: losing the master and those replicas at once (a zone outage) can
lose acknowledged videos (Redis 7.2's ``WAITAOF`` would close that gap; this store does not
use it so that it runs on Redis 6.2). With ``wait_replicas`` = 0, a failover loses what the
replica had not yet received, acknowledged or not: Redis replicates asynchronously. A video
that was not acknowledged may be partly in the rankings until it is re-sent (which
completes it).

**Replica-side filtering.** Each store caches every class's K-th score (its threshold) and
sends only pairs scoring at least that: ties at the threshold are sent, since the tie key
may still place them in the top K. The thresholds are read for every class every
``threshold_refresh_seconds`` and raised by the K-th score each write returns. A threshold is
the K-th score of rankings that existed, so a pair below it cannot be in the final top K,
whose K-th score can only be higher (this holds after a failover too, once every
unacknowledged video is re-sent, as the client contract asks). Over a stream of N pairs per
class, about K·ln(N/K) reach Redis instead of N (``bench_fleet``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import redis
import redis.cluster
import redis.exceptions

from modloc.engine.base.metrics.segment import segment_id
from modloc.engine.runtime.ranking_stores import (
    RedisSettings,
    StoreUnavailable,
    VideoPairs,
)
from modloc.engine.runtime.topk import TopKStats

logger = logging.getLogger(__name__)

MEMBER_FORMAT = "1"  # the member layout of the module docstring; meta refuses another
ORDER_OFFSET = 1 << 63
ATTEMPTS = 3  # tries of one operation across a topology change (each refreshes the slot map)
RETRY_SECONDS = 0.2  # before the second try, doubled after

# Errors that mean "not reachable now": a connection, a timeout, a cluster reconfiguring
# (MOVED/ASK after a failover, TRYAGAIN, CLUSTERDOWN), a master demoted to a read-only replica.
UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
               redis.exceptions.ClusterError, redis.exceptions.ClusterDownError,
               redis.exceptions.MovedError, redis.exceptions.AskError,
               redis.exceptions.TryAgainError, redis.exceptions.ReadOnlyError,
               redis.exceptions.MasterDownError, OSError)

# KEYS: done, order. ARGV: n, n ids, n given orders ('' = the number of videos claimed before,
# the native default).
# Per id: "done" when its pairs are durable already, else its order (claimed now or before).
_CLAIM = """
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  local id = ARGV[1 + i]
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    out[i] = 'done'
  else
    local order = redis.call('HGET', KEYS[2], id)
    if not order then
      order = ARGV[1 + n + i]
      if order == '' then
        order = string.format('%d', redis.call('HLEN', KEYS[2]))
      end
      redis.call('HSET', KEYS[2], id, order)
    end
    out[i] = order
  end
end
return out
"""


def encode_member(order: int, video_id: bytes, start: int) -> bytes:
    """The sorted-set member of one (video, window): see the module docstring."""
    return b"%016x%s\0%08x" % (order + ORDER_OFFSET, video_id, start)


def decode_member(member: bytes) -> tuple[int, str, int]:
    """``(order, video id, start)`` of :func:`encode_member`'s bytes."""
    head, _, start = member.rpartition(b"\0")
    return int(head[:16], 16) - ORDER_OFFSET, head[16:].decode("utf-8"), int(start, 16)


class _Nodes:
    """Keys → the ``redis.Redis`` client of the master holding them: one client for a single
    server, the cluster's slot map for a cluster."""

    def __init__(self, settings: RedisSettings):
        options = dict(socket_timeout=settings.socket_timeout + settings.wait_timeout,
                       socket_connect_timeout=settings.socket_timeout)
        probe = redis.Redis.from_url(settings.url, **options)
        try:
            self.cluster = bool(probe.info("cluster").get("cluster_enabled"))
        finally:
            probe.close()
        self._single = None if self.cluster else redis.Redis.from_url(settings.url, **options)
        self._cluster = redis.cluster.RedisCluster.from_url(settings.url, **options) if self.cluster else None

    def client_of(self, key: bytes) -> redis.Redis:
        if self._cluster is None:
            return self._single
        node = self._cluster.nodes_manager.get_node_from_slot(self._cluster.keyslot(key))
        return self._cluster.get_redis_connection(node)

    def group(self, keys: Sequence[bytes]) -> dict[redis.Redis, list[int]]:
        """Indices of ``keys`` per master client."""
        groups: dict[redis.Redis, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(self.client_of(key), []).append(index)
        return groups

    def masters(self) -> list[redis.Redis]:
        if self._cluster is None:
            return [self._single]
        return [self._cluster.get_redis_connection(node) for node in self._cluster.get_primaries()]

    def refresh(self) -> None:
        """Re-read the cluster's slot map (after a failover or a resharding)."""
        if self._cluster is not None:
            self._cluster.nodes_manager.initialize()

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()
        else:
            self._single.close()


class RedisStore:
    """Per-class top-K in Redis (module docstring): a
    :class:`~modloc.engine.runtime.ranking_stores.RankingStore`, durable and shared.

    Opening connects nothing: the first operation connects (and checks, or records, the
    rankings' K and class ids); an operation that cannot reach Redis raises
    :class:`~modloc.engine.runtime.ranking_stores.StoreUnavailable` and the next one tries
    again. Thread-safe.
    """

    durable = True
    shared = True

    def __init__(self, settings: RedisSettings, class_ids: Sequence[int], k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.settings = settings
        self.class_ids = [int(c) for c in class_ids]
        self.k = k
        prefix = settings.prefix
        self._keys = [f"{prefix}:{{c{c}}}:top".encode() for c in self.class_ids]
        self._done, self._orders, self._meta = (
            f"{prefix}:{{videos}}:{name}".encode() for name in ("done", "order", "meta"))
        # ranked class id → position, vectorized: sorted ids and their positions
        self._sorted_ids = np.asarray(sorted(self.class_ids), np.int64)
        self._sorted_positions = np.argsort(np.asarray(self.class_ids, np.int64), kind="stable")
        self._thresholds = np.zeros(len(self.class_ids))  # fused K-th scores, 0 until full
        self._refreshed = -float("inf")
        self._counts = {"pairs": 0, "accepted": 0, "rejected": 0, "dropped": 0}
        self._last_videos = 0
        self._nodes: _Nodes | None = None
        self._lock = threading.Lock()  # connecting, thresholds, counters
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="redis-rankings")

    def __repr__(self) -> str:
        return f"RedisStore({urlsplit(self.settings.url).hostname}, {len(self.class_ids)} classes, k={self.k})"

    # --- connecting -------------------------------------------------------------------

    def _connected(self) -> _Nodes:
        with self._lock:
            if self._nodes is None:
                nodes = _Nodes(self.settings)
                self._check_meta(nodes)
                self._log_durability(nodes)
                self._nodes = nodes
            return self._nodes

    def _check_meta(self, nodes: _Nodes) -> None:
        """Record K, the class ids and the member format, or refuse rankings made otherwise."""
        wanted = {b"k": str(self.k).encode(), b"class_ids": ",".join(map(str, self.class_ids)).encode(),
                  b"member_format": MEMBER_FORMAT.encode()}
        client = nodes.client_of(self._meta)
        pipe = client.pipeline(transaction=False)
        for field, value in wanted.items():
            pipe.hsetnx(self._meta, field, value)
        pipe.hgetall(self._meta)
        held = pipe.execute()[-1]
        for field, value in wanted.items():
            if held.get(field) != value:
                shown = held.get(field, b"")[:80].decode(errors="replace")
                raise ValueError(
                    f"{self._meta.decode()} at {self.settings.url}: the rankings there hold "
                    f"{field.decode()}={shown!r}, not the {value[:80].decode()!r} this server "
                    "ranks with (another --redis-prefix keeps both)")

    def _log_durability(self, nodes: _Nodes) -> None:
        """Log what an acknowledgement means on each master (CONFIG may be disabled)."""
        for client in nodes.masters():
            where = client.connection_pool.connection_kwargs
            try:
                config = client.config_get("append*")
                setting = (f"appendonly={config.get('appendonly')} "
                           f"appendfsync={config.get('appendfsync')}")
            except redis.exceptions.ResponseError as error:
                setting = f"unknown ({error})"
            logger.info("event=rankings_durability node=%s:%s %s wait_replicas=%d",
                        where.get("host"), where.get("port"), setting, self.settings.wait_replicas)
            if "appendfsync=always" not in setting:
                logger.warning("event=rankings_not_fsynced node=%s:%s: an acknowledged video "
                               "survives a crash of this master only on its replicas",
                               where.get("host"), where.get("port"))

    def _run(self, operation: Callable[[_Nodes], object]):
        """``operation`` with up to :data:`ATTEMPTS` tries across a topology change; every
        operation here is idempotent, so a retry repeats it whole."""
        for attempt in range(ATTEMPTS):
            try:
                return operation(self._connected())
            except UNREACHABLE as error:
                failure = error
                with self._lock:
                    if self._nodes is not None:
                        try:
                            self._nodes.refresh()
                        except UNREACHABLE:
                            self._nodes.close()
                            self._nodes = None
                if attempt + 1 < ATTEMPTS:
                    time.sleep(RETRY_SECONDS * 2 ** attempt)
        raise StoreUnavailable(f"the rankings' Redis at {self.settings.url} cannot be reached: "
                               f"{type(failure).__name__}: {failure}") from failure

    def _pipelines(self, nodes: _Nodes, keys: Sequence[bytes],
                   build: Callable[[redis.client.Pipeline, int], object]) -> list[list]:
        """One pipeline per master over the indices of ``keys`` it holds, run in parallel,
        each ending with ``WAIT`` when replicas are asked for; per key index, the replies to
        the commands ``build(pipe, index)`` queued for it, in order."""
        groups = nodes.group(keys)

        def run(item):
            client, indices = item
            pipe = client.pipeline(transaction=False)
            counts = []
            for index in indices:
                before = len(pipe.command_stack)
                build(pipe, index)
                counts.append(len(pipe.command_stack) - before)
            wait = self.settings.wait_replicas
            if wait:
                pipe.execute_command("WAIT", wait, int(self.settings.wait_timeout * 1000))
            replies = pipe.execute()
            if wait and replies[-1] < wait:
                where = client.connection_pool.connection_kwargs
                raise redis.exceptions.TimeoutError(
                    f"WAIT: {replies[-1]} of {wait} replicas of {where.get('host')}:"
                    f"{where.get('port')} acknowledged within {self.settings.wait_timeout} s")
            out, at = [], 0
            for count in counts:
                out.append(replies[at: at + count])
                at += count
            return indices, out

        results: list = [None] * len(keys)
        for indices, replies in self._pool.map(run, groups.items()):
            for index, reply in zip(indices, replies, strict=True):
                results[index] = reply
        return results

    # --- adding -----------------------------------------------------------------------

    def add_videos(self, videos: Sequence[VideoPairs]) -> list[int | None]:
        prepared = [self._prepare(video) for video in videos]  # every check before any write
        if not videos:
            return []
        return self._run(lambda nodes: self._write(nodes, videos, prepared))

    def _positions(self, class_ids: np.ndarray) -> np.ndarray:
        """Each class id's position in ``class_ids``; -1 for a class not ranked."""
        at = np.clip(np.searchsorted(self._sorted_ids, class_ids), 0, len(self._sorted_ids) - 1)
        return np.where(self._sorted_ids[at] == class_ids, self._sorted_positions[at], -1)

    def _prepare(self, video: VideoPairs) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray, int]:
        """The video's id bytes and its ranked (positive-score) pairs as (positions, starts,
        scores), plus how many were dropped; ValueError as the native accumulator's."""
        starts = np.ascontiguousarray(video.starts, np.int64).reshape(-1)
        class_ids = np.ascontiguousarray(video.class_ids, np.int64).reshape(-1)
        scores = np.ascontiguousarray(video.scores, np.float64).reshape(-1)
        if not len(starts) == len(class_ids) == len(scores):
            raise ValueError(f"video {video.video_id!r}: {len(starts)} starts, {len(class_ids)} "
                             f"class ids and {len(scores)} scores differ in length")
        if np.isnan(scores).any():
            raise ValueError(f"video {video.video_id!r}: a score is NaN")
        if len(starts) and (starts.min() < 0 or starts.max() >= 1 << 31):
            raise ValueError(f"video {video.video_id!r}: a window start is outside [0, 2^31)")
        if "\0" in video.video_id:
            raise ValueError(f"video {video.video_id!r}: an id with a NUL character cannot be "
                             "ranked in Redis (NUL ends the id in a member)")
        positions = self._positions(class_ids)
        ranked = (positions >= 0) & (scores > 0)
        pairs = positions[ranked] << 31 | starts[ranked]
        if len(np.unique(pairs)) < len(pairs):
            # natively both would be ranked; a member is one (video, class, start) here
            raise ValueError(f"video {video.video_id!r}: a (class, window start) pair is given twice")
        return (video.video_id.encode("utf-8"), positions[ranked], starts[ranked], scores[ranked],
                int((~ranked).sum()))

    def _refresh_thresholds(self, nodes: _Nodes) -> None:
        replies = self._pipelines(nodes, self._keys,
                                  lambda pipe, i: pipe.zrange(self._keys[i], self.k - 1, self.k - 1,
                                                              withscores=True))
        with self._lock:
            for position, [reply] in enumerate(replies):
                if reply:
                    self._thresholds[position] = max(self._thresholds[position], -reply[0][1])
            self._refreshed = time.monotonic()

    def _write(self, nodes: _Nodes, videos: Sequence[VideoPairs], prepared) -> list[int | None]:
        if time.monotonic() - self._refreshed > self.settings.threshold_refresh_seconds:
            self._refresh_thresholds(nodes)
        # 1. claim the orders
        ids = [video_id for video_id, *_ in prepared]
        given = [b"" if video.order is None else str(int(video.order)).encode() for video in videos]
        [[claims]] = self._pipelines(nodes, [self._done], lambda pipe, _: pipe.eval(
            _CLAIM, 2, self._done, self._orders, len(ids), *ids, *given))
        orders = [None if claim == b"done" else int(claim) for claim in claims]
        for later in {i for i, video_id in enumerate(ids) if video_id in ids[:i]}:
            orders[later] = None  # the group's first copy of an id is the video; the rest repeat it
        # 2. the pairs above the cached thresholds, per class
        members: dict[int, dict[bytes, float]] = {}
        with self._lock:
            thresholds = self._thresholds.copy()
        sent = rejected = 0
        for (video_id, positions, starts, scores, _), order in zip(prepared, orders, strict=True):
            if order is None:
                continue
            keep = scores >= thresholds[positions] if self.settings.filter_pairs else np.ones(len(scores), bool)
            sent += int(keep.sum())
            rejected += int(len(keep) - keep.sum())
            for position, start, score in zip(positions[keep].tolist(), starts[keep].tolist(),
                                              scores[keep].tolist(), strict=True):
                members.setdefault(position, {})[encode_member(order, video_id, start)] = -score
        positions = sorted(members)
        if positions:
            keys = [self._keys[p] for p in positions]

            def write_class(pipe, index):
                pipe.zadd(keys[index], members[positions[index]])
                pipe.zremrangebyrank(keys[index], self.k, -1)
                pipe.zrange(keys[index], self.k - 1, self.k - 1, withscores=True)

            replies = self._pipelines(nodes, keys, write_class)
            with self._lock:
                for position, (_, _, kth) in zip(positions, replies, strict=True):
                    if kth:
                        self._thresholds[position] = max(self._thresholds[position], -kth[0][1])
        # 3. mark them done
        new = [i for i, order in enumerate(orders) if order is not None]
        if new:
            [marks] = self._pipelines(nodes, [self._done], lambda pipe, _: [
                pipe.hsetnx(self._done, ids[i], orders[i]) for i in new])
            for i, mark in zip(new, marks, strict=True):
                if not mark:  # another replica finished this video first
                    orders[i] = None
        with self._lock:  # the videos written (a duplicate's pairs are not looked at, as natively)
            written = [p for p, order in zip(prepared, orders, strict=True) if order is not None]
            self._counts["pairs"] += sum(len(p[1]) + p[4] for p in written)
            self._counts["dropped"] += sum(p[4] for p in written)
            self._counts["accepted"] += sent
            self._counts["rejected"] += rejected
        return orders

    def commit(self) -> None:
        """Nothing: :meth:`add_videos` returns once its writes are as durable as configured."""

    # --- reading ----------------------------------------------------------------------

    @property
    def videos(self) -> int:
        """Videos ingested by the whole fleet (the last count read, while Redis cannot be
        reached)."""
        try:
            self._last_videos = self._run(lambda nodes: nodes.client_of(self._done).hlen(self._done))
        except StoreUnavailable:
            pass
        return self._last_videos

    def contains(self, video_id: str) -> bool:
        return bool(self._run(lambda nodes: nodes.client_of(self._done).hexists(self._done, video_id)))

    def stats(self) -> TopKStats:
        """The fleet's videos and kept entries; the pair counters are this store's."""
        def read(nodes):
            cards = self._pipelines(nodes, self._keys, lambda pipe, i: pipe.zcard(self._keys[i]))
            return nodes.client_of(self._done).hlen(self._done), sum(c for [c] in cards)

        videos, kept = self._run(read)
        with self._lock:
            return TopKStats(videos=videos, kept=kept, buffered=kept, **self._counts)

    def rows(self) -> dict[int, list[str]]:
        replies = self._run(lambda nodes: self._pipelines(
            nodes, self._keys, lambda pipe, i: pipe.zrange(self._keys[i], 0, self.k - 1)))
        rows = {}
        for class_id, [members] in zip(self.class_ids, replies, strict=True):
            rows[class_id] = [segment_id(video_id, start)
                              for _, video_id, start in map(decode_member, members)]
        return rows

    def ranking(self, class_id: int, limit: int | None, offset: int) -> list[tuple[str, int, float]]:
        position = self._positions(np.asarray([class_id], np.int64))[0]
        if position < 0:
            raise KeyError(f"class {class_id} is not one of the {len(self.class_ids)} classes "
                           "these rankings rank")
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError(f"offset and limit must be >= 0, got {offset}, {limit}")
        stop = min(self.k if limit is None else offset + limit, self.k) - 1
        if stop < offset:
            return []
        key = self._keys[position]
        entries = self._run(lambda nodes: nodes.client_of(key).zrange(key, offset, stop, withscores=True))
        return [(video_id, start, -score)
                for (_, video_id, start), score in ((decode_member(m), s) for m, s in entries)]

    def ping(self) -> None:
        self._run(lambda nodes: [client.ping() for client in nodes.masters()])

    def close(self) -> None:
        self._pool.shutdown()
        with self._lock:
            if self._nodes is not None:
                self._nodes.close()
                self._nodes = None


__all__ = ["ORDER_OFFSET", "RedisStore", "decode_member", "encode_member"]
