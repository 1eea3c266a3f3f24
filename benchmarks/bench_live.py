"""Live localization (``LocalizeLive``): window latency and concurrent real-time streams.

Per model size, distill graphs with random weights exported with ``modloc export``'s own
code (video model with its live encoder and head, 3862 classes; segment model, 1000
classes): ``demo`` (the demo's leaf: 2G 8K X1 64H r=4) and ``paper`` (NeXtVLAD 8G 128K X2
2048H r=16).

1. **Estimate** (in process, no server): the rate of each model call the live engine
   makes, at the batch the engine forms under load (``--estimate-batch`` windows): the
   segment model on 5-frame windows, the live encoder on 5-frame windows, the live head on
   streams' sums. A real-time stream (1 frame a second) needs 0.2 windows/s through the
   segment model and the encoder and, refreshing its candidates every ``r`` frames
   (``--refresh-frames``, default 5), ``1/r`` heads/s: at 100% of the machine the server
   holds ``1 / (0.2/segment + 0.2/encoder + (1/r)/head)`` streams.
2. **Light load**: ``--light`` streams at 1x real time for ``--seconds``: each window's
   latency, from the client sending the message with its fifth frame to receiving its
   event (client and server on this machine, loopback), p50/p99.
3. **Capacity**: levels of concurrent real-time streams (``--levels``), each run for
   ``--seconds`` after starts spread over 5 s: p50/p99 window latency, events received
   against windows completed, the server's RSS. A level is sustained when p99 <= 1 s and
   every window got its event. The load generator is a separate process (asyncio, its own
   core share): it competes with the server for the 2 cores.
4. **Offline**: ``Localize`` over the same server and artifacts: videos/s and frames/s of
   synthetic 60-300-frame videos (one real-time stream is 1 frame/s).

Results go to ``benchmarks/results/bench_live.md``, one section per model size.

    python benchmarks/bench_live.py                          # both sizes, ~25 min on 2 cores
    python benchmarks/bench_live.py --sizes paper --levels 500 1000 1500
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
from _common import RESULTS, provenance, write_section

from modloc.engine.base.features import FEATURE_SIZE, SEGMENT_FRAMES
from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.synth import config_from, generate
from modloc.engine.runtime.artifacts import load_artifact
from modloc.engine.runtime.backends import open_backend
from modloc.engine.runtime.live import LiveConfig, LiveVideoModel, stream_bound_bytes
from modloc.engine.service.process import ServerProcess

RESULTS_FILE = RESULTS / "bench_live.md"
HEADER = """# Live localization: window latency and concurrent real-time streams

