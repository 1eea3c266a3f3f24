"""Per-class top-K insertion throughput: the native accumulator against Python heapq and numpy.

The stream is the engine's stage 4 at Kaggle scale: 1000 classes (the segment classes),
K = 100,000 kept per class, and videos of 20 distinct candidate classes × 60 windows = 1200
(window, class, score) pairs with uniform random scores. It is generated deterministically in
batches of ``--batch`` videos; only insertion is timed (video registration included), and
every method sees the same pairs. The rows:

* ``heapq``: one bounded min-heap per class (``heappush`` until K, then ``heapreplace`` when
  a pair beats the heap's worst), a Python step per pair, on the first ``--heapq-videos``;
* ``numpy``: the best numpy accumulator here, the old ``SegmentRanker``'s batched lexsort
  compaction, made lazy (only classes past K are sorted, on two keys), plus a vectorized
  filter against each class's K-th best score, on both prefixes;
* ``native add``: ``TopK.add``, one call per video (the engine's per-video API);
* ``native insert``: ``TopK.insert``, one call per batch of ``--batch`` videos;
* ``native insert ×T``: ``--threads`` T > 1 threads inserting different batches at once.

A class gets about 1.2 pairs per video, so the first ~83,000 videos only fill the classes;
after that the thresholds rise and more and more pairs are turned away. The native rows run
both prefixes and the whole ``--videos`` stream, whose phases are reported apart. A ratio only
ever compares rows of one prefix, measured in the same run; the rows of a prefix are checked
against each other (same rankings) before anything is written.

    python benchmarks/bench_topk.py                       # under 2 minutes on 2 cores
    python benchmarks/bench_topk.py --videos 50000 --repeats 2 --threads 2
"""

from __future__ import annotations

import argparse
import heapq
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from _common import RESULTS, provenance

from modloc.engine.base.progress import Progress
from modloc.engine.base.vocab import ClassSpace, default_segment_class_ids
from modloc.engine.runtime.topk import TopK, default_slack

RESULTS_FILE = RESULTS / "bench_topk.md"
CANDIDATES = 20
WINDOWS = 60
PAIRS_PER_VIDEO = CANDIDATES * WINDOWS
# Steps coprime with 1000: base + step * j (mod 1000) gives 20 distinct classes.
STEPS = np.array([1, 3, 7, 9, 11, 13, 17, 19, 21, 23, 27, 29, 31, 33, 37, 39])

Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # videos, starts, class ids, scores


def batch(class_ids: np.ndarray, seed: int, index: int, size: int) -> Batch:
    """Batch ``index`` of the stream: ``size`` videos numbered from ``index * size``,
    window-major pairs (``(n,)`` video numbers, starts, class ids, float64 scores)."""
    rng = np.random.default_rng([seed, index])
    base = rng.integers(0, len(class_ids), size)
    step = rng.choice(STEPS, size)
    classes = class_ids[(base[:, None] + step[:, None] * np.arange(CANDIDATES)) % len(class_ids)]
    shape = (size, WINDOWS, CANDIDATES)
    return (np.repeat(np.arange(index * size, (index + 1) * size, dtype=np.int64), PAIRS_PER_VIDEO),
            np.broadcast_to((np.arange(WINDOWS, dtype=np.int64) * 5)[None, :, None], shape).reshape(-1),
            np.broadcast_to(classes[:, None, :], shape).reshape(-1),
            rng.random(size * PAIRS_PER_VIDEO))


