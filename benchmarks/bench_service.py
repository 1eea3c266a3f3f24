"""End-to-end throughput and latency of the gRPC service against the same engine in-process.

The question (issue 6): what does the service layer cost? Both sides run the same engine
core (:class:`modloc.engine.service.core.EngineCore`: the artifacts on ONNX Runtime with the
server's default backend options, the same :class:`modloc.engine.runtime.batcher.Batcher` and
:class:`modloc.engine.runtime.batcher.BatcherConfig`), so the ratio service / in-process is the cost of
gRPC, protobuf, the asyncio front and the response building, nothing else:

* ``in-process``: ``EngineCore.load`` in this process, fed by N Python threads, each a
  closed loop of one video per request (submit, wait for the result, submit the next);
* ``service``: ``modloc serve`` in a subprocess on a loopback port (``--processes P``:
  P processes sharing the port with SO_REUSEPORT, no state directory, Localize only), fed
  by N Localize streams from this process (grpc.aio, one channel, i.e. one connection, per
  stream, so that the kernel can spread streams over the processes), each a closed loop
  with a window of one video: write a video, read its response, write the next (through
  the generated stub: ``AsyncLocalizationClient.localize`` sends its whole list at once, so
  it cannot hold a window). Requests are built from the videos' pre-split chunks (:func:`modloc.engine.service.client.video_chunks`, done
  once) with a fresh id per send (the server refuses an id repeated within a stream);
* ``open loop``: Poisson arrivals at a fixed offered rate (``--load`` × the service's best
  closed-loop videos/s with one process); both sides get the same arrival times and videos
  in a round; latency runs from the scheduled arrival, so a sender that falls behind is
  charged for it (no coordinated omission). The service side deals the arrivals
  round-robin over ``--open-streams`` streams, each with several videos in flight.

Per configuration: videos/s, MB/s of uint8 features sent (frames × 1152 bytes, 1 MB =
10^6 bytes), p50/p99 latency per video, the ratio to in-process with as many callers, the
server's CPU (utime + stime of the server processes read from /proc/<pid>/stat, since
os.times sees a child's CPU only once it exits) and MB/s per server core, the server's CPU
per video split by thread role (/proc/<pid>/task: the engine's threads, i.e. the batcher's
worker and ONNX Runtime's pool, against the service layer's: the asyncio main thread and
gRPC's transport threads), the client's CPU (this process) and the mean videos per
pipeline call. Client and server share this machine's cores, so the client's CPU is CPU
the server does not get. Closed-loop rates are summed per caller (see
:meth:`Recorder.window`). A last table times the service layer's own steps per video on
one thread (request building, parsing, interleaving RGB and audio, response building)
beside the CPU per video measured under load, to show where the extra time goes.

Models: by default one NeXtVLAD at the tiny size of ``tests/tiny.py`` (random weights,
3862 video classes, 1000 segment classes), so that the service layer's cost is visible
next to the model's; ``--paper-size`` uses the paper's (8G 128K X2 2048H r=16). Both are
exported as distill fp32 graphs with ``modloc export``'s code (bench_pipeline's
``export_models``). Data: synthetic videos of 60-300 frames, decoded in memory once.

Each measurement runs ``--seconds`` after ``--warmup`` seconds; ``--rounds`` rounds are
interleaved (every in-process and service configuration once per round) so that other work
on a shared machine slows both sides alike; the median round is reported. Goal (issue 6):
the service reaches >= 80% of the in-process throughput on this machine, judged on matched
rows only: one server process against the in-process engine with as many callers, the ratio
taken within each round (both sides under the same load) and its median over rounds.

Hostile clients (``--hostile``, a section of its own): ``modloc serve`` with its default
limits against a client that never reads its Localize responses (60-frame videos sent as
fast as the transport takes them, ``--slow-reader-seconds``) and against a flood of
KServe ModelInfer calls of [11, 300, 1152] uint8 (``--flood-callers`` connections, each
calling back to back for ``--flood-seconds``). The server's RSS (VmRSS of
/proc/<pid>/status, sampled every 50 ms) before, a third of the way in, at its peak and at
the end, and what the clients saw: the videos the never-reading client got the server to
take, the flood's status codes. Before each, the server is warmed up by the same work done
politely (a third of the window of the same videos with their responses read; three
ModelInfer calls one at a time), so that the growth is what the hostile client costs.

    python benchmarks/bench_service.py               # ~3.5 min on 2 cores
    python benchmarks/bench_service.py --quick       # ~1 min sanity run
    python benchmarks/bench_service.py --paper-size --streams 1 8 --processes 1
    python benchmarks/bench_service.py --hostile     # ~1.5 min: the hostile-client rows
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import torch
from _common import RESULTS, provenance, write_section
from bench_pipeline import export_models

from modloc.engine._proto.inference import grpc_predict_v2_pb2 as kpb
from modloc.engine._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from modloc.engine._proto.modloc.v1 import localization_pb2 as pb
from modloc.engine._proto.modloc.v1 import localization_pb2_grpc as pb_grpc
from modloc.engine.base.features import FEATURE_SIZE
from modloc.engine.base.io.examples import Video
from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.synth import config_from, generate
from modloc.engine.runtime.batcher import BatcherConfig
from modloc.engine.runtime.fusion import FusionConfig
from modloc.engine.runtime.pipeline import PipelineConfig
from modloc.engine.service.client import LocalizationClient, video_chunks
from modloc.engine.service.config import DEFAULT_MAX_MESSAGE_BYTES, ServerConfig
from modloc.engine.service.core import EngineCore
from modloc.engine.service.handlers import interleave, localize_response
from modloc.engine.service.process import ServerProcess, held_port

RESULTS_FILE = RESULTS / "bench_service.md"
HEADER = """# The gRPC service against the same engine in-process

