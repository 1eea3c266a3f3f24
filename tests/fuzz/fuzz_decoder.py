"""Coverage-guided fuzzing (atheris) of the native SequenceExample decoder through its
Python binding, against the protobuf reference as the oracle.

The input is split into payloads at each ``seeds.PAYLOAD_MARKER``. Every payload is
decoded by both; they must accept it with identical videos or refuse it with the same
reason (the reference raises RecordFormatError, the native decoder reports it). The
native code runs uninstrumented here: its coverage-guided run with AddressSanitizer is
``native/decoder_fuzzer.cpp``.

    python tests/fuzz/fuzz_decoder.py CORPUS -runs=1000000
"""

import sys

import atheris
import google_crc32c  # noqa: F401  (third-party code stays uninstrumented: only modloc's is)
import numpy  # noqa: F401

with atheris.instrument_imports(include=["modloc"]):
    from modloc.engine.base.io.examples import RecordFormatError, decode_video
    from modloc.engine.base.io.native import decode_payloads

PAYLOAD_MARKER = b"\xff\xfe\xfd\xfc"  # seeds.PAYLOAD_MARKER


def TestOneInput(data: bytes) -> None:
    payloads = data.split(PAYLOAD_MARKER)
    batch, errors = decode_payloads(payloads)
    refused = dict(errors)
    decoded = iter(batch.videos())
    for position, payload in enumerate(payloads):
        try:
            expected = decode_video(payload)
        except RecordFormatError as error:
            assert refused.get(position) == str(error), (position, payload.hex())
            continue
        assert position not in refused, (refused[position], payload.hex())
        video = next(decoded)
        assert video.id == expected.id and video.same_as(expected) or bool(
            (expected.segment_scores != expected.segment_scores).any()), payload.hex()
    assert next(decoded, None) is None


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
