"""The gRPC server end to end: a real ``modloc serve`` subprocess, real channels."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tiny import split

from modloc.engine._proto.inference import grpc_predict_v2_pb2 as kpb
from modloc.engine._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from modloc.engine._proto.modloc.v1 import localization_pb2 as pb
from modloc.engine._proto.modloc.v1 import localization_pb2_grpc as pb_grpc
from modloc.engine.base.io.examples import Video
from modloc.engine.base.io.readers import read_videos
from modloc.engine.runtime.backends import open_backend
from modloc.engine.runtime.infer import infer
from modloc.engine.runtime.localizer import Localizer
from modloc.engine.service.client import LocalizationClient, video_chunks
from modloc.engine.service.process import ServerProcess, held_port

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
MAX_FRAMES = 400
MAX_MESSAGE = 512 * 1024
MAX_TOP_K = 50
LIMITS = ("--max-frames", str(MAX_FRAMES), "--max-message-bytes", str(MAX_MESSAGE),
          "--max-top-k", str(MAX_TOP_K), "--max-streams", "8", "--max-inflight-videos", "64")


@pytest.fixture(scope="module")
def test_videos(tiny_dataset) -> list[Video]:
    return list(read_videos(split(tiny_dataset, "test")))


@pytest.fixture(scope="module")
def server(tiny_artifacts, tmp_path_factory):
    process = ServerProcess.start(tiny_artifacts, "--state-dir",
                                  str(tmp_path_factory.mktemp("state")), *LIMITS)
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def client(server):
    with LocalizationClient(server.address, max_message_bytes=MAX_MESSAGE, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def expected_csv(tiny_artifacts, tiny_dataset, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("infer") / "submission.csv"
    infer(tiny_artifacts, split(tiny_dataset, "test"), out, progress=False)
    return out.read_bytes()


@pytest.fixture(scope="module")
def ingested(client, test_videos):
    """The test split ingested once, in file order: the acks, and the submission and stats
    read right after. Tests run in any order and some ingest more into this module's
    server, so a test compares against these, not against what the server holds later."""
    acks = client.ingest(test_videos)
    return SimpleNamespace(acks=acks, submission=client.submission(), stats=client.stats())


def frames(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 1152), dtype=np.uint8)


def chunk(video_id="v", count=3, **fields) -> pb.VideoChunk:
    features = frames(count)
    values = dict(video_id=video_id, rgb=features[:, :1024].tobytes(),
                  audio=features[:, 1024:].tobytes(), last=True)
    values.update(fields)
    return pb.VideoChunk(**values)


def call(stub_method, requests, timeout=30):
    """All responses of a streaming call, or the RpcError it ended with."""
    try:
        return list(stub_method(iter(requests), timeout=timeout))
    except grpc.RpcError as error:
        return error


def wait_for(condition, what: str, timeout: float = 30.0):
    """Poll ``condition()`` until it returns something true (returned); fail naming ``what``
    after ``timeout`` seconds. Tests wait on the state they need, never on a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return value


def wait_idle(client, timeout=30.0) -> pb.StatsResponse:
    """Stats once the server holds no video in flight (an aborted stream releases its
    videos as its handler unwinds, just after the client sees the status)."""
    return wait_for(lambda: (stats := client.stats()).inflight_videos == 0 and stats,
                    "no video in flight", timeout)


def server_stats(address: str) -> pb.StatsResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.LocalizationStub(channel).Stats(pb.StatsRequest(), timeout=10)


# --- results ---------------------------------------------------------------------------


def test_localize_equals_in_process_engine(client, tiny_artifacts, test_videos):
    with Localizer.from_artifacts(tiny_artifacts) as localizer:
        expected = {r.video_id: r for r in localizer.localize(test_videos, rank=False)}
    responses = list(client.localize(test_videos))
    assert sorted(r.video_id for r in responses) == sorted(expected)
    for response in responses:
        result = expected[response.video_id]
        assert response.num_frames == result.num_frames
        assert [c.class_id for c in response.candidates] == result.candidate_ids.tolist()
        for candidate, score in zip(response.candidates, result.candidate_scores, strict=True):
            assert candidate.video_score == pytest.approx(score, abs=1e-6)
            want = result.segments(candidate.class_id)
            assert [s.start_seconds for s in candidate.segments] == [start for start, _ in want]
            np.testing.assert_allclose([s.score for s in candidate.segments],
                                       [value for _, value in want], atol=1e-6)


def test_localize_options_threshold_and_max_segments(client, test_videos):
    [full] = client.localize(test_videos[:1])
    [cut] = client.localize(test_videos[:1], threshold=0.5, max_segments=1)
    for whole, part in zip(full.candidates, cut.candidates, strict=True):
        kept = [s for s in whole.segments if s.score > 0.5][:1]
        assert [(s.start_seconds, s.score) for s in part.segments] == \
            [(s.start_seconds, s.score) for s in kept]


