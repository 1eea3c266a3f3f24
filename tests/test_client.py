"""The gRPC clients against a real ``modloc serve``: flow control on Localize, the ingest
retry's bounded reconnect, and the asyncio client's inputs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tiny import split, synth_manifest

from modloc.engine.base.io.examples import Video
from modloc.engine.base.io.readers import read_videos
from modloc.engine.service.client import (
    AsyncLocalizationClient,
    LocalizationClient,
    retryable,
)
from modloc.engine.service.process import ServerProcess

MAX_INFLIGHT = 16
WINDOW = 12  # under MAX_INFLIGHT: the client alone can never pass the server's limit


def frames(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 1152), dtype=np.uint8)


@pytest.fixture(scope="module")
def many_videos() -> list[Video]:
    """Far more small videos than the server's in-flight limit."""
    return [Video(f"m{i}", frames(5, seed=i)) for i in range(320)]


@pytest.fixture(scope="module")
def limited_server(tiny_artifacts, tmp_path_factory):
    """A server with rankings that holds at most MAX_INFLIGHT videos in flight; its batcher
    waits 0.1 s for company, so videos sent without flow control pile up past the limit."""
    process = ServerProcess.start(tiny_artifacts, "--state-dir", str(tmp_path_factory.mktemp("state")),
                                  "--max-inflight-videos", str(MAX_INFLIGHT), "--batch-wait", "0.1")
    yield process
    assert process.stop() == 0, process.log()


# --- Localize flow control ---------------------------------------------------------------


def test_localize_keeps_a_window_under_the_inflight_limit(limited_server, many_videos):
    with LocalizationClient(limited_server.address, timeout=120) as client:
        responses = list(client.localize(iter(many_videos), window=WINDOW))
        assert sorted(r.video_id for r in responses) == sorted(v.id for v in many_videos)
        assert all(r.num_frames == 5 for r in responses)
        # the same videos all at once pass the limit: what the window prevents
        with pytest.raises(grpc.RpcError) as error:
            list(client.localize(many_videos, window=len(many_videos)))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"limit of {MAX_INFLIGHT}" in error.value.details()


def test_async_localize_keeps_a_window_under_the_inflight_limit(limited_server, many_videos):
    async def run():
        async with AsyncLocalizationClient(limited_server.address, timeout=120) as client:
            return [r async for r in client.localize(iter(many_videos), window=WINDOW)]

    responses = asyncio.run(run())
    assert sorted(r.video_id for r in responses) == sorted(v.id for v in many_videos)


def test_localize_reads_its_input_lazily(limited_server, many_videos):
    """Videos are taken from the input only as the window frees: after the first answer
    the client has read at most the window and the one it is sending."""
    taken = 0

    def videos():
        nonlocal taken
        for video in many_videos:
            taken += 1
            yield video

    with LocalizationClient(limited_server.address, timeout=120) as client:
        responses = client.localize(videos(), window=4)
        next(responses)
        assert taken <= 4 + 1
        assert len(list(responses)) == len(many_videos) - 1


def test_window_must_allow_a_video(limited_server):
    with LocalizationClient(limited_server.address) as client, \
            pytest.raises(ValueError, match="window=0"):
        list(client.localize([Video("w", frames(5))], window=0))


# --- the asyncio client's inputs ---------------------------------------------------------


def test_async_client_takes_globs(limited_server, tiny_dataset):
    glob = split(tiny_dataset, "test")
    ids = [video.id for video in read_videos(glob)]

    async def run():
        async with AsyncLocalizationClient(limited_server.address, timeout=120) as client:
            # windows under the server's small in-flight limit (the defaults are above it)
            responses = [r async for r in client.localize(glob, window=WINDOW)]
            acks = await client.ingest(glob, window=WINDOW)
            return responses, acks

    responses, acks = asyncio.run(run())
    assert sorted(r.video_id for r in responses) == sorted(ids)
    assert [ack.video_id for ack in acks] == ids  # ingested in file order


@pytest.mark.parametrize("flavor", ["blocking", "asyncio"])
def test_unreadable_input_raises_its_own_error(flavor, limited_server, tmp_path):
    """An error reading the videos reaches the caller as itself, not as the bare status
    gRPC makes of it (which ingest would retry)."""
    missing = str(tmp_path / "missing" / "*.tfrecord")
    with pytest.raises(FileNotFoundError, match="no TFRecord file matches"):
        if flavor == "blocking":
            with LocalizationClient(limited_server.address, timeout=30) as client:
                client.ingest(missing)
        else:
            async def run():
                async with AsyncLocalizationClient(limited_server.address, timeout=30) as client:
                    await client.ingest(missing)

            asyncio.run(run())
    with pytest.raises(FileNotFoundError, match="no TFRecord file matches"):
        if flavor == "blocking":
            with LocalizationClient(limited_server.address, timeout=30) as client:
                list(client.localize(missing))
        else:
            async def run():
                async with AsyncLocalizationClient(limited_server.address, timeout=30) as client:
                    return [r async for r in client.localize(missing)]

            asyncio.run(run())