One section per model size. A real-time stream sends 1 frame a second (one message per
frame); a window's latency runs from the client sending the message with its fifth frame
to the client receiving the window's event. Server and load generator share this
machine's 2 cores (loopback). `estimate` is computed from the in-process rates of the
three model calls at the batch the engine forms; `sustained` means p99 <= 1 s with every
window's event received. Every stream of a level starts within 5 s and lasts `--seconds`,
so they also end within 5 s: a burst of final answers (a head call and a re-fusion each)
that a live service, whose streams end at random, does not see. `p99 before the first
stream ended` leaves that burst out; `sustained` does not.
"""
SIZES = {"demo": dict(cluster_size=8, groups=2, expansion=1, hidden=64, gating_reduction=4),
         "paper": dict(cluster_size=128, groups=8, expansion=2, hidden=2048, gating_reduction=16)}
STAGGER_SECONDS = 5.0
STREAMS_PER_CONNECTION = 50  # under the server's --max-connection-streams (100)
P99_GOAL = 1.0


def export_size(scratch: Path, size: str, data: Path, threads: int) -> Path:
    """Random video and segment distill models of ``size``, exported (fp32, live graphs)."""
    from bench_backends import random_checkpoint

    from modloc.export.exporter import ExportSettings, export_checkpoint

    args = argparse.Namespace(branching=(1,), seed=0, **SIZES[size])
    root = scratch / size
    if (root / "segment" / "distill-fp32").is_dir():
        return root
    settings = ExportSettings(graphs=("distill",), leaf=0, threads=threads,
                              validation=str(data / "validate" / "*.tfrecord"))
    for kind in ("video", "segment"):
        export_checkpoint(random_checkpoint(root / "checkpoints", kind, args), root / kind, settings)
    return root


def rate(run, items: int, repeats: int = 5) -> float:
    """Items per second of ``run()`` (median of ``repeats`` after a warm-up)."""
    run()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return items / statistics.median(seconds)


def refreshes_per_second(refresh_frames: int) -> float:
    """Head calls per second of a real-time stream: a refresh waits for the first window
    that ends ``refresh_frames`` or more frames after the last one, and windows end every 5."""
    return 1 / (SEGMENT_FRAMES * -(-refresh_frames // SEGMENT_FRAMES))


def estimate(root: Path, batch: int, threads: int, refresh_frames: int) -> dict:
    session = {"session.intra_op.allow_spinning": "0"}
    live = LiveVideoModel(load_artifact(root / "video" / "distill-fp32"), threads, session)
    segment = open_backend(root / "segment" / "distill-fp32", "onnxruntime", threads=threads,
                           session_config=session)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 256, (batch, 5, FEATURE_SIZE), dtype=np.uint8)
    valid = np.full(batch, 5, np.int32)
    sums = live.encode(windows, valid)
    rates = {"segment windows/s": rate(lambda: segment.run(windows, num_frames=valid), batch),
             "encoder windows/s": rate(lambda: live.encode(windows, valid), batch),
             "head sums/s": rate(lambda: live.head(sums), batch)}
    # a real-time stream: 0.2 windows/s, and a refresh every ``refresh_frames`` seconds
    per_stream = 0.2 / rates["segment windows/s"] + 0.2 / rates["encoder windows/s"] + \
        refreshes_per_second(refresh_frames) / rates["head sums/s"]
    segment.close()
    return {**rates, "streams": 1.0 / per_stream, "sums_size": live.sums_size,
            "stream_bytes": stream_bound_bytes(LiveConfig(), live.sums_size, 1000)}


# --- the load generator (a process of its own) ---------------------------------------------


def _generate(address: str, streams: int, seconds: float, videos: list[np.ndarray], out) -> None:
    """Run ``streams`` real-time streams against ``address``; put (latencies, counts (windows
    completed, events received, failed streams and why), offered frames/s) on ``out``."""
    out.put(asyncio.run(_load(address, streams, seconds, videos)))


async def _load(address: str, streams: int, seconds: float, videos: list[np.ndarray]):
    from modloc.engine.service.client import AsyncLocalizationClient, LiveTimer

    # a connection per STREAMS_PER_CONNECTION streams: the server admits --max-connection-streams
    # (100) calls per connection at once, and a live stream past them would wait its turn
    clients = [AsyncLocalizationClient(address, timeout=seconds + 120)
               for _ in range(max(1, -(-streams // STREAMS_PER_CONNECTION)))]
    latencies: list[tuple[float, float, float]] = []  # (sent, client latency, server seconds)
    counts = {"completed": 0, "received": 0, "errors": 0, "frames": 0}
    causes: dict[str, int] = {}  # why streams failed: the status code, or the exception's type
    started = time.monotonic()

    async def one(index: int) -> None:
        features = videos[index % len(videos)]
        count = min(len(features), int(seconds))
        offset = STAGGER_SECONDS * index / streams
        timer = LiveTimer()

        async def paced():
            begin = started + offset
            for frame in range(count):
                delay = begin + frame + 1 - time.monotonic()  # frame i exists after i + 1 s
                if delay > 0:
                    await asyncio.sleep(delay)
                counts["frames"] += 1
                yield features[frame: frame + 1]

        counts["completed"] += -(-count // 5)
        try:
            async for event in clients[index % len(clients)].localize_live(
                    f"stream-{index}", paced(), top_n=3, timer=timer):
                if event.HasField("window"):
                    latency = timer.latency(event.window)
                    latencies.append((time.monotonic() - latency - started, latency,
                                      event.window.server_seconds))
                    counts["received"] += 1
        except Exception as error:
            counts["errors"] += 1
            cause = error.code().name if isinstance(error, grpc.RpcError) else type(error).__name__
            causes[cause] = causes.get(cause, 0) + 1
            if causes[cause] == 1:  # the first of each kind, in the log
                print(f"  stream {index}: {cause}: {error.details() if isinstance(error, grpc.RpcError) else error}",
                      flush=True)

    await asyncio.gather(*(one(index) for index in range(streams)))
    elapsed = time.monotonic() - started
    for client in clients:
        await client.close()
    return latencies, {**counts, "causes": causes}, counts["frames"] / elapsed


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _worst_second(samples: np.ndarray) -> str:
    """When the slowest windows were sent: the second of the run with the highest p99."""
    if not len(samples):
        return "-"
    seconds = samples[:, 0].astype(int)
    worst = max(np.unique(seconds), key=lambda s: np.percentile(samples[seconds == s, 1], 99))
    return f"{worst} s"


def run_level(server: ServerProcess, streams: int, seconds: float, videos) -> dict:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    generator = context.Process(target=_generate, args=(server.address, streams, seconds, videos, out))
    before = rss_kib(server.process.pid)
    generator.start()
    peak = before
    while generator.is_alive() and out.empty():
        peak = max(peak, rss_kib(server.process.pid))
        time.sleep(0.5)
    samples, counts, offered = out.get()
    generator.join()
    samples = np.array(samples, np.float64).reshape(-1, 3)
    latencies, server_seconds = samples[:, 1], samples[:, 2]
    row = {"streams": streams, "windows": counts["completed"], "received": counts["received"],
           "errors": counts["errors"], "offered_fps": offered,
           "causes": ", ".join(f"{name} {count}" for name, count in sorted(counts["causes"].items())),
           "p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99),
           # streams end within STAGGER_SECONDS of each other, a burst of final answers no live
           # service sees; the windows sent before the first stream ends show the steady state
           "steady_p99": _percentile(latencies[samples[:, 0] < seconds], 99),
           "server_p99": _percentile(server_seconds, 99),
           "worst_second": _worst_second(samples),
           "rss_mib": peak / 1024, "rss_growth_mib": (peak - before) / 1024}
    row["sustained"] = (row["p99"] <= P99_GOAL and not row["errors"]
                        and row["received"] == row["windows"])
    print(f"  {streams} streams: p50 {row['p50'] * 1000:.0f} ms, p99 {row['p99'] * 1000:.0f} ms "
          f"(server {row['server_p99'] * 1000:.0f} ms; worst at {row['worst_second']}; before the "
          f"first stream ended {row['steady_p99'] * 1000:.0f} ms), "
          f"{row['received']}/{row['windows']} events, {row['errors']} errors"
          f"{' (' + row['causes'] + ')' if row['causes'] else ''}, offered "
          f"{offered:.0f} frames/s, server RSS {row['rss_mib']:.0f} MiB "
          f"({'sustained' if row['sustained'] else 'NOT sustained'})", flush=True)
    return row


def offline(server: ServerProcess, videos) -> dict:
    from modloc.engine.base.io.examples import Video
    from modloc.engine.service.client import LocalizationClient

    items = [Video(f"offline-{i}", features) for i, features in enumerate(videos)]
    with LocalizationClient(server.address, timeout=600) as client:
        list(client.localize(items[:4]))  # warm-up
        started = time.perf_counter()
        list(client.localize(items))
        seconds = time.perf_counter() - started
    frames = sum(len(v.features) for v in items)
    return {"videos": len(items), "videos_per_s": len(items) / seconds, "frames_per_s": frames / seconds}


def bench_size(size: str, scratch: Path, data: Path, args) -> str:
    print(f"[{size}] exporting random distill models with live graphs ...", flush=True)
    root = export_size(scratch, size, data, args.threads)
    estimated = estimate(root, args.estimate_batch, args.threads, args.refresh_frames)
    print(f"[{size}] estimate: {estimated['streams']:,.0f} real-time streams "
          f"(segment {estimated['segment windows/s']:,.0f} windows/s, encoder "
          f"{estimated['encoder windows/s']:,.0f} windows/s, head {estimated['head sums/s']:,.0f}/s)",
          flush=True)
    videos = [v.features for v in read_videos(str(data / "test" / "*.tfrecord"))]
    server = ServerProcess.start(root, "--max-live-streams", str(max(args.levels + [args.light]) + 16),
                                 "--live-refresh-frames", str(args.refresh_frames))
    try:
        print(f"[{size}] light load: {args.light} streams for {args.seconds:g} s ...", flush=True)
        light = run_level(server, args.light, args.seconds, videos)
        rows = []
        for streams in args.levels:
            print(f"[{size}] {streams} streams for {args.seconds:g} s ...", flush=True)
            rows.append(run_level(server, streams, args.seconds, videos))
            if not rows[-1]["sustained"] and not args.all_levels:
                break
        print(f"[{size}] offline Localize ...", flush=True)
        localize = offline(server, videos)
    finally:
        server.stop()
    sustained = max((row["streams"] for row in rows if row["sustained"]), default=0)
    lines = [
        f"## {size}: distill NeXtVLAD {SIZES[size]['groups']}G {SIZES[size]['cluster_size']}K "
        f"X{SIZES[size]['expansion']} {SIZES[size]['hidden']}H r={SIZES[size]['gating_reduction']}"
        + ("" if args.refresh_frames == LiveConfig().refresh_frames
           else f", candidates refreshed every {args.refresh_frames} frames"),
        "", provenance(),
        f"- Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, numpy "
        f"{np.__version__}; server: ONNX Runtime (its defaults); a 2-core CPU machine "
        "shared with other work",
        f"- sums per stream: {estimated['sums_size']:,} floats; state bound per stream "
        f"(300-frame horizon, 60-frame blocks, 1000 segment classes): "
        f"{estimated['stream_bytes'] / 1024:,.0f} KiB",
        "", "**Estimate** (in process, batches of "
        f"{args.estimate_batch}): segment model {estimated['segment windows/s']:,.0f} windows/s, "
        f"encoder {estimated['encoder windows/s']:,.0f} windows/s, head "
        f"{estimated['head sums/s']:,.0f} sums/s → **{estimated['streams']:,.0f} real-time streams** "
        "at 100% of the machine (per stream per second: 0.2 windows through the segment model "
        f"and the encoder, {refreshes_per_second(args.refresh_frames):.3g} heads).",
        "", f"**Light load** ({args.light} streams, {args.seconds:g} s): window latency p50 "
        f"{light['p50'] * 1000:.0f} ms, p99 {light['p99'] * 1000:.0f} ms "
        f"({light['received']}/{light['windows']} events).",
        "", "| streams | windows | events received | errors | frames/s offered | p50 ms | p99 ms | "
        "p99 ms before the first stream ended | "
        "server RSS MiB | RSS growth MiB | sustained |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        errors = f"{row['errors']} ({row['causes']})" if row["causes"] else f"{row['errors']}"
        lines.append(f"| {row['streams']} | {row['windows']} | {row['received']} | {errors} | "
                     f"{row['offered_fps']:,.0f} | {row['p50'] * 1000:,.0f} | {row['p99'] * 1000:,.0f} | "
                     f"{row['steady_p99'] * 1000:,.0f} | "
                     f"{row['rss_mib']:,.0f} | {row['rss_growth_mib']:,.0f} | "
                     f"{'yes' if row['sustained'] else 'no'} |")
    lines += ["", f"**Measured**: {sustained:,} concurrent real-time streams sustained "
              f"(estimate {estimated['streams']:,.0f}; goal for the paper size: 1,000).",
              "", f"**Offline Localize** on the same server: {localize['videos_per_s']:,.1f} videos/s, "
              f"{localize['frames_per_s']:,.0f} frames/s ({localize['videos']} videos of 60-300 "
              "frames; a real-time stream is 1 frame/s)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["demo", "paper"])
    parser.add_argument("--levels", nargs="+", type=int, default=[250, 500, 1000, 1500, 2000])
    parser.add_argument("--all-levels", action="store_true", help="go on past an unsustained level")
    parser.add_argument("--light", type=int, default=8, help="streams at light load")
    parser.add_argument("--seconds", type=float, default=40.0, help="seconds of stream per level")
    parser.add_argument("--estimate-batch", type=int, default=64)
    parser.add_argument("--refresh-frames", type=int, default=LiveConfig().refresh_frames,
                        help="the server's --live-refresh-frames: a stream's candidates are "
                        "refreshed every this many frames (default %(default)s; a section of its own "
                        "when not the default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=RESULTS_FILE)
    parser.add_argument("--scratch", type=Path,
                        help="keep the data and exported models here (reused when present)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-live-") as scratch_dir:
        scratch = args.scratch or Path(scratch_dir)
        data = scratch / "data"
        if not (data / "synth.json").is_file():
            generate(config_from("tiny", validate_videos=16, test_videos=64, min_frames=60,
                                 max_frames=300, seed=0), data, splits=("validate", "test"))
        for size in args.sizes:
            section = bench_size(size, scratch, data, args)
            print(section)
            write_section(args.out, section, HEADER)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
