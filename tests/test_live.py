"""Live localization: the encoder and head graphs, the engine's stream state, and
``LocalizeLive`` on a real ``modloc serve`` subprocess over loopback."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tiny import split

from modloc.cli import main
from modloc.engine._proto.modloc.v1 import localization_pb2 as pb
from modloc.engine._proto.modloc.v1 import localization_pb2_grpc as pb_grpc
from modloc.engine.base.io.examples import Video
from modloc.engine.base.io.readers import read_videos
from modloc.engine.runtime.artifacts import (
    LIVE_ENCODER_FILE,
    LIVE_HEAD_FILE,
    MANIFEST_FILE,
    load_artifact,
)
from modloc.engine.runtime.backends import open_backend
from modloc.engine.runtime.fusion import FusionConfig
from modloc.engine.runtime.live import (
    CandidateUpdate,
    LiveConfig,
    LiveEngine,
    LiveQueueFull,
    LiveVideoModel,
    StreamEnd,
    StreamOptions,
    WindowEvent,
    stream_bound_bytes,
)
from modloc.engine.runtime.pipeline import ScoringModel
from modloc.engine.service.client import LiveTimer, LocalizationClient, live_requests, replay
from modloc.engine.service.process import ServerProcess
from modloc.export.live import check_live_parity
from modloc.export.onnx_export import ParityError, parity_batches

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MAX_LIVE_FRAMES = 50
LIMITS = ("--max-live-streams", "2", "--max-live-frames", str(MAX_LIVE_FRAMES),
          "--live-idle-seconds", "1.5")


@pytest.fixture(scope="module")
def test_videos(tiny_dataset) -> list[Video]:
    return list(read_videos(split(tiny_dataset, "test")))


@pytest.fixture(scope="module")
def server(tiny_artifacts, tmp_path_factory):
    """The ensemble video model (its gates go through the live head too), the distill
    segment model, durable rankings, small live limits."""
    process = ServerProcess.start(tiny_artifacts, "--video", "ensemble-fp32", "--state-dir",
                                  str(tmp_path_factory.mktemp("state")), *LIMITS)
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def client(server):
    with LocalizationClient(server.address, timeout=60) as client:
        yield client


def frames(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 1152), dtype=np.uint8)


def chunked(features: np.ndarray, size: int) -> list[np.ndarray]:
    return [features[begin: begin + size] for begin in range(0, len(features), size)]


def run_live(client, video_id: str, chunks, **options) -> list[pb.LiveEvent]:
    return list(client.localize_live(video_id, chunks, **options))


def assert_same_localization(live: pb.LocalizeResponse, whole: pb.LocalizeResponse, rtol=1e-5):
    assert live.num_frames == whole.num_frames
    assert [c.class_id for c in live.candidates] == [c.class_id for c in whole.candidates]
    for a, b in zip(live.candidates, whole.candidates, strict=True):
        assert a.scored == b.scored
        np.testing.assert_allclose(a.video_score, b.video_score, rtol=rtol)
        mine = {s.start_seconds: s.score for s in a.segments}
        theirs = {s.start_seconds: s.score for s in b.segments}
        assert mine.keys() == theirs.keys()
        for start, score in mine.items():
            np.testing.assert_allclose(score, theirs[start], rtol=rtol)


# --- the graphs ------------------------------------------------------------------------


@pytest.mark.parametrize("graph", ["distill", "ensemble"])
def test_encoder_plus_head_equals_the_one_piece_graph(tiny_artifacts, graph):
    artifact = load_artifact(tiny_artifacts / "video" / f"{graph}-fp32")
    record = artifact.live
    assert record["parity"]["passed"] and record["parity"]["max_rel_error"] <= 1e-4
    assert record["parity"]["chunks"] == ["all", "1", "5", "7"]
    assert record["sums"]["layout"][-1] == {"name": "frames", "offset": record["sums"]["size"] - 1,
                                            "size": 1}
    assert (record["gate_frames"] == 300) == (graph == "ensemble")
    assert any(piece["name"] == "gate code sums" for piece in record["sums"]["layout"]) == (
        graph == "ensemble")
    live = LiveVideoModel(artifact)
    features, num_frames = parity_batches([(3, 23)], seed=7)[0]
    with open_backend(artifact) as one_piece:
        expected = one_piece.run(features, num_frames=num_frames)
        for size in (1, 3, 5, 7, 23):
            total = sum(live.encode(np.ascontiguousarray(part), np.clip(num_frames - begin, 0, len(part[0])))
                        for begin, part in zip(range(0, 23, size),
                                               (features[:, b: b + size] for b in range(0, 23, size)),
                                               strict=True))
            np.testing.assert_allclose(live.head(total), expected, rtol=1e-4)
        np.testing.assert_array_equal(total[:, -1], num_frames)  # the last column counts frames
        check_live_parity(live, one_piece)
    # the gate fails on a head that is not the graph's: the other graph's one-piece model
    other = "ensemble" if graph == "distill" else "distill"
    with open_backend(tiny_artifacts / "video" / f"{other}-fp32") as wrong, \
            pytest.raises(ParityError, match="live graphs: encoder \\+ head differ"):
        check_live_parity(live, wrong)


def test_segment_and_reduced_precision_artifacts_have_no_live_graphs(tiny_artifacts, tmp_path):
    segment = load_artifact(tiny_artifacts / "segment" / "distill-fp32")
    assert segment.live is None and not (segment.path / LIVE_ENCODER_FILE).exists()
    with pytest.raises(Exception, match="no live graphs"):
        LiveVideoModel(segment)
    # a live file the manifest does not describe is refused, as any other file
    video = Path(shutil.copytree(tiny_artifacts / "video" / "distill-fp32", tmp_path / "v"))
    manifest = json.loads((video / MANIFEST_FILE).read_text())
    manifest["files"].pop(LIVE_HEAD_FILE)
    (video / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="live_head.onnx is present but the manifest does not describe it"):
        load_artifact(video)


# --- the engine, in process -------------------------------------------------------------


class _Held:
    """A segment scorer that waits for ``release`` on its first call (to fill the queue)."""

    def __init__(self, classes):
        self.classes = classes
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, features, num_frames):
        self.entered.set()
        self.release.wait(30)
        return np.full((len(features), len(self.classes)), 0.5, np.float32)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_engine_queue_limit_at_its_edge_and_bounded_stream_memory(tiny_artifacts):
    live = LiveVideoModel(load_artifact(tiny_artifacts / "video" / "distill-fp32"))
    held = _Held((1, 2, 3))
    config = LiveConfig(max_queued_windows=4, max_wait=0.0)
    engine = LiveEngine(live, ScoringModel(held, held.classes), FusionConfig(), config)
    events: list = []
    try:
        stream = engine.open("a", StreamOptions(), events.extend, lambda error: events.append(error))
        stream.push(frames(5))  # one window: the worker takes it and waits in the scorer
        assert held.entered.wait(10)
        stream.push(frames(20, seed=1))  # 4 windows queued: the limit
        with pytest.raises(LiveQueueFull, match="limit of 4"):
            stream.push(frames(5, seed=2))
        assert stream.frames == 25  # the refused push kept nothing
        held.release.set()
        wait_for(lambda: sum(isinstance(e, WindowEvent) for e in events) == 5)
        stream.push(frames(3, seed=3), last=True)
        wait_for(lambda: any(isinstance(e, StreamEnd) for e in events))
        windows = [e for e in events if isinstance(e, WindowEvent)]
        assert [w.start for w in windows] == [0, 5, 10, 15, 20, 25] and windows[-1].partial
    finally:
        held.release.set()
        engine.close()
    # a long stream keeps at most the horizon: its arrays stay under the bound
    engine = LiveEngine(live, ScoringModel(held, held.classes), FusionConfig())
    long_events: list = []
    long = engine.open("b", StreamOptions(), long_events.extend, lambda error: None)
    for seed in range(20):
        long.push(frames(40, seed=seed))
    long.push(frames(1), last=True)
    wait_for(lambda: long_events and isinstance(long_events[-1], StreamEnd), 30)
    engine.close()
    # the candidates come from the latest 241-300 frames; the final covers the last 60 windows
    updates = [e for e in long_events if isinstance(e, CandidateUpdate)]
    assert all(u.frames == min(u.through, 300) or 241 <= u.frames <= 300 for u in updates), \
        [(u.frames, u.through) for u in updates]
    assert updates[-1].through == 801 and 241 <= updates[-1].frames <= 300
    final = long_events[-1].localization
    assert final.window_starts.tolist() == list(range(505, 805, 5)) and final.partial[-1]
    kept = sum(block.nbytes for block in long.blocks) + sum(s.nbytes for _, _, s in long.windows)
    bound = stream_bound_bytes(engine.config, live.sums_size, 3)
    assert long.processed == 801 and len(long.windows) == 60 and 0 < kept <= bound
    assert long.windows[-1][0] == 800 and len(long.blocks) <= 5


# --- LocalizeLive on a real server -------------------------------------------------------


@pytest.mark.parametrize("size", [1, 3, 5, 7, None])
def test_final_answer_equals_localize_for_any_chunking(client, test_videos, size):
    video = test_videos[size or 0]
    [whole] = list(client.localize([video]))
    events = run_live(client, video.id, chunked(video.features, size or len(video.features)))
    assert events[-1].WhichOneof("event") == "final"
    assert_same_localization(events[-1].final.localization, whole)


def test_events_come_in_window_order_one_per_window(client, test_videos):
    video = next(v for v in test_videos if len(v.features) % 5)  # with a partial last window
    timer = LiveTimer()
    events = run_live(client, video.id, replay(video.features, 2), refresh_frames=10, timer=timer)
    kinds = [event.WhichOneof("event") for event in events]
    windows = [event.window for event in events if event.HasField("window")]
    count = len(video.features)
    assert [w.start_seconds for w in windows] == list(range(0, count, 5))
    assert [w.partial for w in windows] == [False] * (count // 5) + [True]
    assert kinds[0] == "candidates" and kinds[-1] == "final" and kinds.count("final") == 1
    # each window was fused with the candidates announced last before it
    version = 0
    for event in events:
        if event.HasField("candidates"):
            assert event.candidates.version == version + 1
            version = event.candidates.version
        elif event.HasField("window"):
            assert event.window.candidates_version == version
            assert 0 <= timer.latency(event.window, time.monotonic()) < 30
            assert event.window.server_seconds >= 0


def test_candidate_refresh_changes_later_fusions(client, test_videos):
    """Windows fuse P_vid(the candidates of their version)^a · P_seg^b: refreshing at every
    window and never (until the end) give different window events, and both give the
    final localization of Localize."""
    video = max(test_videos, key=lambda v: len(v.features))
    [whole] = list(client.localize([video]))
    runs = {cadence: run_live(client, video.id, chunked(video.features, 1), refresh_frames=cadence)
            for cadence in (5, 1000)}
    final = runs[5][-1].final.localization
    segment = {}  # (start, class) → P_seg, from Localize's answer and the final candidates
    for candidate in whole.candidates:
        for s in candidate.segments:
            segment[(s.start_seconds, candidate.class_id)] = (s.score / candidate.video_score ** 0.05) ** (1 / 0.95)
    for cadence, events in runs.items():
        assert_same_localization(events[-1].final.localization, whole)
        updates = [e.candidates for e in events if e.HasField("candidates")]
        windows = [e.window for e in events if e.HasField("window")]
        if cadence == 5:
            assert len(updates) == len(windows)  # one refresh per window (the last: the end's)
        else:
            assert [u.version for u in updates] == [1, 2] and updates[0].frames == 5
            # the end refreshes them: the last window is fused with the final candidates
            assert [w.candidates_version for w in windows] == [1] * (len(windows) - 1) + [2]
            assert updates[1].frames == len(video.features)
        scores = {u.version: {c.class_id: c.video_score for c in u.candidates} for u in updates}
        checked = 0
        for window in windows:
            for entry in window.scores:
                key = (window.start_seconds, entry.class_id)
                if key in segment:
                    expected = scores[window.candidates_version][entry.class_id] ** 0.05 * segment[key] ** 0.95
                    np.testing.assert_allclose(entry.score, expected, rtol=1e-4)
                    checked += 1
        assert checked
    first = {w.window.start_seconds: [(s.class_id, s.score) for s in w.window.scores]
             for w in runs[5] if w.HasField("window")}
    never = {w.window.start_seconds: [(s.class_id, s.score) for s in w.window.scores]
             for w in runs[1000] if w.HasField("window")}
    assert first[0] == never[0] and first != never  # same first candidates, then they part
    assert final.num_frames == len(video.features)


def test_ingest_at_the_end_is_durable_once_and_a_dropped_stream_applies_nothing(client, test_videos):
    video = test_videos[3]
    before = client.stats().ranked_videos
    # the stream breaks before its last message: nothing of it is applied
    stub = pb_grpc.LocalizationStub(client.channel)
    messages = list(live_requests("dropped", chunked(video.features, 4), pb.LiveOptions(ingest=True)))
    release = threading.Event()

    def partial():
        yield from messages[:-1]
        release.wait(10)  # hold the stream open, without its last message

    call = stub.LocalizeLive(partial(), timeout=30)
    received = []
    for event in call:
        received.append(event)
        if event.HasField("window") and event.window.start_seconds >= 5:
            break
    call.cancel()
    release.set()
    time.sleep(0.5)
    assert client.stats().ranked_videos == before
    assert not any(e.WhichOneof("event") == "final" for e in received)
    # a finished stream is ingested once, acknowledged when durable; a re-sent id is a duplicate
    [first] = [e.final for e in run_live(client, "live-ingest", chunked(video.features, 4), ingest=True)
               if e.HasField("final")]
    assert first.ingest.status == pb.IngestAck.INGESTED and first.ingest.sequence >= 1
    assert client.stats().ranked_videos == before + 1
    [again] = [e.final for e in run_live(client, "live-ingest", chunked(video.features, 6), ingest=True)
               if e.HasField("final")]
    assert again.ingest.status == pb.IngestAck.DUPLICATE and again.ingest.sequence == 0
    assert client.stats().ranked_videos == before + 1
    # what entered is the final localization's full windows
    best = max((c for c in first.localization.candidates if c.segments), key=lambda c: c.segments[0].score)
    top = [(e.video_id, e.start_seconds) for e in client.top_segments(best.class_id, 50)]
    assert ("live-ingest", best.segments[0].start_seconds) in top


def _live_error(client, messages, timeout=30) -> grpc.RpcError:
    stub = pb_grpc.LocalizationStub(client.channel)
    with pytest.raises(grpc.RpcError) as error:
        list(stub.LocalizeLive(iter(messages), timeout=timeout))
    return error.value


def _message(stream_id="s", count=5, **fields) -> pb.LiveFrames:
    features = frames(count)
    return pb.LiveFrames(stream_id=stream_id, rgb=features[:, :1024].tobytes(),
                         audio=features[:, 1024:].tobytes(), **fields)


BAD = {
    "empty id": ([_message("", last=True)], INVALID, "video_id is empty"),
    "rgb bytes": ([pb.LiveFrames(stream_id="s", rgb=b"\0" * 1000, last=True)], INVALID,
                  "rgb holds 1000 bytes, not a multiple of 1024"),
    "streams differ": ([pb.LiveFrames(stream_id="s", rgb=b"\0" * 1024, audio=b"", last=True)], INVALID,
                       "rgb holds 1 frames but audio 0"),
    "another id": ([_message("s"), _message("t", last=True)], INVALID, "differs from the first message's"),
    "late options": ([_message("s"), _message("", options=pb.LiveOptions(top_n=2), last=True)], INVALID,
                     "options are read from the first message only"),
    "no last": ([_message("s")], INVALID, "ended without a message with last set"),
    "no frames": ([pb.LiveFrames(stream_id="s", last=True)], INVALID, "the stream ended without frames"),
    "threshold": ([_message("s", options=pb.LiveOptions(threshold=2.0), last=True)], INVALID,
                  "options.threshold=2.0 is not a number in [0, 1]"),
    "ingest id": ([_message("a b", options=pb.LiveOptions(ingest=True), last=True)], INVALID,
                  "video id 'a b' cannot be ranked"),
    "frames limit": ([_message("s", MAX_LIVE_FRAMES), _message("", 1, last=True)],
                     grpc.StatusCode.OUT_OF_RANGE, f"51 frames so far, more than the limit of {MAX_LIVE_FRAMES}"),
}


@pytest.mark.parametrize("case", sorted(BAD), ids=sorted(BAD))
def test_bad_input_is_refused_naming_the_field(case, client, server):
    messages, code, fragment = BAD[case]
    before = client.stats().ranked_videos
    error = _live_error(client, messages)
    assert error.code() == code and fragment in error.details(), (error.code(), error.details())
    assert client.stats().ranked_videos == before
    assert server.health() == 1  # SERVING


def test_limits_at_their_edges(client, server):
    # exactly max_live_frames frames pass
    events = run_live(client, "edge", [frames(MAX_LIVE_FRAMES)])
    assert events[-1].final.localization.num_frames == MAX_LIVE_FRAMES
    # two live streams may be open; a third is refused
    release = threading.Event()
    stub = pb_grpc.LocalizationStub(client.channel)

    def held(name):
        yield _message(name)
        release.wait(10)
        yield _message("", last=True)

    calls = [stub.LocalizeLive(held(f"open-{i}"), timeout=30) for i in range(2)]
    for call in calls:
        assert next(call).HasField("candidates")  # both are open and answered
    error = _live_error(client, [_message("third", last=True)])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit is 2" in error.details()
    release.set()
    for call in calls:
        assert list(call)[-1].HasField("final")
    # a stream that goes quiet for the idle timeout ends
    quiet = threading.Event()

    def idle():
        yield _message("idle")
        quiet.wait(10)

    started = time.monotonic()
    error = _live_error(client, idle())
    quiet.set()
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no message for 1.5 s" in error.details()
    assert 1.4 < time.monotonic() - started < 10


def test_a_server_without_live_graphs_says_so_and_tokens_guard_live_streams(tiny_artifacts, tmp_path):
    root = Path(shutil.copytree(tiny_artifacts, tmp_path / "artifacts"))
    token = "live-token-0123456789abcdef"
    (tmp_path / "tokens").write_text(token + "\n")
    video = root / "video" / "distill-fp32"
    manifest = json.loads((video / MANIFEST_FILE).read_text())
    manifest["live"] = None
    for name in (LIVE_ENCODER_FILE, LIVE_HEAD_FILE):
        manifest["files"].pop(name)
        (video / name).unlink()
    (video / MANIFEST_FILE).write_text(json.dumps(manifest))
    process = ServerProcess.start(root, "--token-file", str(tmp_path / "tokens"))
    try:
        with LocalizationClient(process.address, timeout=30) as anonymous:
            with pytest.raises(grpc.RpcError) as error:
                run_live(anonymous, "s", [frames(5)])
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with LocalizationClient(process.address, token=token, timeout=30) as client:
            with pytest.raises(grpc.RpcError) as error:
                run_live(client, "s", [frames(5)])
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "no live graphs" in error.value.details()
            assert len(list(client.localize([Video("v", frames(7))]))) == 1  # the rest still serves
    finally:
        assert process.stop() == 0, process.log()


def test_client_live_cli_replays_a_video(server, tiny_dataset, test_videos, capsys):
    video = test_videos[1]
    assert main(["client", "live", server.address, "--data", split(tiny_dataset, "test"),
                 "--video-id", video.id, "--speed", "0", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum("window" in line for line in lines) == -(-len(video.features) // 5)
    assert "final" in lines[-1]
    assert main(["client", "live", server.address, "--data", split(tiny_dataset, "test"),
                 "--video-id", video.id, "--speed", "0", "--chunk-frames", "4"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith(f"final: {len(video.features)} frames")
    assert "latency p50" in out
    assert main(["client", "live", server.address, "--data", split(tiny_dataset, "test"),
                 "--video-id", "nope", "--speed", "0"]) == 1
    assert "no video 'nope'" in capsys.readouterr().err
