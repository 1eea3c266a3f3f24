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

import contextlib
import errno
import fcntl
import json
import logging
import operator
import os
import struct
import threading
import time
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
_MANIFEST = "MANIFEST"
_MANIFEST_FORMAT = "modloc-topk-state"
_MANIFEST_VERSION = 1
_FRAMING = len(encode_record(b""))  # bytes a TFRecord adds to its payload
_CRC_BYTES = 4  # a record's last field: the masked CRC32C of its data
_ACCEPT_LOSS = "accept_loss (modloc serve --accept-state-loss)"


class StateMismatchError(ValueError):
    """A state directory filled under other settings (models, fusion) than the opener's."""


@dataclass(frozen=True)
class StatePolicy:
    """What :meth:`DurableTopK.open` may do beyond restoring intact state: each is an
    operator's explicit choice (``modloc serve`` flags), never a default.

    Attributes:
        accept_loss: open damaged state (a file the manifest names missing, shorter than it
            says, or corrupt): keep what is intact, drop the rest, and log what was dropped.
        accept_settings: keep rankings filled under other settings than the opener's
            (another model, other fusion exponents); the manifest then records the new ones.
        fresh: start empty rankings; the directory's files are moved into a
            ``replaced-<time>/`` folder inside it, not deleted.
    """

    accept_loss: bool = False
    accept_settings: bool = False
    fresh: bool = False


def _generations(directory: Path, pattern: str) -> dict[int, Path]:
    prefix, suffix = pattern.split("{")[0], pattern.split("}")[1]
    found = {}
    for path in directory.glob(f"{prefix}*{suffix}"):
        number = path.name[len(prefix): -len(suffix)]
        if number.isdigit():
            found[int(number)] = path
    return found


def _torn(error: CorruptRecordError, handle: BinaryIO, size: int) -> bool:
    """Whether a log's bad record is an append that a crash cut short (module rules).

    Torn: a record (or its header) that the file ends inside of; a last record whose data
    CRC fails and whose CRC field reads zero (the end of the append never reached the
    disk); a header failing its length CRC followed only by zeros (a file extended without
    its data). Anything else is damage.
    """
    if error.reason.startswith("truncated"):
        return True
    if error.reason == "data CRC mismatch" and handle.tell() == size:
        handle.seek(size - _CRC_BYTES)
        return handle.read() == b"\0" * _CRC_BYTES
    if error.reason == "length CRC mismatch":
        handle.seek(error.offset)
        return not handle.read().strip(b"\0")
    return False


def _logged_id(payload: bytes) -> str:
    """The video id of a log record (order int64, id length uint32, id, pairs)."""
    (length,) = struct.unpack_from("<I", payload, 8)
    return payload[12: 12 + length].decode("utf-8", "replace")


def _flat(settings: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_differences(stored: dict, wanted: dict) -> list[str]:
    """``"name: <stored> then, <wanted> now"`` for every setting that differs (nested keys
    dotted)."""
    before, now = _flat(stored), _flat(wanted)
    return [f"{key}: {before.get(key, '<absent>')!r} then, {now.get(key, '<absent>')!r} now"
            for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)]


@dataclass
class _LogState:
    """What the current log holds: its length, records after the header, last video."""

    path: Path
    first_video: int  # videos before the log's first record (the snapshot's)
    bytes: int = 0
    records: int = 0
    last_video: str | None = None

    def to_json(self) -> dict:
        return {"file": self.path.name, "first_video": self.first_video, "bytes": self.bytes,
                "records": self.records, "last_video": self.last_video}

    def holds(self) -> str:
        last = f", the last {self.last_video!r}" if self.last_video is not None else ""
        return f"{self.bytes} bytes: its header and {self.records} videos{last}"


