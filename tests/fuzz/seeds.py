"""Seed corpora for the fuzz harnesses, from synthetic files and (when given) real ones.

::

    python tests/fuzz/seeds.py OUT [--real ../shared/data/yt8m]

writes ``OUT/<harness>/`` for each harness of this folder: ``decoder`` (SequenceExample
payloads), ``tfrecord`` (whole TFRecord files: videos, snapshots, logs), ``snapshot`` (top-K
snapshots), ``insert_log`` (insert logs, one with a torn tail), and the native harnesses'
``native_decoder`` and ``native_topk`` (their input layouts: see ``native/*.cpp``).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import itertools
import struct
import tempfile
from pathlib import Path

import numpy as np

from modloc.engine.base.io.examples import Video, encode_truth, encode_video
from modloc.engine.base.io.tfrecord import encode_record, iter_buffer_records, iter_records
from modloc.engine.runtime.topk import DurableTopK, TopK

# the accumulator the log harnesses replay into (native/topk_fuzzer.cpp has the same)
LOG_CLASSES = (3, 7, 11, 42)
LOG_K = 6
# where native/decoder_fuzzer.cpp splits its input into payloads
PAYLOAD_MARKER = b"\xff\xfe\xfd\xfc"
REAL_FILES = 8  # real TFRecord files read at most (their first records)


def synthetic_videos(count: int = 6) -> list[Video]:
    """Small videos with labels, rated segments, an empty one and a unicode id."""
    rng = np.random.default_rng(0)
    videos = []
    for index in range(count):
        frames = [0, 1, 5, 12, 31, 2][index % 6]
        rated = index % 3
        videos.append(Video(
            f"s{index}" if index % 4 else f"vidéo-{index}",
            rng.integers(0, 256, (frames, 1152), dtype=np.uint8),
            labels=np.array([index, index + 3], np.int64),
            segment_labels=np.arange(rated, dtype=np.int64) + 3,
            segment_start_times=np.arange(rated, dtype=np.int64) * 5,
            segment_scores=np.linspace(0, 1, rated).astype(np.float32)))
    return videos


def _video(index: int):
    """A deterministic video of pairs for a top-K (ties, zeros, a class not ranked)."""
    rng = np.random.default_rng(index)
    windows = int(rng.integers(1, 5))
    classes = rng.choice([3, 7, 11, 42, 99], size=3, replace=False)
    starts = np.repeat(np.arange(windows) * 5, len(classes))
    return f"v{index}", starts, np.tile(classes, windows), rng.integers(-1, 5, len(starts)) / 4


def top_k_files(scratch: Path) -> tuple[list[bytes], list[bytes]]:
    """(snapshots, insert logs) of small accumulators, written by DurableTopK itself."""
    snapshots = []
    for videos, k, slack in ((0, LOG_K, 1), (7, LOG_K, 1), (25, 2, 1), (12, 100, None)):
        topk = TopK(LOG_CLASSES, k, slack)
        for index in range(videos):
            topk.add(*_video(index))
        snapshots.append(topk.to_bytes())
    logs = []
    for videos in (0, 3, 11):
        directory = scratch / f"log-{videos}"
        with DurableTopK.open(directory, LOG_CLASSES, LOG_K) as durable:
            for index in range(videos):
                durable.add(*_video(index))
        (log,) = directory.glob("log-*.tfrecord")
        logs.append(log.read_bytes())
    logs.append(logs[-1][:-7])  # a torn tail
    return snapshots, logs


def real_payloads(root: Path | None) -> list[bytes]:
    """The first records of some real YouTube-8M files (frame-level and video-level)."""
    if root is None:
        return []
    payloads = []
    for path in sorted(glob.glob(str(root / "**" / "*.tfrecord"), recursive=True))[:REAL_FILES]:
        payloads += [record.payload for record in itertools.islice(iter_records(path), 2)]
    return payloads


def write_corpora(out: Path, real: Path | None = None) -> dict[str, int]:
    """Write every harness's seed corpus under ``out``; the number of seeds of each."""
    videos = synthetic_videos()
    payloads = [encode_video(video) for video in videos] + [encode_truth(videos[2])]
    payloads += real_payloads(real)
    with tempfile.TemporaryDirectory() as scratch:
        snapshots, logs = top_k_files(Path(scratch))
    framed = [b"".join(encode_record(p) for p in payloads[:3]), *snapshots, *logs]
    snapshot_records = [[r.payload for r in iter_buffer_records(s)] for s in snapshots]
    log_records = [r.payload for log in logs[:-1] for r in iter_buffer_records(log)]
    corpora = {
        "decoder": payloads + [PAYLOAD_MARKER.join(payloads[:2])],
        "tfrecord": framed,
        "snapshot": snapshots,
        "insert_log": logs,
        "native_decoder": payloads + [PAYLOAD_MARKER.join(payloads[:3])],
        "native_topk": [b"\0" + b"".join(struct.pack("<I", len(p)) + p for p in records)
                        for records in snapshot_records]
                       + [b"\1" + log_records[0]] + [b"\2" + p for p in log_records[1:]],
    }
    for name, seeds in corpora.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            (folder / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    return {name: len(seeds) for name, seeds in corpora.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--real", type=Path, help="a folder of real YouTube-8M TFRecord files")
    args = parser.parse_args()
    for name, count in write_corpora(args.out, args.real).items():
        print(f"{args.out / name}: {count} seeds")


if __name__ == "__main__":
    main()
