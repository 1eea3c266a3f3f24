"""Reading YouTube-8M TFRecord files into :class:`Video` / :class:`VideoLevelRecord` objects.

Every reader takes paths or glob patterns, verifies framing and CRCs, and turns a record
that fails to decode into a :class:`CorruptRecordError` naming the file, the record index
and the byte offset; ``skip_corrupt=True`` counts such records in ``stats`` instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from engine.io.examples import (
    RecordFormatError,
    Video,
    VideoLevelRecord,
    decode_video,
    decode_video_level,
    is_frame_level,
)
from engine.io.tfrecord import CorruptRecordError, ReadStats, Record, expand_paths, iter_records

Patterns = str | os.PathLike | Iterable[str | os.PathLike]
T = TypeVar("T")


def iter_all_records(
    patterns: Patterns, skip_corrupt: bool = False, stats: ReadStats | None = None
) -> Iterator[Record]:
    """CRC-checked records of every file named by ``patterns``, file by file in sorted order."""
    for path in expand_paths(patterns):
        yield from iter_records(path, skip_corrupt, stats)


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


def read_videos(
    patterns: Patterns,
    skip_corrupt: bool = False,
    stats: ReadStats | None = None,
    decoder: str = "native",
) -> Iterator[Video]:
    """Frame-level videos of every file named by ``patterns``.

    ``decoder`` is ``"native"`` (the C++ decoder, fast) or ``"protobuf"`` (the reference);
    both yield identical videos.
    """
    if decoder == "native":
        from engine.io.native import read_frame_batches

        for batch in read_frame_batches(patterns, skip_corrupt=skip_corrupt, stats=stats):
            yield from batch.videos()
        return
    if decoder != "protobuf":
        raise ValueError(f"unknown decoder {decoder!r}: expected 'native' or 'protobuf'")
    yield from decode_records(
        iter_all_records(patterns, skip_corrupt, stats), decode_video, skip_corrupt, stats
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
