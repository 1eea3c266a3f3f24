"""The native per-class top-K accumulator: exactness against a brute-force sort, merging,
threads, snapshots, and the durable directory (insert log, crash recovery, SIGKILL).

Streams are tiny and quantized (many exact ties); a small ``slack`` makes the buffers cut
back to ``k`` often, so the threshold path runs on every test.
"""

from __future__ import annotations

import json
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

from modloc.engine.base.io.tfrecord import encode_record, iter_buffer_records
from modloc.engine.base.metrics import SegmentTruth, rank_segments, segment_map
from modloc.engine.runtime.fusion import dummy_pairs
from modloc.engine.runtime.topk import (
    DurableTopK,
    StateMismatchError,
    StatePolicy,
    TopK,
    TopKFormatError,
    default_slack,
)

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


def _acknowledged(directory: Path, count: int, snapshot_after: int | None = None) -> Path:
    """A directory whose first ``count`` videos were committed (a snapshot after
    ``snapshot_after`` of them), left as a crash would leave it (never closed)."""
    live = directory.with_name(directory.name + "-live")
    durable = DurableTopK.open(live, CLASSES, K)
    for index in range(count):
        durable.add(*_video(index))
        if index + 1 == snapshot_after:
            durable.commit()
            durable.snapshot()
    durable.commit()
    _crash_image(live, directory)
    durable.close()
    return directory


@pytest.mark.parametrize("cut", ["inside the last record", "inside its length field"])
def test_a_torn_append_at_the_logs_end_is_dropped_saying_where(tmp_path, caplog, cut):
    directory = _acknowledged(tmp_path / "d", 12)
    log = _log(directory)
    last = list(iter_buffer_records(log.read_bytes()))[-1]
    size = log.stat().st_size - 5 if cut == "inside the last record" else last.offset + 5
    os.truncate(log, size)
    with caplog.at_level(logging.WARNING, logger="modloc.engine.runtime.topk"):
        reopened = DurableTopK.open(directory, CLASSES, K)
    assert f"{log}: the log ends in a torn write" in caplog.text
    assert (f"cut at byte offset {last.offset} inside record 12 (truncated" in caplog.text
            and f"dropping its {size - last.offset} bytes" in caplog.text
            and f"the last intact record is video {_video(10)[0]!r} (the log's video 11), "
                f"ending at byte {last.offset}" in caplog.text), caplog.text
    assert reopened.topk.rankings() == _fed(range(11)).rankings()
    reopened.add(*_video(11))  # appended after the cut-off tail: the log stays well framed
    reopened.close()
    with DurableTopK.open(directory, CLASSES, K) as again:
        assert again.topk.rankings() == _fed(range(12)).rankings()


def test_a_crc_bad_last_record_is_torn_only_if_its_crc_never_reached_the_disk(tmp_path, caplog):
    """The rule for a last record failing its CRC: its CRC field reads zero, the end of an
    append a crash cut short; any other bytes (one flipped bit) are damage."""
    directory = _acknowledged(tmp_path / "d", 8)
    log = _log(directory)
    data = bytearray(log.read_bytes())
    last = list(iter_buffer_records(bytes(data)))[-1]
    flipped = bytearray(data)
    flipped[last.offset + 14] ^= 0x01
    log.write_bytes(bytes(flipped))
    with pytest.raises(TopKFormatError, match=rf"{log}: record 8 at byte offset {last.offset}: data "
                       r"CRC mismatch \(and is not a torn write at the log's end\)") as refused:
        DurableTopK.open(directory, CLASSES, K)
    assert f"the last intact record before it is video {_video(6)[0]!r}" in str(refused.value)
    assert "--accept-state-loss" in str(refused.value)
    data[-4:] = b"\0\0\0\0"  # the append's last block never written
    log.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="modloc.engine.runtime.topk"):
        with DurableTopK.open(directory, CLASSES, K) as reopened:
            assert reopened.topk.rankings() == _fed(range(7)).rankings()
    assert "torn write" in caplog.text and "data CRC mismatch" in caplog.text


@pytest.mark.parametrize("damage", ["deleted", "emptied", "cut to its header", "cut mid-record"])
def test_a_log_missing_or_shorter_than_the_manifest_says_is_refused(tmp_path, caplog, damage):
    """After a clean close the manifest knows the log's length: losing any of it is refused,
    naming the file and what is missing, unless the operator accepts the loss."""
    directory = tmp_path / "d"
    with DurableTopK.open(directory, CLASSES, K) as durable:
        for index in range(20):
            durable.add(*_video(index))
        durable.snapshot()
        for index in range(20, 40):
            durable.add(*_video(index))
    log = _log(directory)
    records = list(iter_buffer_records(log.read_bytes()))
    if damage == "deleted":
        log.unlink()
        expected = rf"{log} is missing: the manifest names it as the log of the videos after the first 20, holding \d+ bytes: its header and 20 videos, the last '{_video(39)[0]}'"
    else:
        size = {"emptied": 0, "cut to its header": records[1].offset,
                "cut mid-record": records[10].offset + 20}[damage]
        os.truncate(log, size)
        expected = rf"{log} holds {size} bytes, fewer than the \d+ bytes: its header and 20 videos"
    with pytest.raises(TopKFormatError, match=expected) as refused:
        DurableTopK.open(directory, CLASSES, K)
    assert "when the manifest was written (close" in str(refused.value)
    with caplog.at_level(logging.WARNING, logger="modloc.engine.runtime.topk"):
        with DurableTopK.open(directory, CLASSES, K, policy=StatePolicy(accept_loss=True)) as accepted:
            kept = {"deleted": 20, "emptied": 20, "cut to its header": 20, "cut mid-record": 29}[damage]
            assert accepted.topk.rankings() == _fed(range(kept)).rankings()
    assert "accepting the loss as asked" in caplog.text
    with DurableTopK.open(directory, CLASSES, K) as again:  # the accepted state is the state now
        assert again.topk.stats().videos == kept


