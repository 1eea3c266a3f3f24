"""TFRecord framing (REFERENCE §1.1), read and written without TensorFlow.

Each record on disk is::

    uint64 length | uint32 masked_crc32c(length bytes) | data[length] | uint32 masked_crc32c(data)

all little-endian, with ``mask(crc) = ((crc >> 15) | (crc << 17)) + 0xA282EAD8 (mod 2**32)``.
The CRC32C itself comes from the ``google-crc32c`` package.

Both CRCs are verified on read. A corrupt or truncated record raises
:class:`CorruptRecordError`, which names the file, the record index and the byte offset;
with ``skip_corrupt=True`` the reader counts it in :class:`ReadStats` and goes on where it
can: past a record whose *data* CRC is wrong (its length was trustworthy), but not past a
bad length CRC or a truncation, after which the framing of the rest of the file is lost.
"""

from __future__ import annotations

import glob
import io
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import google_crc32c

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
# A serialized protobuf cannot exceed 2 GiB; a larger length (even with a matching CRC) is
# refused before any allocation.
MAX_RECORD_BYTES = (1 << 31) - 1


def masked_crc32c(data: bytes) -> int:
    """The TFRecord mask of the CRC32C (Castagnoli) of ``data``."""
    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# one path or glob pattern, or several
Patterns = str | os.PathLike | Iterable[str | os.PathLike]


class CorruptRecordError(ValueError):
    """A record that fails its framing or CRC check, or does not decode."""

    def __init__(self, source: str, index: int, offset: int, reason: str):
        self.source = source
        self.index = index
        self.offset = offset
        self.reason = reason
        super().__init__(f"{source}: record {index} at byte offset {offset}: {reason}")


class NotTFRecordError(CorruptRecordError):
    """A file whose very first record fails its framing: not a TFRecord file at all (a text
    file, a CSV, a directory listing). Raised even when corrupt records are skipped, since
    nothing of such a file can be read."""

    def __init__(self, source: str, reason: str):
        super().__init__(source, 0, 0, reason)
        self.args = (f"{source}: not a TFRecord file (record 0 at byte offset 0: {reason})",)


@dataclass
class ReadStats:
    """What a reader saw; summed over every file it read."""

    records: int = 0
    corrupt_records: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def add_corrupt(self, error: CorruptRecordError, keep: int = 100) -> None:
        self.corrupt_records += 1
        if len(self.errors) < keep:
            self.errors.append(str(error))


@dataclass(frozen=True)
class Record:
    """One record's payload and where it came from."""

    source: str
    index: int
    offset: int
    payload: bytes


def encode_record(payload: bytes) -> bytes:
    """The framed bytes of one record."""
    length = _HEADER.pack(len(payload), 0)[:8]
    return b"".join(
        (length, _FOOTER.pack(masked_crc32c(length)), payload, _FOOTER.pack(masked_crc32c(payload)))
    )