One section per machine and model size. `in-process` is the engine core the server runs
(same artifacts, backend options, batcher settings) fed by N Python threads, one video per
request, closed loop; `service` is `modloc serve` on loopback fed by N Localize streams
(one connection each), closed loop with one video in flight per stream; `open loop` is
Poisson arrivals at the same offered rate on both sides. `ratio` = service videos/s ÷
in-process videos/s with as many callers (open loop: p50 latency ratio). MB/s counts the
uint8 features sent (frames × 1152 bytes). `server CPU` is the server processes' CPU
(from /proc) in cores; for in-process it is the whole benchmark process (engine and its
caller threads). `per-core ratio` = service MB/s per server core ÷ in-process MB/s per
core: the service layer's cost with the CPU each side got factored out, which matters on a
shared machine where the two sides do not get the same share of the cores (the closed-loop
rates are summed per caller, see `Recorder.window`). `engine CPU` is the server's batcher
and ONNX Runtime threads per video; `front + gRPC CPU` the service layer's threads (asyncio
main thread, gRPC transport) per video. `client CPU` is this process while it drives the
service; client and server share the machine's cores. `mean batch` is videos per pipeline
call.
"""
# The paper's NeXtVLAD (8G 128K X2 2048H r=16) and the tiny leaf of tests/tiny.py, whose
# model cost is small enough for the service layer's own cost to show.
SIZES = {"paper": dict(cluster_size=128, groups=8, expansion=2, hidden=2048, gating_reduction=16),
         "tiny": dict(cluster_size=4, groups=2, expansion=2, hidden=16, gating_reduction=4)}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MB = 1e6


# --- measurement records ---------------------------------------------------------------

@dataclass
class Recorder:
    """Completions ``(caller, finish time, latency, feature bytes)``; appended from many
    threads (list.append is atomic under the GIL)."""

    done: list = field(default_factory=list)

    def add(self, caller: int, finished: float, latency: float, nbytes: int) -> None:
        self.done.append((caller, finished, latency, nbytes))

    def window(self, begin: float, end: float, closed_loop: bool) -> dict:
        """Videos/s, MB/s and latency percentiles of the completions within [begin, end].

        Closed loop, the rates are summed over the callers, each caller's rate taken between
        its first and last completion in the window: with many callers the batcher answers
        them in bursts (one per pipeline call, 0.5 s and more apart), and counting whole
        bursts in a fixed window would be off by up to a burst; a caller completes once per
        burst, so its own first-to-last rate is exact. Open loop, completions over the window.
        """
        inside = [entry for entry in self.done if begin <= entry[1] <= end]
        latencies = np.array([latency for _, _, latency, _ in inside]) * 1e3
        row = {"videos": len(inside),
               "p50_ms": float(np.percentile(latencies, 50)) if len(inside) else float("nan"),
               "p99_ms": float(np.percentile(latencies, 99)) if len(inside) else float("nan")}
        if not closed_loop:
            row["videos_per_s"] = len(inside) / (end - begin)
            row["mb_per_s"] = sum(entry[3] for entry in inside) / MB / (end - begin)
            return row
        per_caller: dict[int, list] = {}
        for caller, finished, _, nbytes in inside:
            per_caller.setdefault(caller, []).append((finished, nbytes))
        videos_per_s = mb_per_s = 0.0
        for caller, completions in per_caller.items():
            completions.sort()
            span = completions[-1][0] - completions[0][0]
            if len(completions) < 2 or span <= 0:
                raise RuntimeError(f"caller {caller} completed {len(completions)} videos in the "
                                   f"window: measure for longer (--seconds)")
            videos_per_s += (len(completions) - 1) / span
            mb_per_s += sum(nbytes for _, nbytes in completions[1:]) / MB / span
        row["videos_per_s"], row["mb_per_s"] = videos_per_s, mb_per_s
        return row

    def fewest(self, callers: int, begin: float) -> int:
        """Completions since ``begin`` of the caller with the fewest."""
        counts = dict.fromkeys(range(callers), 0)
        for caller, finished, _, _ in self.done:
            if finished >= begin:
                counts[caller] += 1
        return min(counts.values())


# A closed-loop window lasts --seconds, longer if needed until every caller has completed
# this many videos in it (a busy machine or large batches), at most MAX_STRETCH times longer.
MIN_COMPLETIONS = 3
MAX_STRETCH = 8


def _stat_cpu(path: str) -> tuple[str, float]:
    """``(name, utime + stime in seconds)`` from a /proc ``stat`` file (fields 2, 14, 15)."""
    with open(path) as handle:
        text = handle.read()
    name = text[text.index("(") + 1: text.rindex(")")]
    fields = text.rpartition(")")[2].split()
    return name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_cpu_seconds(pid: int) -> float:
    """CPU seconds of a live process, exited threads included."""
    return _stat_cpu(f"/proc/{pid}/stat")[1]


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Thread id → (name, CPU seconds) of a live process."""
    threads = {}
    for entry in os.listdir(f"/proc/{pid}/task"):
        try:
            threads[int(entry)] = _stat_cpu(f"/proc/{pid}/task/{entry}/stat")
        except OSError:  # the thread exited while we looked
            continue
    return threads


def child_pids(parent: int) -> list[int]:
    """Live children of ``parent`` (the forked server processes), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):  # exited while we looked
            continue
        if ppid == parent:
            children.append(int(entry))
    return children


def server_groups(pid: int) -> dict[str, float]:
    """A serving process's CPU seconds by role. The main thread runs the asyncio front
    (grpc.aio's Python side: reading requests, checks, interleaving, response building);
    gRPC's own threads (event engine, timers) do the transport; every other thread is the
    engine: the batcher's worker (the pipeline's Python and numpy) and ONNX Runtime's pool."""
    groups = {"front": 0.0, "grpc": 0.0, "engine": 0.0}
    for tid, (name, seconds) in thread_cpu(pid).items():
        if tid == pid:
            groups["front"] += seconds
        elif name.startswith(("grpc", "event_engine", "lifeguard", "default-executo", "resolver")):
            groups["grpc"] += seconds
        else:
            groups["engine"] += seconds
    return groups