def test_chunked_video_equals_whole(client, server):
    video = Video("long", frames(MAX_FRAMES, seed=3))
    whole = pb.LocalizeRequest(video=video_chunks(video)[0])
    pieces = [pb.LocalizeRequest(video=c) for c in video_chunks(video, 100 * 1152 + 4096)]
    assert len(pieces) == 4 and pieces[0].video.expected_frames == MAX_FRAMES
    stub = pb_grpc.LocalizationStub(client.channel)
    [one], [other] = call(stub.Localize, [whole]), call(stub.Localize, pieces)
    assert one == other and one.num_frames == 300  # the pipeline localizes the first 300


def test_ingest_then_submission_equals_infer(ingested, test_videos, expected_csv):
    acks = ingested.acks
    assert [a.video_id for a in acks] == [v.id for v in test_videos]
    assert {a.status for a in acks} == {pb.IngestAck.INGESTED}
    assert [a.sequence for a in acks] == list(range(1, len(test_videos) + 1))  # 0: a duplicate
    assert ingested.submission == expected_csv
    assert ingested.stats.videos_ingested == ingested.stats.ranked_videos == len(test_videos)


def test_duplicate_ingest_changes_nothing(client, ingested, test_videos):
    before, submission = client.stats(), client.submission()
    acks = client.ingest(test_videos[3:5])
    assert [a.status for a in acks] == [pb.IngestAck.DUPLICATE] * 2
    after = client.stats()
    assert after.duplicates == before.duplicates + 2 and after.ranked_videos == before.ranked_videos
    assert client.submission() == submission


def test_top_segments_paging(client, ingested):
    rows = [row.split(",") for row in client.submission().decode().splitlines()[1:]]
    class_id, segments = next((int(c), ids.split()) for c, ids in rows if len(ids.split()) >= 3)
    total = len(segments)
    full = client.top_segments(class_id, min(total, MAX_TOP_K))
    assert [f"{e.video_id}:{e.start_seconds}" for e in full] == segments[:MAX_TOP_K]
    assert [e.rank for e in full] == list(range(len(full)))
    assert all(a.score >= b.score for a, b in zip(full[:-1], full[1:], strict=True))
    assert client.top_segments(class_id, 2, offset=1) == full[1:3]
    [last] = client.top_segments(class_id, MAX_TOP_K, offset=total - 1)
    assert (last.rank, f"{last.video_id}:{last.start_seconds}") == (total - 1, segments[-1])
    assert client.top_segments(class_id, MAX_TOP_K, offset=total) == []
    for k, offset, code, fragment in ((0, 0, grpc.StatusCode.INVALID_ARGUMENT, "k=0 is outside"),
                                      (MAX_TOP_K + 1, 0, grpc.StatusCode.INVALID_ARGUMENT,
                                       f"k={MAX_TOP_K + 1} is outside 1..{MAX_TOP_K}"),
                                      (1, 100_000, grpc.StatusCode.OUT_OF_RANGE, "ranking depth")):
        with pytest.raises(grpc.RpcError) as error:
            client.top_segments(class_id, k, offset)
        assert error.value.code() == code and fragment in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        client.top_segments(99_999, 1)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "class_id=99999" in error.value.details()