def batches(class_ids: np.ndarray, seed: int, videos: int, size: int) -> Iterator[Batch]:
    for index in range(-(-videos // size)):
        videos_batch, starts, classes, scores = batch(class_ids, seed, index, size)
        keep = videos_batch < videos
        yield videos_batch[keep], starts[keep], classes[keep], scores[keep]


# --- the accumulators -------------------------------------------------------------------


class NativeInsert:
    """``TopK.insert`` of whole batches; videos are registered under their numbers."""

    def __init__(self, class_ids: np.ndarray, k: int):
        self.topk = TopK(class_ids, k)

    def feed(self, videos: np.ndarray, starts: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> None:
        first, last = int(videos[0]), int(videos[-1])
        indices = np.array([self.topk.add_video(str(v)) for v in range(first, last + 1)])
        self.topk.insert(indices[videos - first], starts, classes, scores)

    def finish(self) -> None:
        """Nothing to do: the state is the exact top K after every call."""

    def ranked(self) -> dict[int, list[tuple[int, int]]]:
        return {c: [(int(v), s) for v, s, _ in self.topk.ranking(c)] for c in self.topk.class_ids.tolist()}


class NativeAdd(NativeInsert):
    """``TopK.add``, one call per video."""

    def feed(self, videos: np.ndarray, starts: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> None:
        for begin in range(0, len(videos), PAIRS_PER_VIDEO):
            end = begin + PAIRS_PER_VIDEO
            self.topk.add(str(videos[begin]), starts[begin:end], classes[begin:end], scores[begin:end])


class HeapTopK:
    """One bounded min-heap per class of keys (score, -video, -start): its root is the
    class's worst kept pair under the rank order (score desc, video, start)."""

    def __init__(self, class_ids: np.ndarray, k: int):
        self.space = ClassSpace(class_ids)
        self.k = k
        self.heaps: list[list[tuple[float, int, int]]] = [[] for _ in class_ids]

    def feed(self, videos: np.ndarray, starts: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> None:
        heaps, k = self.heaps, self.k
        push, replace = heapq.heappush, heapq.heapreplace
        for video, start, position, score in zip(videos.tolist(), starts.tolist(),
                                                 self.space.positions(classes).tolist(), scores.tolist(),
                                                 strict=True):
            if position < 0 or score <= 0:
                continue
            heap = heaps[position]
            key = (score, -video, -start)
            if len(heap) < k:
                push(heap, key)
            elif key > heap[0]:
                replace(heap, key)

    def finish(self) -> None:
        """Nothing to do: the heaps hold the exact top K after every pair."""

    def ranked(self) -> dict[int, list[tuple[int, int]]]:
        return {c: [(-v, -s) for _, v, s in sorted(heap, reverse=True)]
                for c, heap in zip(self.space.class_ids.tolist(), self.heaps, strict=True)}


class NumpyTopK:
    """The old ``SegmentRanker``'s batched compaction, made lazier: a pair scored below its
    class's K-th best (known once the class overflowed) is dropped on arrival; the rest
    pile up, and when they outnumber the kept pairs only the classes holding more than K
    are sorted (one stable lexsort on (class, -score)) and cut to K. Stable is enough for
    the tie rule here: a class's kept pairs come from earlier videos and stay ahead of its
    new ones, and the stream arrives in (video, start) order, which the old ranker's
    4-key lexsort spent two more keys on."""

    def __init__(self, class_ids: np.ndarray, k: int, compact_every: int = 1 << 22):
        self.space = ClassSpace(class_ids)
        self.k = k
        self.compact_every = compact_every
        self.floor = np.zeros(self.space.num_classes)
        self.kept = [np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)]
        self.pending: list[list[np.ndarray]] = []
        self.pending_size = 0

    def feed(self, videos: np.ndarray, starts: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> None:
        positions = self.space.positions(classes)
        keep = positions >= 0
        keep[keep] = scores[keep] >= np.maximum(self.floor[positions[keep]], np.nextafter(0, 1))
        self.pending.append([positions[keep], videos[keep], starts[keep], scores[keep]])
        self.pending_size += int(keep.sum())
        if self.pending_size >= max(self.compact_every, len(self.kept[0])):
            self.compact(everything=False)

    def compact(self, everything: bool) -> None:
        """Cut the classes holding more than K (``everything``: sort every class)."""
        columns = [np.concatenate([kept, *(p[i] for p in self.pending)]) for i, kept in enumerate(self.kept)]
        self.pending, self.pending_size = [], 0
        counts = np.bincount(columns[0], minlength=self.space.num_classes)
        cut = (counts > 0) if everything else (counts > self.k)
        rows = cut[columns[0]]
        if rows.any():
            chosen = [column[rows] for column in columns]
            order = np.lexsort((-chosen[3], chosen[0]))
            ranked = chosen[0][order]
            rank = np.arange(len(order)) - np.searchsorted(ranked, ranked, side="left")
            chosen = [column[order[rank < self.k]] for column in chosen]
            bounds = np.searchsorted(chosen[0], np.arange(self.space.num_classes + 1))
            full = np.flatnonzero(np.diff(bounds) == self.k)
            self.floor[full] = chosen[3][bounds[full + 1] - 1]
            columns = [np.concatenate([column[~rows], part]) for column, part in zip(columns, chosen, strict=True)]
        self.kept = columns

    def finish(self) -> None:
        """Cut the classes past K, so that the state is the top K of everything fed (the
        other accumulators never hold more), and the timing includes that work."""
        self.compact(everything=False)

    def ranked(self) -> dict[int, list[tuple[int, int]]]:
        self.compact(everything=True)
        positions, videos, starts, _ = self.kept
        bounds = np.searchsorted(positions, np.arange(self.space.num_classes + 1))
        return {c: list(zip(videos[bounds[p]:bounds[p + 1]].tolist(), starts[bounds[p]:bounds[p + 1]].tolist(),
                            strict=True))
                for p, c in enumerate(self.space.class_ids.tolist())}


# --- timing -----------------------------------------------------------------------------


def timed_run(make: Callable[[], object], class_ids: np.ndarray, args, videos: int) -> tuple[object, list[float]]:
    """Feeds the first ``videos`` of the stream and finishes; returns the accumulator and the
    seconds spent on each batch (generation not included; the finish counts to the last)."""
    accumulator = make()
    seconds = []
    with Progress(type(accumulator).__name__, -(-videos // args.batch), "batch") as bar:
        for pairs in bar.each(batches(class_ids, args.seed, videos, args.batch)):
            start = time.perf_counter()
            accumulator.feed(*pairs)
            seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    accumulator.finish()
    seconds[-1] += time.perf_counter() - start
    return accumulator, seconds


def threaded_run(class_ids: np.ndarray, args) -> float:
    """Seconds ``--threads`` threads take to insert the whole stream: in each round every
    thread makes its own batch, then all insert at once and the round's time is from the
    first start to the last end."""
    accumulator = NativeInsert(class_ids, args.k)
    count = -(-args.videos // args.batch)
    threads = args.threads
    starts, ends = [0.0] * threads, [0.0] * threads
    ready, done = threading.Barrier(threads + 1), threading.Barrier(threads + 1)

    def work(part: int) -> None:
        for first in range(0, count, threads):
            index = first + part
            pairs = None
            if index < count:
                videos, begin, classes, scores = batch(class_ids, args.seed, index, args.batch)
                keep = videos < args.videos
                pairs = videos[keep], begin[keep], classes[keep], scores[keep]
            ready.wait()
            starts[part] = time.perf_counter()
            if pairs is not None:
                accumulator.feed(*pairs)
            ends[part] = time.perf_counter()
            done.wait()

    workers = [threading.Thread(target=work, args=(part,)) for part in range(threads)]
    for worker in workers:
        worker.start()
    total = 0.0
    for _ in range(0, count, threads):
        ready.wait()
        done.wait()
        total += max(ends) - min(starts)
    for worker in workers:
        worker.join()
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=120_000,
                        help="videos of the whole stream, for the native rows (default 120,000: "
                             "144M pairs, past the filling phase)")
    parser.add_argument("--numpy-videos", type=int, default=20_000,
                        help="prefix run by numpy and, for comparison, the native rows (default 20,000)")
    parser.add_argument("--heapq-videos", type=int, default=1_000, help="prefix run by heapq (default 1,000)")
    parser.add_argument("--batch", type=int, default=256, help="videos per batch (default 256)")
    parser.add_argument("--k", type=int, default=100_000, help="pairs kept per class (default 100,000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row, median kept (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of the extra 'native insert xT' row (default 1: no such row)")
    parser.add_argument("--small-k", type=int, default=1_000,
                        help="K of the second comparison, where the prefixes run past the filling "
                             "phase (default 1,000; 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stream")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE, help="results file")
    args = parser.parse_args(argv)
    if min(args.videos, args.numpy_videos, args.heapq_videos, args.batch, args.k, args.repeats,
           args.threads) < 1 or args.small_k < 0:
        parser.error("every count must be at least 1")
    if args.videos < args.numpy_videos or args.numpy_videos < args.heapq_videos:
        parser.error("expected --videos >= --numpy-videos >= --heapq-videos")
    class_ids = np.asarray(default_segment_class_ids(), dtype=np.int64)

    def median_rate(make, videos: int, name: str) -> tuple[float, object, list[list[float]]]:
        runs, last = [], None
        for repeat in range(args.repeats):
            print(f"{name}: {videos:,} videos, run {repeat + 1}/{args.repeats} ...", flush=True)
            last = None  # the previous run's memory goes before the next one starts
            last, seconds = timed_run(make, class_ids, args, videos)
            runs.append(seconds)
        return statistics.median(sum(run) for run in runs), last, runs

    def compare_on_prefix(k: int, videos: int, with_heapq: bool) -> list[tuple[str, int, float]]:
        """Every method on the same first ``videos`` of the stream at ``k``, checked to rank
        alike: the rows one table's ratios compare."""
        methods = [("heapq", HeapTopK)] if with_heapq else []
        methods += [("numpy", NumpyTopK), ("native add", NativeAdd), ("native insert", NativeInsert)]
        rows, ranked = [], {}
        for name, make in methods:
            seconds, accumulator, _ = median_rate(lambda make=make: make(class_ids, k), videos,
                                                  f"{name} K={k:,}")
            rows.append((name, videos, seconds))
            ranked[name] = accumulator.ranked()
            del accumulator
        first = next(iter(ranked.values()))
        if any(other != first for other in ranked.values()):
            raise RuntimeError(f"the accumulators disagree on {videos:,} videos at K={k}: a benchmark bug")
        return rows

    def table(rows: list[tuple[str, int, float]]) -> str:
        """Markdown rows of one prefix, with each rate relative to the first row's."""
        if len({videos for _, videos, _ in rows}) != 1:
            raise ValueError("a ratio compares rates on the same prefix only")
        _, videos, baseline = rows[0]
        lines = [f"| method | videos | pairs | median s | M pairs/s | vs {rows[0][0]} |",
                 "|---|---:|---:|---:|---:|---:|"]
        for name, videos, seconds in rows:
            rate = videos * PAIRS_PER_VIDEO / seconds
            lines.append(f"| {name} | {videos:,} | {videos * PAIRS_PER_VIDEO / 1e6:,.1f}M | {seconds:.3f} | "
                         f"{rate / 1e6:,.2f} | {baseline / seconds:,.1f}x |")
        return "\n".join(lines)

    def comparisons(k: int) -> str:
        """The heapq prefix (every method) and the longer numpy prefix (numpy and native)."""
        return (table(compare_on_prefix(k, args.heapq_videos, with_heapq=True)) + "\n\n"
                + table(compare_on_prefix(k, args.numpy_videos, with_heapq=False)))

    main_tables = comparisons(args.k)
    seconds, _, runs = median_rate(lambda: NativeInsert(class_ids, args.k), args.videos, "native insert")
    stream_rows = ["| method | videos | pairs | median s | M pairs/s |", "|---|---:|---:|---:|---:|"]
    stream = [("native insert", seconds)]
    if args.threads > 1:
        print(f"native insert x{args.threads}: {args.videos:,} videos ...", flush=True)
        stream.append((f"native insert x{args.threads}",
                       statistics.median(threaded_run(class_ids, args) for _ in range(args.repeats))))
    for name, total in stream:
        stream_rows.append(f"| {name} | {args.videos:,} | {args.videos * PAIRS_PER_VIDEO / 1e6:,.1f}M | "
                           f"{total:.3f} | {args.videos * PAIRS_PER_VIDEO / total / 1e6:,.2f} |")
    stream_table = "\n".join(stream_rows)
    small_table = comparisons(args.small_k) if args.small_k else ""

    # The whole-stream native runs by phase: filling (a class holds fewer than K pairs on
    # average) and rising thresholds.
    filling = min(args.videos, args.k * len(class_ids) // PAIRS_PER_VIDEO)
    per_batch = -(-filling // args.batch)
    phases = ["| phase | videos | M pairs/s (median) |", "|---|---:|---:|"]
    for label, part, videos in (("filling", slice(0, per_batch), min(filling, per_batch * args.batch)),
                                ("rising thresholds", slice(per_batch, None), args.videos - per_batch * args.batch)):
        if videos > 0:
            rate = statistics.median(videos * PAIRS_PER_VIDEO / sum(run[part]) for run in runs)
            phases.append(f"| {label} | {videos:,} | {rate / 1e6:,.2f} |")
    phase_table = "\n".join(phases)
    print(main_tables)
    print(stream_table)
    print(phase_table)
    if small_table:
        print(small_table)

    small_section = f"""
## K = {args.small_k:,}: the same prefixes past the filling phase

A class fills after about {args.small_k * len(class_ids) // PAIRS_PER_VIDEO:,} videos here, so the
prefixes are mostly the steady state, where most pairs are turned away (same tables, same
prefixes):

{small_table}
""" if small_table else ""
    report = f"""# Per-class top-K insertion throughput

{provenance()}
- Python {platform.python_version()}, numpy {np.__version__}
- stream: {len(class_ids)} classes, K = {args.k:,}, videos of {CANDIDATES} candidate classes x {WINDOWS} windows = {PAIRS_PER_VIDEO} pairs, uniform random scores, batches of {args.batch} videos; native slack {default_slack(args.k):,} per class
- one process, one inserting thread unless marked xT; median of {args.repeats} runs per row; insertion timed (video registration included), stream generation not

{main_tables}

Each table runs every method on the same prefix of the same stream (and checks that they rank
it the same), so its ratios compare per-pair rates on equal work: the first table on the first
{args.heapq_videos:,} videos (all that heapq, a Python step per pair, runs in reasonable time),
the second on the first {args.numpy_videos:,}. On these prefixes every class is still filling
(fewer than K pairs), where numpy only concatenates. `native add` is one `TopK.add` call per
video (1200 pairs), `native insert` one `TopK.insert` call per batch. The whole stream, past
the filling phase, is run by the native accumulator alone (no ratio: nothing else runs it):

{stream_table}

{phase_table}

While filling, every pair is appended to its class's buffer: the time goes to page faults on
the ~2 GB of buffers and to the copies. Once a class holds K pairs, a pair below its
threshold is turned away in O(1), but while the thresholds rise most pairs still enter (any
exact streaming top-K must take about K·ln(N/K) of a class's N pairs), and every K/4 entries a
class is cut back to K by one pass over its 2 MB buffer, which is then about half the time.
Far into a stream (N ≫ K per class) nearly every pair is turned away.
{small_section}"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
