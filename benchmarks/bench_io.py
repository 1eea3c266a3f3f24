"""Frame-level reading throughput: the protobuf reference decoder against the native one.

Writes a synthetic frame-level TFRecord file (random uint8 videos of 60-300 frames, encoded
with ``modloc.engine.base.io.examples.encode_video``), then reads the whole file several times in this
one process through

* ``protobuf``: ``read_videos(path, decoder="protobuf")``, one protobuf message per record;
* ``native``: ``read_frame_batches(path)``, the C++ decoder into contiguous batches;
* ``native videos``: ``read_videos(path, decoder="native")``, the same plus a ``Video`` (numpy
  views) per video, which is what code written against the reference gets;
* ``framing only``: ``iter_all_records(path)``, the TFRecord framing and CRC checks that every
  path above includes, without decoding: the floor under all of them.

The file is read once before timing, so all paths read it from the page cache. Prints the
medians (MB/s of file bytes, videos/s) and the ratios to protobuf, and writes them with the
machine and versions to ``benchmarks/results/bench_io.md``.

    python benchmarks/bench_io.py                 # ~100 MB file, 5 runs per path
    python benchmarks/bench_io.py --videos 100 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import google.protobuf
import numpy as np
from _common import RESULTS, provenance
from google.protobuf.internal import api_implementation

from modloc.engine.base.io.examples import FEATURE_SIZE, Video, encode_video
from modloc.engine.base.io.native import read_frame_batches
from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.io.tfrecord import iter_all_records, write_records
from modloc.engine.base.progress import Progress

RESULTS_FILE = RESULTS / "bench_io.md"


def synthetic_payloads(count: int, seed: int) -> Iterator[bytes]:
    """Encoded videos of 60-300 random frames with a few labels, as the real files hold."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        frames = int(rng.integers(60, 301))
        yield encode_video(Video(
            id=f"{index:04x}",
            features=rng.integers(0, 256, (frames, FEATURE_SIZE), dtype=np.uint8),
            labels=rng.integers(0, 3862, int(rng.integers(1, 6))),
        ))


def read_protobuf(path: str) -> int:
    return sum(1 for _ in read_videos(path, decoder="protobuf"))


def read_native(path: str) -> int:
    return sum(len(batch) for batch in read_frame_batches(path))


def read_native_videos(path: str) -> int:
    return sum(1 for _ in read_videos(path, decoder="native"))


def read_framing(path: str) -> int:
    return sum(1 for _ in iter_all_records(path))


PATHS: dict[str, Callable[[str], int]] = {
    "protobuf": read_protobuf,
    "native": read_native,
    "native videos": read_native_videos,
    "framing only": read_framing,
}


def time_path(read: Callable[[str], int], path: str, repeats: int, videos: int) -> list[float]:
    seconds = []
    with Progress(read.__name__, repeats, "pass") as bar:
        for _ in range(repeats):
            start = time.perf_counter()
            count = read(path)
            seconds.append(time.perf_counter() - start)
            if count != videos:
                raise RuntimeError(f"{read.__name__} read {count} videos, expected {videos}")
            bar.update()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=500,
                        help="videos in the synthetic file (default 500, about 100 MB)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed reads of the whole file per path (default 5; median kept)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic videos")
    parser.add_argument("--data", type=Path,
                        help="where to write the synthetic file, kept afterwards (default: a "
                             "temporary file, removed)")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE,
                        help="results file (default benchmarks/results/bench_io.md)")
    args = parser.parse_args(argv)
    if args.videos < 1 or args.repeats < 1:
        parser.error("--videos and --repeats must be at least 1")

    with tempfile.TemporaryDirectory() as scratch:
        path = args.data or Path(scratch) / "frames.tfrecord"
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {args.videos} synthetic videos to {path} ...", flush=True)
        write_records(path, synthetic_payloads(args.videos, args.seed))
        size = path.stat().st_size
        read_native(str(path))  # into the page cache
        rows = []
        for name, read in PATHS.items():
            print(f"reading with {name} x{args.repeats} ...", flush=True)
            seconds = statistics.median(time_path(read, str(path), args.repeats, args.videos))
            rows.append((name, seconds, size / seconds / 1e6, args.videos / seconds))

    protobuf_seconds = rows[0][1]
    header = "| path | median s | MB/s | videos/s | vs protobuf |"
    lines = [header, "|---|---:|---:|---:|---:|"]
    for name, seconds, mb_s, videos_s in rows:
        lines.append(f"| {name} | {seconds:.3f} | {mb_s:,.1f} | {videos_s:,.1f} | "
                     f"{protobuf_seconds / seconds:.1f}x |")
    table = "\n".join(lines)
    print(table)

    report = f"""# Frame-level reading throughput

{provenance()}
- Python {platform.python_version()}, numpy {np.__version__}, protobuf {google.protobuf.__version__} ({api_implementation.Type()} runtime)
- file: {args.videos} synthetic videos of 60-300 frames, {size / 1e6:.1f} MB; read from the page cache
- one process, one thread; median of {args.repeats} reads of the whole file per path, CRC checks included

{table}

`protobuf` is `read_videos(path, decoder="protobuf")`, `native` is `read_frame_batches(path)`
(64 videos per batch), `native videos` is `read_videos(path, decoder="native")` (a `Video` of
numpy views per video), `framing only` is `iter_all_records(path)`: the TFRecord framing and
CRC checks, done in Python by every path, without decoding. MB/s counts file bytes.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
