"""The service's promises under damaged state, failed disks, hostile clients and floods:
real ``modloc serve`` subprocesses on loopback ports, memory read from /proc/<pid>/status."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from tiny import split

from modloc.engine._proto.modloc.v1 import localization_pb2 as pb
from modloc.engine.base.io.examples import Video, encode_video
from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.io.tfrecord import iter_buffer_records, write_records
from modloc.engine.service.app import EXIT_STATE_FAILED
from modloc.engine.service.client import LocalizationClient
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
    assert re.search(rf'modloc_requests_total{{code="INVALID_ARGUMENT",method="{re.escape(method)}"}} [1-9]',
                     server.metrics())
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
    and how many videos were acknowledged before it; non-zero exit; no gRPC traceback."""
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
    lines = done.stderr.strip().splitlines()
    assert lines == [f"modloc client: error: {path}: record 1 at byte offset {records[1].offset}: data "
                     "CRC mismatch; 1 videos (0 duplicates) acknowledged before it (in the rankings; "
                     "sending the same files again skips them as duplicates)"], done.stderr
    with LocalizationClient(server.address) as client:
        assert client.stats().ranked_videos == before + 1