# --- the ingest retry when the server is gone for good ----------------------------------


@pytest.mark.parametrize("flavor", ["blocking", "asyncio"])
def test_ingest_gives_up_when_the_server_does_not_come_back(flavor, tiny_artifacts, tmp_path):
    """The only server stops (SIGTERM) halfway through an ingest and never returns: the
    client's retry waits reconnect_timeout for it, then raises the status that broke the
    stream (the drain's grace ran out before the ingest ended)."""
    reconnect_timeout = 2.0
    server = ServerProcess.start(tiny_artifacts, "--state-dir", str(tmp_path / "state"),
                                 "--grace", "1")
    stopped_at = []

    def stop():
        assert server.stop() == 0, server.log()
        stopped_at.append(True)

    stopper = threading.Thread(target=stop)

    def videos():
        for index in range(200):
            if index == 20:
                stopper.start()  # in the background: the client must see the stream break
            if index > 20:
                time.sleep(0.02)  # the ingest outlasts the drain's grace
            yield Video(f"g{index}", frames(5, seed=index))

    try:
        with pytest.raises(grpc.RpcError) as error:
            # the call deadline is far above what the retry may take: reaching it is a failure
            if flavor == "blocking":
                with LocalizationClient(server.address, timeout=60) as client:
                    client.ingest(videos(), window=4, reconnect_timeout=reconnect_timeout)
            else:
                async def run():
                    async with AsyncLocalizationClient(server.address, timeout=60) as client:
                        await client.ingest(videos(), window=4, reconnect_timeout=reconnect_timeout)

                asyncio.run(run())
    finally:
        stopper.join()
        if server.process.poll() is None:
            server.kill()
    # the status that broke the stream, not the 60 s call deadline's DEADLINE_EXCEEDED: the
    # client gave up after its reconnect wait instead of waiting for a server that never
    # came back. How the break shows is a race: usually UNAVAILABLE, and INTERNAL ("Failed
    # execute_batch") when grpc.aio was sending into the stream as it closed; both retryable.
    assert retryable(error.value), error.value
    assert stopped_at, "the server did not stop"


# --- the client verb, piped as a script runs it ------------------------------------------


def client_verb(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modloc", "client", *argv], capture_output=True,
                          text=True, timeout=120)


def test_client_verb_answers_a_script_in_one_line_each(limited_server, tiny_dataset, tmp_path):
    """A truncated file: the videos before it are ingested, then one error line (no gRPC
    traceback); stats as JSON numbers; an empty class said on stderr."""
    from modloc.engine.base.io.tfrecord import iter_records
    from modloc.engine.base.vocab import default_segment_class_ids

    source = sorted(Path(tiny_dataset, "test").glob("*.tfrecord"))[0]
    records = list(iter_records(source))
    truncated = tmp_path / "truncated.tfrecord"
    truncated.write_bytes(source.read_bytes()[: records[3].offset + 40])
    done = client_verb("ingest", limited_server.address, "--data", str(truncated), "--timeout", "60")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    *progress, error = done.stderr.strip().splitlines()
    assert error.startswith("modloc client: error: ") and f"{truncated}: record 3 at byte offset " \
        f"{records[3].offset}: truncated record" in error
    assert all(" ingest: " in line for line in progress)  # the progress lines, nothing else
    assert "ingest: 3 video, " in progress[-1] and progress[-1].endswith("stopped")

    done = client_verb("stats", limited_server.address)
    stats = json.loads(done.stdout)
    assert stats["videosIngested"] >= 3 and isinstance(stats["videosIngested"], int)
    assert all(isinstance(value, int) for value in stats["batchSizes"].values())

    ranked = set(synth_manifest(tiny_dataset)["segment_class_ids"])
    empty = next(int(c) for c in default_segment_class_ids() if int(c) not in ranked)
    done = client_verb("top", limited_server.address, str(empty), "--k", "5")
    assert done.returncode == 0 and done.stdout == ""
    assert done.stderr.strip() == (f"class {empty} has no ranked segment from rank 0 on (nothing "
                                   "ingested for it yet)")


class _Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code, details, again", [
    (grpc.StatusCode.UNAVAILABLE, "Socket closed", True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "64 videos in flight", True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Sent message larger than max (5 vs. 4)", False),
    (grpc.StatusCode.INTERNAL, "Failed execute_batch: SendMessageOperation", True),  # grpc.aio's
    (grpc.StatusCode.INTERNAL, "model 'distill-fp32' failed", False),  # the server's fault
    (grpc.StatusCode.INVALID_ARGUMENT, "video 'a': frames", False),
    (grpc.StatusCode.UNKNOWN, "Exception iterating requests!", False),
    (grpc.StatusCode.CANCELLED, "Locally cancelled by application!", False),
])
def test_what_the_client_tries_again(code, details, again):
    assert retryable(_Failure(code, details)) is again