@dataclass
class Snapshot:
    """What a measurement window is the difference of."""

    time: float
    server_cpu: float  # server processes (in-process: this whole process)
    client_cpu: float  # this process while it drives the service
    groups: dict[str, float]  # server CPU seconds by role
    stats: dict | None  # batcher and pipeline counters (None: not available)


def usage(first: Snapshot, last: Snapshot, videos_per_s: float) -> dict:
    """CPU cores, CPU per video by role (cores over the window's rate, so that a burst of
    completions at a window edge does not skew it) and mean batch between two snapshots."""
    wall = last.time - first.time
    row = {"server_cores": (last.server_cpu - first.server_cpu) / wall,
           "client_cores": (last.client_cpu - first.client_cpu) / wall,
           "mean_batch": float("nan")}
    for group in last.groups:
        cores = (last.groups[group] - first.groups.get(group, 0.0)) / wall
        row[f"{group}_ms_per_video"] = cores / videos_per_s * 1e3 if videos_per_s else float("nan")
    if first.stats is not None and last.stats is not None:
        sizes = {size: last.stats["batch_sizes"].get(size, 0) - first.stats["batch_sizes"].get(size, 0)
                 for size in last.stats["batch_sizes"]}
        calls = sum(sizes.values())
        if calls:
            row["mean_batch"] = sum(size * count for size, count in sizes.items()) / calls
    return row


def inprocess_snapshot(core: EngineCore, callers: set[int]) -> Snapshot:
    """This process's CPU: the caller threads (and the main thread, which paces them)
    apart, everything else (the batcher's worker, ONNX Runtime's pool) is the engine."""
    groups = {"callers": 0.0, "engine": 0.0}
    for tid, (_, seconds) in thread_cpu(os.getpid()).items():
        groups["callers" if tid in callers or tid == os.getpid() else "engine"] += seconds
    return Snapshot(time.perf_counter(), time.process_time(), 0.0, groups, core_stats(core))


def core_stats(core: EngineCore) -> dict:
    return {"batch_sizes": dict(core.stats()["batch_sizes"])}


def response_stats(response: pb.StatsResponse) -> dict:
    return {"batch_sizes": {int(k): int(v) for k, v in response.batch_sizes.items()}}


# --- in-process ------------------------------------------------------------------------

def inprocess_closed(core: EngineCore, videos, callers: int, args) -> dict:
    """``callers`` threads, each submitting one video and waiting for it, in a loop."""
    recorder, stop = Recorder(), threading.Event()

    def caller(index: int) -> None:
        sent = 0
        while not stop.is_set():
            video = videos[(index * 7 + sent) % len(videos)]  # callers start at different videos
            start = time.perf_counter()
            core.batcher.submit([video]).result()
            finished = time.perf_counter()
            recorder.add(index, finished, finished - start, video.features.nbytes)
            sent += 1

    threads = [threading.Thread(target=caller, args=(index,), daemon=True) for index in range(callers)]
    for thread in threads:
        thread.start()
    caller_ids = {thread.native_id for thread in threads}
    time.sleep(args.warmup)
    first = inprocess_snapshot(core, caller_ids)
    time.sleep(args.seconds)
    while recorder.fewest(callers, first.time) < MIN_COMPLETIONS and \
            time.perf_counter() - first.time < MAX_STRETCH * args.seconds:
        time.sleep(0.1)
    last = inprocess_snapshot(core, caller_ids)
    stop.set()
    for thread in threads:
        thread.join()
    window = recorder.window(first.time, last.time, closed_loop=True)
    row = {**window, **usage(first, last, window["videos_per_s"])}
    row["client_cores"] = float("nan")  # the callers are inside the measured process
    return row


