"""The service's promises under damaged state, failed disks, hostile clients and floods:
real ``modloc serve`` subprocesses on loopback ports, memory read from /proc/<pid>/status."""

from __future__ import annotations

import collections
import itertools
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from tiny import split

from modloc.engine._proto.inference import grpc_predict_v2_pb2 as kpb
from modloc.engine._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from modloc.engine._proto.modloc.v1 import localization_pb2 as pb
from modloc.engine._proto.modloc.v1 import localization_pb2_grpc as pb_grpc
from modloc.engine.base.io.examples import Video, encode_video
from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.io.tfrecord import iter_buffer_records, write_records
from modloc.engine.service.app import EXIT_STATE_FAILED
from modloc.engine.service.client import LocalizationClient, video_chunks
from modloc.engine.service.process import ServerProcess

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def test_videos(tiny_dataset) -> list[Video]:
    return list(read_videos(split(tiny_dataset, "test")))


def frames(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 1152), dtype=np.uint8)


def _refused_start(artifacts, *args) -> str:
    """The log of a server that refused to start."""
    with pytest.raises(RuntimeError, match="modloc serve did not start") as failed:
        ServerProcess.start(artifacts, *args)
    return str(failed.value)


# --- the state directory ------------------------------------------------------------------


def test_a_log_lost_after_acknowledged_videos_stops_the_restart(tiny_artifacts, tmp_path, test_videos):
    """19 videos acknowledged past the last snapshot, a SIGKILL, the log deleted: the restart
    is refused naming the file and what it held, until the operator accepts the loss."""
    state = tmp_path / "state"
    first = ServerProcess.start(tiny_artifacts, "--state-dir", str(state), "--snapshot-videos", "20")
    with LocalizationClient(first.address, timeout=60) as client:
        client.ingest(test_videos[:20])  # a snapshot of 20
        client.ingest([Video(f"past-{i}", frames(10, seed=i)) for i in range(19)])  # in the log only
    assert first.kill() == -signal.SIGKILL
    snapshotted = json.loads((state / "MANIFEST").read_text())["snapshot"]["videos"]
    assert snapshotted == 20
    [log] = state.glob("log-*.tfrecord")
    log.unlink()
    refused = _refused_start(tiny_artifacts, "--state-dir", str(state))
    assert (f"{log} is missing: the manifest names it as the log of the videos after the first "
            f"{snapshotted}") in refused
    assert "--accept-state-loss" in refused
    accepted = ServerProcess.start(tiny_artifacts, "--state-dir", str(state), "--accept-state-loss")
    try:
        with LocalizationClient(accepted.address, timeout=60) as client:
            # the snapshot's videos: the loss of the others is explicit
            assert client.stats().ranked_videos == snapshotted
    finally:
        assert accepted.stop() == 0, accepted.log()
    assert "accepting the loss as asked" in accepted.log()


def test_a_restart_with_other_models_or_settings_is_refused(tiny_artifacts, tmp_path, test_videos):
    state = tmp_path / "state"
    first = ServerProcess.start(tiny_artifacts, "--state-dir", str(state))
    with LocalizationClient(first.address, timeout=60) as client:
        client.ingest(test_videos[:3])
    assert first.stop() == 0, first.log()
    refused = _refused_start(tiny_artifacts, "--state-dir", str(state), "--segment", "ensemble-fp32",
                             "--top-n", "10")
    assert "segment_model.variant: 'distill-fp32' then, 'ensemble-fp32' now" in refused
    assert "top_n: 20 then, 10 now" in refused and "segment_model.onnx_sha256" in refused
    kept = ServerProcess.start(tiny_artifacts, "--state-dir", str(state), "--segment", "ensemble-fp32",
                               "--top-n", "10", "--accept-settings-change")
    with LocalizationClient(kept.address, timeout=60) as client:
        assert client.stats().ranked_videos == 3
    assert kept.stop() == 0, kept.log()
    fresh = ServerProcess.start(tiny_artifacts, "--state-dir", str(state), "--fresh-state")
    with LocalizationClient(fresh.address, timeout=60) as client:
        assert client.stats().ranked_videos == 0
    assert fresh.stop() == 0, fresh.log()
    [aside] = state.glob("replaced-*")
    assert (aside / "MANIFEST").is_file()