class TFRecordWriter:
    """Writes framed records to a file (``with TFRecordWriter(path) as w: w.write(b)``).

    The file is written to ``<path>.tmp`` and renamed on a clean close, so a crash never
    leaves a truncated file under the final name.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._handle: BinaryIO | None = open(self._tmp, "wb")
        self.records = 0

    def write(self, payload: bytes) -> None:
        if self._handle is None:
            raise ValueError(f"{self.path}: writer is closed")
        self._handle.write(encode_record(payload))
        self.records += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_records(path: str | os.PathLike, payloads: Iterable[bytes]) -> int:
    """Write every payload to ``path``; returns the number of records."""
    with TFRecordWriter(path) as writer:
        for payload in payloads:
            writer.write(payload)
    return writer.records


def _stream_size(handle: BinaryIO) -> int | None:
    """Size in bytes of a regular file read from its start, None for other streams."""
    try:
        if handle.tell() == 0:
            return os.fstat(handle.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    return None


def _truncated(source: str, index: int, offset: int, available: int, length: int) -> CorruptRecordError:
    return CorruptRecordError(
        source, index, offset,
        f"truncated record: {available} of {length + _FOOTER.size} bytes after the header",
    )


def iter_stream_records(
    handle: BinaryIO,
    source: str,
    skip_corrupt: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[Record]:
    """Records of an open binary stream, CRC-checked (see the module docstring).

    ``handle.read(n)`` must return fewer than ``n`` bytes only at end of stream, as buffered
    files and ``io.BytesIO`` do.
    """
    stats = stats if stats is not None else ReadStats()
    size = _stream_size(handle)
    index = 0
    offset = 0
    while True:
        header = handle.read(_HEADER.size)
        if not header:
            return
        framed = False  # whether the length's CRC holds
        try:
            if len(header) < _HEADER.size:
                raise CorruptRecordError(
                    source, index, offset, f"truncated header: {len(header)} of {_HEADER.size} bytes"
                )
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                raise CorruptRecordError(source, index, offset, "length CRC mismatch")
            framed = True
            if length > MAX_RECORD_BYTES:
                raise CorruptRecordError(
                    source, index, offset, f"record length {length} exceeds {MAX_RECORD_BYTES} bytes"
                )
            # A file too short for the declared length is refused before the read, which
            # would otherwise allocate the whole declared length.
            available = None if size is None else size - offset - _HEADER.size
            if available is not None and available < length + _FOOTER.size:
                raise _truncated(source, index, offset, available, length)
            # Payload and footer are read separately: slicing one read would copy the
            # payload a second time.
            payload = handle.read(length)
            footer = handle.read(_FOOTER.size)
            if len(payload) < length or len(footer) < _FOOTER.size:
                raise _truncated(source, index, offset, len(payload) + len(footer), length)
        except CorruptRecordError as error:
            if offset == 0 and not framed:
                raise NotTFRecordError(source, error.reason) from None
            if not skip_corrupt:
                raise
            stats.add_corrupt(error)
            return  # framing of the rest of the stream is unknown
        (data_crc,) = _FOOTER.unpack(footer)
        record_offset = offset
        record_size = _HEADER.size + length + _FOOTER.size
        offset += record_size
        index += 1
        stats.bytes += record_size
        if masked_crc32c(payload) != data_crc:
            error = CorruptRecordError(source, index - 1, record_offset, "data CRC mismatch")
            if not skip_corrupt:
                raise error
            stats.add_corrupt(error)
            continue
        stats.records += 1
        yield Record(source, index - 1, record_offset, payload)


def iter_records(
    path: str | os.PathLike,
    skip_corrupt: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[Record]:
    """CRC-checked records of one TFRecord file."""
    with open(path, "rb", buffering=1 << 20) as handle:
        yield from iter_stream_records(handle, str(path), skip_corrupt, stats)


def iter_buffer_records(
    buffer: bytes,
    source: str = "<buffer>",
    skip_corrupt: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[Record]:
    """CRC-checked records of an in-memory buffer of framed records."""
    yield from iter_stream_records(io.BytesIO(buffer), source, skip_corrupt, stats)


def expand_paths(patterns: Patterns) -> list[str]:
    """Files named by one or more paths or glob patterns, sorted, without repeats.

    Raises FileNotFoundError naming the pattern that matched nothing (a typo in a glob
    should never silently read zero files), and IsADirectoryError with the glob to quote for
    a directory.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths: list[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if os.path.isdir(pattern):
            raise IsADirectoryError(f"{pattern!r} is a directory: name its files, e.g. "
                                    f"'{os.path.join(pattern, '*.tfrecord')}' (quoted)")
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"no TFRecord file matches {pattern!r}")
        paths.extend(matches)
    return list(dict.fromkeys(paths))


def count_records(patterns: Patterns) -> int:
    """Records in the files named by ``patterns``, from their framing alone: each length is
    read (and its CRC checked) and the payload skipped, so counting costs a seek per record,
    not a read of the data."""
    count = 0
    for path in expand_paths(patterns):
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            offset = index = 0
            while offset < size:
                header = handle.read(_HEADER.size)
                length, length_crc = _HEADER.unpack(header) if len(header) == _HEADER.size else (0, None)
                if length_crc is None or masked_crc32c(header[:8]) != length_crc:
                    raise CorruptRecordError(path, index, offset, "bad record header")
                offset = handle.seek(length + _FOOTER.size, os.SEEK_CUR)
                index += 1
            count += index
    return count


def iter_all_records(
    patterns: Patterns, skip_corrupt: bool = False, stats: ReadStats | None = None
) -> Iterator[Record]:
    """CRC-checked records of every file named by ``patterns``, file by file in sorted order."""
    for path in expand_paths(patterns):
        yield from iter_records(path, skip_corrupt, stats)