def test_health_reflection_model_info(server, client, tiny_artifacts):
    assert server.health() == SERVING and server.health("modloc.v1.Localization") == SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    [answer] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in answer.list_services_response.service}
    assert {"modloc.v1.Localization", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    info = client.model_info()
    assert info.video_manifest_json == (tiny_artifacts / "video/distill-fp32/manifest.json").read_text()
    assert info.top_n == 20 and info.k == 100_000 and len(info.ranked_class_ids) == 1000


# --- bad input -------------------------------------------------------------------------

INVALID, RANGE, EXISTS, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                                     grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _piece(**fields):
    return chunk(**{"last": False, **fields})


BAD = {  # name: (rpc, chunks or requests, code, message fragment)
    "empty id": ("L", [chunk("")], INVALID, "video_id is empty"),
    "id too long": ("L", [chunk("x" * 257)], INVALID, "257 bytes of UTF-8, more than the limit of 256"),
    "id too long multibyte": ("L", [chunk("é" * 129)], INVALID, "258 bytes"),
    "id newline": ("L", [chunk("a\nb")], INVALID, "control character"),
    "id nul": ("L", [chunk("a\x00b")], INVALID, "control character"),
    "id del": ("L", [chunk("a\x7fb")], INVALID, "control character"),
    "id nel": ("L", [chunk("a\x85b")], INVALID, "control character"),
    "id whitespace only": ("L", [chunk("   ")], INVALID, "only whitespace"),
    "rgb short": ("L", [chunk(rgb=b"\0" * 1023, audio=b"\0" * 128)], INVALID, "video.rgb holds 1023 bytes"),
    "rgb long": ("L", [chunk(rgb=b"\0" * 1025, audio=b"\0" * 128)], INVALID, "video.rgb holds 1025 bytes"),
    "audio short": ("L", [chunk(rgb=b"\0" * 1024, audio=b"\0" * 127)], INVALID, "video.audio holds 127 bytes"),
    "audio long": ("L", [chunk(rgb=b"\0" * 1024, audio=b"\0" * 129)], INVALID, "video.audio holds 129"),
    "frames differ": ("L", [chunk(rgb=b"\0" * 2048, audio=b"\0" * 128)], INVALID, "2 frames but video.audio 1"),
    "no frames": ("L", [chunk(rgb=b"", audio=b"")], INVALID, "has no frames"),
    "too many frames": ("L", [chunk(count=MAX_FRAMES + 1)], RANGE, f"{MAX_FRAMES + 1} frames so far"),
    "too many frames chunked": ("L", [_piece(count=300), chunk(count=101, continued=True)], RANGE,
                                f"{MAX_FRAMES + 1} frames so far"),
    "expected over limit": ("L", [chunk(expected_frames=MAX_FRAMES + 1)], RANGE, "expected_frames=401"),
    "expected mismatch": ("L", [chunk(count=3, expected_frames=5)], INVALID, "video.expected_frames said 5"),
    "expected passed midway": ("L", [_piece(count=3, expected_frames=2)], INVALID,
                               "more than video.expected_frames=2"),
    "expected changes": ("L", [_piece(count=1, expected_frames=4), chunk(count=3, continued=True,
                                                                         expected_frames=5)],
                         INVALID, "differs from the first piece's 4"),
    "continued nothing open": ("L", [chunk(continued=True)], INVALID, "no video is open"),
    "continued other id": ("L", [_piece(video_id="a"), chunk(video_id="b", continued=True)], INVALID,
                           "another video than the open one, 'a'"),
    "new video while open": ("L", [_piece(video_id="a"), chunk(video_id="b")], INVALID,
                             "video 'a' is still open"),
    "same id while open": ("L", [_piece(video_id="a"), chunk(video_id="a")], INVALID,
                           "video 'a' is still open"),
    "stream ends open": ("L", [_piece(video_id="a")], INVALID, "stream ended while video 'a' was open"),
    "duplicate in stream": ("L", [chunk("a"), chunk("a")], EXISTS, "already sent in this stream"),
    "message too large": ("L", [chunk(count=500)], EXHAUSTED, "larger than max"),
    "missing video": ("L", [None], INVALID, "video field is missing"),
    "threshold nan": ("L", [pb.LocalizeRequest(video=chunk(), threshold=math.nan)], INVALID, "threshold=nan"),
    "threshold negative": ("L", [pb.LocalizeRequest(video=chunk(), threshold=-0.1)], INVALID, "threshold=-0.1"),
    "threshold above one": ("L", [pb.LocalizeRequest(video=chunk(), threshold=1.5)], INVALID, "[0, 1]"),
    "threshold inf": ("L", [pb.LocalizeRequest(video=chunk(), threshold=math.inf)], INVALID, "threshold=inf"),
    "ingest id space": ("I", [chunk("a b")], INVALID, "'a b' cannot be ranked"),
    "ingest id colon": ("I", [chunk("a:5")], INVALID, "'a:5' cannot be ranked"),
    "ingest id comma": ("I", [chunk("a,b")], INVALID, "'a,b' cannot be ranked"),
    # a CSV writer would quote it; in the CSV it would swallow the rows after its own
    "ingest id quote": ("I", [chunk('"a')], INVALID, """'"a' cannot be ranked"""),
    "ingest id tab": ("I", [chunk("a\tb")], INVALID, "control character"),
    "ingest empty id": ("I", [chunk("")], INVALID, "video_id is empty"),
    "ingest rgb short": ("I", [chunk(rgb=b"\0" * 100, audio=b"")], INVALID, "video.rgb holds 100 bytes"),
    "ingest no frames": ("I", [chunk(rgb=b"", audio=b"")], INVALID, "has no frames"),
    "ingest too many frames": ("I", [chunk(count=MAX_FRAMES + 1)], RANGE, "401 frames so far"),
    "ingest continued nothing open": ("I", [chunk(continued=True)], INVALID, "no video is open"),
    "ingest ends open": ("I", [_piece(video_id="z")], INVALID, "stream ended while video 'z'"),
    "ingest missing video": ("I", [None], INVALID, "video field is missing"),
    "ingest frames differ": ("I", [chunk(rgb=b"\0" * 1024, audio=b"")], INVALID, "1 frames but video.audio 0"),
}


@pytest.mark.parametrize("case", sorted(BAD), ids=sorted(BAD))
def test_bad_input_is_refused_and_nothing_applied(case, server, client, ingested):
    rpc, items, code, fragment = BAD[case]
    stub = pb_grpc.LocalizationStub(client.channel)
    if rpc == "L":
        method, wrap = stub.Localize, lambda c: pb.LocalizeRequest(video=c)
    else:
        method, wrap = stub.Ingest, lambda c: pb.IngestRequest(video=c)
    requests = [item if not isinstance(item, pb.VideoChunk) and item is not None else
                (wrap(item) if item is not None else (pb.LocalizeRequest() if rpc == "L" else pb.IngestRequest()))
                for item in items]
    before = wait_idle(client)
    error = call(method, requests)
    assert isinstance(error, grpc.RpcError), error
    assert error.code() == code and fragment in error.details(), (error.code(), error.details())
    after = wait_idle(client)
    assert server.health() == SERVING
    assert (after.videos_ingested, after.ranked_videos, after.inflight_videos) == \
        (before.videos_ingested, before.ranked_videos, 0)
    # a whole valid video sent to Localize before the refused message may have been localized
    # already (Localize starts each video as it arrives; it changes no state): only
    # "duplicate in stream" sends one
    localized_before_refusal = 1 if case == "duplicate in stream" else 0
    assert before.videos_localized <= after.videos_localized <= \
        before.videos_localized + localized_before_refusal


def test_error_after_answered_videos_keeps_them(client, ingested):
    stub = pb_grpc.LocalizationStub(client.channel)
    good = Video("kept-1", frames(7, seed=9))
    requests = iter([pb.IngestRequest(video=video_chunks(good)[0]), pb.IngestRequest(video=chunk(""))])
    before = client.stats().ranked_videos
    answers = stub.Ingest(requests, timeout=30)
    with pytest.raises(grpc.RpcError) as error:
        list(answers)
    assert error.value.code() == INVALID
    # the good video is either acknowledged or not, but never half-applied: re-sending it
    # gives one consistent outcome and the rankings hold it exactly once
    [ack] = client.ingest([good])
    assert client.stats().ranked_videos == before + 1
    assert ack.status in (pb.IngestAck.INGESTED, pb.IngestAck.DUPLICATE)


def test_exactly_max_frames_accepted(client):
    [response] = client.localize([Video("edge", frames(MAX_FRAMES))])
    assert response.video_id == "edge" and response.num_frames == 300
    [one_frame] = client.localize([Video("one", frames(1))])
    assert one_frame.num_frames == 1
    [long_id] = client.localize([Video("é" * 128, frames(2))])  # 256 bytes: the limit
    assert long_id.video_id == "é" * 128


# --- limits, deadline, crash, drain, processes --------------------------------------------


def _start_slow_server(tiny_artifacts, state) -> ServerProcess:
    """A server whose batcher holds each video 1.5 s (so videos stay in flight), with 3
    in-flight videos and 2 streams at most."""
    process = ServerProcess.start(tiny_artifacts, "--state-dir", str(state), "--batch-wait", "1.5",
                                  "--max-inflight-videos", "3", "--max-streams", "2", "--grace", "20")
    process.state = state
    return process


@pytest.fixture(scope="module")
def slow_server(tiny_artifacts, tmp_path_factory):
    """The limits' and the deadline's slow server (shared: neither changes its state)."""
    process = _start_slow_server(tiny_artifacts, tmp_path_factory.mktemp("slow-state"))
    yield process
    if process.process.poll() is None:
        process.kill()


@pytest.fixture
def draining_server(tiny_artifacts, tmp_path):
    """A slow server of the drain test's own, which the test stops (so that the tests
    sharing ``slow_server`` run in any order)."""
    process = _start_slow_server(tiny_artifacts, tmp_path / "state")
    yield process
    if process.process.poll() is None:
        process.kill()


def _localize_stream(address, videos, timeout=30):
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.LocalizationStub(channel)
    return channel, stub.Localize(iter([pb.LocalizeRequest(video=video_chunks(v)[0]) for v in videos]),
                                  timeout=timeout)


def test_inflight_and_stream_limits_at_their_edges(slow_server):
    videos = [Video(f"w{i}", frames(5, seed=i)) for i in range(4)]
    channel, exact = _localize_stream(slow_server.address, videos[:3])  # exactly the limit
    wait_for(lambda: server_stats(slow_server.address).inflight_videos == 3, "3 videos in flight")
    other, over = _localize_stream(slow_server.address, videos[3:])  # one more: refused
    with pytest.raises(grpc.RpcError) as error:
        list(over)
    assert error.value.code() == EXHAUSTED and "limit of 3" in error.value.details()
    assert sorted(r.video_id for r in exact) == ["w0", "w1", "w2"]
    # two streams open (the limit), a third is refused
    wait_for(lambda: server_stats(slow_server.address).active_streams == 0, "the streams to close")
    held = [_localize_stream(slow_server.address, [Video(f"s{i}", frames(5))]) for i in range(2)]
    wait_for(lambda: server_stats(slow_server.address).active_streams == 2, "2 open streams")
    third, refused = _localize_stream(slow_server.address, [Video("s3", frames(5))])
    with pytest.raises(grpc.RpcError) as error:
        list(refused)
    assert error.value.code() == EXHAUSTED and "server's limit is 2" in error.value.details()
    for _, stream in held:
        assert len(list(stream)) == 1
    for c in (channel, other, third, *(c for c, _ in held)):
        c.close()


def test_deadline_exceeded(slow_server):
    channel, stream = _localize_stream(slow_server.address, [Video("late", frames(5))], timeout=0.5)
    with pytest.raises(grpc.RpcError) as error:
        list(stream)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    channel.close()


def test_sigterm_drains_in_flight_work(draining_server):
    import threading

    later = threading.Event()

    def requests():
        yield pb.LocalizeRequest(video=video_chunks(Video("drained", frames(5)))[0])
        later.wait(20)  # an open stream goes on sending during the grace period
        yield pb.LocalizeRequest(video=video_chunks(Video("sent-while-draining", frames(5, seed=1)))[0])

    channel = grpc.insecure_channel(draining_server.address)
    stream = pb_grpc.LocalizationStub(channel).Localize(requests(), timeout=30)
    wait_for(lambda: server_stats(draining_server.address).inflight_videos == 1,
             "the video to wait in the batcher")
    draining_server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: draining_server.health() == NOT_SERVING, "health NOT_SERVING after SIGTERM")
    refused_channel, refused = _localize_stream(draining_server.address, [Video("new", frames(5))])
    with pytest.raises(grpc.RpcError) as error:
        list(refused)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    later.set()
    assert [r.video_id for r in stream] == ["drained", "sent-while-draining"]
    assert draining_server.stop() == 0, draining_server.log()
    assert list(draining_server.state.glob("snapshot-*.topk"))
    assert "event=drain_finished" in draining_server.log()
    channel.close()
    refused_channel.close()


