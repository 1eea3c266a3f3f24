"""The native per-class top-K accumulator: exactness against a brute-force sort, merging,
threads, snapshots, and the durable directory (insert log, crash recovery, SIGKILL).

Streams are tiny and quantized (many exact ties); a small ``slack`` makes the buffers cut
back to ``k`` often, so the threshold path runs on every test.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from modloc.engine.base.io.tfrecord import CorruptRecordError, encode_record, iter_buffer_records
from modloc.engine.base.metrics import SegmentTruth, rank_segments, segment_map
from modloc.engine.runtime.fusion import dummy_pairs
from modloc.engine.runtime.topk import DurableTopK, TopK, TopKFormatError, default_slack

CLASSES = [3, 7, 11, 42]
K = 6


def _video(index: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """A deterministic video: id, starts, class ids and quantized scores (ties, zeros,
    negatives, a class outside CLASSES)."""
    rng = np.random.default_rng(index)
    windows = int(rng.integers(1, 6))
    classes = rng.choice([3, 7, 11, 42, 99], size=3, replace=False)
    starts = np.repeat(np.arange(windows) * 5, len(classes))
    scores = rng.integers(-1, 5, len(starts)) / 4
    video_id = f"vidéo-{index}" if index % 3 else f"v{index}"
    return video_id, starts, np.tile(classes, windows), scores


def _fed(indices, k: int = K, slack: int | None = 1) -> TopK:
    """An accumulator fed the videos ``indices`` in order, one add each."""
    topk = TopK(CLASSES, k, slack)
    for index in indices:
        topk.add(*_video(index))
    return topk


def _brute(stream, class_ids, k: int) -> tuple[dict[int, list[str]], dict[int, list[float]]]:
    """Rankings by one lexsort on the full key (score desc, order, video id, start) over
    every pair.

    ``stream``: ``(video id, order, starts, class ids, scores)`` calls; a video's order is
    that of its first call.
    """
    orders: dict[str, int] = {}
    columns = {"video": [], "order": [], "start": [], "class": [], "score": []}
    for video_id, order, starts, classes, scores in stream:
        orders.setdefault(video_id, len(orders) if order is None else order)
        columns["video"] += [video_id] * len(starts)
        columns["order"] += [orders[video_id]] * len(starts)
        columns["start"] += list(starts)
        columns["class"] += list(classes)
        columns["score"] += list(scores)
    video, order, start, klass, score = (np.array(columns[name]) for name in columns)
    rankings, values = {}, {}
    for class_id in class_ids:
        rows = np.flatnonzero((klass == class_id) & (score > 0))
        best = rows[np.lexsort((start[rows], video[rows], order[rows], -score[rows]))][:k]
        rankings[class_id] = [f"{video[i]}:{start[i]}" for i in best]
        values[class_id] = score[best].tolist()
    return rankings, values


def _random_stream(rng, videos: int, orders: bool):
    """Calls ``(video id, order, starts, class ids, scores)``: some videos in two calls
    (the second with a different order, which must be ignored, and which may be another
    video's: equal orders rank by id), quantized scores."""
    permutation = rng.permutation(videos * 10)[:videos]
    calls = []
    for index in range(videos):
        video_id, starts, classes, scores = _video(int(rng.integers(1 << 30)))
        video_id = f"{video_id}#{index}"
        order = int(permutation[index]) - videos * 5 if orders else None
        split = int(rng.integers(0, len(starts) + 1)) if rng.random() < 0.3 else len(starts)
        calls.append((video_id, order, starts[:split], classes[:split], scores[:split]))
        if split < len(starts):
            later = None if order is None else order + 1
            calls.append((video_id, later, starts[split:], classes[split:], scores[split:]))
    tail = calls[len(calls) // 2:]
    rng.shuffle(tail)  # a video's second call may come much later (or first)
    return calls[: len(calls) // 2] + tail


# --- the SegmentRanker's tests, adapted ---------------------------------------------


def test_dummy_prediction_ranks_with_ties_in_video_then_window_order():
    topk = TopK([3, 8], k=4)
    topk.add("b", *dummy_pairs(10, [3], [0.5]))
    topk.add("a", *dummy_pairs(12, [3, 8], [0.9, 0.0]))  # a 0.0 score is not ranked
    topk.add("c", *dummy_pairs(5, [3, 4], [0.5, 1.0]))  # 4 is not a ranked class
    # ties keep the video order (b before c), then the window order
    assert topk.rankings() == {3: ["a:0", "a:5", "b:0", "b:5"], 8: []}
    truth = SegmentTruth(["a", "b", "b", "c"], [5, 0, 5, 0], [3, 3, 3, 3], [1, 0, 1, 1])
    # relevant ranks (rated only): a:5 ✓, b:0 ✗, b:5 ✓ → (1/1 + 2/3) / 3 positives
    assert segment_map(topk.rankings(), truth).map == pytest.approx((1 + 2 / 3) / 3)


@pytest.mark.parametrize("slack", [1, None])
def test_matches_rank_segments(slack):
    rng = np.random.default_rng(0)
    videos = [f"v{i}" for i in range(30)]
    scores = rng.random((30 * 4, 3)).round(2)  # rounded: plenty of ties
    ids = [f"{video}:{5 * window}" for video in videos for window in range(4)]
    topk = TopK([7, 8, 9], k=25, slack=slack)
    for index, video in enumerate(videos):
        own = scores[4 * index : 4 * index + 4]
        topk.add(video, np.repeat([0, 5, 10, 15], 3), np.tile([7, 8, 9], 4), own.ravel())
    assert topk.rankings() == rank_segments(ids, scores, [7, 8, 9], k=25)


# --- exactness ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k,slack", [(1, 1), (1, None), (3, 2), (8, 1), (40, 5), (10_000, None)])
def test_rankings_equal_a_brute_force_sort(seed, k, slack):
    rng = np.random.default_rng(seed)
    stream = _random_stream(rng, videos=60, orders=bool(seed % 2))
    topk = TopK(CLASSES, k, slack)
    for video_id, order, starts, classes, scores in stream:
        topk.add(video_id, starts, classes, scores, order=order)
    expected, values = _brute(stream, CLASSES, k)
    assert topk.rankings() == expected
    for class_id in CLASSES:
        entries = topk.ranking(class_id)
        assert [f"{v}:{s}" for v, s, _ in entries] == expected[class_id]
        assert [score for _, _, score in entries] == values[class_id]
    stats = topk.stats()
    assert stats.kept == sum(map(len, expected.values())) and stats.videos == len({c[0] for c in stream})
    assert stats.pairs == stats.accepted + stats.rejected + stats.dropped == sum(len(c[2]) for c in stream)
    assert stats.buffered <= len(CLASSES) * (k + topk.slack)


@pytest.mark.parametrize("scores", ["constant", "log-uniform", "with infinity"])
def test_rankings_equal_a_brute_force_sort_for_extreme_scores(scores):
    # the cuts bucket scores linearly between the threshold and the highest score: one
    # value, 600 orders of magnitude, or an infinite score must not break them
    rng = np.random.default_rng(7)
    stream = []
    for index, (video_id, starts, classes, _) in enumerate(_video(i) for i in range(150)):
        if scores == "constant":
            values = np.full(len(starts), 0.5)
        else:
            values = 10.0 ** rng.uniform(-300, 300, len(starts))
            if scores == "with infinity":
                values[rng.random(len(starts)) < 0.1] = np.inf
        stream.append((video_id, index, starts, classes, values))
    for k, slack in [(1, 1), (5, 1), (20, 3)]:
        topk = TopK(CLASSES, k, slack)
        for video_id, order, starts, classes, values in stream:
            topk.add(video_id, starts, classes, values, order=order)
        assert topk.rankings() == _brute(stream, CLASSES, k)[0]


def test_vectorized_insert_equals_adds_and_pages_a_ranking():
    rng = np.random.default_rng(5)
    stream = _random_stream(rng, videos=80, orders=True)
    one_by_one = TopK(CLASSES, 7, slack=2)
    batched = TopK(CLASSES, 7, slack=2)
    for video_id, order, starts, classes, scores in stream:
        one_by_one.add(video_id, starts, classes, scores, order=order)
    indices = [batched.add_video(video_id, order) for video_id, order, *_ in stream]
    assert batched.add_video(stream[0][0], order=-(1 << 62)) == indices[0]  # known: order kept
    batched.insert(np.repeat(indices, [len(c[2]) for c in stream]), np.concatenate([c[2] for c in stream]),
                   np.concatenate([c[3] for c in stream]), np.concatenate([c[4] for c in stream]))
    assert batched.rankings() == one_by_one.rankings()
    whole = batched.ranking(7)
    assert batched.ranking(7, limit=3, offset=2) == whole[2:5]
    assert batched.ranking(7, offset=100) == [] and batched.ranking(7, limit=0) == []


def test_bad_input_is_refused_and_inserts_nothing():
    topk = TopK([3, 7], k=2)
    with pytest.raises(ValueError, match="video 'nan-video': a score is NaN"):
        topk.add("nan-video", [0, 5], [3, 3], [0.5, float("nan")])
    with pytest.raises(ValueError, match="differ in length"):
        topk.add("short", [0, 5], [3], [0.5, 0.5])
    with pytest.raises(ValueError, match="window start -5"):
        topk.add("negative", [-5], [3], [0.5])
    assert not topk.contains("nan-video") and topk.stats().pairs == 0
    index = topk.add_video("v")
    with pytest.raises(ValueError, match="video index 9, but 1 videos are registered"):
        topk.insert([index, 9], [0, 0], [3, 3], [0.5, 0.5])
    with pytest.raises(ValueError, match="video 'v': a score is NaN"):
        topk.insert([index, index], [0, 5], [3, 3], [0.5, float("nan")])
    assert topk.rankings() == {3: [], 7: []}
    with pytest.raises(KeyError, match="class 99 is not one of the 2 classes"):
        topk.ranking(99)
    with pytest.raises(ValueError, match="k must be >= 1"):
        TopK([3], k=0)
    with pytest.raises(ValueError, match="repeated"):
        TopK([3, 3])


# --- merging --------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [2, 3])
def test_merged_shards_equal_one_accumulator(shards):
    rng = np.random.default_rng(shards)
    videos = list(range(120))
    single = TopK(CLASSES, K, slack=2)
    parts = [TopK(CLASSES, K, slack=1 + shard) for shard in range(shards)]
    for order, index in enumerate(videos):
        single.add(*_video(index), order=order)
        parts[int(rng.integers(shards))].add(*_video(index), order=order)  # a global order
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    assert merged.rankings() == single.rankings()
    assert [merged.ranking(c) for c in CLASSES] == [single.ranking(c) for c in CLASSES]
    assert merged.stats().pairs == single.stats().pairs and merged.stats().videos == len(videos)


def test_merge_keeps_the_smaller_order_of_a_shared_video():
    first, second = TopK([3], k=3), TopK([3], k=3)
    first.add("y", [0], [3], [0.5], order=2)
    first.add("x", [0], [3], [0.5], order=5)
    second.add("x", [5], [3], [0.5], order=1)
    first.merge(second)
    assert first.rankings() == {3: ["x:0", "x:5", "y:0"]}


def test_merge_with_lowered_orders_then_more_inserts_stays_exact():
    # shared videos get the smaller order, which reorders the other side's kept entries;
    # continuous scores (no ties at a threshold), so the union's top k is exact
    rng = np.random.default_rng(11)
    first, second = TopK(CLASSES, 5, slack=1), TopK(CLASSES, 5, slack=1)
    stream = []
    for index in range(80):
        video_id, starts, classes, _ = _video(index)
        scores = rng.random(len(starts))
        shard = first if index % 2 else second
        order = 1000 - index if shard is first else index  # first: reversed orders
        shard.add(video_id, starts, classes, scores, order=order)
        stream.append((video_id, order, starts, classes, scores))
        if index % 5 == 0:  # the same id in the other shard too, ordered there by index
            other = second if shard is first else first
            more = rng.random(len(starts))
            other.add(video_id, starts + 1000, classes, more, order=index)
            stream.append((video_id, index, starts + 1000, classes, more))
    first.merge(second)
    lowest = {}
    for video_id, order, *_ in stream:
        lowest[video_id] = min(order, lowest.get(video_id, order))
    stream = [(v, lowest[v], *rest) for v, _, *rest in stream]
    assert first.rankings() == _brute(stream, CLASSES, 5)[0]
    for index in range(80, 120):  # cuts after the merge reset the thresholds
        video_id, starts, classes, _ = _video(index)
        scores = rng.random(len(starts))
        first.add(video_id, starts, classes, scores, order=index)
        stream.append((video_id, index, starts, classes, scores))
    assert first.rankings() == _brute(stream, CLASSES, 5)[0]


def test_merge_refuses_other_classes_k_or_itself():
    topk = TopK([3, 7], k=4)
    with pytest.raises(ValueError, match="different class ids"):
        topk.merge(TopK([7, 3], k=4))
    with pytest.raises(ValueError, match="k=5 into one of k=4"):
        topk.merge(TopK([3, 7], k=5))
    with pytest.raises(ValueError, match="into itself"):
        topk.merge(topk)


# --- threads --------------------------------------------------------------------------


def test_four_threads_inserting_equal_one():
    # videos of 600 pairs, so that the threads overlap inside the native insert
    rng = np.random.default_rng(1)
    videos = [(f"t{i}", np.repeat(np.arange(120) * 5, 5), rng.choice([3, 7, 11, 42, 99], 600),
               rng.integers(-1, 20, 600) / 8) for i in range(160)]
    sequential = TopK(CLASSES, 50, slack=8)
    for order, video in enumerate(videos):
        sequential.add(*video, order=order)
    shared = TopK(CLASSES, 50, slack=8)
    barrier = threading.Barrier(4)

    def work(part: int) -> None:
        barrier.wait()
        for order in range(part, len(videos), 4):
            video_id, starts, classes, scores = videos[order]
            if order % 8 < 4:
                shared.add(video_id, starts, classes, scores, order=order)
            else:
                index = shared.add_video(video_id, order)
                shared.insert(np.full(len(starts), index), starts, classes, scores)

    threads = [threading.Thread(target=work, args=(part,)) for part in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert shared.rankings() == sequential.rankings()
    assert [shared.ranking(c) for c in CLASSES] == [sequential.ranking(c) for c in CLASSES]
    assert shared.stats().pairs == sequential.stats().pairs
    assert shared.stats().dropped == sequential.stats().dropped


# --- snapshots ------------------------------------------------------------------------


def test_snapshot_round_trip_and_restore_mid_stream(tmp_path):
    uninterrupted = _fed(range(90))
    before = _fed(range(40))
    path = tmp_path / "state.topk"
    before.save(path)
    restored = TopK.load(path)
    assert restored.rankings() == before.rankings() and restored.stats() == before.stats()
    assert (restored.k, restored.slack, restored.class_ids.tolist()) == (K, 1, CLASSES)
    assert restored.to_bytes() == before.to_bytes()
    for index in range(40, 90):  # default orders continue from the restored video count
        restored.add(*_video(index))
    assert restored.rankings() == uninterrupted.rankings()
    assert TopK.from_bytes(uninterrupted.to_bytes(), slack=64).slack == 64


def _with_header(data: bytes, edit) -> bytes:
    """``data`` with its snapshot header record's payload replaced by ``edit(payload)``."""
    payloads = [record.payload for record in iter_buffer_records(data)]
    payloads[0] = edit(payloads[0])
    return b"".join(encode_record(payload) for payload in payloads)


def test_damaged_snapshots_are_refused_naming_the_file(tmp_path):
    data = _fed(range(30)).to_bytes()
    cases = {
        "flipped": (data[:60] + bytes([data[60] ^ 1]) + data[61:], "CRC mismatch"),
        "truncated": (data[:-7], "truncated record"),
        "record missing": (b"".join(encode_record(r.payload) for r in list(iter_buffer_records(data))[:-1]),
                           "5 records, the header announces 6"),
        "version": (_with_header(data, lambda p: p[:8] + (2).to_bytes(4, "little") + p[12:]),
                    "format version 2 is not supported"),
        "magic": (_with_header(data, lambda p: b"NOTTOPK!" + p[8:]), "not a top-K snapshot"),
        "not tfrecord": (b'{"json": true}\n' * 4, "not a readable top-K snapshot: record 0"),
        "empty": (b"", "empty file"),
    }
    for name, (damaged, reason) in cases.items():
        path = tmp_path / f"{name}.topk"
        path.write_bytes(damaged)
        with pytest.raises(TopKFormatError, match=reason) as info:
            TopK.load(path)
        assert str(path) in str(info.value), name


# --- durability -----------------------------------------------------------------------


def _crash_image(directory: Path, into: Path) -> Path:
    """The files of an open directory as they are now: what a crash would leave."""
    shutil.copytree(directory, into)
    return into


def _log(directory: Path) -> Path:
    (log,) = directory.glob("log-*.tfrecord")
    return log


def test_durable_add_commit_crash_and_reopen(tmp_path):
    durable = DurableTopK.open(tmp_path / "d", CLASSES, K)
    assert all(durable.add(*_video(index)) for index in range(25))
    durable.commit()
    assert not durable.add(*_video(3))  # idempotent: already ingested
    assert durable.topk.stats().videos == 25
    crashed = _crash_image(tmp_path / "d", tmp_path / "crashed")  # never closed
    with DurableTopK.open(crashed, CLASSES, K) as reopened:
        assert reopened.topk.rankings() == _fed(range(25)).rankings()
        assert reopened.contains(_video(24)[0]) and not reopened.contains("unknown")
        assert not reopened.add(*_video(10))
        assert reopened.add(*_video(25))
    with DurableTopK.open(crashed, CLASSES, K) as again:
        assert again.topk.rankings() == _fed(range(26)).rankings()
    durable.close()
    with pytest.raises(ValueError, match="closed"):
        durable.add(*_video(99))


def test_torn_last_record_is_dropped_with_a_warning(tmp_path, caplog):
    with DurableTopK.open(tmp_path / "d", CLASSES, K) as durable:
        for index in range(12):
            durable.add(*_video(index))
    log = _log(tmp_path / "d")
    os.truncate(log, log.stat().st_size - 5)
    with caplog.at_level(logging.WARNING, logger="modloc.engine.runtime.topk"):
        reopened = DurableTopK.open(tmp_path / "d", CLASSES, K)
    assert "torn by a crash" in caplog.text and str(log) in caplog.text
    assert reopened.topk.rankings() == _fed(range(11)).rankings()
    assert not reopened.contains(_video(11)[0])
    reopened.add(*_video(11))  # appended after the cut-off tail: the log stays well framed
    reopened.close()
    with DurableTopK.open(tmp_path / "d", CLASSES, K) as again:
        assert again.topk.rankings() == _fed(range(12)).rankings()


def test_corrupt_record_in_the_middle_is_an_error(tmp_path):
    with DurableTopK.open(tmp_path / "d", CLASSES, K) as durable:
        for index in range(6):
            durable.add(*_video(index))
    log = _log(tmp_path / "d")
    records = list(iter_buffer_records(log.read_bytes()))
    data = bytearray(log.read_bytes())
    data[records[3].offset + 14] ^= 0xFF  # inside record 3's payload
    log.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match=r"record 3 at byte offset \d+: data CRC mismatch") as info:
        DurableTopK.open(tmp_path / "d", CLASSES, K)
    assert str(log) in str(info.value)


def test_snapshot_then_more_adds_then_reopen(tmp_path):
    directory = tmp_path / "d"
    durable = DurableTopK.open(directory, CLASSES, K)
    for index in range(20):
        durable.add(*_video(index))
    first = durable.snapshot()
    for index in range(20, 30):
        durable.add(*_video(index))
    durable.commit()
    second = durable.snapshot()
    assert not first.exists() and second.exists()
    for index in range(30, 45):
        durable.add(*_video(index))
    durable.commit()
    assert sorted(p.name for p in directory.iterdir()) == ["LOCK", "log-00000002.tfrecord",
                                                          "snapshot-00000002.topk"]
    with DurableTopK.open(_crash_image(directory, tmp_path / "crashed"), CLASSES, K) as reopened:
        assert reopened.topk.rankings() == _fed(range(45)).rankings()
        assert not reopened.add(*_video(5))  # in the snapshot: still idempotent
    durable.close()


def test_a_snapshot_that_cannot_be_written_leaves_the_log_going(tmp_path, monkeypatch):
    import errno

    import modloc.engine.base.atomic

    directory = tmp_path / "d"
    durable = DurableTopK.open(directory, CLASSES, K)
    for index in range(10):
        durable.add(*_video(index))
    durable.commit()
    real_replace = os.replace

    def full_disk(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modloc.engine.base.atomic.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        durable.snapshot()
    monkeypatch.setattr(modloc.engine.base.atomic.os, "replace", real_replace)
    # no half-written file is left, and the log takes more: nothing acknowledged was at risk
    assert sorted(p.name for p in directory.iterdir()) == ["LOCK", "log-00000000.tfrecord"]
    for index in range(10, 15):
        durable.add(*_video(index))
    durable.commit()
    with DurableTopK.open(_crash_image(directory, tmp_path / "crashed"), CLASSES, K) as reopened:
        assert reopened.topk.rankings() == _fed(range(15)).rankings()
    durable.close()


def test_a_snapshot_left_unfinished_by_a_crash_is_discarded(tmp_path, caplog):
    directory = tmp_path / "d"
    with DurableTopK.open(directory, CLASSES, K) as durable:
        for index in range(10):
            durable.add(*_video(index))
    # the crash came after the snapshot's rename, before its data reached the disk
    (directory / "snapshot-00000001.topk").write_bytes(b"\0" * 100)
    with caplog.at_level(logging.WARNING, logger="modloc.engine.runtime.topk"):
        reopened = DurableTopK.open(directory, CLASSES, K)
    assert "unfinished" in caplog.text
    assert reopened.topk.rankings() == _fed(range(10)).rankings()
    reopened.close()
    # ...and one that did reach the disk is used, its log created, the older generation removed
    (directory / "snapshot-00000001.topk").write_bytes(_fed(range(10), slack=None).to_bytes())
    with DurableTopK.open(directory, CLASSES, K) as reopened:
        assert reopened.topk.rankings() == _fed(range(10)).rankings()
    assert sorted(p.name for p in directory.iterdir()) == ["LOCK", "log-00000001.tfrecord",
                                                          "snapshot-00000001.topk"]
    # an unfinished snapshot with nothing earlier to fall back on is an error, not a reset
    (directory / "log-00000001.tfrecord").unlink()
    (directory / "snapshot-00000001.topk").write_bytes(b"\0" * 100)
    with pytest.raises(TopKFormatError, match="no earlier generation"):
        DurableTopK.open(directory, CLASSES, K)


def test_durable_refuses_other_classes_k_and_a_second_opener(tmp_path):
    directory = tmp_path / "d"
    with DurableTopK.open(directory, CLASSES, K) as durable:
        durable.add(*_video(0))
        with pytest.raises(BlockingIOError, match="open in another process"):
            DurableTopK.open(directory, CLASSES, K)
    with pytest.raises(TopKFormatError, match="other class ids"):
        DurableTopK.open(directory, [3, 7], K)  # only a log: its header says
    with DurableTopK.open(directory, CLASSES, K) as durable:
        durable.snapshot()
    with pytest.raises(ValueError, match=r"holds a top-K of k=6 over 4 classes"):
        DurableTopK.open(directory, CLASSES, K + 1)
    with pytest.raises(ValueError, match=r"holds a top-K of k=6 over 4 classes"):
        DurableTopK.open(directory, [3, 7, 11], K)


def _serve_until_killed(directory: str) -> None:
    """The SIGKILL test's child: add, commit, acknowledge (print) videos until killed,
    with a snapshot every 7 videos."""
    durable = DurableTopK.open(directory, CLASSES, K)
    index = 0
    while True:
        durable.add(*_video(index))
        durable.commit()
        print(index, flush=True)
        index += 1
        if index % 7 == 0:
            durable.snapshot()


def test_sigkill_loses_nothing_acknowledged(tmp_path):
    directory = tmp_path / "d"
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import test_topk; "
         "test_topk._serve_until_killed(sys.argv[2])", str(Path(__file__).parent), str(directory)],
        stdout=subprocess.PIPE, text=True)
    acknowledged = []
    deadline = time.monotonic() + 30
    try:
        while len(acknowledged) < 40 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acknowledged.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert len(acknowledged) == 40, "the child stopped before acknowledging 40 videos"
    with DurableTopK.open(directory, CLASSES, K) as reopened:
        present = 0
        while reopened.contains(_video(present)[0]):
            present += 1
        assert present >= len(acknowledged)  # every acknowledged one, maybe one more
        assert reopened.topk.stats().videos == present  # and nothing out of sequence
        assert reopened.topk.rankings() == _fed(range(present)).rankings()


def test_commit_fsyncs_every_byte_it_acknowledges(tmp_path, fsynced):
    """os.fsync observed at the lowest seam: when commit() returns, the log's last fsync
    covered all of the log. A crash test cannot see a missing fsync (a killed process leaves
    the OS cache intact), so this is the test that does."""
    synced = fsynced
    with DurableTopK.open(tmp_path / "d", CLASSES, K) as durable:
        for group in range(3):
            for index in range(3 * group, 3 * group + 3):
                assert durable.add(*_video(index))
            durable.commit()
            status = _log(tmp_path / "d").stat()
            assert synced.get(status.st_ino) == status.st_size, f"group {group} acknowledged unsynced"
        durable.snapshot()  # a new log: its header is synced before any record goes after it
        assert durable.add(*_video(99))
        durable.commit()
        status = _log(tmp_path / "d").stat()
        assert synced.get(status.st_ino) == status.st_size


def test_a_log_torn_inside_its_header_starts_again_from_byte_0(tmp_path, caplog):
    directory = tmp_path / "d"
    DurableTopK.open(directory, CLASSES, K).close()  # a log that holds only its header
    log = _log(directory)
    os.truncate(log, 5)  # the crash tore the header itself
    with DurableTopK.open(directory, CLASSES, K) as reopened:
        assert reopened.topk.stats().videos == 0
        assert reopened.add(*_video(0))
    with DurableTopK.open(directory, CLASSES, K) as again:  # the rewritten log reads back whole
        assert again.contains(_video(0)[0]) and again.topk.stats().videos == 1


def test_the_default_slack_is_a_quarter_of_k_and_at_least_1024():
    assert default_slack(100_000) == 25_000
    assert default_slack(4_099) == 1_024 and default_slack(4_100) == 1_025
    assert default_slack(1) == 1_024
