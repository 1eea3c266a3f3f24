"""Rankings in Redis, and a fleet of ``modloc serve`` replicas over them: real
``redis-server`` processes on loopback (a server, a 3-master cluster with a replica each),
real servers, real failures (SIGKILL of a master, Redis gone)."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from tiny import split

from modloc.engine._proto.modloc.v1 import localization_pb2 as pb
from modloc.engine._proto.modloc.v1 import localization_pb2_grpc as pb_grpc
from modloc.engine.base.io.examples import Video
from modloc.engine.base.io.readers import read_videos
from modloc.engine.runtime.infer import infer
from modloc.engine.runtime.ranking_stores import (
    NativeStore,
    RedisSettings,
    StoreUnavailable,
    VideoPairs,
)
from modloc.engine.runtime.rankings import Rankings
from modloc.engine.runtime.redis_rankings import RedisStore, decode_member, encode_member
from modloc.engine.service.app import INGEST_HEALTH
from modloc.engine.service.client import LocalizationClient, video_chunks
from modloc.engine.service.process import ServerProcess
from modloc.engine.service.redis_process import RedisCluster, RedisServer, free_port

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
CLASSES = [3, 4, 5, 7, 11, 12, 13, 20]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with RedisServer.start(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """3 masters, a replica each; shared by the tests that do not break it."""
    with RedisCluster.start(tmp_path_factory.mktemp("cluster"), masters=3, replicas=1) as cluster:
        yield cluster


@pytest.fixture(params=["server", "cluster"])
def redis_url(request) -> str:
    return request.getfixturevalue("redis_server" if request.param == "server" else "cluster").url


_prefixes = iter(f"t{n}" for n in range(1_000_000))


def settings(url: str, **fields) -> RedisSettings:
    """Settings over fresh keys (a new prefix per call)."""
    return RedisSettings(url, prefix=next(_prefixes), **fields)


def stream(count: int, seed: int = 0) -> list[VideoPairs]:
    """Videos whose scores tie a lot (quarters, zeros included), with ids that are prefixes of
    each other and non-ASCII, default and explicit (negative too) orders, and repeats."""
    rng = np.random.default_rng(seed)
    grid = np.array([(c, s) for c in [*CLASSES, 99] for s in range(0, 100, 5)])  # 99: not ranked
    names = ["ab", "ab0", "abc", "a", "bé", "b"]
    videos = []
    for i in range(count):
        pick = grid[rng.choice(len(grid), 40, replace=False)]
        video_id = "ab" if i % 9 == 0 else f"{names[i % len(names)]}{i // len(names)}"
        order = int(rng.integers(-5, 5)) if i % 4 == 0 else None
        videos.append(VideoPairs(video_id, pick[:, 1], pick[:, 0], rng.integers(0, 5, 40) / 4.0, order))
    return videos


def test_members_sort_as_the_native_tie_rule():
    keys = [(-(1 << 63), "b", 0), (-1, "zz", 0), (0, "a", 5), (0, "a", 10), (0, "a0", 0),
            (0, "ab", 0), (0, "é", 0), (1, "", 0), ((1 << 63) - 1, "a", (1 << 31) - 1)]
    members = [encode_member(order, video_id.encode(), start) for order, video_id, start in keys]
    assert sorted(members) == members  # byte order = (order, id bytes, start) order
    assert [decode_member(m) for m in members] == keys


def test_redis_ranks_exactly_as_the_native_accumulator(redis_url, tmp_path):
    """Two replicas' stores adding alternate groups of one stream into one Redis (a server,
    or a cluster's three shards) rank exactly as the durable native store that saw the
    stream alone: same orders, same duplicates, same rows, pages and CSV; and the cached
    thresholds kept most pairs from ever reaching Redis."""
    videos = stream(120)
    native = Rankings(CLASSES, k=6, directory=tmp_path / "native")
    shared = settings(redis_url, threshold_refresh_seconds=0.01)
    replicas = [Rankings(CLASSES, k=6, redis=shared), Rankings(CLASSES, k=6, redis=shared)]
    expected, got = [], []
    for number, begin in enumerate(range(0, len(videos), 8)):
        group = videos[begin: begin + 8]
        expected += native.store.add_videos(group)
        got += replicas[number % 2].store.add_videos(group)
    assert got == expected and None in got
    for replica in replicas:
        assert replica.rows() == native.rows()
        assert replica.submission_csv() == native.submission_csv()
        for class_id in CLASSES:
            assert replica.ranking(class_id, 2, 3) == native.ranking(class_id, 2, 3)
            assert replica.ranking(class_id) == native.ranking(class_id)
        assert replica.videos == native.videos == len({v.video_id for v in videos})
    sent = [replica.stats() for replica in replicas]
    assert all(stats.rejected > 0 for stats in sent)
    assert sum(s.accepted for s in sent) < native.stats().accepted
    everything = Rankings(CLASSES, k=6, redis=settings(redis_url, filter_pairs=False))
    everything.store.add_videos(videos)  # the baseline bench_fleet measures: the same rows
    assert everything.rows() == native.rows() and everything.stats().rejected == 0
    native.close()


def test_classes_spread_over_the_cluster_shards(cluster):
    store = RedisStore(settings(cluster.url), CLASSES, 6)
    masters = {cluster.master_of(key).port for key in store._keys}
    assert len(masters) == 3  # a class's set lives on one shard; the classes on all three
    store.close()


def test_resending_changes_nothing(redis_server):
    store = RedisStore(settings(redis_server.url), CLASSES, 6)
    videos = stream(20, seed=1)
    first = store.add_videos(videos)
    rows, stats = store.rows(), store.stats()
    assert store.add_videos(videos) == [None] * len(videos)  # all DUPLICATE
    assert store.rows() == rows and store.stats().kept == stats.kept
    # a repeat inside one group is its first copy's duplicate
    new = [VideoPairs(f"new{i}", np.array([0]), np.array([3]), np.array([0.9])) for i in range(2)]
    registered = len(first) - first.count(None)
    assert store.add_videos([new[0], new[0], new[1]]) == [registered, None, registered + 1]
    store.close()


def test_bad_input_is_refused_before_any_write(redis_server):
    url = settings(redis_server.url)
    store = RedisStore(url, CLASSES, 6)
    good = VideoPairs("ok", np.array([0]), np.array([3]), np.array([0.5]))
    for bad, message in [
        (VideoPairs("nan", np.array([0, 5]), np.array([3, 3]), np.array([0.5, np.nan])), "a score is NaN"),
        (VideoPairs("twice", np.array([5, 5]), np.array([3, 3]), np.array([0.5, 0.6])), "given twice"),
        (VideoPairs("far", np.array([1 << 31]), np.array([3]), np.array([0.5])), r"outside \[0, 2\^31\)"),
        (VideoPairs("nu\0l", np.array([0]), np.array([3]), np.array([0.5])), "NUL"),
        (VideoPairs("short", np.array([0, 5]), np.array([3]), np.array([0.5])), "differ in length"),
    ]:
        with pytest.raises(ValueError, match=message):
            store.add_videos([good, bad])
    assert store.videos == 0 and not store.contains("ok")
    assert store.add_videos([good]) == [0]
    # rankings of another k (or other classes) under the same keys are refused
    with pytest.raises(ValueError, match=r"hold k='6', not the '7'"):
        RedisStore(url, CLASSES, 7).add_videos([good])
    with pytest.raises(ValueError, match="class_ids="):
        RedisStore(url, CLASSES[:-1], 6).contains("ok")
    store.close()


def test_unreachable_redis_is_unavailable_not_an_error():
    store = RedisStore(RedisSettings(f"redis://127.0.0.1:{free_port()}", socket_timeout=1), CLASSES, 6)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="cannot be reached: ConnectionError"):
        store.add_videos(stream(1))
    with pytest.raises(StoreUnavailable):
        store.ping()
    assert time.monotonic() - started < 10
    store.close()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="url: 'http://x' is not redis://"):
        RedisSettings("http://x")
    with pytest.raises(ValueError, match="wait_replicas: -1 is not an integer"):
        RedisSettings("redis://x:1", wait_replicas=-1)
    with pytest.raises(ValueError, match="prefix: 'a{b}' must be printable"):
        RedisSettings("redis://x:1", prefix="a{b}")
    with pytest.raises(ValueError, match="in a directory or in Redis, not both"):
        Rankings(CLASSES, 6, directory="x", redis=RedisSettings("redis://x:1"))


# --- a fleet of servers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_videos(tiny_dataset) -> list[Video]:
    return list(read_videos(split(tiny_dataset, "test")))


@pytest.fixture(scope="module")
def expected_csv(tiny_artifacts, tiny_dataset, tmp_path_factory) -> bytes:
    """Single-node ``modloc infer`` over the test split."""
    out = tmp_path_factory.mktemp("infer") / "submission.csv"
    infer(tiny_artifacts, split(tiny_dataset, "test"), out, progress=False)
    return out.read_bytes()


def replica(artifacts, url: str, *args: str) -> ServerProcess:
    return ServerProcess.start(artifacts, "--rankings", url, *args)


def test_two_replicas_over_a_cluster_give_the_single_node_submission(
        cluster, tiny_artifacts, test_videos, expected_csv):
    """Replica A ingests the first half of the test split, replica B the second half and
    (re-sent) the last quarter of A's: B reports those DUPLICATE, and both serve the
    Submission of single-node ``modloc infer``, byte for byte, and the same rankings."""
    prefix = next(_prefixes)
    servers = [replica(tiny_artifacts, cluster.url, "--redis-prefix", prefix, "--redis-wait-replicas", "1")
               for _ in range(2)]
    try:
        half = len(test_videos) // 2
        with LocalizationClient(servers[0].address, timeout=60) as a, \
                LocalizationClient(servers[1].address, timeout=60) as b:
            first = a.ingest(test_videos[:half])
            second = b.ingest(test_videos[half - half // 2:])
            assert [ack.sequence for ack in first] == list(range(1, half + 1))
            assert [ack.status for ack in second[:half // 2]] == [pb.IngestAck.DUPLICATE] * (half // 2)
            assert [ack.sequence for ack in second[half // 2:]] == list(range(half + 1, len(test_videos) + 1))
            for client in (a, b):
                assert client.submission() == expected_csv
                assert client.stats().ranked_videos == len(test_videos)
            class_id = int(expected_csv.decode().splitlines()[1].split(",")[0])
            assert [(s.video_id, s.start_seconds, s.score) for s in a.top_segments(class_id, 5)] == \
                [(s.video_id, s.start_seconds, s.score) for s in b.top_segments(class_id, 5)]
        for server in servers:
            assert server.health(INGEST_HEALTH) == SERVING
    finally:
        for server in servers:
            assert server.stop() == 0, server.log()


def test_processes_sharing_a_port_are_replicas_of_the_fleet(redis_server, tiny_artifacts, test_videos,
                                                            expected_csv):
    """``--processes 2`` with rankings in Redis: both processes ingest and read the same
    rankings (seen through channels that the kernel gave to each of them)."""
    server = replica(tiny_artifacts, redis_server.url, "--redis-prefix", next(_prefixes), "--processes", "2",
                     "--address", f"127.0.0.1:{free_port()}")
    try:
        with LocalizationClient(server.address, timeout=60) as client:
            client.ingest(test_videos)
        answered = {}
        for _ in range(40):  # each new channel is a new connection, spread over the processes
            with LocalizationClient(server.address, timeout=60) as client:
                answered.setdefault(client.stats().process_id, client.submission())
            if len(answered) == 2:
                break
        assert len(answered) == 2 and set(answered.values()) == {expected_csv}
    finally:
        assert server.stop() == 0, server.log()


def test_a_master_killed_mid_ingest_loses_nothing_acknowledged(
        tiny_artifacts, tmp_path, test_videos, expected_csv):
    """SIGKILL of the master holding the ingested-video registry halfway through an ingest
    (appendfsync always, WAIT 1): its replica is promoted, the killed node restarts and
    rejoins as the new master's replica, the client re-sends what was not acknowledged, and
    the rankings end equal to single-node ``modloc infer`` (a lost acknowledged video would
    never be re-sent, and the CSV would differ)."""
    with RedisCluster.start(tmp_path / "cluster", masters=3, replicas=1) as cluster:
        server = replica(tiny_artifacts, cluster.url, "--redis-wait-replicas", "1")
        victim = cluster.master_of(b"modloc:{videos}:done")

        def fail_over():
            victim.kill()
            cluster.wait_promoted(victim)
            victim.restart()  # it comes back as the replica of the promoted one
            cluster.wait_ok()

        killer = threading.Thread(target=fail_over)

        def videos():
            for index, video in enumerate(test_videos):
                if index == len(test_videos) // 2:
                    killer.start()
                yield video

        try:
            with LocalizationClient(server.address, timeout=60) as client:
                acks = client.ingest(videos(), window=4)
                killer.join()
                assert sorted(a.video_id for a in acks) == sorted(v.id for v in test_videos)
                assert client.submission() == expected_csv
                assert client.stats().ranked_videos == len(test_videos)
            assert cluster.topology()[victim.port] == "slave"  # failed over, then rejoined
            assert "event=rankings_unavailable" in server.log()  # the kill was seen mid-ingest
        finally:
            if killer.is_alive():
                killer.join()
            assert server.stop() == 0, server.log()


def test_redis_unreachable_stops_ingestion_not_localize(tiny_artifacts, tmp_path, test_videos):
    """Redis gone: Ingest and the rankings' reads answer UNAVAILABLE and the ingestion
    health entry turns NOT_SERVING, while Localize and the overall health go on; Redis back
    (restarted on its AOF): ingestion resumes by itself, nothing acknowledged lost."""
    redis_server = RedisServer.start(tmp_path / "redis")
    server = replica(tiny_artifacts, redis_server.url)
    try:
        with LocalizationClient(server.address, timeout=60) as client:
            client.ingest(test_videos[:4])
            assert server.health(INGEST_HEALTH) == SERVING
            redis_server.kill()
            stub = pb_grpc.LocalizationStub(client.channel)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Ingest(iter([pb.IngestRequest(video=video_chunks(test_videos[4])[0])]), timeout=30))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "cannot be reached" in refused.value.details()
            deadline = time.monotonic() + 10
            while server.health(INGEST_HEALTH) != NOT_SERVING and time.monotonic() < deadline:
                time.sleep(0.1)
            assert server.health(INGEST_HEALTH) == NOT_SERVING
            assert server.health("") == SERVING
            assert [r.video_id for r in client.localize(test_videos[:2])] != []
            with pytest.raises(grpc.RpcError) as reading:
                client.top_segments(3, 1)
            assert reading.value.code() == grpc.StatusCode.UNAVAILABLE
            redis_server.restart()
            deadline = time.monotonic() + 10
            while server.health(INGEST_HEALTH) != SERVING and time.monotonic() < deadline:
                time.sleep(0.1)
            assert server.health(INGEST_HEALTH) == SERVING
            acks = client.ingest(test_videos[:6])
            assert [a.status for a in acks] == [pb.IngestAck.DUPLICATE] * 4 + [pb.IngestAck.INGESTED] * 2
            assert client.stats().ranked_videos == 6
    finally:
        assert server.stop() == 0, server.log()
        redis_server.stop()


def test_the_embedded_default_needs_no_redis(tmp_path):
    rankings = Rankings(CLASSES, k=6, directory=tmp_path)
    assert isinstance(rankings.store, NativeStore) and not rankings.shared and rankings.snapshots
    rankings.close()
