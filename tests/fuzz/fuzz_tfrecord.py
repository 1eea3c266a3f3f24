"""Coverage-guided fuzzing (atheris) of the TFRecord framing reader.

Every input is read strictly (it yields its records or raises CorruptRecordError, nothing
else) and leniently (``skip_corrupt``: raises only NotTFRecordError, for an input whose
first record's framing fails); a record it yields is CRC-checked, so encoding its payload
again gives the same bytes it was read from.

    python tests/fuzz/fuzz_tfrecord.py CORPUS -runs=1000000
"""

import sys

import atheris
import google_crc32c  # noqa: F401  (third-party code stays uninstrumented: only modloc's is)
import numpy  # noqa: F401

with atheris.instrument_imports(include=["modloc"]):
    from modloc.engine.base.io.tfrecord import (
        CorruptRecordError,
        NotTFRecordError,
        ReadStats,
        encode_record,
        iter_buffer_records,
    )


def TestOneInput(data: bytes) -> None:
    try:
        for record in iter_buffer_records(data, "<fuzz>"):
            framed = encode_record(record.payload)
            assert data[record.offset: record.offset + len(framed)] == framed
    except CorruptRecordError as error:
        assert 0 <= error.offset <= len(data) and error.source == "<fuzz>"
    stats = ReadStats()
    try:
        records = list(iter_buffer_records(data, "<fuzz>", skip_corrupt=True, stats=stats))
    except NotTFRecordError as error:
        assert error.offset == 0 and stats.records == 0
        return
    assert stats.records == len(records)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
