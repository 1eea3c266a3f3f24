"""Coverage-guided fuzzing (atheris) of the insert-log reader (what ``DurableTopK.open``
replays: the TFRecord framing, the native header check and record replay, the torn-write
rules), on a fresh 4-class accumulator per input.

Every input replays or raises TopKFormatError; what it replays ends inside the input and
holds as many videos as the accumulator registered.

    python tests/fuzz/fuzz_insert_log.py CORPUS -runs=1000000
"""

import io
import logging
import sys
from pathlib import Path

import atheris
import google_crc32c  # noqa: F401  (third-party code stays uninstrumented: only modloc's is)
import numpy  # noqa: F401

with atheris.instrument_imports(include=["modloc"]):
    from modloc.engine.runtime.topk import (
        StatePolicy,
        TopK,
        TopKFormatError,
        _LogState,
        _replay,
    )

CLASSES, K = (3, 7, 11, 42), 6  # seeds.py writes logs of this accumulator
logging.disable(logging.WARNING)  # torn tails are logged; the fuzzer needs no output


def TestOneInput(data: bytes) -> None:
    topk = TopK(CLASSES, K, 1)
    state = _LogState(Path("<fuzz>"), 0)
    try:
        _replay(io.BytesIO(data), "<fuzz>", len(data), topk, state, 0, StatePolicy())
    except TopKFormatError as error:
        assert str(error).startswith("<fuzz>")
        return
    assert 0 <= state.bytes <= len(data)
    assert topk.stats().videos <= state.records


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
