"""Per-class top-K of (video, window start, score) pairs: stage 4 of the engine, with persistence.

:class:`TopK` keeps, for each ranked class, the ``k`` best pairs among everything inserted
(native code, ``native/topk.cpp``); the engine pipeline, :func:`modloc.engine.runtime.offline_eval.localize_split`,
:mod:`modloc.export.validation` and the service feed it. :class:`DurableTopK` adds an insert log
and snapshots in a directory so that nothing acknowledged is lost in a crash.

**Rank order** (per class): score descending; among equal scores the video with the
smaller *order* first, then the smaller window start. A video's order is a 64-bit tie key
given when it is registered, by default the number of videos registered before it, so by
default ties keep the order in which videos were added (REFERENCE §7 step 4, "ties keep
file order"). Sharded runs pass a global order (e.g. ``(file index << 32) | record index``)
and merging the shards (:meth:`TopK.merge`) then gives exactly the single-process ranking.
Two videos given the same order are ranked by id (code point order of their UTF-8 bytes).

**What enters**: pairs of a class the accumulator does not rank, or with a score <= 0, are
dropped (the reference ranks only positive values); a NaN score is a ValueError and
nothing of that call is inserted.

**Exactness and memory**: each class holds an unordered buffer that always contains its
exact top ``k``; when the buffer reaches ``k + slack`` entries it is cut back to the ``k``
best and the ``k``-th best becomes the class's threshold, below which a pair is turned
away in O(1). Memory is bounded by ``16 bytes × classes × (k + slack)`` for the buffers
(default slack ``max(k // 4, 1024)``: 2 GB for 1000 classes at k = 100,000), plus, per
registered video, its id and about 60 bytes, plus one buffer's worth (``16 × (k + slack)``
bytes) of scratch per thread that has cut a buffer.

**Threads**: every method may be called from several threads at once; insertion releases
the GIL and locks one class at a time.

**Snapshot** (:meth:`TopK.to_bytes`, :meth:`TopK.save`): TFRecord framing
(:mod:`modloc.engine.base.io.tfrecord`, whose masked CRC32Cs checksum every record) of ``2 + C``
records, little-endian: a header (magic ``MLTKSNAP``, format version, ``k``, slack, the
counters of :class:`TopKStats`, the ``C`` class ids, the number of videos), the video table
(order and UTF-8 id of each video) and one record per class (its kept entries, best first:
score float64, video index uint32, start uint32). See ``native/topk.cpp`` for the byte layout.

**Insert log** (:class:`DurableTopK`): TFRecord framing; record 0 is a header (magic
``MLTK-LOG``, version, ``k``, class ids), then one record per added video: its order, id
and the pairs that entered a buffer when it was added (score, start, class position).
Pairs turned away then can never be in the top ``k``, so replaying the records after the
snapshot they follow rebuilds exactly the same rankings.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import operator
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.typing import ArrayLike

from modloc.engine import _native
from modloc.engine.base.atomic import fsync_path, write_atomically
from modloc.engine.base.io.tfrecord import (
    CorruptRecordError,
    encode_record,
    iter_buffer_records,
    iter_stream_records,
)
from modloc.engine.base.metrics.segment import MAX_SEGMENTS_PER_CLASS, segment_id
from modloc.engine.base.vocab import ClassSpace

logger = logging.getLogger(__name__)


class TopKFormatError(ValueError):
    """A snapshot or insert log that cannot be read; the message names the file and why."""


@dataclass(frozen=True)
class TopKStats:
    """Counts of a :class:`TopK`.

    Attributes:
        videos: videos registered.
        kept: entries the rankings hold now (at most ``k`` per class).
        buffered: entries held in memory, at most ``classes × (k + slack)``.
        pairs: pairs given to :meth:`TopK.add` and :meth:`TopK.insert`
            (``= accepted + rejected + dropped``; a merge adds the other's counts).
        accepted: pairs that entered a class buffer (some were cut later).
        rejected: pairs turned away by a class's threshold.
        dropped: pairs of a class not ranked, or with a score <= 0.
    """

    videos: int
    kept: int
    buffered: int
    pairs: int
    accepted: int
    rejected: int
    dropped: int


def default_slack(k: int) -> int:
    """Entries buffered per class beyond ``k`` before a cut: a quarter of ``k``, at least 1024.

    A cut costs O(k + slack), so a larger slack means fewer cuts per pair and more memory.
    """
    return max(k // 4, 1024)


def _int64(values: ArrayLike) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.int64).reshape(-1)


def _float64(values: ArrayLike) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float64).reshape(-1)


def _order(order: int | None) -> int | None:
    return None if order is None else operator.index(order)


class TopK:
    """Per class, the ``k`` best (video, window start, score) pairs inserted (module docstring).

    Args:
        class_ids: the ranked classes, vocabulary ids (e.g. the 1000 segment classes,
            :func:`modloc.engine.base.vocab.default_segment_class_ids`).
        k: pairs kept per class, >= 1 (Kaggle's row limit by default).
        slack: pairs buffered per class beyond ``k`` (default :func:`default_slack`).
    """

    def __init__(self, class_ids: Sequence[int] | np.ndarray, k: int = MAX_SEGMENTS_PER_CLASS,
                 slack: int | None = None):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        space = ClassSpace(class_ids)
        self._core = _native.TopK(space.class_ids, k, default_slack(k) if slack is None else slack)

    @classmethod
    def _wrap(cls, core: _native.TopK) -> TopK:
        ClassSpace(core.class_ids)  # a snapshot's class ids must be vocabulary ids too
        topk = cls.__new__(cls)
        topk._core = core
        return topk

    @property
    def class_ids(self) -> np.ndarray:
        """``(C,)`` int64 ranked class ids, in the order of :meth:`rankings`."""
        return self._core.class_ids

    @property
    def k(self) -> int:
        return self._core.k

    @property
    def slack(self) -> int:
        return self._core.slack

    def __repr__(self) -> str:
        return f"TopK({len(self.class_ids)} classes, k={self.k}, {self._core.num_videos} videos)"

    # --- inserting ------------------------------------------------------------------

    def add_video(self, video_id: str, order: int | None = None) -> int:
        """Register a video; returns its index (for :meth:`insert`).

        ``order`` is its 64-bit tie key (default: the number of videos registered before
        it). An id registered already keeps its index and order.
        """
        return self._core.add_video(video_id, _order(order))

    def contains(self, video_id: str) -> bool:
        """Whether ``video_id`` is registered."""
        return self._core.find_video(video_id) is not None

    def add(self, video_id: str, starts: ArrayLike, class_ids: ArrayLike, scores: ArrayLike,
            order: int | None = None) -> None:
        """Add one video's pairs: ``(m,)`` window start frames, class ids and float64 scores.

        Registers the video first (``order`` as in :meth:`add_video`); a video may be added
        in several calls. Pairs of a class not ranked or with a score <= 0 are dropped.
        Raises ValueError, inserting nothing, when the lengths differ, a score is NaN
        (naming the video) or a start is outside ``[0, 2^31)``.
        """
        self._core.add(video_id, _order(order), _int64(starts), _int64(class_ids),
                       _float64(scores), False)

    def insert(self, videos: ArrayLike, starts: ArrayLike, class_ids: ArrayLike,
               scores: ArrayLike) -> None:
        """Add pairs of many registered videos in one call: the fast path.

        Args:
            videos: ``(n,)`` video indices from :meth:`add_video`.
            starts: ``(n,)`` window start frames.
            class_ids: ``(n,)`` vocabulary ids.
            scores: ``(n,)`` float64 scores.

        Same filtering and checks as :meth:`add`; an index that is not registered is a
        ValueError too (nothing inserted).
        """
        self._core.insert(_int64(videos), _int64(starts), _int64(class_ids), _float64(scores))

    def merge(self, other: TopK) -> None:
        """Add ``other``'s state to this one: afterwards this holds the exact top ``k`` of
        the union of both streams.

        Both must have the same class ids (same order) and ``k``, else ValueError. A video
        id in both is one video with the smaller order; the result is exact when a video's
        order is the same everywhere its pairs were inserted (a global order is).
        """
        if not isinstance(other, TopK):
            raise TypeError(f"can only merge a TopK, got {type(other).__name__}")
        self._core.merge(other._core)

    # --- reading --------------------------------------------------------------------

    def rankings(self) -> dict[int, list[str]]:
        """Class id → up to ``k`` segment ids (``"<video id>:<start>"``), best first, for
        every ranked class (an empty list for a class without pairs).

        The shape :func:`modloc.engine.base.metrics.segment_map` and
        :func:`modloc.engine.base.submission.write_submission` take.
        """
        slices = [self._core.ranking(position, 0, self.k)[:2] for position in range(len(self.class_ids))]
        ids = self._core.video_ids()  # read after the slices: it names every video they hold
        return {class_id: [segment_id(ids[v], s) for v, s in zip(videos.tolist(), starts.tolist(), strict=True)]
                for class_id, (videos, starts) in zip(self.class_ids.tolist(), slices, strict=True)}

    def ranking(self, class_id: int, limit: int | None = None,
                offset: int = 0) -> list[tuple[str, int, float]]:
        """``(video id, start, score)`` of one class's ranks ``[offset, offset + limit)``,
        best first (all from ``offset`` when ``limit`` is None).

        Raises KeyError for a class the accumulator does not rank.
        """
        position = self._core.position(operator.index(class_id))
        if position < 0:
            raise KeyError(f"class {class_id} is not one of the {len(self.class_ids)} classes this "
                           "top-K ranks")
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError(f"offset and limit must be >= 0, got {offset}, {limit}")
        videos, starts, scores = self._core.ranking(position, offset, self.k if limit is None else limit)
        return [(self._core.video_id(v), s, score)
                for v, s, score in zip(videos.tolist(), starts.tolist(), scores.tolist(), strict=True)]

    def stats(self) -> TopKStats:
        return TopKStats(**self._core.stats())

    # --- snapshots ------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The snapshot of the current state (format in the module docstring)."""
        return b"".join(_framed(self._core.encode_snapshot()))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>", slack: int | None = None) -> TopK:
        """The accumulator a snapshot holds; ``slack`` None keeps the snapshot's.

        Raises TopKFormatError naming ``source`` and what is wrong (not a snapshot, a record
        failing its CRC, truncated, an unsupported format version, an inconsistent field).
        """
        try:
            payloads = [record.payload for record in iter_buffer_records(data, source)]
        except CorruptRecordError as error:
            raise TopKFormatError(f"{source}: not a readable top-K snapshot: record {error.index} "
                                  f"at byte offset {error.offset}: {error.reason}") from None
        if not payloads:
            raise TopKFormatError(f"{source}: empty file, not a top-K snapshot")
        try:
            core = _native.TopK.decode_snapshot(payloads, slack)
        except ValueError as error:
            raise TopKFormatError(f"{source}: {error}") from None
        return cls._wrap(core)

    def save(self, path: str | os.PathLike) -> None:
        """Write the snapshot to ``path`` atomically (a reader sees the old file or the new)."""
        write_atomically(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike, slack: int | None = None) -> TopK:
        """The accumulator saved at ``path`` (errors as :meth:`from_bytes`)."""
        return cls.from_bytes(Path(path).read_bytes(), str(path), slack)


def _framed(payloads: list[bytes]) -> Iterator[bytes]:
    """TFRecord records of ``payloads``, emptying the list as it goes so that each payload
    is freed once framed."""
    payloads.reverse()
    while payloads:
        yield encode_record(payloads.pop())


# --- durability -----------------------------------------------------------------------

_SNAPSHOT = "snapshot-{:08d}.topk"
_LOG = "log-{:08d}.tfrecord"
_LOCK = "LOCK"
_FRAMING = len(encode_record(b""))  # bytes a TFRecord adds to its payload


def _generations(directory: Path, pattern: str) -> dict[int, Path]:
    prefix, suffix = pattern.split("{")[0], pattern.split("}")[1]
    found = {}
    for path in directory.glob(f"{prefix}*{suffix}"):
        number = path.name[len(prefix): -len(suffix)]
        if number.isdigit():
            found[int(number)] = path
    return found


def _torn_tail(error: CorruptRecordError, handle: BinaryIO, size: int) -> bool:
    """Whether a log's bad record is the tail of an append a crash cut short.

    A truncated record is; so is one failing its data CRC that ends the file (part of its
    bytes never reached the disk), and a header failing its CRC followed only by zeros (a
    file extended without its data). Anything else is corruption of acknowledged data.
    """
    if error.reason.startswith("truncated"):
        return True
    if error.reason == "data CRC mismatch":
        return handle.tell() == size
    if error.reason == "length CRC mismatch":
        handle.seek(error.offset)
        return not handle.read().strip(b"\0")
    return False


class DurableTopK:
    """A :class:`TopK` in a directory that survives crashes: nothing acknowledged is lost.

    Use :meth:`open`. Each :meth:`add` inserts a video and appends its record to the insert
    log; :meth:`commit` flushes and fsyncs the log, so every add before it is durable (add
    many videos, commit once, then acknowledge them). :meth:`snapshot` writes the state to
    a new snapshot and starts a new log; reopening loads the latest snapshot and replays
    its log.

    The directory holds ``snapshot-<generation>.topk`` (none for generation 0),
    ``log-<generation>.tfrecord`` (the adds after that snapshot) and ``LOCK`` (an exclusive
    lock: one process at a time). A snapshot is made durable (file and directory fsynced)
    before its log is created and before the previous generation is deleted, so a crash at
    any point leaves one complete generation: a snapshot whose log was never created may be
    unfinished and is discarded, with a warning, in favour of the previous generation.

    Thread-safe: adds, commits and snapshots are serialized by one lock. Read the state
    through :attr:`topk`; adding to it directly would bypass the log.
    """

    def __init__(self, directory: Path, topk: TopK, generation: int, log: BinaryIO, lock: BinaryIO):
        self.directory = directory
        self._topk = topk
        self._generation = generation
        self._log: BinaryIO | None = log
        self._lock_file = lock
        self._lock = threading.Lock()
        self._failed: BaseException | None = None

    @classmethod
    def open(cls, directory: str | os.PathLike, class_ids: Sequence[int] | np.ndarray,
             k: int = MAX_SEGMENTS_PER_CLASS, slack: int | None = None) -> DurableTopK:
        """Restore the directory's latest snapshot and replay its log (an empty accumulator
        for a new directory).

        Raises ValueError when the directory holds a top-K of other class ids or ``k``,
        TopKFormatError or CorruptRecordError (naming the file, and the record index) for
        a damaged snapshot or log, and BlockingIOError when another process has it open. A
        log record torn by a crash (the file's tail) is dropped with a logged warning.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / _LOCK, "ab")
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BlockingIOError(errno.EWOULDBLOCK,
                                      f"{directory}: the top-K directory is open in another process") from None
            wanted = TopK(class_ids, k, slack)
            topk, generation = cls._restore(directory, wanted, slack)
            log = cls._open_log(directory / _LOG.format(generation), topk)
            for older, path in [*_generations(directory, _SNAPSHOT).items(), *_generations(directory, _LOG).items()]:
                if older < generation:
                    path.unlink()
            fsync_path(directory)
        except BaseException:
            lock.close()
            raise
        return cls(directory, topk, generation, log, lock)

    @staticmethod
    def _restore(directory: Path, wanted: TopK, slack: int | None) -> tuple[TopK, int]:
        """The latest complete generation's snapshot (not yet its log) and its number."""
        for leftover in directory.glob(".snapshot-*.tmp-*"):  # write_atomically's, unfinished
            leftover.unlink()
        snapshots = _generations(directory, _SNAPSHOT)
        logs = _generations(directory, _LOG)
        discarded = None
        for generation in sorted(snapshots.keys() | logs.keys(), reverse=True):
            if generation not in snapshots:
                if generation != 0:
                    raise TopKFormatError(f"{logs[generation]}: the log of generation {generation} "
                                          f"has no snapshot {_SNAPSHOT.format(generation)}")
                return wanted, 0
            try:
                topk = TopK.load(snapshots[generation], slack)
            except TopKFormatError as error:
                if generation in logs:
                    raise  # its log exists, so it was complete and durable: damaged since
                logger.warning("%s: discarding a snapshot a crash left unfinished (%s)",
                               snapshots[generation], error)
                snapshots[generation].unlink()
                discarded = snapshots[generation]
                continue
            if topk.k != wanted.k or not np.array_equal(topk.class_ids, wanted.class_ids):
                raise ValueError(
                    f"{directory}: holds a top-K of k={topk.k} over {len(topk.class_ids)} classes "
                    f"({snapshots[generation].name}), not the k={wanted.k} over "
                    f"{len(wanted.class_ids)} classes asked for")
            return topk, generation
        if discarded is not None:
            # the previous generation's log goes only once a later one is complete
            raise TopKFormatError(f"{discarded}: unfinished, and no earlier generation to fall back on")
        return wanted, 0

    @staticmethod
    def _open_log(path: Path, topk: TopK) -> BinaryIO:
        """Replay ``path`` into ``topk`` (creating the log if absent) and open it for appending."""
        header = False
        end = size = 0
        if path.exists():
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                try:
                    for record in iter_stream_records(handle, str(path)):
                        try:
                            if record.index == 0:
                                topk._core.check_log_header(record.payload)
                                header = True
                            else:
                                topk._core.replay(record.payload)
                        except ValueError as error:
                            if record.index == 0:
                                raise TopKFormatError(f"{path}: {error}") from None
                            raise CorruptRecordError(str(path), record.index, record.offset,
                                                     str(error)) from None
                        end = record.offset + _FRAMING + len(record.payload)
                except CorruptRecordError as error:
                    if not _torn_tail(error, handle, size):
                        raise
                    logger.warning("%s: dropping the last record, torn by a crash (%s)", path, error)
            if end < size:
                os.truncate(path, end)
        log = open(path, "ab")
        if not header:
            log.write(encode_record(topk._core.encode_log_header()))
        if not header or end < size:
            # the cut and the header must be on disk before records are appended after them
            log.flush()
            os.fsync(log.fileno())
            fsync_path(path.parent)
        return log

    @property
    def topk(self) -> TopK:
        """The accumulator (read it; add through :meth:`add`)."""
        return self._topk

    def contains(self, video_id: str) -> bool:
        """Whether ``video_id`` was added (durably or not yet committed)."""
        return self._topk.contains(video_id)

    def add(self, video_id: str, starts: ArrayLike, class_ids: ArrayLike, scores: ArrayLike,
            order: int | None = None) -> bool:
        """Insert one video's pairs (as :meth:`TopK.add`) and log them.

        Returns False, doing nothing, when ``video_id`` was added before: adding is
        idempotent, so a client may resend what was not acknowledged. Durable once
        :meth:`commit` returns.
        """
        with self._lock:
            log = self._writable()
            if self._topk.contains(video_id):
                return False
            record = self._topk._core.add(video_id, _order(order), _int64(starts), _int64(class_ids),
                                          _float64(scores), True)
            self._write(log.write, encode_record(record))
            return True

    def commit(self) -> None:
        """Flush the log and fsync it: every add before this call is durable."""
        with self._lock:
            log = self._writable()
            self._write(self._sync, log)

    def snapshot(self) -> Path:
        """Write the state to a new snapshot, durably, and start a new log; returns its path."""
        with self._lock:
            log = self._writable()
            generation = self._generation + 1
            path = self.directory / _SNAPSHOT.format(generation)
            try:
                write_atomically(path, self._topk.to_bytes())
                fsync_path(path)
                fsync_path(self.directory)
            except BaseException:
                # Only a snapshot that did not get written: the log still holds everything, so
                # this is no failure of the state (later adds and commits go on).
                path.unlink(missing_ok=True)
                raise

            def write():
                # Only now, with the snapshot durable, may the new log start and the old go.
                new_log = self._open_log(self.directory / _LOG.format(generation), self._topk)
                log.close()
                (self.directory / _LOG.format(self._generation)).unlink()
                (self.directory / _SNAPSHOT.format(self._generation)).unlink(missing_ok=True)
                fsync_path(self.directory)
                return new_log

            self._log = self._write(write)
            self._generation = generation
            return path

    def close(self) -> None:
        """Commit and release the directory; further calls raise ValueError."""
        with self._lock:
            if self._log is None:
                return
            try:
                if self._failed is None:
                    self._sync(self._log)
            finally:
                self._log.close()
                self._log = None
                self._lock_file.close()

    def __enter__(self) -> DurableTopK:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def _writable(self) -> BinaryIO:
        if self._log is None:
            raise ValueError(f"{self.directory}: the durable top-K is closed")
        if self._failed is not None:
            raise RuntimeError(f"{self.directory}: an earlier write failed ({self._failed}); "
                               "reopen the directory to recover") from self._failed
        return self._log

    def _write(self, operation, *args):
        """Run a log or snapshot write; after a failure the in-memory state may be ahead
        of the files, so every later call is refused until the directory is reopened."""
        try:
            return operation(*args)
        except BaseException as error:
            self._failed = error
            raise

    @staticmethod
    def _sync(log: BinaryIO) -> None:
        log.flush()
        os.fsync(log.fileno())


__all__ = ["DurableTopK", "TopK", "TopKFormatError", "TopKStats", "default_slack"]