def test_a_log_lost_after_a_crash_past_the_snapshot_is_refused(tmp_path):
    """The issue's case: 20 videos acknowledged past the last snapshot, then the process
    died and the log was deleted or emptied; before the manifest it restarted without them."""
    for damage in ("deleted", "emptied"):
        directory = _acknowledged(tmp_path / damage, 40, snapshot_after=20)
        log = _log(directory)
        log.unlink() if damage == "deleted" else log.write_bytes(b"")
        with pytest.raises(TopKFormatError, match=rf"{log} (is missing|holds 0 bytes)"):
            DurableTopK.open(directory, CLASSES, K)


def test_corrupt_record_in_the_middle_is_an_error(tmp_path):
    directory = _acknowledged(tmp_path / "d", 6)
    log = _log(directory)
    records = list(iter_buffer_records(log.read_bytes()))
    data = bytearray(log.read_bytes())
    data[records[3].offset + 14] ^= 0xFF  # inside record 3's payload
    log.write_bytes(bytes(data))
    with pytest.raises(TopKFormatError, match=rf"{log}: record 3 at byte offset \d+: data CRC mismatch"):
        DurableTopK.open(directory, CLASSES, K)
    with DurableTopK.open(directory, CLASSES, K, policy=StatePolicy(accept_loss=True)) as accepted:
        assert accepted.topk.rankings() == _fed(range(2)).rankings()  # up to the damage


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
    assert sorted(p.name for p in directory.iterdir()) == ["LOCK", "MANIFEST", "log-00000002.tfrecord",
                                                          "snapshot-00000002.topk"]
    manifest = json.loads((directory / "MANIFEST").read_text())
    assert manifest["snapshot"] == {"file": second.name, "bytes": second.stat().st_size, "videos": 30}
    assert manifest["log"]["file"] == "log-00000002.tfrecord" and manifest["log"]["first_video"] == 30
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
    assert sorted(p.name for p in directory.iterdir()) == ["LOCK", "MANIFEST", "log-00000000.tfrecord"]
    for index in range(10, 15):
        durable.add(*_video(index))
    durable.commit()
    with DurableTopK.open(_crash_image(directory, tmp_path / "crashed"), CLASSES, K) as reopened:
        assert reopened.topk.rankings() == _fed(range(15)).rankings()
    durable.close()


def test_files_the_manifest_does_not_name_are_leftovers_and_a_named_one_must_be_intact(tmp_path):
    directory = tmp_path / "d"
    with DurableTopK.open(directory, CLASSES, K) as durable:
        for index in range(10):
            durable.add(*_video(index))
    # a crash during a snapshot, before the manifest named it: its files are leftovers
    (directory / "snapshot-00000001.topk").write_bytes(b"\0" * 100)
    (directory / "log-00000001.tfrecord").write_bytes(b"")
    with DurableTopK.open(directory, CLASSES, K) as reopened:
        assert reopened.topk.rankings() == _fed(range(10)).rankings()
        reopened.snapshot()
    assert sorted(p.name for p in directory.iterdir()) == ["LOCK", "MANIFEST", "log-00000001.tfrecord",
                                                          "snapshot-00000001.topk"]
    # the named snapshot damaged, emptied or replaced: refused
    snapshot = directory / "snapshot-00000001.topk"
    good = snapshot.read_bytes()
    for damaged, reason in ((b"", "holds 0 bytes, not the"), (good[:-1] + b"\x01", "is damaged"),
                            (_fed(range(9), slack=None).to_bytes(), r"holds \d+ (bytes|videos), not the")):
        snapshot.write_bytes(damaged)
        with pytest.raises(TopKFormatError, match=rf"{snapshot} .*{reason}.*snapshot of 10 acknowledged videos"):
            DurableTopK.open(directory, CLASSES, K)
    snapshot.unlink()
    with pytest.raises(TopKFormatError, match=rf"{snapshot} is missing"):
        DurableTopK.open(directory, CLASSES, K)