def test_sigkill_mid_ingest_then_resend_tail(tiny_artifacts, tmp_path, test_videos, expected_csv):
    state = str(tmp_path / "state")
    first = ServerProcess.start(tiny_artifacts, "--state-dir", state)
    channel = grpc.insecure_channel(first.address)
    acks = pb_grpc.LocalizationStub(channel).Ingest(
        iter([pb.IngestRequest(video=video_chunks(v)[0]) for v in test_videos]), timeout=60)
    acked = [next(acks).video_id for _ in range(len(test_videos) // 2)]
    assert first.kill() == -signal.SIGKILL
    channel.close()
    second = ServerProcess.start(tiny_artifacts, "--state-dir", state)
    try:
        with LocalizationClient(second.address, timeout=60) as client:
            assert client.stats().ranked_videos >= len(acked)  # every acknowledged video survived
            client.ingest(test_videos[len(acked):])  # the unacknowledged tail, in order
            assert client.submission() == expected_csv
    finally:
        assert second.stop() == 0


@pytest.mark.parametrize("flavor", ["blocking", "asyncio"])
def test_clients_resume_an_ingest_across_a_server_restart(flavor, tiny_artifacts, tmp_path, test_videos,
                                                          expected_csv):
    """The server is killed (SIGKILL) halfway through an ingest and a new one starts on the
    same address and state; the client reconnects by itself, resends its unacknowledged tail
    in order and goes on. Every video is acknowledged once, and the rankings end equal to
    offline inference over the same videos."""
    import asyncio
    import threading

    from modloc.engine.service.client import AsyncLocalizationClient

    state = str(tmp_path / "state")
    first = ServerProcess.start(tiny_artifacts, "--state-dir", state)
    servers = []

    def restart():
        assert first.kill() == -signal.SIGKILL
        servers.append(ServerProcess.start(tiny_artifacts, "--state-dir", state, "--address", first.address))

    restarter = threading.Thread(target=restart)

    def videos():
        for index, video in enumerate(test_videos):
            if index == len(test_videos) // 2:
                restarter.start()  # in the background: the client must see the stream break
            yield video

    try:
        if flavor == "blocking":
            with LocalizationClient(first.address, timeout=60) as client:
                acks = client.ingest(videos(), window=4)
        else:
            async def ingest():
                async with AsyncLocalizationClient(first.address, timeout=60) as client:
                    return await client.ingest(videos(), window=4)

            acks = asyncio.run(ingest())
        restarter.join()
        assert sorted(ack.video_id for ack in acks) == sorted(video.id for video in test_videos)
        with LocalizationClient(first.address, timeout=60) as client:
            stats = client.stats()
            # the restarted server answers; it ingested the part the first one had not
            assert stats.process_id == servers[0].process.pid
            assert 0 < stats.videos_ingested < len(test_videos) == stats.ranked_videos
            assert client.submission() == expected_csv
    finally:
        restarter.join()
        for server in servers:
            assert server.stop() == 0, server.log()


def test_a_state_directory_that_cannot_be_written_stops_ingestion_and_reads(tiny_artifacts, tmp_path):
    """A full disk at a group commit: that group is not acknowledged, and since the rankings
    in memory may now hold videos that are not on disk, ingestion and the rankings' reads
    answer UNAVAILABLE (StateFailure) until a restart; the health hook fires once; the
    shutdown writes no snapshot over the files."""
    import asyncio
    import errno

    from modloc.engine.service.config import ServerConfig
    from modloc.engine.service.core import EngineCore, StateFailure

    state = tmp_path / "state"
    core = EngineCore.load(ServerConfig(artifacts=tiny_artifacts, state_dir=state))
    failures = []
    core.on_state_failure = lambda: failures.append(True)

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario():
        assert [o.sequence for o in await core.ingest([Video("ok", frames(8))])] == [1]
        core.rankings.commit = full_disk
        with pytest.raises(StateFailure, match="could not be written .*No space left on device"):
            await core.ingest([Video("lost", frames(8, seed=1))])
        with pytest.raises(StateFailure):
            await core.ingest([Video("later", frames(8, seed=2))])
        with pytest.raises(StateFailure):
            core.submission_csv()
        with pytest.raises(StateFailure):
            core.ranking(core.localizer.rankings.class_ids[0], 1, 0)
        await core.close()

    asyncio.run(scenario())
    assert failures == [True]
    assert not list(state.glob("snapshot-*"))  # no snapshot written over the failed state


def test_every_acknowledged_group_was_fsynced_before_its_ack(tiny_artifacts, tmp_path, fsynced):
    """os.fsync observed at the lowest seam: when ``ingest`` returns (what the server sends
    as the ack), the insert log's last fsync covered every byte the log holds. A crash test
    cannot see a missing fsync (a killed process leaves the OS cache intact); this can."""
    import asyncio

    from modloc.engine.service.config import ServerConfig
    from modloc.engine.service.core import EngineCore

    synced = fsynced
    state = tmp_path / "state"
    core = EngineCore.load(ServerConfig(artifacts=tiny_artifacts, state_dir=state,
                                        snapshot_videos=0, snapshot_seconds=0))

    async def scenario():
        sizes = []
        for group in range(4):
            videos = [Video(f"g{group}-{i}", frames(6, seed=10 * group + i)) for i in range(group + 1)]
            outcomes = await core.ingest(videos)
            assert [o.duplicate for o in outcomes] == [False] * len(videos)
            (log,) = state.glob("log-*.tfrecord")
            status = log.stat()
            assert synced.get(status.st_ino) == status.st_size, f"group {group} acked unsynced"
            sizes.append(status.st_size)
        # a group sent again is acknowledged as duplicates (sequence 0) and counted so
        again = await core.ingest([Video("g1-0", frames(6, seed=10)), Video("g1-1", frames(6, seed=11))])
        assert [(o.duplicate, o.sequence) for o in again] == [(True, 0), (True, 0)]
        assert (core.duplicates, core.videos_ingested) == (2, 1 + 2 + 3 + 4)
        await core.close()
        return sizes

    sizes = asyncio.run(scenario())
    assert sizes == sorted(set(sizes))  # each group added records


def test_serve_beyond_loopback_without_tokens_is_refused_exposure(tiny_artifacts, monkeypatch):
    """A real ``modloc serve`` on 0.0.0.0 with no token refuses to start, saying how to fix
    it; the same command with --insecure-no-auth serves (so the refusal is the check's)."""
    from modloc.engine.service.security import TOKENS_ENV

    monkeypatch.delenv(TOKENS_ENV, raising=False)
    with pytest.raises(RuntimeError, match="refusing to listen on 0.0.0.0:0 without authentication"):
        ServerProcess.start(tiny_artifacts, "--address", "0.0.0.0:0")
    server = ServerProcess.start(tiny_artifacts, "--address", "0.0.0.0:0", "--insecure-no-auth")
    try:
        assert wait_for(lambda: server.health() == SERVING, "the open server to serve")
    finally:
        assert server.stop() == 0, server.log()


def _serve_with_file_size_limit(tiny_artifacts, state, limit: int) -> ServerProcess:
    """``modloc serve`` whose files may not grow past ``limit`` bytes (RLIMIT_FSIZE: a write
    beyond it fails with EFBIG, as on a full disk; Python ignores SIGXFSZ)."""
    import resource

    from modloc.engine.service.process import READY_PREFIX

    log_path = state.parent / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "modloc", "serve", str(tiny_artifacts), "--address", "127.0.0.1:0",
         "--state-dir", str(state), "--snapshot-videos", "0"],
        stdout=subprocess.PIPE, stderr=open(log_path, "wb"), text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    line = process.stdout.readline()
    assert line.startswith(READY_PREFIX), log_path.read_text()
    return ServerProcess(process, line[len(READY_PREFIX):].strip(), log_path)


def test_a_state_failure_turns_the_real_server_unhealthy_and_unavailable(tiny_artifacts, tmp_path,
                                                                         test_videos):
    """Through the server: the group whose commit fails is not acknowledged, health turns
    NOT_SERVING, Ingest, TopSegments and Submission answer UNAVAILABLE while Localize goes on;
    a restart on the same state holds every acknowledged video."""
    state = tmp_path / "state"
    server = _serve_with_file_size_limit(tiny_artifacts, state, 16 * 1024)
    acked = []
    try:
        with LocalizationClient(server.address, timeout=60) as client:
            with pytest.raises(grpc.RpcError) as failed:
                for video in test_videos:  # one group each, until the log passes the limit
                    acked += client.ingest([video], retries=0)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "could not be written" in failed.value.details()
            assert 0 < len(acked) < len(test_videos)
            wait_for(lambda: server.health() == NOT_SERVING, "health NOT_SERVING after the failure")
            assert server.health("modloc.v1.Localization") == NOT_SERVING
            for attempt in (lambda: client.ingest(test_videos[-1:], retries=0),
                            lambda: client.top_segments(client.model_info().ranked_class_ids[0], 1),
                            lambda: client.submission()):
                with pytest.raises(grpc.RpcError) as refused:
                    attempt()
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "must restart" in refused.value.details()
            assert [r.video_id for r in client.localize(test_videos[:1])] == [test_videos[0].id]
    finally:
        server.stop()
    restarted = ServerProcess.start(tiny_artifacts, "--state-dir", str(state))
    try:
        with LocalizationClient(restarted.address, timeout=60) as client:
            assert client.stats().ranked_videos >= len(acked)
            again = client.ingest([test_videos[i] for i in range(len(acked))], retries=0)
            assert [a.status for a in again] == [pb.IngestAck.DUPLICATE] * len(acked)
    finally:
        assert restarted.stop() == 0, restarted.log()


def test_metrics_endpoint_settings_are_checked(tiny_artifacts):
    from modloc.engine.service.config import ServerConfig

    with pytest.raises(ValueError, match="metrics_port: each of the processes would bind it"):
        ServerConfig(artifacts=tiny_artifacts, address="127.0.0.1:50999", processes=2, metrics_port=9100)
    # an IPv6 literal keeps its brackets for gRPC and loses them for other socket APIs
    config = ServerConfig(artifacts=tiny_artifacts, address="[::1]:0")
    assert (config.host, config.bare_host) == ("[::1]", "::1")


def test_processes_share_the_port_without_rankings(tiny_artifacts, tmp_path):
    with held_port() as port:
        # the configuration is checked before any model loads
        result = subprocess.run([sys.executable, "-m", "modloc", "serve", str(tiny_artifacts),
                                 "--processes", "2", "--state-dir", str(tmp_path), "--address",
                                 f"127.0.0.1:{port}"], capture_output=True, text=True)
        assert result.returncode == 1 and "rankings need a single owner" in result.stderr
        server = ServerProcess.start(tiny_artifacts, "--processes", "2", "--address",
                                     f"127.0.0.1:{port}")
    try:
        pids = set()
        for _ in range(16):  # own connections: channels otherwise share one global subchannel
            with grpc.insecure_channel(server.address, [("grpc.use_local_subchannel_pool", 1)]) as channel:
                pids.add(pb_grpc.LocalizationStub(channel).Stats(pb.StatsRequest(), timeout=30).process_id)
        assert len(pids) == 2
        with LocalizationClient(server.address, timeout=30) as client, pytest.raises(grpc.RpcError) as error:
            client.ingest([Video("x", frames(5))], retries=0)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        assert server.stop() == 0, server.log()


def test_async_client(server, client, ingested, test_videos):
    import asyncio

    from modloc.engine.service.client import AsyncLocalizationClient

    async def run():
        async with AsyncLocalizationClient(server.address, timeout=30) as aclient:
            responses = [r async for r in aclient.localize(test_videos[:2])]
            acks = await aclient.ingest(test_videos[:2])
            return responses, acks, await aclient.submission()

    responses, acks, csv = asyncio.run(run())
    assert sorted(r.video_id for r in responses) == sorted(v.id for v in test_videos[:2])
    assert [a.status for a in acks] == [pb.IngestAck.DUPLICATE] * 2
    assert csv == client.submission()


def test_secured_server_tls_token_kserve_and_metrics(tiny_artifacts, pki, tmp_path, test_videos):
    """One server with TLS, a bearer token and a metrics port: the front door as deployed."""
    token = "s3cret-token-0123456789"
    (tmp_path / "tokens").write_text(f"# the test's token\n{token}\n")
    server = ServerProcess.start(tiny_artifacts, "--token-file", str(tmp_path / "tokens"),
                                 "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                                 "--metrics-port", "0")
    try:
        # port 0: the server logs the port it bound before it says it is serving
        metrics_port = int(re.search(r"event=metrics address=\S+:(\d+)", server.log()).group(1))
        secured = LocalizationClient(server.address, token=token, tls_ca=pki / "ca.pem", timeout=30)
        assert [r.video_id for r in secured.localize(test_videos[:1])] == [test_videos[0].id]
        for wrong in (None, "not-the-token-at-all-000"):
            with pytest.raises(grpc.RpcError) as refused:
                LocalizationClient(server.address, token=wrong, tls_ca=pki / "ca.pem", timeout=30).stats()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as plaintext:
            LocalizationClient(server.address, token=token, timeout=5).stats()
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE

        credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
        with grpc.secure_channel(server.address, credentials) as channel:
            health_stub = health_pb2_grpc.HealthStub(channel)
            assert health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING  # no token
            features = np.ascontiguousarray(test_videos[0].features[None, :20])
            request = kpb.ModelInferRequest(model_name="modloc-segment", inputs=[
                kpb.ModelInferRequest.InferInputTensor(name="features", datatype="UINT8", shape=[1, 20, 1152]),
                kpb.ModelInferRequest.InferInputTensor(name="num_frames", datatype="INT32", shape=[1])],
                raw_input_contents=[features.tobytes(), np.array([20], np.int32).tobytes()])
            response = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, timeout=30, metadata=(("authorization", f"Bearer {token}"),))
        with open_backend(tiny_artifacts / "segment" / "distill-fp32") as backend:
            expected = backend.run(features, num_frames=np.array([20], np.int32))
        served = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(expected.shape)
        np.testing.assert_array_equal(served, expected)

        def scrape() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
                    for line in text.splitlines() if line.startswith("modloc_")}

        # the gauges and videos_total are copied once a second
        metrics = wait_for(lambda: (m := scrape()).get('modloc_videos_total{rpc="Localize"}') and m,
                           "the metrics to count the Localize call")
        assert metrics['modloc_videos_total{rpc="Localize"}'] == 1
        assert any('method="/modloc.v1.Localization/Localize"' in name for name in metrics)
        assert any('code="UNAUTHENTICATED"' in name for name in metrics)
        # the pipeline's work: one batch of one video, its windows, every stage timed
        assert metrics["modloc_batch_size_count"] == 1 and metrics["modloc_segments_total"] >= 1
        for stage in ("queue", "video_model", "segment_model", "fusion"):
            assert metrics[f'modloc_stage_seconds_count{{stage="{stage}"}}'] == 1, stage
    finally:
        assert server.stop() == 0