def test_a_failed_state_directory_drains_with_its_exit_status(tiny_artifacts, tmp_path):
    """The log's file cannot grow past 64 KiB (EFBIG, as a full disk): ingestion stops at the
    failed commit, SIGTERM still drains cleanly and exits with EXIT_STATE_FAILED, and a
    restart holds every acknowledged video."""
    state = tmp_path / "state"
    server = ServerProcess.start(tiny_artifacts, "--state-dir", str(state),
                                 file_size_limit=64 << 10)
    acknowledged = 0
    with LocalizationClient(server.address, timeout=60) as client:
        with pytest.raises(grpc.RpcError) as failed:
            for index in range(2000):
                client.ingest([Video(f"v{index}", frames(40, seed=index))], retries=0)
                acknowledged += 1
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "could not be written" in failed.value.details() and acknowledged > 0
    assert server.health() == NOT_SERVING
    assert server.stop() == EXIT_STATE_FAILED
    log = server.log()
    assert "event=drain_finished" in log
    assert "Task exception was never retrieved" not in log and "Traceback" not in log, log
    restarted = ServerProcess.start(tiny_artifacts, "--state-dir", str(state))
    try:
        with LocalizationClient(restarted.address, timeout=60) as client:
            assert client.stats().ranked_videos >= acknowledged
    finally:
        assert restarted.stop() == 0, restarted.log()


# --- undecodable requests, the client's retries and its errors ------------------------------


@pytest.fixture(scope="module")
def server(tiny_artifacts, tmp_path_factory):
    """A server with rankings and a metrics endpoint; ``metrics()`` scrapes it."""
    process = ServerProcess.start(tiny_artifacts, "--state-dir", str(tmp_path_factory.mktemp("state")),
                                  "--metrics-port", "0", "--max-streams", "2")
    [port] = re.findall(r"event=metrics address=[\d.]+:(\d+)", process.log())
    process.metrics = lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    yield process
    assert process.stop() == 0, process.log()


def _invalid_utf8_id_chunk() -> bytes:
    """An IngestRequest whose video.video_id is the single byte 0xff (not UTF-8)."""
    request = pb.IngestRequest(video=pb.VideoChunk(video_id="x", rgb=b"\0" * 1024, audio=b"\0" * 128,
                                                   last=True)).SerializeToString()
    assert request.count(b"\x0a\x01x") == 1  # video_id: field 1, 1 byte long
    return request.replace(b"\x0a\x01x", b"\x0a\x01\xff")


UNDECODABLE = {  # name: (method, request streaming, response streaming, message bytes, rpc, index)
    "unary garbage": ("/modloc.v1.Localization/Stats", False, False, b"\xff\xff\xff", "Stats", None),
    "stream garbage": ("/modloc.v1.Localization/Localize", True, True, b"\x0a\x05ab", "Localize", 0),
    "non-UTF-8 id": ("/modloc.v1.Localization/Ingest", True, True, _invalid_utf8_id_chunk(), "Ingest", 0),
    "server-stream garbage": ("/modloc.v1.Localization/TopSegments", False, True, b"\x08", "TopSegments",
                              None),
    "health garbage": ("/grpc.health.v1.Health/Check", False, False, b"\x0a\xff", "Check", None),
    "KServe garbage": ("/inference.GRPCInferenceService/ModelInfer", False, False, b"\x0a\x09ab",
                       "ModelInfer", None),
}