class DurableTopK:
    """A :class:`TopK` in a directory that survives crashes: nothing acknowledged is lost,
    and state that cannot be trusted is never used silently.

    Use :meth:`open`. Each :meth:`add` inserts a video and appends its record to the insert
    log; :meth:`commit` flushes and fsyncs the log, so every add before it is durable (add
    many videos, commit once, then acknowledge them). :meth:`snapshot` writes the state to
    a new snapshot and starts a new log; reopening loads the snapshot and replays its log.

    **The directory.** ``MANIFEST`` names every file that holds acknowledged data, as
    LevelDB's MANIFEST/CURRENT do: the snapshot (``snapshot-<generation>.topk``, none in
    generation 0) with its size and video count, the log that continues it
    (``log-<generation>.tfrecord``) with the number of videos before its first record,
    and the length and video count the log was known to hold when the manifest was
    written (at open, at each snapshot, at a clean close); also the settings that filled
    the rankings (the models' hashes, the fusion settings; see ``settings``) and when and
    why it was written. It is replaced atomically and durably (fsync, rename, directory
    fsync). ``LOCK`` is an exclusive lock: one process at a time. A file the manifest does
    not name is a leftover (of a snapshot a crash interrupted, or of the generation a
    snapshot replaced) and is deleted at open.

    **A snapshot** is written durably, then its new log (header only, fsynced), then the
    manifest naming both; only then are the previous generation's files deleted. A crash
    at any point leaves the manifest naming one complete generation.

    **Opening refuses** (TopKFormatError naming the file and what is missing) state that
    cannot be trusted: no manifest beside top-K files; a named file missing; a snapshot of
    another size or video count than the manifest says; a log shorter than the length the
    manifest recorded (an emptied or truncated log, after a clean close for instance); a
    record that fails its CRC or does not decode anywhere but at the log's end.
    :attr:`StatePolicy.accept_loss` opens it anyway, keeping what is intact (the snapshot,
    the log up to its first bad record) and logging what was dropped.

    **The log's end** past what the manifest recorded may hold a torn write: an append that
    a crash cut short, never acknowledged (acknowledgements follow a commit's fsync). It
    cannot be told from a cut made later, so it is accepted as one and dropped, with a
    warning saying where the log was cut (byte offset, bytes dropped, last intact record):
    a record the file ends inside of; a last record whose data CRC fails and whose CRC
    field reads zero (the end of the append never reached the disk); a length field failing
    its CRC followed only by zeros. A last record whose CRC fails with any other bytes
    (e.g. one flipped bit) is damage and refused.

    **Settings** (``settings`` of :meth:`open`): the manifest records them; an opener with
    other settings is refused (:class:`StateMismatchError`, naming each difference) unless
    :attr:`StatePolicy.accept_settings`, or :attr:`StatePolicy.fresh` starts new rankings.

    Thread-safe: adds, commits and snapshots are serialized by one lock. Read the state
    through :attr:`topk`; adding to it directly would bypass the log.
    """

    def __init__(self, directory: Path, topk: TopK, generation: int, snapshot: dict | None,
                 log: BinaryIO, log_state: _LogState, settings: dict | None, lock: BinaryIO):
        self.directory = directory
        self._topk = topk
        self._generation = generation
        self._snapshot_entry = snapshot
        self._log: BinaryIO | None = log
        self._log_state = log_state
        self._settings = settings
        self._lock_file = lock
        self._lock = threading.Lock()
        self._failed: BaseException | None = None

    @classmethod
    def open(cls, directory: str | os.PathLike, class_ids: Sequence[int] | np.ndarray,
             k: int = MAX_SEGMENTS_PER_CLASS, slack: int | None = None,
             settings: dict | None = None, policy: StatePolicy = StatePolicy()) -> DurableTopK:
        """Restore the directory's snapshot and replay its log (an empty accumulator for a
        new directory), following the rules of the class docstring.

        ``settings``: JSON-serializable settings that filled the rankings (checked against
        the manifest's; None: not checked, the recorded ones kept).

        Raises ValueError when the directory holds a top-K of other class ids or ``k``,
        StateMismatchError for other settings, TopKFormatError or CorruptRecordError
        (naming the file, and the record index) for state that cannot be trusted, and
        BlockingIOError when another process has it open.
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
            if policy.fresh:
                _move_aside(directory)
            for leftover in directory.glob(".*.tmp-*"):  # write_atomically's, unfinished
                leftover.unlink()
            manifest = _read_manifest(directory, policy)
            if manifest is None:
                manifest = _adopt(directory, policy)
            if settings is not None and manifest.get("settings") is not None:
                _check_settings(directory, manifest["settings"], settings, policy)
            restored = cls._restore(directory, manifest, TopK(class_ids, k, slack), slack, policy)
            opened = cls(directory, *restored,
                         settings if settings is not None else manifest.get("settings"), lock)
            opened._write_manifest("open")
            named = {opened._log_state.path.name}
            if opened._snapshot_entry is not None:
                named.add(opened._snapshot_entry["file"])
            for path in [*_generations(directory, _SNAPSHOT).values(), *_generations(directory, _LOG).values()]:
                if path.name not in named:
                    logger.info("%s: removing a file the manifest does not name (left by an "
                                "interrupted or finished snapshot)", path)
                    path.unlink()
            fsync_path(directory)
        except BaseException:
            lock.close()
            raise
        return opened

    @classmethod
    def _restore(cls, directory: Path, manifest: dict, wanted: TopK, slack: int | None,
                 policy: StatePolicy) -> tuple[TopK, int, dict | None, BinaryIO, _LogState]:
        """The generation the manifest names: its snapshot loaded and checked, its log
        replayed and opened for appending (what :meth:`__init__` takes)."""
        generation = manifest["generation"]
        entry = manifest["snapshot"]
        topk = wanted
        if entry is not None:
            path = directory / entry["file"]
            problem = None
            if not path.exists():
                problem = "is missing"
            elif path.stat().st_size != entry["bytes"]:
                problem = f"holds {path.stat().st_size} bytes, not the {entry['bytes']} it was written with"
            else:
                try:
                    topk = TopK.load(path, slack)
                except TopKFormatError as error:
                    problem = f"is damaged ({error})"
                else:
                    if topk.stats().videos != entry["videos"]:
                        problem = f"holds {topk.stats().videos} videos, not the {entry['videos']} it was written with"
            if problem is not None:
                _refuse_or_accept(policy, f"{path} {problem}: the manifest names it as the "
                                  f"snapshot of {entry['videos']} acknowledged videos",
                                  f"starting from an empty top-K, the {entry['videos']} videos "
                                  "of the snapshot are lost")
                topk, entry = wanted, None
            elif topk.k != wanted.k or not np.array_equal(topk.class_ids, wanted.class_ids):
                raise ValueError(
                    f"{directory}: holds a top-K of k={topk.k} over {len(topk.class_ids)} classes "
                    f"({path.name}), not the k={wanted.k} over {len(wanted.class_ids)} classes asked for")
        recorded = manifest["log"]
        state = _LogState(directory / recorded["file"], recorded["first_video"])
        known = None if manifest.get("adopted") else _LogState(
            state.path, state.first_video, recorded["bytes"], recorded["records"], recorded["last_video"])
        log = cls._open_log(state, topk, known, manifest, policy)
        return topk, generation, entry, log, state

    @staticmethod
    def _open_log(state: _LogState, topk: TopK, known: _LogState | None, manifest: dict | None,
                  policy: StatePolicy) -> BinaryIO:
        """Replay ``state.path`` into ``topk`` (filling ``state``), cut a torn tail, and open
        it for appending (a new log gets its header). ``known``: what the manifest says it
        held (None for a log being created)."""
        path = state.path
        when = f"when the manifest was written ({manifest['event']}, {manifest['written']})" \
            if known is not None else ""
        header = False
        size = 0
        if path.exists():
            size = path.stat().st_size
        elif known is not None:
            _refuse_or_accept(policy, f"{path} is missing: the manifest names it as the log of "
                              f"the videos after the first {known.first_video}, holding "
                              f"{known.holds()} {when}",
                              "starting a new log; those videos are lost")
        if known is not None and path.exists() and size < known.bytes:
            _refuse_or_accept(policy, f"{path} holds {size} bytes, fewer than the "
                              f"{known.holds()} {when}: it was emptied or cut",
                              "keeping its intact records; the rest are lost")
        if size:
            with open(path, "rb") as handle:
                header = _replay(handle, str(path), size, topk, state,
                                 known.bytes if known is not None else 0, policy)
            if known is not None and state.records < known.records:
                _refuse_or_accept(policy, f"{path} holds {state.records} intact videos, fewer "
                                  f"than the {known.holds()} {when}",
                                  "keeping the intact ones")
        if state.bytes < size:
            os.truncate(path, state.bytes)
        log = open(path, "ab")
        if not header:
            log.write(encode_record(topk._core.encode_log_header()))
            state.bytes = log.tell()
        if not header or state.bytes < size:
            # the cut and the header must be on disk before records are appended after them
            log.flush()
            os.fsync(log.fileno())
            fsync_path(path.parent)
        return log

    def _write_manifest(self, event: str) -> None:
        """Replace the manifest, durably, with the files and lengths as they are now.

        A failure writing the new text changes nothing (the old manifest stands); one in the
        rename or the directory's fsync leaves unknown which manifest a crash would keep,
        so it fails the state (see :meth:`_write`).
        """
        manifest = {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION,
                    "event": event, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "generation": self._generation, "snapshot": self._snapshot_entry,
                    "log": self._log_state.to_json(), "settings": self._settings}
        tmp = self.directory / f".{_MANIFEST}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(manifest, indent=1) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._write(self._install, tmp)

    def _install(self, tmp: Path) -> None:
        os.replace(tmp, self.directory / _MANIFEST)
        fsync_path(self.directory)

    @property
    def topk(self) -> TopK:
        """The accumulator (read it; add through :meth:`add`)."""
        return self._topk

    @property
    def failure(self) -> BaseException | None:
        """The write that failed the directory (then every later write is refused until it
        is reopened), or None."""
        return self._failed

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
            record = encode_record(self._topk._core.add(
                video_id, _order(order), _int64(starts), _int64(class_ids), _float64(scores), True))
            self._write(log.write, record)
            self._log_state.bytes += len(record)
            self._log_state.records += 1
            self._log_state.last_video = video_id
            return True

    def commit(self) -> None:
        """Flush the log and fsync it: every add before this call is durable."""
        with self._lock:
            log = self._writable()
            self._write(self._sync, log)

    def snapshot(self) -> Path:
        """Write the state to a new snapshot, durably, and start a new log; returns its path.

        A snapshot that cannot be written (a full disk) raises OSError and changes nothing:
        the current log goes on holding everything.
        """
        with self._lock:
            log = self._writable()
            generation = self._generation + 1
            path = self.directory / _SNAPSHOT.format(generation)
            data = self._topk.to_bytes()
            videos = self._topk.stats().videos
            new_state = _LogState(self.directory / _LOG.format(generation), videos)
            before = (self._generation, self._snapshot_entry, self._log_state)
            new_state.path.unlink(missing_ok=True)  # never replay a stray file into the state
            try:
                write_atomically(path, data, durable=True)
                new_log = self._open_log(new_state, self._topk, None, None, StatePolicy())
            except BaseException:
                path.unlink(missing_ok=True)
                new_state.path.unlink(missing_ok=True)
                raise
            self._generation, self._log_state = generation, new_state
            self._snapshot_entry = {"file": path.name, "bytes": len(data), "videos": videos}
            try:
                self._write_manifest("snapshot")
            except BaseException:
                (self._generation, self._snapshot_entry, self._log_state) = before
                new_log.close()
                if self._failed is None:  # the old manifest stands: so does its generation
                    path.unlink(missing_ok=True)
                    new_state.path.unlink(missing_ok=True)
                raise
            # Only now, with the manifest naming the new generation, may the old one go.
            log.close()
            self._log = new_log
            for old in (_LOG.format(before[0]), _SNAPSHOT.format(before[0])):
                (self.directory / old).unlink(missing_ok=True)
            self._write(fsync_path, self.directory)
            return path

    def close(self) -> None:
        """Commit, record the log's length in the manifest, and release the directory;
        further calls raise ValueError.

        After a failed write nothing is flushed: the files are the state to keep (the
        buffered tail was never acknowledged).
        """
        with self._lock:
            if self._log is None:
                return
            try:
                if self._failed is None:
                    self._sync(self._log)
                    try:
                        self._write_manifest("close")
                    except OSError as error:  # the log is synced: nothing is at risk
                        logger.warning("%s: could not record the log's length at close (%s)",
                                       self.directory, error)
            finally:
                if self._failed is None:
                    self._log.close()
                else:
                    with contextlib.suppress(OSError):  # the flush of the unacknowledged tail
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
        """Run a log write; after a failure the in-memory state may be ahead of the files,
        so every later call is refused until the directory is reopened."""
        try:
            return operation(*args)
        except BaseException as error:
            self._failed = error
            raise

    @staticmethod
    def _sync(log: BinaryIO) -> None:
        log.flush()
        os.fsync(log.fileno())


def _replay(handle: BinaryIO, source: str, size: int, topk: TopK, state: _LogState,
            known_bytes: int, policy: StatePolicy) -> bool:
    """Replay an insert log of ``size`` bytes from ``handle`` into ``topk``, filling
    ``state`` (the end of the last intact record, the videos, the last one); whether the log
    had its header. A damaged record is dropped with what follows when it is a torn write
    past ``known_bytes`` (logged), or when ``policy`` accepts the loss; otherwise
    TopKFormatError names the file, record and offset (the reader's only error)."""
    header = False
    try:
        for record in iter_stream_records(handle, source):
            try:
                if record.index == 0:
                    topk._core.check_log_header(record.payload)
                    header = True
                else:
                    topk._core.replay(record.payload)
                    state.records += 1
                    state.last_video = _logged_id(record.payload)
            except ValueError as error:
                if record.index == 0:
                    raise TopKFormatError(f"{source}: {error}") from None
                raise CorruptRecordError(source, record.index, record.offset, str(error)) from None
            state.bytes = record.offset + _FRAMING + len(record.payload)
    except CorruptRecordError as error:
        acknowledged = error.offset < known_bytes
        if not acknowledged and _torn(error, handle, size):
            logger.warning(
                "%s: the log ends in a torn write (an append a crash cut short, never "
                "acknowledged): cut at byte offset %d inside record %d (%s); dropping its %d "
                "bytes; the last intact record is %s", source, error.offset, error.index,
                error.reason, size - state.bytes, _last_intact(state))
        else:
            why = "inside what the manifest says the log held" if acknowledged else \
                "and is not a torn write at the log's end"
            _refuse_or_accept(policy, f"{error} ({why}); the last intact record before it is "
                              f"{_last_intact(state)}",
                              f"dropping the {size - state.bytes} bytes from byte offset "
                              f"{error.offset} on")
    return header


def _last_intact(state: _LogState) -> str:
    if state.last_video is None:
        return f"the header (the log holds no video), ending at byte {state.bytes}"
    return f"video {state.last_video!r} (the log's video {state.records}), ending at byte {state.bytes}"


def _refuse_or_accept(policy: StatePolicy, problem: str, consequence: str) -> None:
    """Refuse untrusted state with ``problem``, or (accept_loss) log it and go on."""
    if not policy.accept_loss:
        raise TopKFormatError(f"{problem}. Refusing to open state that has lost acknowledged "
                              f"data; to open it anyway ({consequence}), pass {_ACCEPT_LOSS}")
    logger.warning("%s; accepting the loss as asked: %s", problem, consequence)


def _read_manifest(directory: Path, policy: StatePolicy) -> dict | None:
    """The directory's manifest; None when it has none (or an unreadable one the policy
    accepts losing)."""
    path = directory / _MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        _check_manifest(manifest)
    except ValueError as error:  # json's errors (UnicodeDecodeError too) are ValueErrors
        _refuse_or_accept(policy, f"{path} cannot be read ({type(error).__name__}: {error})",
                          "adopting the newest generation whose snapshot loads")
        return None
    return manifest


def _check_manifest(manifest) -> None:
    """Raise ValueError naming the first field of a manifest that is missing or mistyped,
    or a file name other than its generation's (a manifest names files in its directory
    only)."""
    def field(container, key: str, kinds: tuple, where: str):
        value = container.get(key) if isinstance(container, dict) else None
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            raise ValueError(f"field {where}{key} is {value!r}, not {' or '.join(k.__name__ for k in kinds)}")
        return value

    if not isinstance(manifest, dict):
        raise ValueError(f"not a JSON object but {type(manifest).__name__}")
    if (manifest.get("format"), manifest.get("version")) != (_MANIFEST_FORMAT, _MANIFEST_VERSION):
        raise ValueError(f"format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                         f"expected {_MANIFEST_FORMAT!r} version {_MANIFEST_VERSION}")
    generation = field(manifest, "generation", (int,), "")
    field(manifest, "event", (str,), "")
    field(manifest, "written", (str,), "")
    field(manifest, "settings", (dict, type(None)), "")
    snapshot = field(manifest, "snapshot", (dict, type(None)), "")
    if snapshot is not None:
        if field(snapshot, "file", (str,), "snapshot.") != _SNAPSHOT.format(generation):
            raise ValueError(f"snapshot.file {snapshot['file']!r} is not generation {generation}'s")
        for key in ("bytes", "videos"):
            field(snapshot, key, (int,), "snapshot.")
    log = field(manifest, "log", (dict,), "")
    if field(log, "file", (str,), "log.") != _LOG.format(generation):
        raise ValueError(f"log.file {log['file']!r} is not generation {generation}'s")
    for key in ("first_video", "bytes", "records"):
        field(log, key, (int,), "log.")
    field(log, "last_video", (str, type(None)), "log.")


def _adopt(directory: Path, policy: StatePolicy) -> dict:
    """A manifest for a directory without one: a new state directory, or (accept_loss) the
    newest generation of top-K files whose snapshot loads."""
    snapshots = _generations(directory, _SNAPSHOT)
    logs = _generations(directory, _LOG)
    if snapshots or logs:
        _refuse_or_accept(policy, f"{directory} holds top-K files ({', '.join(sorted(p.name for p in [*snapshots.values(), *logs.values()]))}) "
                          f"but no readable {_MANIFEST} naming which of them hold acknowledged data",
                          "adopting the newest generation whose snapshot loads")
    for generation in sorted(snapshots, reverse=True):
        try:
            topk = TopK.load(snapshots[generation])
        except TopKFormatError as error:
            logger.warning("%s: not adopted (%s)", snapshots[generation], error)
            continue
        return {"generation": generation, "adopted": True,
                "snapshot": {"file": snapshots[generation].name,
                             "bytes": snapshots[generation].stat().st_size, "videos": topk.stats().videos},
                "log": {"file": _LOG.format(generation), "first_video": topk.stats().videos, "bytes": 0,
                        "records": 0, "last_video": None}}
    return {"generation": 0, "adopted": True, "snapshot": None,
            "log": {"file": _LOG.format(0), "first_video": 0, "bytes": 0, "records": 0,
                    "last_video": None}}


def _check_settings(directory: Path, stored: dict, wanted: dict, policy: StatePolicy) -> None:
    differences = settings_differences(stored, wanted)
    if not differences:
        return
    listed = "; ".join(differences)
    if not policy.accept_settings:
        raise StateMismatchError(
            f"{directory}: its rankings were filled under other settings ({listed}); refusing "
            "to mix the rankings of two configurations. Start new rankings with fresh (modloc "
            "serve --fresh-state, which moves the old files aside), or keep adding to these "
            "with accept_settings (modloc serve --accept-settings-change)")
    logger.warning("%s: keeping rankings filled under other settings, as asked (%s)", directory, listed)


def _move_aside(directory: Path) -> None:
    """Move the directory's state files into ``replaced-<time>/`` (fresh state)."""
    files = [path for path in directory.iterdir()
             if path.is_file() and path.name != _LOCK and not path.name.startswith(".")]
    if not files:
        return
    aside = directory / time.strftime("replaced-%Y%m%dT%H%M%S")
    suffix = 0
    while aside.exists():
        suffix += 1
        aside = aside.with_name(time.strftime("replaced-%Y%m%dT%H%M%S") + f"-{suffix}")
    aside.mkdir()
    for path in files:
        path.rename(aside / path.name)
    fsync_path(aside)
    fsync_path(directory)
    logger.warning("%s: starting fresh state as asked; the previous files are in %s", directory, aside)


__all__ = ["DurableTopK", "StateMismatchError", "StatePolicy", "TopK", "TopKFormatError",
           "TopKStats", "default_slack", "settings_differences"]
