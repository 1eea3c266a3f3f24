"""Coverage-guided fuzzing (atheris) of the top-K snapshot reader (``TopK.from_bytes``:
the TFRecord framing in Python, the native decoder of the records underneath).

Every input loads or raises TopKFormatError; a snapshot that loads ranks every class and
saves to bytes that load to the same rankings.

    python tests/fuzz/fuzz_snapshot.py CORPUS -runs=1000000
"""

import sys

import atheris
import google_crc32c  # noqa: F401  (third-party code stays uninstrumented: only modloc's is)
import numpy  # noqa: F401

with atheris.instrument_imports(include=["modloc"]):
    from modloc.engine.runtime.topk import TopK, TopKFormatError


def TestOneInput(data: bytes) -> None:
    try:
        topk = TopK.from_bytes(data, "<fuzz>")
    except TopKFormatError as error:
        assert str(error).startswith("<fuzz>: ")
        return
    rankings = topk.rankings()
    again = TopK.from_bytes(topk.to_bytes())
    assert again.rankings() == rankings and again.stats() == topk.stats()


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