def test_health_is_not_serving_while_the_models_load(tiny_artifacts):
    """The port opens before the models load: probes see NOT_SERVING, the APIs UNAVAILABLE."""
    import asyncio

    from modloc.engine.service.app import _Server
    from modloc.engine.service.config import ServerConfig

    async def scenario():
        server = _Server(ServerConfig(artifacts=tiny_artifacts, address="127.0.0.1:0", grace_seconds=1))
        port = await server.bind()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health_stub = health_pb2_grpc.HealthStub(channel)
            kserve_stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            stub = pb_grpc.LocalizationStub(channel)
            for service in ("", "modloc.v1.Localization"):
                answer = await health_stub.Check(health_pb2.HealthCheckRequest(service=service))
                assert answer.status == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as loading:
                await stub.Stats(pb.StatsRequest())
            assert loading.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading its models" in loading.value.details()
            assert not (await kserve_stub.ServerReady(kpb.ServerReadyRequest())).ready
            with pytest.raises(grpc.aio.AioRpcError) as model_loading:
                await kserve_stub.ModelMetadata(kpb.ModelMetadataRequest(name="modloc-video"))
            assert model_loading.value.code() == grpc.StatusCode.UNAVAILABLE

            await server.load()
            assert (await health_stub.Check(health_pb2.HealthCheckRequest())).status == SERVING
            assert (await stub.Stats(pb.StatsRequest())).process_id > 0
            assert (await kserve_stub.ServerReady(kpb.ServerReadyRequest())).ready
        await server.drain("test")

    asyncio.run(scenario())