def poisson_arrivals(rate: float, seconds: float, seed: int) -> np.ndarray:
    """Arrival offsets (s) of a Poisson process at ``rate`` per second over ``seconds``;
    both sides of a round get the same ones."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, int(rate * seconds * 1.5) + 100)
    while gaps.sum() < seconds:  # a rare short draw: extend it
        gaps = np.concatenate([gaps, rng.exponential(1.0 / rate, len(gaps))])
    offsets = np.cumsum(gaps)
    return offsets[offsets < seconds]


def inprocess_open(core: EngineCore, videos, arrivals: np.ndarray, args) -> dict:
    """One video submitted at each arrival; latency from its scheduled arrival."""
    recorder = Recorder()
    begin = time.perf_counter()
    measure_from, measure_to = begin + args.warmup, begin + args.warmup + args.seconds
    snapshots = []

    def take_snapshots() -> None:  # at the window's edges, whatever the arrivals do
        for instant in (measure_from, measure_to):
            time.sleep(max(0.0, instant - time.perf_counter()))
            snapshots.append(inprocess_snapshot(core, {threading.get_native_id()}))

    snapshotter = threading.Thread(target=take_snapshots, daemon=True)
    snapshotter.start()
    pending = []
    for sent, offset in enumerate(arrivals):
        arrival = begin + offset
        delay = arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        video = videos[sent % len(videos)]

        def record(future, scheduled=arrival, nbytes=video.features.nbytes):
            finished = time.perf_counter()
            recorder.add(0, finished, finished - scheduled, nbytes)

        future = core.batcher.submit([video])
        future.add_done_callback(record)
        pending.append(future)
    snapshotter.join()
    for future in pending:
        future.result()
    first, last = snapshots
    window = recorder.window(measure_from, measure_to, closed_loop=False)
    row = {**window, **usage(first, last, window["videos_per_s"])}
    row["client_cores"] = float("nan")
    return row


# --- the service -----------------------------------------------------------------------

class Server:
    """``modloc serve`` (:class:`modloc.engine.service.process.ServerProcess`) with the benchmark's
    batch settings, and the CPU time of its serving processes."""

    def __init__(self, root: Path, processes: int, args):
        # several processes need a named port: held (not probed) until they have bound it
        with held_port() as port:
            self.server = ServerProcess.start(
                root, "--address", f"127.0.0.1:{port if processes > 1 else 0}",
                "--processes", str(processes),
                "--video-batch", str(args.video_batch), "--window-batch", str(args.window_batch),
                "--batch-wait", str(args.batch_wait),
                "--max-streams", str(max(*args.streams, args.open_streams) + 8))
        self.address = self.server.address
        self.processes = processes
        pid = self.server.process.pid
        # with one process it serves itself; with several the parent only forks and waits
        self.pids = [pid] + (child_pids(pid) if processes > 1 else [])
        if len(self.pids) != processes + (processes > 1):
            raise RuntimeError(f"expected {processes} server processes, found {self.pids[1:]}")

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(pid) for pid in self.pids)

    def groups(self) -> dict[str, float]:
        """CPU seconds by role, summed over the serving processes."""
        total: dict[str, float] = {}
        for pid in self.pids[1:] or self.pids:
            for group, seconds in server_groups(pid).items():
                total[group] = total.get(group, 0.0) + seconds
        return total

    def per_process_cpu(self) -> list[float]:
        return [proc_cpu_seconds(pid) for pid in self.pids[1:] or self.pids]

    def stop(self) -> int:
        return self.server.stop()


def channel(address: str) -> grpc.aio.Channel:
    # A local subchannel pool gives each channel its own connection (by default channels to
    # one target share one), which SO_REUSEPORT needs to spread streams over processes.
    return grpc.aio.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ("grpc.use_local_subchannel_pool", 1)])


def request_for(chunk: pb.VideoChunk, video_id: str, args) -> pb.LocalizeRequest:
    """A request carrying a pre-split video under a fresh id (one copy of its bytes)."""
    request = pb.LocalizeRequest(threshold=args.threshold, max_segments=args.max_segments)
    request.video.CopyFrom(chunk)
    request.video.video_id = video_id
    return request


async def server_snapshot(server: Server, stats_stub) -> Snapshot:
    stats = None
    if server.processes == 1:  # with several, Stats answers for whichever process it reaches
        stats = response_stats(await stats_stub.Stats(pb.StatsRequest(), timeout=10))
    return Snapshot(time.perf_counter(), server.cpu_seconds(), time.process_time(),
                    server.groups(), stats)


async def service_closed(server: Server, chunks, callers: int, args) -> dict:
    """``callers`` Localize streams, each with one video in flight."""
    recorder, stop = Recorder(), asyncio.Event()
    channels = [channel(server.address) for _ in range(callers + 1)]
    await asyncio.gather(*(c.channel_ready() for c in channels))
    stats_stub = pb_grpc.LocalizationStub(channels[-1])

    async def stream(index: int) -> None:
        call = pb_grpc.LocalizationStub(channels[index]).Localize()
        sent = 0
        while not stop.is_set():
            chunk = chunks[(index * 7 + sent) % len(chunks)]
            start = time.perf_counter()
            await call.write(request_for(chunk, f"s{index}-{sent}", args))
            response = await call.read()
            if response is grpc.aio.EOF:
                raise RuntimeError(f"stream {index} ended early: {await call.code()}")
            finished = time.perf_counter()
            recorder.add(index, finished, finished - start, len(chunk.rgb) + len(chunk.audio))
            sent += 1
        await call.done_writing()
        await call.read()  # EOF: the server closed the stream cleanly

    try:
        tasks = [asyncio.create_task(stream(index)) for index in range(callers)]
        await asyncio.sleep(args.warmup)
        first = await server_snapshot(server, stats_stub)
        process_split = server.per_process_cpu()
        await asyncio.sleep(args.seconds)
        while recorder.fewest(callers, first.time) < MIN_COMPLETIONS and \
                time.perf_counter() - first.time < MAX_STRETCH * args.seconds:
            await asyncio.sleep(0.1)
        last = await server_snapshot(server, stats_stub)
        process_split = [after - before for before, after in zip(process_split, server.per_process_cpu(), strict=True)]
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    window = recorder.window(first.time, last.time, closed_loop=True)
    row = {**window, **usage(first, last, window["videos_per_s"])}
    total = sum(process_split)
    row["process_shares"] = [share / total for share in process_split] if total else []
    return row


async def service_open(server: Server, chunks, arrivals: np.ndarray, args) -> dict:
    """The arrivals dealt round-robin over ``--open-streams`` streams (several videos in
    flight on each); latency from each scheduled arrival."""
    recorder, streams = Recorder(), args.open_streams
    channels = [channel(server.address) for _ in range(streams + 1)]
    await asyncio.gather(*(c.channel_ready() for c in channels))
    stats_stub = pb_grpc.LocalizationStub(channels[-1])
    begin = time.perf_counter()
    measure_from, measure_to = begin + args.warmup, begin + args.warmup + args.seconds

    async def stream(index: int) -> None:
        call = pb_grpc.LocalizationStub(channels[index]).Localize()
        scheduled: dict[str, tuple[float, int]] = {}

        async def reader() -> None:
            while (response := await call.read()) is not grpc.aio.EOF:
                arrival, nbytes = scheduled.pop(response.video_id)
                finished = time.perf_counter()
                recorder.add(index, finished, finished - arrival, nbytes)

        reading = asyncio.create_task(reader())
        for position in range(index, len(arrivals), streams):
            arrival = begin + arrivals[position]
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = chunks[position % len(chunks)]  # the video in-process gets at this arrival
            video_id = f"o{position}"
            scheduled[video_id] = (arrival, len(chunk.rgb) + len(chunk.audio))
            await call.write(request_for(chunk, video_id, args))
        await call.done_writing()
        await reading

    try:
        tasks = [asyncio.create_task(stream(index)) for index in range(streams)]
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        first = await server_snapshot(server, stats_stub)
        await asyncio.sleep(max(0.0, measure_to - time.perf_counter()))
        last = await server_snapshot(server, stats_stub)
        await asyncio.gather(*tasks)
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    window = recorder.window(measure_from, measure_to, closed_loop=False)
    return {**window, **usage(first, last, window["videos_per_s"])}


# --- where the time goes ---------------------------------------------------------------

def layer_steps(core: EngineCore, videos, chunks, args) -> list[tuple[str, str, float]]:
    """Per-video CPU of the service layer's own steps, on one thread: (side, step, µs)."""
    results = core.batcher.localize(list(videos))
    requests = [request_for(chunk, video.id, args) for chunk, video in zip(chunks, videos, strict=True)]
    wire = [request.SerializeToString() for request in requests]
    fusion = core.config.pipeline.fusion
    responses = [localize_response(result, core.vocabulary, args.threshold, args.max_segments,
                                   fusion.include_partial) for result in results]
    answers = [response.SerializeToString() for response in responses]
    steps = [
        ("client", "build request (copy the video's bytes, set id)",
         lambda: [request_for(chunk, video.id, args) for chunk, video in zip(chunks, videos, strict=True)]),
        ("client", "serialize request", lambda: [request.SerializeToString() for request in requests]),
        ("server", "parse request", lambda: [pb.LocalizeRequest.FromString(data) for data in wire]),
        ("server", "interleave RGB and audio into (M, 1152)",
         lambda: [interleave(request.video.rgb, request.video.audio) for request in requests]),
        ("server", "build response (localize_response)",
         lambda: [localize_response(result, core.vocabulary, args.threshold, args.max_segments,
                                    fusion.include_partial) for result in results]),
        ("server", "serialize response", lambda: [response.SerializeToString() for response in responses]),
        ("client", "parse response", lambda: [pb.LocalizeResponse.FromString(data) for data in answers]),
    ]
    rows = []
    for side, name, run in steps:
        run()  # warm-up
        seconds = []
        for _ in range(5):
            start = time.process_time()
            run()
            seconds.append(time.process_time() - start)
        rows.append((side, name, statistics.median(seconds) / len(videos) * 1e6))
    segments = sum(len(candidate.segments) for response in responses for candidate in response.candidates)
    rows.append(("", f"(response: {np.mean([len(a) for a in answers]) / 1e3:.1f} kB, "
                 f"{segments / len(responses):.0f} segments per video on average)", float("nan")))
    return rows


