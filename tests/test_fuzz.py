"""A short run of every Python fuzz harness (tests/fuzz/), from the seed corpora: the
harnesses stay runnable, and their oracles hold on a few hundred mutated inputs each. The
long runs (10^6 inputs, and the native harnesses under AddressSanitizer) are
``tests/fuzz/run.py``'s."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))
from seeds import write_corpora  # noqa: E402

RUNS = 400


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpora")
    write_corpora(out)
    return out


@pytest.mark.parametrize("harness", ["tfrecord", "snapshot", "insert_log", "decoder"])
def test_fuzz_harness_smoke_run(harness, corpora, tmp_path):
    done = subprocess.run(
        [sys.executable, str(FUZZ / f"fuzz_{harness}.py"), f"-runs={RUNS}", "-max_len=4096",
         f"-artifact_prefix={tmp_path}/", str(corpora / harness)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(rf"Done {RUNS} runs", done.stderr), done.stderr[-3000:]
    assert not list(tmp_path.glob("crash-*"))
