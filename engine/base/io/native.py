"""Frame-level records decoded by the C++ extension into contiguous arrays.

:func:`decode_payloads` hands a batch of payloads to ``modloc.engine._native`` (``native/decoder.cpp``),
which parses the protobuf wire format itself, with the GIL released, into one ``(ΣM, 1152)``
uint8 feature array and flat label and segment arrays with per-video offsets: no Python
object per frame, and :meth:`FrameBatch.video` hands out numpy views, not copies.

The native decoder accepts and rejects exactly what the reference
(:func:`modloc.engine.base.io.examples.decode_video`) does, yields the same values, and gives the same
reason for a rejected payload, so ``read_videos(..., decoder="native")`` and
``decoder="protobuf"`` are interchangeable. Framing and CRCs stay in
:mod:`modloc.engine.base.io.tfrecord`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from modloc.engine import _native
from modloc.engine.base.io.examples import (
    RecordFormatError,
    RecordKindError,
    Video,
    decode_video,
    frame_record_problem,
)
from modloc.engine.base.io.tfrecord import (
    CorruptRecordError,
    Patterns,
    ReadStats,
    Record,
    iter_all_records,
)

# A payload the protobuf runtime rejects for each of its two errors that the native decoder
# reports ("corrupt", "bad_utf8"): a wire type 6 tag, and a context map key that is not
# UTF-8. The runtime's text names the error, not where it happened, so one probe each does.
_RUNTIME_PROBES = {
    "corrupt": b"\x0e",
    "bad_utf8": b"\x0a\x05\x0a\x03\x0a\x01\xff",
}


@functools.cache
def _runtime_reason(kind: str) -> str:
    """The reference's reason for a payload the protobuf runtime refuses, as ``kind``.

    The runtime's DecodeError text changes between protobuf releases, so it is learned from
    the installed runtime rather than written down here.
    """
    try:
        decode_video(_RUNTIME_PROBES[kind])
    except RecordFormatError as error:
        return str(error)
    raise RuntimeError(f"the protobuf runtime accepted the {kind!r} probe payload")


def _reason(kind: str, detail: str, raw_id: bytes | None) -> str:
    """The reference's message for one payload the native decoder left out."""
    if kind in _RUNTIME_PROBES:
        return _runtime_reason(kind)
    if kind == "id_not_utf8":
        return f"context '{detail}' is not valid UTF-8: {raw_id!r}"
    if raw_id is None:
        return detail
    return f"video {raw_id.decode('utf-8')!r}: {detail}"


@dataclass(eq=False)
class FrameBatch:
    """Decoded frame-level videos in contiguous arrays.

    Per-video lists are flat, with ``N + 1`` offsets: video ``i`` owns
    ``[offsets[i], offsets[i + 1])``. ``segment_labels``, ``segment_start_times`` and
    ``segment_scores`` share ``segment_offsets``; ``segment_end_times`` has its own
    offsets because a video may have rated segments without end times.

    Attributes:
        ids: video ids.
        features: ``(ΣM, 1152)`` uint8, RGB in columns ``[0, 1024)``, audio after.
        frame_offsets: ``(N + 1,)`` int64 rows of ``features`` per video.
        rgb_frames, audio_frames: ``(N,)`` int64 frames of each stream as stored.
        labels, label_offsets: video-level class ids (int64).
        segment_labels, segment_start_times, segment_scores, segment_offsets: rated
            segments (int64, int64, float32).
        segment_end_times, segment_end_offsets: segment end times (int64).
    """

    ids: list[str]
    features: np.ndarray
    frame_offsets: np.ndarray
    rgb_frames: np.ndarray
    audio_frames: np.ndarray
    labels: np.ndarray
    label_offsets: np.ndarray
    segment_labels: np.ndarray
    segment_start_times: np.ndarray
    segment_scores: np.ndarray
    segment_offsets: np.ndarray
    segment_end_times: np.ndarray
    segment_end_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def video(self, i: int) -> Video:
        """Video ``i`` as a :class:`Video` whose arrays are views into this batch."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"video {i} of a batch of {len(self)}")
        i %= len(self)
        frames = slice(self.frame_offsets[i], self.frame_offsets[i + 1])
        labels = slice(self.label_offsets[i], self.label_offsets[i + 1])
        segments = slice(self.segment_offsets[i], self.segment_offsets[i + 1])
        ends = slice(self.segment_end_offsets[i], self.segment_end_offsets[i + 1])
        return Video(
            id=self.ids[i],
            features=self.features[frames],
            labels=self.labels[labels],
            segment_labels=self.segment_labels[segments],
            segment_start_times=self.segment_start_times[segments],
            segment_end_times=self.segment_end_times[ends],
            segment_scores=self.segment_scores[segments],
            rgb_frames=int(self.rgb_frames[i]),
            audio_frames=int(self.audio_frames[i]),
        )

    def videos(self) -> Iterator[Video]:
        for i in range(len(self)):
            yield self.video(i)

    def head(self, count: int) -> FrameBatch:
        """The first ``count`` videos, as views into this batch."""
        count = min(count, len(self))
        frames = self.frame_offsets[count]
        labels = self.label_offsets[count]
        segments = self.segment_offsets[count]
        ends = self.segment_end_offsets[count]
        return FrameBatch(
            ids=self.ids[:count],
            features=self.features[:frames],
            frame_offsets=self.frame_offsets[: count + 1],
            rgb_frames=self.rgb_frames[:count],
            audio_frames=self.audio_frames[:count],
            labels=self.labels[:labels],
            label_offsets=self.label_offsets[: count + 1],
            segment_labels=self.segment_labels[:segments],
            segment_start_times=self.segment_start_times[:segments],
            segment_scores=self.segment_scores[:segments],
            segment_offsets=self.segment_offsets[: count + 1],
            segment_end_times=self.segment_end_times[:ends],
            segment_end_offsets=self.segment_end_offsets[: count + 1],
        )


def decode_payloads(payloads: Sequence[bytes]) -> tuple[FrameBatch, list[tuple[int, str]]]:
    """Decode frame-level ``SequenceExample`` payloads.

    Returns the batch of the good payloads, in order, and ``(position, reason)`` for each
    payload left out, ``reason`` being the message the reference decoder raises for it.
    """
    arrays, raw_ids, failures = _native.decode_frame_payloads(list(payloads))
    batch = FrameBatch(ids=[raw.decode("utf-8") for raw in raw_ids], **arrays)
    errors = [
        (position, _reason(kind, detail, raw_id)) for position, kind, detail, raw_id in failures
    ]
    return batch, errors


def _first_refused(
    batch: FrameBatch, positions: list[int], records: list[Record], require_frames: bool
) -> tuple[int, RecordKindError] | None:
    """``(batch index, error)`` of the first decoded video a frame-level reader refuses
    (:func:`modloc.engine.base.io.examples.frame_record_problem`); ``positions[i]`` is video ``i``'s record."""
    # without require_frames only a video with no frame in either stream can be refused
    # (a video-level Example); most batches have none, and skip the per-record check
    combine = np.minimum if require_frames else np.maximum
    suspects = np.flatnonzero(combine(batch.rgb_frames, batch.audio_frames) == 0)
    for i in suspects.tolist():
        problem = frame_record_problem(
            records[positions[i]], batch.ids[i], int(batch.rgb_frames[i]),
            int(batch.audio_frames[i]), require_frames,
        )
        if problem is not None:
            return i, problem
    return None


