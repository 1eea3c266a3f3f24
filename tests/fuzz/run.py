"""Run every fuzz harness for a number of inputs and report what each did.

::

    tests/fuzz/build_native.sh                          # once: the ASan/UBSan libFuzzer builds
    python tests/fuzz/run.py --runs 1000000 --real ../shared/data/yt8m --out fuzz-runs

Seeds come from ``seeds.py`` (synthetic files, and real ones with ``--real``). Each harness
runs in its own process, one after the other, niced (this machine's cores are shared); its
log, corpus and any crashing input land under ``--out``. The native harnesses run when
``build/fuzz/`` holds them. The report lists inputs, seconds and outcome per harness.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from seeds import write_corpora

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PYTHON_HARNESSES = ("tfrecord", "snapshot", "insert_log", "decoder")
NATIVE_HARNESSES = {"native_decoder": "decoder_fuzzer", "native_topk": "topk_fuzzer"}
# the decoder's inputs stay small enough for ~10^3 runs/s under AddressSanitizer; a real
# frame-level record is cut to its context and first frames
MAX_LEN = {"native_decoder": 16384, "decoder": 16384}


def run(name: str, command: list[str], out: Path) -> dict:
    log = out / f"{name}.log"
    started = time.monotonic()
    with open(log, "w") as handle:
        status = subprocess.run(["nice", "-n", "19", *command], stdout=handle, stderr=subprocess.STDOUT,
                                cwd=out).returncode
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    done = re.findall(r"Done (\d+) runs in (\d+) second", text)
    crashes = sorted(p.name for p in out.glob(f"{name}-crash-*")) + sorted(
        p.name for p in out.glob("crash-*"))
    return {"harness": name, "runs": int(done[-1][0]) if done else None, "seconds": seconds,
            "status": status, "crashes": crashes, "log": str(log)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per harness")
    parser.add_argument("--real", type=Path, help="real YouTube-8M TFRecords to seed from")
    parser.add_argument("--out", type=Path, default=Path("fuzz-runs"))
    parser.add_argument("--only", nargs="+", help="harness names (default: all)")
    args = parser.parse_args()
    out = args.out.resolve()
    corpora = out / "corpus"
    for name, count in write_corpora(corpora, args.real).items():
        print(f"seeds: {name}: {count}", flush=True)
    native = ROOT / "build" / "fuzz"
    results = []
    for name in args.only or [*PYTHON_HARNESSES, *NATIVE_HARNESSES]:
        limits = [f"-runs={args.runs}", f"-artifact_prefix={out}/{name}-", "-print_final_stats=1"]
        if name in MAX_LEN:
            limits.append(f"-max_len={MAX_LEN[name]}")
        if name in NATIVE_HARNESSES:
            binary = native / NATIVE_HARNESSES[name]
            if not binary.exists():
                print(f"{name}: skipped, {binary} not built (tests/fuzz/build_native.sh)")
                continue
            command = [str(binary), *limits, str(corpora / name)]
        else:
            command = [sys.executable, str(HERE / f"fuzz_{name}.py"), *limits, str(corpora / name)]
        result = run(name, command, out)
        results.append(result)
        print(f"{name}: {result['runs']} inputs in {result['seconds']:.0f} s, exit {result['status']}, "
              f"crashes: {result['crashes'] or 'none'}", flush=True)
    return 0 if all(r["status"] == 0 and not r["crashes"] for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