@pytest.mark.parametrize("case", sorted(UNDECODABLE))
def test_an_undecodable_request_is_invalid_argument_counted_and_quiet(server, case):
    method, request_streaming, response_streaming, data, rpc, index = UNDECODABLE[case]
    with grpc.insecure_channel(server.address) as channel:
        kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                (True, True): channel.stream_stream}[(request_streaming, response_streaming)]
        call = kind(method)  # raw bytes both ways
        request = iter([data]) if request_streaming else data
        with pytest.raises(grpc.RpcError) as refused:
            result = call(request, timeout=10)
            if response_streaming:
                list(result)
    which = "the request" if index is None else f"request {index}"
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    assert refused.value.details().startswith(f"{rpc}: {which} is not a valid "), refused.value.details()
    # the call is counted as its handler unwinds, just after the client has its status
    counted = rf'modloc_requests_total{{code="INVALID_ARGUMENT",method="{re.escape(method)}"}} [1-9]'
    deadline = time.monotonic() + 5
    while not re.search(counted, server.metrics()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(counted, server.metrics())
    assert "Traceback" not in server.log() and " ERROR " not in server.log()


def test_a_server_wide_limit_is_retried_with_backoff(server, tmp_path):
    """RESOURCE_EXHAUSTED (here: the server's 2 streams are open) is worth another try: the
    ingest succeeds once a stream closes."""
    with LocalizationClient(server.address, timeout=60) as holder:
        held = [holder.localize(iter([Video(f"h{i}", frames(5))]), window=1) for i in range(2)]
        for stream in held:  # both streams open and answered once: the limit is reached
            next(stream)
        release = threading.Timer(0.6, lambda: [stream.close() for stream in held])
        release.start()
        with LocalizationClient(server.address, timeout=60) as client:
            [ack] = client.ingest([Video("after-the-limit", frames(5))])
        release.join()
    assert ack.status == pb.IngestAck.INGESTED


def test_client_ingest_names_the_bad_record_and_what_was_acknowledged(server, tmp_path):
    """A corrupt record in the middle of a file: one error line naming the file, the record
    and how many videos were acknowledged before it; non-zero exit; no gRPC traceback (the
    other lines are the progress log of piped output)."""
    path = tmp_path / "damaged.tfrecord"
    write_records(path, [encode_video(Video(f"rec-{i}", frames(6, seed=i))) for i in range(10)])
    data = bytearray(path.read_bytes())
    records = list(iter_buffer_records(bytes(data)))
    data[records[1].offset + 20] ^= 0xFF  # inside record 1's payload
    path.write_bytes(bytes(data))
    with LocalizationClient(server.address) as client:
        before = client.stats().ranked_videos
    done = subprocess.run([sys.executable, "-m", "modloc", "client", "ingest", server.address,
                           "--data", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("[")]
    assert lines == [f"modloc client: error: {path}: record 1 at byte offset {records[1].offset}: data "
                     "CRC mismatch; 1 videos (0 duplicates) acknowledged before it (in the rankings; "
                     "sending the same files again skips them as duplicates)"], done.stderr
    with LocalizationClient(server.address) as client:
        assert client.stats().ranked_videos == before + 1


# --- backpressure and admission: memory measured from /proc/<pid>/status ---------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def test_a_client_that_never_reads_cannot_grow_the_server(tiny_artifacts):
    """A Localize stream whose client sends 60-frame videos as fast as it can and never reads
    a response: the stream stops reading at max_stream_videos unanswered videos, so the
    client can send only what the windows hold, and the server's memory stays flat
    (before: it read every video, thousands in seconds, and grew ~30 MiB/s)."""
    server = ServerProcess.start(tiny_artifacts, "--max-stream-videos", "8")
    sent = 0
    [chunk] = video_chunks(Video("template", frames(60)))

    def requests():
        nonlocal sent
        for index in itertools.count():
            piece = pb.VideoChunk()
            piece.CopyFrom(chunk)
            piece.video_id = f"unread-{index}"
            sent += 1
            yield pb.LocalizeRequest(video=piece)

    # a plain HTTP/2 window on the client (no bandwidth probing): what it absorbs is small
    channel = grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)])
    try:
        call = pb_grpc.LocalizationStub(channel).Localize(requests(), timeout=60)
        time.sleep(1.0)
        before = rss_mib(server.process.pid)
        time.sleep(2.5)
        after = rss_mib(server.process.pid)
        with LocalizationClient(server.address) as client:
            stats = client.stats()
        assert stats.inflight_videos <= 8, stats
        assert sent <= 8 + 64, f"the server read {sent} videos of a client that reads nothing"
        assert after - before < 10, (before, after)
        call.cancel()
    finally:
        channel.close()
        assert server.stop() == 0, server.log()