def _decode_chunk(
    records: list[Record], skip_corrupt: bool, stats: ReadStats | None, require_frames: bool
) -> Iterator[FrameBatch]:
    """The good videos of ``records``; a bad one raises (after the videos before it) or is
    counted, as :func:`modloc.engine.base.io.readers.decode_frame_records` does."""
    batch, errors = decode_payloads([record.payload for record in records])
    failed = {position for position, _ in errors}
    positions = [position for position in range(len(records)) if position not in failed]
    refused = _first_refused(batch, positions, records, require_frames)
    # records from the refused one on are never reached, as in the record-by-record path
    stop = positions[refused[0]] if refused is not None else len(records)
    if errors and not skip_corrupt and errors[0][0] < stop:
        position, reason = errors[0]
        record = records[position]
        if position:  # no record before the first bad one is bad: they are the batch's head
            yield batch.head(position)
        raise CorruptRecordError(record.source, record.index, record.offset, reason)
    for position, reason in errors:
        if position > stop:
            break
        record = records[position]
        if stats is not None:
            stats.records -= 1
            stats.add_corrupt(
                CorruptRecordError(record.source, record.index, record.offset, reason)
            )
    if refused is not None:
        index, error = refused
        if index:
            yield batch.head(index)
        raise error
    if len(batch):
        yield batch


def _batches(
    records: Iterable[Record],
    skip_corrupt: bool,
    stats: ReadStats | None,
    videos_per_batch: int,
    require_frames: bool,
) -> Iterator[FrameBatch]:
    """Decodes ``records`` ``videos_per_batch`` at a time.

    A framing error raised by ``records`` comes after the videos of the records before it,
    as it does in the record-by-record reference path.
    """
    if videos_per_batch < 1:
        raise ValueError(f"videos_per_batch must be at least 1, got {videos_per_batch}")
    records = iter(records)
    while True:
        chunk: list[Record] = []
        framing_error: CorruptRecordError | None = None
        try:
            for record in records:
                chunk.append(record)
                if len(chunk) == videos_per_batch:
                    break
        except CorruptRecordError as error:
            framing_error = error
        if chunk:
            yield from _decode_chunk(chunk, skip_corrupt, stats, require_frames)
        if framing_error is not None:
            raise framing_error
        if len(chunk) < videos_per_batch:
            return


def read_frame_batches(
    patterns: Patterns,
    skip_corrupt: bool = False,
    stats: ReadStats | None = None,
    videos_per_batch: int = 64,
    require_frames: bool = False,
) -> Iterator[FrameBatch]:
    """Frame-level videos of every file named by ``patterns``, ``videos_per_batch`` at a time.

    Same files, order, errors and ``stats`` as ``read_videos(..., decoder="protobuf")``: a
    record that fails framing, its CRC or decoding raises :class:`CorruptRecordError` naming
    the file, the record and its byte offset, or with ``skip_corrupt=True`` is counted in
    ``stats`` and left out; a video-level ``Example`` (or, with ``require_frames``, a record
    without frames) raises :class:`~modloc.engine.base.io.examples.RecordKindError` in either mode.
    """
    yield from _batches(
        iter_all_records(patterns, skip_corrupt, stats),
        skip_corrupt,
        stats,
        videos_per_batch,
        require_frames,
    )
