"""The service's promises under damaged state, failed disks, hostile clients and floods:
real ``modloc serve`` subprocesses on loopback ports, memory read from /proc/<pid>/status."""

from __future__ import annotations

import json
import signal

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from tiny import split

from modloc.engine.base.io.examples import Video
from modloc.engine.base.io.readers import read_videos
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