def test_a_kserve_flood_over_many_connections_is_refused_before_it_is_read(tiny_artifacts):
    """32 connections each calling ModelInfer with [11, 300, 1152] uint8 (3.8 MB) back to back
    for 3 s, against --max-kserve-requests 2: the calls past the limit answer
    RESOURCE_EXHAUSTED before their message is read, and the server's peak RSS grows by
    tens of MiB (before: every call was parsed, +900 MiB for 64 callers)."""
    server = ServerProcess.start(tiny_artifacts, "--max-kserve-requests", "2", "--metrics-port", "0")
    [port] = re.findall(r"event=metrics address=[\d.]+:(\d+)", server.log())
    features = np.random.default_rng(0).integers(0, 256, (11, 300, 1152), dtype=np.uint8)
    request = kpb.ModelInferRequest(model_name="modloc-video", inputs=[
        kpb.ModelInferRequest.InferInputTensor(name="features", datatype="UINT8", shape=[11, 300, 1152]),
        kpb.ModelInferRequest.InferInputTensor(name="num_frames", datatype="INT32", shape=[11])],
        raw_input_contents=[features.tobytes(), np.full(11, 300, "<i4").tobytes()])
    options = [("grpc.max_send_message_length", 8 << 20), ("grpc.use_local_subchannel_pool", 1)]
    statuses: collections.Counter[str] = collections.Counter()
    details = set()
    try:
        with grpc.insecure_channel(server.address, options=options) as channel:
            kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)  # warm-up
        before = peak = rss_mib(server.process.pid)
        until = time.monotonic() + 3.0

        def caller():
            with grpc.insecure_channel(server.address, options=options) as channel:  # its own connection
                stub = kpb_grpc.GRPCInferenceServiceStub(channel)
                while time.monotonic() < until:
                    try:
                        stub.ModelInfer(request, timeout=60)
                        statuses["OK"] += 1
                    except grpc.RpcError as error:
                        statuses[error.code().name] += 1
                        details.add(error.details())

        callers = [threading.Thread(target=caller) for _ in range(32)]
        for thread in callers:
            thread.start()
        while any(thread.is_alive() for thread in callers):
            peak = max(peak, rss_mib(server.process.pid))
            time.sleep(0.02)
        assert set(statuses) == {"OK", "RESOURCE_EXHAUSTED"}, statuses
        assert details == {"ModelInfer: 2 KServe requests are in flight, the server's limit is 2; "
                           "retry after a backoff"}
        assert peak - before < 120, (before, peak, statuses)
        def refused() -> float:
            scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            return float(re.findall(r'modloc_requests_total{code="RESOURCE_EXHAUSTED",method="/inference.'
                                    r'GRPCInferenceService/ModelInfer"} ([\d.]+)', scraped)[0])

        deadline = time.monotonic() + 5  # each call is counted as its handler unwinds
        while refused() != statuses["RESOURCE_EXHAUSTED"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert refused() == statuses["RESOURCE_EXHAUSTED"]
    finally:
        assert server.stop() == 0, server.log()


def test_connections_past_the_limit_are_closed(tiny_artifacts):
    server = ServerProcess.start(tiny_artifacts, "--max-connections", "2")
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
    channels = [grpc.insecure_channel(server.address, options=options) for _ in range(3)]
    try:
        outcomes = []
        for channel in channels:
            try:
                kpb_grpc.GRPCInferenceServiceStub(channel).ServerLive(kpb.ServerLiveRequest(), timeout=5)
                outcomes.append("OK")
            except grpc.RpcError as error:
                outcomes.append(error.code().name)
        assert outcomes == ["OK", "OK", "UNAVAILABLE"]
    finally:
        for channel in channels:
            channel.close()
        assert server.stop() == 0, server.log()


def test_kserve_limits_are_checked_with_the_server_settings(tiny_artifacts):
    from modloc.engine.service.config import ServerConfig

    with pytest.raises(ValueError, match=r"max_kserve_bytes: 1048576 is not an integer in 4194304\.\."):
        ServerConfig(artifacts=tiny_artifacts, max_kserve_bytes=1 << 20)
    with pytest.raises(ValueError, match=r"max_stream_videos: 0 is not an integer in 1\.\."):
        ServerConfig(artifacts=tiny_artifacts, max_stream_videos=0)


# --- batch invariance ----------------------------------------------------------------------


def test_served_scores_and_csv_do_not_depend_on_batch_companions(tiny_artifacts, tiny_dataset, tmp_path,
                                                                test_videos):
    """A server that scores every video alone (--video-batch 1: each model call one row)
    gives bit-identical fused scores to the engine scoring all videos in one batch, and its
    Submission is byte for byte ``modloc infer``'s (which batches 24 at once). Before the
    two-row rule, single-row calls differed by ~1e-9 and could swap adjacent ties."""
    from modloc.engine.runtime.infer import infer
    from modloc.engine.runtime.localizer import Localizer

    offline = tmp_path / "submission.csv"
    infer(tiny_artifacts, split(tiny_dataset, "test"), offline, progress=False)
    with Localizer.from_artifacts(tiny_artifacts) as localizer:
        together = {r.video_id: r for r in localizer.localize(test_videos, rank=False)}
    server = ServerProcess.start(tiny_artifacts, "--state-dir", str(tmp_path / "state"),
                                 "--video-batch", "1", "--batch-wait", "0")
    try:
        with LocalizationClient(server.address, timeout=60) as client:
            for response in client.localize(test_videos, window=1):  # one video per call
                result = together[response.video_id]
                for candidate in response.candidates:
                    assert [(s.start_seconds, s.score) for s in candidate.segments] == \
                        result.segments(candidate.class_id), response.video_id
            client.ingest(test_videos, window=1)
            assert client.submission() == offline.read_bytes()
    finally:
        assert server.stop() == 0, server.log()
