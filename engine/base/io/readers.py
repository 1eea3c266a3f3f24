"""Reading YouTube-8M TFRecord files into :class:`Video` / :class:`VideoLevelRecord` objects.

Every reader takes paths or glob patterns, verifies framing and CRCs, and turns a record
that fails to decode into a :class:`CorruptRecordError` naming the file, the record index
and the byte offset; ``skip_corrupt=True`` counts such records in ``stats`` instead.

The frame-level readers also refuse, with a :class:`RecordKindError` that ``skip_corrupt``
does not skip, a video-level ``Example`` (which parses as a frame-level ``SequenceExample``
without frames) and, where the caller needs features (``require_frames``), a frame-level
record without frames.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from modloc.engine.base.io.examples import (
    RecordFormatError,
    Video,
    VideoLevelRecord,
    decode_video,
    decode_video_level,
    frame_record_problem,
    is_frame_level,
)
from modloc.engine.base.io.native import read_frame_batches
from modloc.engine.base.io.tfrecord import (
    CorruptRecordError,
    Patterns,
    ReadStats,
    Record,
    expand_paths,
    iter_all_records,
    iter_records,
)

T = TypeVar("T")


def decode_records(
    records: Iterable[Record],
    decode: Callable[[bytes], T],
    skip_corrupt: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[T]:
    """Decode each record's payload, turning layout errors into located CorruptRecordErrors."""
    for record in records:
        try:
            yield decode(record.payload)
        except RecordFormatError as error:
            located = CorruptRecordError(record.source, record.index, record.offset, str(error))
            if not skip_corrupt:
                raise located from None
            if stats is not None:
                stats.records -= 1
                stats.add_corrupt(located)


def decode_frame_records(
    records: Iterable[Record],
    skip_corrupt: bool = False,
    stats: ReadStats | None = None,
    require_frames: bool = False,
) -> Iterator[Video]:
    """Frame-level videos of ``records`` with the reference decoder; refuses what
    :func:`frame_record_problem` refuses."""
    for record in records:
        for video in decode_records([record], decode_video, skip_corrupt, stats):
            problem = frame_record_problem(
                record, video.id, video.rgb_frames, video.audio_frames, require_frames
            )
            if problem is not None:
                raise problem
            yield video


def read_videos(
    patterns: Patterns,
    skip_corrupt: bool = False,
    stats: ReadStats | None = None,
    decoder: str = "native",
    require_frames: bool = False,
) -> Iterator[Video]:
    """Frame-level videos of every file named by ``patterns``.

    ``decoder`` is ``"native"`` (the C++ decoder, fast) or ``"protobuf"`` (the reference);
    both yield identical videos. A video-level ``Example`` raises :class:`RecordKindError`;
    so does a record without frames when ``require_frames`` (callers that use the
    features), while without it such records (``test_truth`` ratings) are yielded.
    """
    if decoder == "native":
        for batch in read_frame_batches(
            patterns, skip_corrupt=skip_corrupt, stats=stats, require_frames=require_frames
        ):
            yield from batch.videos()
        return
    if decoder != "protobuf":
        raise ValueError(f"unknown decoder {decoder!r}: expected 'native' or 'protobuf'")
    yield from decode_frame_records(
        iter_all_records(patterns, skip_corrupt, stats), skip_corrupt, stats, require_frames
    )


def read_video_level(
    patterns: Patterns, skip_corrupt: bool = False, stats: ReadStats | None = None
) -> Iterator[VideoLevelRecord]:
    """Video-level records (``mean_rgb``, ``mean_audio``) of every file named by ``patterns``."""
    yield from decode_records(
        iter_all_records(patterns, skip_corrupt, stats), decode_video_level, skip_corrupt, stats
    )


def file_is_frame_level(path: str | os.PathLike) -> bool | None:
    """Whether a file holds frame-level records, from its first record; None if empty.

    A file whose first record is unreadable counts as frame-level: that reader then
    reports the corruption with its location.
    """
    try:
        for record in iter_records(path):
            return is_frame_level(record.payload)
    except ValueError:  # CorruptRecordError, RecordFormatError
        return True
    return None


def read_any(
    patterns: Patterns,
    skip_corrupt: bool = False,
    stats: ReadStats | None = None,
    decoder: str = "native",
) -> Iterator[Video | VideoLevelRecord]:
    """Every record of every file, as a :class:`Video` or a :class:`VideoLevelRecord`
    according to each file's kind (:func:`file_is_frame_level`)."""
    for path in expand_paths(patterns):
        kind = file_is_frame_level(path)
        if kind:
            yield from read_videos(path, skip_corrupt, stats, decoder)
        elif kind is not None:
            yield from read_video_level(path, skip_corrupt, stats)