# --- the run ---------------------------------------------------------------------------

def median_row(rows: list[dict]) -> dict:
    """Per key, the median over rounds (the rounds' own percentiles, not pooled)."""
    keys = [key for key in rows[0] if isinstance(rows[0][key], (int, float))]
    merged = {key: statistics.median(row[key] for row in rows) for key in keys}
    if "process_shares" in rows[0]:
        merged["process_shares"] = [statistics.median(values)
                                    for values in zip(*(row["process_shares"] for row in rows), strict=True)]
    return merged


def number(value: float, digits: int = 1) -> str:
    return "—" if value != value else f"{value:,.{digits}f}"


def per_core(row: dict) -> float:
    """MB/s of features per core of server CPU."""
    return row["mb_per_s"] / row["server_cores"] if row["server_cores"] > 0 else float("nan")


def render_closed(rows: list[dict]) -> str:
    lines = ["| mode | processes | callers | videos/s | MB/s | p50 ms | p99 ms | ratio | server CPU "
             "(cores) | MB/s per server core | per-core ratio | engine CPU ms/video | front + gRPC CPU ms/video | "
             "client CPU (cores) | mean batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        layer = row.get("front_ms_per_video", float("nan")) + row.get("grpc_ms_per_video", float("nan"))
        lines.append(f"| {row['mode']} | {row.get('processes', '—')} | {row['callers']} | "
                     f"{number(row['videos_per_s'])} | {number(row['mb_per_s'])} | "
                     f"{number(row['p50_ms'], 2)} | {number(row['p99_ms'], 2)} | "
                     f"{row['ratio_text']} | {number(row['server_cores'], 2)} | {number(per_core(row))} | "
                     f"{number(row['core_ratio'], 2)} | "
                     f"{number(row['engine_ms_per_video'], 2)} | {number(layer, 2)} | "
                     f"{number(row['client_cores'], 2)} | {number(row['mean_batch'])} |")
    return "\n".join(lines)


def render_steps(steps, inproc: dict, service: dict) -> str:
    """The one-thread step timings beside the CPU per video measured under load."""
    lines = ["| side | what | µs per video |", "|---|---|---:|"]
    lines += [f"| {side} | {name} | {number(us, 0)} |" for side, name, us in steps]
    lines += [
        f"| server | the steps above together | "
        f"{number(sum(us for side, _, us in steps if side == 'server'), 0)} |",
        f"| client | the steps above together | "
        f"{number(sum(us for side, _, us in steps if side == 'client'), 0)} |",
        f"| server | measured under load: front (asyncio main thread) | "
        f"{number(service['front_ms_per_video'] * 1e3, 0)} |",
        f"| server | measured under load: gRPC transport threads | "
        f"{number(service['grpc_ms_per_video'] * 1e3, 0)} |",
        f"| server | measured under load: engine threads (batcher, ONNX Runtime) | "
        f"{number(service['engine_ms_per_video'] * 1e3, 0)} |",
        f"| in-process | measured under load: engine threads (batcher, ONNX Runtime) | "
        f"{number(inproc['engine_ms_per_video'] * 1e3, 0)} |",
        f"| client | measured under load: this process | "
        f"{number(service['client_cores'] / service['videos_per_s'] * 1e6, 0)} |"]
    return "\n".join(lines)


# --- hostile clients ---------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RssSampler:
    """The peak VmRSS of a process, sampled every 50 ms from a thread."""

    def __init__(self, pid: int):
        self.pid, self.before, self.peak = pid, rss_mib(pid), 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(0.05)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        end = rss_mib(self.pid)
        return {"rss_before": self.before, "rss_peak": max(self.peak, end), "rss_end": end}


def hostile_window(sampler: RssSampler, seconds: float) -> float:
    """Wait ``seconds``; the RSS a third of the way in (what the rest of the window adds
    to it shows whether growth goes on or has stopped)."""
    time.sleep(seconds / 3)
    third = rss_mib(sampler.pid)
    time.sleep(seconds - seconds / 3)
    return third


def stop_or_kill(server: ServerProcess) -> str:
    """SIGTERM and the exit status; a server that does not drain in 60 s is killed."""
    try:
        return str(server.stop())
    except subprocess.TimeoutExpired:
        server.kill()
        return "no exit 60 s after SIGTERM: killed"


def slow_reader(root: Path, args) -> dict:
    """A Localize stream whose client never reads (module docstring)."""
    server = ServerProcess.start(root)
    template = np.random.default_rng(args.seed).integers(0, 256, (60, FEATURE_SIZE), dtype=np.uint8)
    [chunk] = video_chunks(Video("template", template))
    sent = 0

    def requests(prefix: str, count: int | None):
        nonlocal sent
        for index in itertools.count() if count is None else range(count):
            piece = pb.VideoChunk()
            piece.CopyFrom(chunk)
            piece.video_id = f"{prefix}-{index}"
            if prefix == "unread":
                sent += 1
            yield pb.LocalizeRequest(video=piece)

    try:
        # the warm-up: the same videos for a third of the window, by a client that reads its
        # responses and keeps as many in flight as the server lets one stream hold (the
        # batches, hence the model's arenas, reach the sizes the hostile client meets)
        warm_until = time.monotonic() + args.slow_reader_seconds / 3
        polite = (Video(f"warm-{index}", template) for index in itertools.count())
        window = ServerConfig.__dataclass_fields__["max_stream_videos"].default
        with LocalizationClient(server.address, timeout=600) as client:
            for _ in client.localize(itertools.takewhile(lambda _: time.monotonic() < warm_until, polite),
                                     window=window):
                pass
        sampler = RssSampler(server.process.pid)
        with grpc.insecure_channel(server.address) as rude:
            call = pb_grpc.LocalizationStub(rude).Localize(requests("unread", None), timeout=600)
            third = hostile_window(sampler, args.slow_reader_seconds)
            with grpc.insecure_channel(server.address) as other:
                stats = pb_grpc.LocalizationStub(other).Stats(pb.StatsRequest(), timeout=30)
            row = sampler.stop()
            call.cancel()
        row.update(seconds=args.slow_reader_seconds, clients=1, rss_third=third,
                   outcome=f"the client sent {sent:,} videos and read none; server: "
                           f"{stats.videos_localized:,} localized, {stats.inflight_videos} unanswered")
    finally:
        status = stop_or_kill(server)
    row["exit"] = status
    return row


def kserve_flood(root: Path, args) -> dict:
    """``--flood-callers`` connections calling ModelInfer back to back (module docstring)."""
    server = ServerProcess.start(root)
    features = np.random.default_rng(args.seed).integers(0, 256, (11, 300, FEATURE_SIZE), dtype=np.uint8)
    request = kpb.ModelInferRequest(model_name="modloc-video", inputs=[
        kpb.ModelInferRequest.InferInputTensor(name="features", datatype="UINT8", shape=list(features.shape)),
        kpb.ModelInferRequest.InferInputTensor(name="num_frames", datatype="INT32", shape=[11])],
        raw_input_contents=[features.tobytes(), np.full(11, 300, "<i4").tobytes()])
    options = [("grpc.max_send_message_length", 8 << 20), ("grpc.use_local_subchannel_pool", 1)]
    statuses: collections.Counter[str] = collections.Counter()
    try:
        with grpc.insecure_channel(server.address, options=options) as polite:
            stub = kpb_grpc.GRPCInferenceServiceStub(polite)
            for _ in range(3):  # the warm-up, one call at a time
                stub.ModelInfer(request, timeout=120)
        sampler = RssSampler(server.process.pid)
        until = time.monotonic() + args.flood_seconds

        def caller() -> None:
            with grpc.insecure_channel(server.address, options=options) as connection:
                stub = kpb_grpc.GRPCInferenceServiceStub(connection)
                while time.monotonic() < until:
                    try:
                        stub.ModelInfer(request, timeout=120)
                        statuses["OK"] += 1
                    except grpc.RpcError as error:
                        statuses[error.code().name] += 1

        callers = [threading.Thread(target=caller) for _ in range(args.flood_callers)]
        for thread in callers:
            thread.start()
        third = hostile_window(sampler, args.flood_seconds)
        for thread in callers:
            thread.join()
        row = sampler.stop()
        row.update(seconds=args.flood_seconds, clients=args.flood_callers, rss_third=third,
                   outcome=", ".join(f"{code} {count:,}" for code, count in statuses.most_common()))
    finally:
        status = stop_or_kill(server)
    row["exit"] = status
    return row


def render_hostile(rows: dict[str, dict]) -> str:
    lines = ["| client | connections | seconds | RSS before (MiB) | at 1/3 | peak | end | peak growth | "
             "growth over the last 2/3 | what the clients saw | server exit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['clients']} | {row['seconds']:g} | {row['rss_before']:.0f} | "
                     f"{row['rss_third']:.0f} | {row['rss_peak']:.0f} | {row['rss_end']:.0f} | "
                     f"{row['rss_peak'] - row['rss_before']:+.0f} MiB | "
                     f"{row['rss_end'] - row['rss_third']:+.0f} MiB | {row['outcome']} | {row['exit']} |")
    return "\n".join(lines)


def hostile(args) -> int:
    """The hostile-client section (module docstring)."""
    with tempfile.TemporaryDirectory(prefix="bench-service-") as scratch_dir:
        scratch = Path(scratch_dir)
        generate(config_from("tiny", validate_videos=16, test_videos=8, min_frames=60,
                             max_frames=300, seed=args.seed), scratch / "data", splits=("validate", "test"))
        print("building and exporting the tiny models ...", flush=True)
        root = export_models(scratch, args, ("fp32",))
        rows = {}
        print(f"a client that never reads, {args.slow_reader_seconds:g} s ...", flush=True)
        rows["never reads its Localize responses (60-frame videos)"] = slow_reader(root, args)
        print(f"a KServe flood, {args.flood_callers} connections, {args.flood_seconds:g} s ...", flush=True)
        rows["ModelInfer flood, [11, 300, 1152] uint8 each"] = kserve_flood(root, args)
    section = (
        f"## Hostile clients, CPU: {platform.machine()}, {os.cpu_count()} cores, tiny NeXtVLAD\n\n"
        f"{provenance()}\n- Python {platform.python_version()}, grpcio {grpc.__version__}; "
        f"`modloc serve` with its default limits; RSS = VmRSS of /proc/<pid>/status sampled every "
        f"50 ms, after a polite warm-up; load average {os.getloadavg()[0]:.2f} at the end (a shared "
        f"machine)\n\n{render_hostile(rows)}\n")
    print(section)
    write_section(args.out, section, HEADER)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a ~1 min sanity run: one round of short windows, one process")
    parser.add_argument("--paper-size", action="store_true",
                        help="the paper's NeXtVLAD instead of the tiny one")
    parser.add_argument("--streams", nargs="+", type=int, default=[1, 8, 64],
                        help="concurrent callers (threads in-process, Localize streams)")
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2],
                        help="server processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--load", type=float, default=0.7,
                        help="open-loop offered rate as a share of the service's best closed-loop rate")
    parser.add_argument("--open-streams", type=int, default=16, help="streams of the open-loop run")
    parser.add_argument("--videos", type=int, default=64, help="synthetic videos (60-300 frames)")
    parser.add_argument("--video-batch", type=int, default=PipelineConfig().video_batch_size,
                        help="videos per pipeline call (batcher) and per video-model call")
    parser.add_argument("--window-batch", type=int, default=PipelineConfig().window_batch_size)
    parser.add_argument("--batch-wait", type=float, default=BatcherConfig().max_wait,
                        help="seconds the oldest queued video waits for company")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="Localize threshold (segments above it are returned; the client's default)")
    parser.add_argument("--max-segments", type=int, default=0, help="segments per candidate (0 = all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="export threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hostile", action="store_true",
                        help="only the hostile-client section: a never-reading client, a KServe flood")
    parser.add_argument("--slow-reader-seconds", type=float, default=30.0)
    parser.add_argument("--flood-seconds", type=float, default=20.0)
    parser.add_argument("--flood-callers", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS_FILE)
    args = parser.parse_args(argv)
    if args.hostile:
        for name, value in SIZES["tiny"].items():
            setattr(args, name, value)
        args.branching = (1,)
        torch.manual_seed(args.seed)
        return hostile(args)
    if args.quick:
        args.rounds, args.seconds, args.warmup, args.processes = 1, 2.0, 0.5, [1]
    size = "paper" if args.paper_size else "tiny"
    for name, value in SIZES[size].items():  # what bench_pipeline's export_models reads
        setattr(args, name, value)
    args.branching = (1,)
    torch.manual_seed(args.seed)  # the random weights, hence the responses' sizes, repeat
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="bench-service-") as scratch_dir:
        scratch = Path(scratch_dir)
        generate(config_from("tiny", validate_videos=16, test_videos=args.videos, min_frames=60,
                             max_frames=300, seed=args.seed), scratch / "data",
                 splits=("validate", "test"))
        print(f"building and exporting the {size} models ...", flush=True)
        root = export_models(scratch, args, ("fp32",))
        videos = list(read_videos(str(scratch / "data" / "test" / "*.tfrecord")))
        chunks = []
        for video in videos:
            [chunk] = video_chunks(video)  # 300 frames fit one message
            chunks.append(chunk)
        frames = sum(len(video.features) for video in videos)

        # the engine core exactly as `modloc serve` builds it from the same flags
        pipeline = PipelineConfig(fusion=FusionConfig(), video_batch_size=args.video_batch,
                                  window_batch_size=args.window_batch)
        batcher = BatcherConfig(max_batch_videos=args.video_batch, max_wait=args.batch_wait)
        core = EngineCore.load(ServerConfig(artifacts=root, pipeline=pipeline, batcher=batcher,
                                            address="127.0.0.1:0"))
        servers = {}
        try:
            for processes in args.processes:
                servers[processes] = Server(root, processes, args)
                print(f"modloc serve --processes {processes} on {servers[processes].address}", flush=True)
            closed: dict[tuple, list[dict]] = {}
            for round_ in range(args.rounds):
                for callers in args.streams:
                    row = inprocess_closed(core, videos, callers, args)
                    closed.setdefault(("in-process", 0, callers), []).append(row)
                    print(f"  round {round_ + 1} in-process {callers:3d} callers: "
                          f"{row['videos_per_s']:8.1f} videos/s", flush=True)
                    for processes, server in servers.items():
                        row = asyncio.run(service_closed(server, chunks, callers, args))
                        closed.setdefault(("service", processes, callers), []).append(row)
                        print(f"  round {round_ + 1} service P={processes} {callers:3d} streams: "
                              f"{row['videos_per_s']:8.1f} videos/s", flush=True)
            table = []
            for (mode, processes, callers), rows in closed.items():
                row = {**median_row(rows), "mode": mode, "callers": callers}
                if mode == "service":
                    row["processes"] = processes
                    base = median_row(closed[("in-process", 0, callers)])
                    # matched rows: each round's service run against that round's in-process
                    # run with as many callers (interleaved, so both met the same machine load)
                    row["ratio"] = statistics.median(
                        service["videos_per_s"] / inprocess["videos_per_s"] for service, inprocess
                        in zip(rows, closed[("in-process", 0, callers)], strict=True))
                    row["core_ratio"] = per_core(row) / per_core(base)
                    row["ratio_text"] = f"{row['ratio']:.2f}"
                    if processes > 1 and row.get("process_shares"):
                        row["ratio_text"] += " (CPU split " + "/".join(
                            f"{share:.0%}" for share in row["process_shares"]) + ")"
                else:
                    row["ratio_text"], row["core_ratio"] = "1.00", 1.0
                table.append(row)
            order = {callers: i for i, callers in enumerate(args.streams)}
            table.sort(key=lambda row: (order[row["callers"]], row["mode"] != "in-process",
                                        row.get("processes", 0)))

            # open loop at a share of the one-process service's best closed-loop rate
            best_service = max(row["videos_per_s"] for row in table
                               if row["mode"] == "service" and row["processes"] == min(servers))
            rate = args.load * best_service
            open_rows = {"in-process": [], "service": []}
            for round_ in range(args.rounds):
                arrivals = poisson_arrivals(rate, args.warmup + args.seconds, args.seed + round_)
                open_rows["in-process"].append(inprocess_open(core, videos, arrivals, args))
                open_rows["service"].append(asyncio.run(
                    service_open(servers[min(servers)], chunks, arrivals, args)))
                print(f"  round {round_ + 1} open loop at {rate:.1f} videos/s: in-process p99 "
                      f"{open_rows['in-process'][-1]['p99_ms']:.1f} ms, service p99 "
                      f"{open_rows['service'][-1]['p99_ms']:.1f} ms", flush=True)
            inproc_open = {**median_row(open_rows["in-process"]), "mode": "in-process open loop",
                           "callers": f"Poisson {rate:.1f}/s", "ratio_text": "1.00", "core_ratio": 1.0}
            svc_open = {**median_row(open_rows["service"]), "mode": "service open loop",
                        "callers": f"Poisson {rate:.1f}/s ({args.open_streams} streams)",
                        "processes": min(servers)}
            svc_open["ratio_text"] = f"p50 ×{svc_open['p50_ms'] / inproc_open['p50_ms']:.2f}"
            svc_open["core_ratio"] = per_core(svc_open) / per_core(inproc_open)

            steps = layer_steps(core, videos, chunks, args)
        finally:
            statuses = {processes: server.stop() for processes, server in servers.items()}
            asyncio.run(core.close())
        if any(statuses.values()):
            raise RuntimeError(f"a server exited with a failure: {statuses}")

    most = max(args.streams)
    inproc_most = next(row for row in table if row["mode"] == "in-process" and row["callers"] == most)
    svc_most = next(row for row in table if row["mode"] == "service" and row["callers"] == most
                    and row["processes"] == min(servers))
    # the verdict from matched rows only: one server process against the in-process engine
    # (one process too) with the same callers, the median of the per-round ratios
    matched = [(row["callers"], row["ratio"]) for row in table
               if row["mode"] == "service" and row["processes"] == 1]
    met = [callers for callers, ratio in matched if ratio >= 0.8]
    verdict = ", ".join(f"{callers} caller{'s' * (callers > 1)} {ratio:.0%}" for callers, ratio in matched)
    layer_share = (svc_most["front_ms_per_video"] + svc_most["grpc_ms_per_video"]) / (
        svc_most["front_ms_per_video"] + svc_most["grpc_ms_per_video"] + svc_most["engine_ms_per_video"])
    scaling = ""
    if len(servers) > 1:
        scaling = f"- processes, {most} streams: " + ", ".join(
            f"P={row['processes']} {row['videos_per_s']:,.1f} videos/s"
            for row in table if row["mode"] == "service" and row["callers"] == most) + \
            f" (this machine has {os.cpu_count()} cores, shared by every process and the client)\n"
    section = (
        f"## CPU: {platform.machine()}, {os.cpu_count()} cores, {size} NeXtVLAD\n\n"
        f"{provenance()}\n- Python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}; load average before the "
        f"run {load_before[0]:.2f} (the machine is shared)\n"
        f"- model: one NeXtVLAD, {SIZES[size]}, random weights, distill fp32 on ONNX Runtime "
        f"(the server's default options); 3862 video classes, 1000 segment classes\n"
        f"- {len(videos)} synthetic videos, {frames / len(videos):.0f} frames "
        f"({frames * FEATURE_SIZE / len(videos) / 1e3:.0f} kB of features) per video on average; "
        f"batcher {args.video_batch} videos per call, {args.batch_wait * 1e3:g} ms wait, window batch "
        f"{args.window_batch}; Localize threshold {args.threshold}, max_segments {args.max_segments}\n"
        f"- {args.rounds} interleaved rounds of {args.seconds:g} s (after {args.warmup:g} s warm-up), "
        f"median round reported\n"
        f"- goal: service ≥ 80% of in-process throughput with as many callers (one server "
        f"process; median over rounds of the ratio within a round): {verdict or 'no one-process row'}: "
        f"**met at {len(met)} of {len(matched)} caller counts**; with {most} streams the service "
        f"layer (front + gRPC threads) is {layer_share:.1%} of the server's CPU per video\n{scaling}\n"
        f"### Closed loop and open loop\n\n{render_closed([*table, inproc_open, svc_open])}\n\n"
        f"### Where the service's time goes (one thread, per video)\n\n"
        f"{render_steps(steps, inproc_most, svc_most)}\n")
    print(section)
    write_section(args.out, section, HEADER)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