def test_client_cli(server, client, ingested, tiny_dataset, tmp_path, capsys):
    from modloc.cli import main

    assert main(["client", "ingest", server.address, "--data", split(tiny_dataset, "test")]) == 0
    assert capsys.readouterr().out.strip() == f"ingested 0 videos ({len(ingested.acks)} duplicates)"
    assert main(["client", "submission", server.address, "--out", str(tmp_path / "s.csv")]) == 0
    served = client.submission()  # the module's server: earlier tests may have ingested more
    assert (tmp_path / "s.csv").read_bytes() == served
    capsys.readouterr()
    class_id, segments = next((int(row.split(",")[0]), row.split(",")[1].split())
                              for row in served.decode().splitlines()[1:] if row.split(",")[1])
    assert main(["client", "top", server.address, str(class_id), "--k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1] for line in lines] == segments[:2]
    assert main(["client", "localize", server.address, "--data", split(tiny_dataset, "test")]) == 0
    responses = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(responses) == 24 and all(r["candidates"] for r in responses)
    assert main(["client", "stats", server.address]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert int(stats["videosIngested"]) >= len(ingested.acks)
    # counters at zero are printed too: a script reading one finds it
    assert {"duplicates", "queueDepth", "activeStreams", "inflightVideos"} <= stats.keys()