def test_top_k_files_without_a_manifest_are_refused_unless_adopted(tmp_path):
    directory = tmp_path / "d"
    with DurableTopK.open(directory, CLASSES, K) as durable:
        for index in range(10):
            durable.add(*_video(index))
        durable.snapshot()
        durable.add(*_video(10))
    (directory / "MANIFEST").unlink()
    with pytest.raises(TopKFormatError, match=r"holds top-K files \(log-00000001.tfrecord, "
                       r"snapshot-00000001.topk\) but no readable MANIFEST"):
        DurableTopK.open(directory, CLASSES, K)
    (directory / "MANIFEST").write_text("{not json")
    with pytest.raises(TopKFormatError, match=r"MANIFEST cannot be read \(JSONDecodeError"):
        DurableTopK.open(directory, CLASSES, K)
    with DurableTopK.open(directory, CLASSES, K, policy=StatePolicy(accept_loss=True)) as adopted:
        assert adopted.topk.rankings() == _fed(range(11)).rankings()
    with DurableTopK.open(directory, CLASSES, K) as again:  # adopted: it has a manifest now
        assert again.topk.stats().videos == 11


def test_settings_that_filled_the_rankings_are_checked_on_restart(tmp_path, caplog):
    directory = tmp_path / "d"
    first = {"segment_model": {"sha256": "aa", "variant": "distill-fp32"}, "top_n": 20}
    with DurableTopK.open(directory, CLASSES, K, settings=first) as durable:
        durable.add(*_video(0))
    changed = {"segment_model": {"sha256": "bb", "variant": "distill-int8"}, "top_n": 20}
    with pytest.raises(StateMismatchError, match=r"filled under other settings \(segment_model.sha256: "
                       r"'aa' then, 'bb' now; segment_model.variant: 'distill-fp32' then, "
                       r"'distill-int8' now\)") as refused:
        DurableTopK.open(directory, CLASSES, K, settings=changed)
    assert "--fresh-state" in str(refused.value) and "--accept-settings-change" in str(refused.value)
    with DurableTopK.open(directory, CLASSES, K, settings=first) as same:  # the same ones: fine
        assert same.topk.stats().videos == 1
    with caplog.at_level(logging.WARNING, logger="modloc.engine.runtime.topk"):
        with DurableTopK.open(directory, CLASSES, K, settings=changed,
                              policy=StatePolicy(accept_settings=True)) as kept:
            assert kept.topk.stats().videos == 1
    assert "keeping rankings filled under other settings" in caplog.text
    with DurableTopK.open(directory, CLASSES, K, settings=changed) as recorded:  # now recorded
        assert recorded.topk.stats().videos == 1
    with DurableTopK.open(directory, CLASSES, K, settings=first, policy=StatePolicy(fresh=True)) as fresh:
        assert fresh.topk.stats().videos == 0
    [aside] = directory.glob("replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["MANIFEST", "log-00000000.tfrecord"]


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


def test_a_log_cut_inside_its_header_is_refused_or_started_again_from_byte_0(tmp_path):
    """The manifest names a log only once its header is durable, so a header cut short is
    damage, not a torn append: refused; with accept_loss the log starts again from byte 0."""
    directory = tmp_path / "d"
    DurableTopK.open(directory, CLASSES, K).close()  # a log that holds only its header
    log = _log(directory)
    os.truncate(log, 5)
    with pytest.raises(TopKFormatError, match=r"holds 5 bytes, fewer than the 72 bytes"):
        DurableTopK.open(directory, CLASSES, K)
    with DurableTopK.open(directory, CLASSES, K, policy=StatePolicy(accept_loss=True)) as reopened:
        assert reopened.topk.stats().videos == 0
        assert reopened.add(*_video(0))
    with DurableTopK.open(directory, CLASSES, K) as again:  # the rewritten log reads back whole
        assert again.contains(_video(0)[0]) and again.topk.stats().videos == 1


def test_the_default_slack_is_a_quarter_of_k_and_at_least_1024():
    assert default_slack(100_000) == 25_000
    assert default_slack(4_099) == 1_024 and default_slack(4_100) == 1_025
    assert default_slack(1) == 1_024


def test_a_manifest_names_only_its_generations_files(tmp_path):
    """A damaged or crafted manifest cannot point the reader at another file (or outside
    the directory): each field is checked before any file is opened."""
    directory = tmp_path / "d"
    with DurableTopK.open(directory, CLASSES, K) as durable:
        durable.add(*_video(0))
    good = json.loads((directory / "MANIFEST").read_text())
    for change, message in (({"log": {**good["log"], "file": "../elsewhere.tfrecord"}},
                             r"log.file '../elsewhere.tfrecord' is not generation 0's"),
                            ({"generation": "0"}, r"field generation is '0', not int"),
                            ({"log": {**good["log"], "records": True}}, r"field log.records is True")):
        (directory / "MANIFEST").write_text(json.dumps({**good, **change}))
        with pytest.raises(TopKFormatError, match=rf"MANIFEST cannot be read \(ValueError: {message}"):
            DurableTopK.open(directory, CLASSES, K)
