"""modloc.training.datasets and modloc.training.data on small real TFRecord files."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from modloc.engine.base.features import MAX_FRAMES, masked_model_input, padding_input
from modloc.engine.base.io.examples import (
    FEATURE_SIZE,
    RecordKindError,
    Video,
    VideoLevelRecord,
    encode_truth,
    encode_video,
    encode_video_level,
)
from modloc.engine.base.io.tfrecord import write_records
from modloc.engine.base.vocab import ClassSpace
from modloc.engine.base.windows import pack_segment_windows, segment_windows
from modloc.training import datasets
from modloc.training.datasets import InvalidRatingError, SegmentDataset, VideoLevelDataset

PB = {"decoder": "protobuf"}


def make_video(video_id: str, frames: int, labels=(), ratings=(), seed: int = 0) -> Video:
    """A video with random non-zero features; ``ratings`` = [(start, class, score)]."""
    rng = np.random.default_rng([seed, frames, len(video_id)])
    features = rng.integers(1, 256, size=(frames, FEATURE_SIZE), dtype=np.uint8)
    starts, classes, scores = zip(*ratings, strict=True) if ratings else ((), (), ())
    return Video(
        id=video_id,
        features=features,
        labels=list(labels),
        segment_labels=list(classes),
        segment_start_times=list(starts),
        segment_scores=list(scores),
    )


def write(path, videos: list[Video]) -> str:
    write_records(path, [encode_video(video) for video in videos])
    return str(path)


def only_batch(dataset, batch_size: int = 64):
    batches = list(dataset.batches(batch_size))
    assert len(batches) == 1
    return batches[0]


@pytest.fixture
def many_files(tmp_path):
    """5 files of 7 short videos; every video rated at two starts."""
    for file in range(5):
        videos = [
            make_video(f"v{file}_{i}", 1 + i % 4, labels=[i], ratings=[(0, 3, 1.0), (5, 4, 0.0)])
            for i in range(7)
        ]
        write(tmp_path / f"part{file}.tfrecord", videos)
    return str(tmp_path / "part*.tfrecord")


ALL_IDS = {f"v{file}_{i}" for file in range(5) for i in range(7)}


# --- video level ----------------------------------------------------------------------


def test_video_level_features_padding_and_labels(tmp_path):
    videos = [make_video("a", 3, [2, 9]), make_video("b", 7, [0]), make_video("c", 320, [])]
    path = write(tmp_path / "v.tfrecord", videos)
    batch = only_batch(VideoLevelDataset(path, shuffle=False, **PB))

    assert batch.video_ids == ["a", "b", "c"]
    assert batch.features.dtype == np.uint8 and batch.features.shape == (3, MAX_FRAMES, FEATURE_SIZE)
    assert batch.num_frames.dtype == np.int32 and batch.num_frames.tolist() == [3, 7, 300]
    for row, video in enumerate(videos):
        valid = batch.num_frames[row]
        np.testing.assert_array_equal(batch.features[row, :valid], video.features[:valid])
        assert not batch.features[row, valid:].any()
    assert batch.labels.dtype == np.float32 and batch.labels.shape == (3, 3862)
    assert np.flatnonzero(batch.labels[0]).tolist() == [2, 9]
    assert np.flatnonzero(batch.labels[1]).tolist() == [0]
    assert not batch.labels[2].any()
    assert batch.label_weights is None and batch.segment_starts is None
    # the padding contract: the model fills padding with the dequantized-0.0 input
    inputs = masked_model_input(batch.features[:1], batch.num_frames[:1])
    np.testing.assert_array_equal(inputs[0, 3:], np.broadcast_to(padding_input(), (297, FEATURE_SIZE)))


def test_video_level_pad_to_longest(tmp_path):
    path = write(tmp_path / "v.tfrecord", [make_video("a", 3), make_video("b", 7), make_video("c", 1)])
    batch = only_batch(VideoLevelDataset(path, shuffle=False, pad_to="longest", **PB))
    assert batch.features.shape == (3, 7, FEATURE_SIZE)
    assert batch.num_frames.tolist() == [3, 7, 1]
    assert not batch.features[0, 3:].any() and not batch.features[2, 1:].any()
    # a video without frames never makes an all-padding example: the reader refuses it
    empty_path = write(tmp_path / "e.tfrecord", [make_video("z", 0)])
    with pytest.raises(RecordKindError, match=r"e\.tfrecord: record 0 .* 'z' has no frames"):
        only_batch(VideoLevelDataset(empty_path, shuffle=False, pad_to="longest", **PB))


def test_video_level_class_space_drops_and_counts(tmp_path):
    path = write(tmp_path / "v.tfrecord", [make_video("a", 2, [2, 9, 5, 5000]), make_video("b", 1, [7])])
    dataset = VideoLevelDataset(path, class_ids=[5, 2], shuffle=False, **PB)
    batch = only_batch(dataset)
    # output j is vocabulary class class_ids[j]
    assert batch.labels.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert dataset.num_classes == 2
    stats = dataset.stats
    assert (stats.videos, stats.examples, stats.dropped_labels, stats.files) == (2, 2, 3, 1)
    assert stats.read.records == 2


def test_examples_do_not_pin_larger_buffers():
    video = make_video("long", 12)
    assert datasets._unpinned(video.features) is video.features
    window = datasets._unpinned(video.features[5:10])
    assert not np.shares_memory(window, video.features)
    np.testing.assert_array_equal(window, video.features[5:10])


def test_class_space_validation():
    assert ClassSpace().num_classes == 3862
    assert ClassSpace([7, 3]).positions(np.array([3, 7, 4, -1, 9999])).tolist() == [1, 0, -1, -1, -1]
    with pytest.raises(ValueError, match="repeated"):
        ClassSpace([1, 1])
    with pytest.raises(ValueError, match="outside"):
        ClassSpace([3862])


# --- segment level --------------------------------------------------------------------

RATED = make_video(
    "seg",
    12,
    labels=[3, 4, 7],
    ratings=[
        (10, 7, 1.0),
        (0, 3, 0.0),
        (10, 4, 1.0),  # second rated class at start 10
        (20, 3, 1.0),  # window wholly past the 12-frame video
        (7, 3, 1.0),  # not a multiple of 5
        (300, 4, 1.0),  # >= max_frames
        (15, 9999, 1.0),  # class outside the vocabulary: start 15 yields nothing
    ],
)


def test_segment_examples_match_hand_computed(tmp_path):
    path = write(tmp_path / "s.tfrecord", [RATED, make_video("unrated", 4, [1])])
    dataset = SegmentDataset(path, shuffle=False, **PB)
    batch = only_batch(dataset)

    assert batch.video_ids == ["seg", "seg", "seg"]
    assert batch.segment_starts.dtype == np.int64
    assert batch.segment_starts.tolist() == [10, 0, 20]  # unique starts, first-occurrence order
    assert batch.features.shape == (3, 5, FEATURE_SIZE)
    assert batch.num_frames.tolist() == [2, 5, 0]
    np.testing.assert_array_equal(batch.features[0, :2], RATED.features[10:12])
    assert not batch.features[0, 2:].any() and not batch.features[2].any()
    np.testing.assert_array_equal(batch.features[1], RATED.features[0:5])

    def nonzero(row):
        return {int(c): float(row[c]) for c in np.flatnonzero(row)}

    assert batch.label_weights.dtype == np.float32
    assert nonzero(batch.label_weights[0]) == {4: 1.0, 7: 1.0}
    assert nonzero(batch.labels[0]) == {4: 1.0, 7: 1.0}
    assert nonzero(batch.label_weights[1]) == {3: 1.0}
    assert nonzero(batch.labels[1]) == {}  # rated negative: score 0 with weight 1
    assert nonzero(batch.label_weights[2]) == {3: 1.0} and nonzero(batch.labels[2]) == {3: 1.0}

    stats = dataset.stats
    assert (stats.videos, stats.examples, stats.videos_without_examples) == (2, 3, 1)
    assert (stats.invalid_ratings, stats.dropped_ratings, stats.empty_windows) == (2, 1, 1)


def test_segment_class_space(tmp_path):
    path = write(tmp_path / "s.tfrecord", [RATED])
    dataset = SegmentDataset(path, class_ids=[4, 3], shuffle=False, **PB)
    batch = only_batch(dataset)
    assert batch.segment_starts.tolist() == [10, 0, 20]
    assert batch.labels.tolist() == [[1, 0], [0, 0], [0, 1]]
    assert batch.label_weights.tolist() == [[1, 0], [0, 1], [0, 1]]
    assert dataset.stats.dropped_ratings == 2  # class 7 and class 9999

    only_seven = SegmentDataset(path, class_ids=[7], shuffle=False, **PB)
    assert only_batch(only_seven).segment_starts.tolist() == [10]


def test_segment_strict_names_file_and_video(tmp_path):
    path = write(tmp_path / "s.tfrecord", [RATED])
    with pytest.raises(InvalidRatingError, match=r"s\.tfrecord: video 'seg'.*\[7, 300\]"):
        list(SegmentDataset(path, strict=True, **PB).batches(4))


def test_segment_window_capped_at_max_frames(tmp_path):
    video = make_video("long", 320, ratings=[(295, 1, 1.0), (300, 1, 1.0)])
    path = write(tmp_path / "s.tfrecord", [video])
    dataset = SegmentDataset(path, shuffle=False, **PB)
    batch = only_batch(dataset)
    assert batch.segment_starts.tolist() == [295] and batch.num_frames.tolist() == [5]
    np.testing.assert_array_equal(batch.features[0], video.features[295:300])
    assert dataset.stats.invalid_ratings == 1


@pytest.fixture
def unusable_files(tmp_path):
    """Two files whose record 1 cannot be trained on: a video-level Example, and a
    ratings-only (test_truth) record without frames."""
    good = encode_video(RATED)
    video_level = encode_video_level(VideoLevelRecord("02aa", np.zeros(1024), np.zeros(128), [3]))
    paths = {"video-level": tmp_path / "video_level.tfrecord", "no frames": tmp_path / "truth.tfrecord"}
    write_records(paths["video-level"], [good, video_level, good])
    write_records(paths["no frames"], [good, encode_truth(RATED), good])
    return paths


@pytest.mark.parametrize("kind, reason", [("video-level", "'02aa' is a video-level Example"),
                                          ("no frames", "'seg' has no frames")])
@pytest.mark.parametrize("dataset_class", [VideoLevelDataset, SegmentDataset])
@pytest.mark.parametrize("decoder", ["protobuf", "native"])
@pytest.mark.parametrize("shards", [1, 2])  # 2 shards of 1 file: the record-interleaved path
def test_records_without_frames_are_refused_naming_file_and_record(
        unusable_files, kind, reason, dataset_class, decoder, shards):
    path = unusable_files[kind]
    with pytest.raises(RecordKindError, match=rf"{path}: record 1 at byte offset \d+: video {reason}"):
        for shard in range(shards):  # record 1 belongs to shard 1 when interleaved
            dataset = dataset_class(str(path), decoder=decoder, shard=(shard, shards),
                                    skip_corrupt=True)
            list(dataset.batches(2))


# --- order, determinism, sharding -----------------------------------------------------


def id_stream(dataset, batch_size=4, epochs=1):
    return [vid for batch in dataset.batches(batch_size, epochs=epochs) for vid in batch.video_ids]


def test_seeded_shuffle_is_deterministic(many_files):
    def make(seed):
        return VideoLevelDataset(many_files, seed=seed, shuffle_buffer=8, **PB)

    first, again, other = id_stream(make(0)), id_stream(make(0)), id_stream(make(1))
    assert first == again
    assert first != other
    assert set(first) == set(other) == ALL_IDS and len(first) == len(ALL_IDS)
    two_epochs = id_stream(make(0), epochs=2)
    assert two_epochs[:35] == first and two_epochs[35:] != first
    assert sorted(two_epochs[35:]) == sorted(first)
    unshuffled = id_stream(VideoLevelDataset(many_files, shuffle=False, **PB))
    assert unshuffled == sorted(ALL_IDS)


def test_batches_options(many_files):
    dataset = VideoLevelDataset(many_files, shuffle=False, **PB)
    assert [len(b) for b in dataset.batches(10)] == [10, 10, 10, 5]
    assert [len(b) for b in dataset.batches(10, drop_last=True, epochs=2)] == [10] * 6
    forever = dataset.batches(10, epochs=None)
    assert sum(len(next(forever)) for _ in range(9)) == 80  # 35 + 35 + 10: a third epoch
    assert dataset.stats.epoch == 2
    with pytest.raises(ValueError, match="smaller than batch_size"):
        next(VideoLevelDataset(many_files, shuffle_buffer=3, **PB).batches(4))
    # an empty shard (35 records, 40 shards) ends even a forever stream instead of spinning
    empty_shard = VideoLevelDataset(many_files, shard=(39, 40), **PB).batches(4, epochs=None)
    assert list(itertools.islice(empty_shard, 3)) == []


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 8])
@pytest.mark.parametrize("decoder", ["protobuf", "native"])  # record access / decode-then-skip
def test_every_example_once_across_shards(many_files, count, decoder):
    videos, segments = Counter(), Counter()
    read_videos_total = 0
    for index in range(count):
        shard = {"shard": (index, count), "decoder": decoder, "seed": 3}
        video_level = VideoLevelDataset(many_files, **shard)
        videos.update(id_stream(video_level, epochs=2))
        read_videos_total += video_level.stats.videos
        for batch in SegmentDataset(many_files, **shard).batches(3, epochs=2):
            segments.update(zip(batch.video_ids, batch.segment_starts.tolist(), strict=True))
    assert set(videos) == ALL_IDS and set(videos.values()) == {2}
    assert len(segments) == 2 * len(ALL_IDS) and set(segments.values()) == {2}
    assert read_videos_total == len(ALL_IDS)


def test_subshard_composes(many_files):
    seen = Counter()
    for rank in range(2):
        dataset = VideoLevelDataset(many_files, shard=(rank, 2), **PB)
        for worker in range(3):
            part = dataset.subshard(worker, 3)
            assert part.shard == (rank * 3 + worker, 6)
            seen.update(id_stream(part))
    assert set(seen) == ALL_IDS and set(seen.values()) == {1}


# --- torch loading --------------------------------------------------------------------


def test_loader_two_workers_reads_each_example_once(many_files):
    torch = pytest.importorskip("torch")
    from modloc.training.data import make_loader

    loader = make_loader(SegmentDataset(many_files, seed=1, **PB), batch_size=4, num_workers=2)
    passes = []
    for _ in range(2):
        seen = Counter()
        for batch in loader:
            assert batch.features.dtype == torch.uint8 and batch.features.shape[1:] == (5, FEATURE_SIZE)
            assert batch.num_frames.dtype == torch.int32
            assert batch.labels.dtype == torch.float32 and batch.label_weights.shape == batch.labels.shape
            assert batch.segment_starts.dtype == torch.int64
            seen.update(zip(batch.video_ids, batch.segment_starts.tolist(), strict=True))
        assert len(seen) == 2 * len(ALL_IDS) and set(seen.values()) == {1}
        passes.append(list(seen))
    assert passes[0] != passes[1]  # persistent workers advance the epoch: a new order


def test_torch_batch_in_process(many_files):
    torch = pytest.importorskip("torch")
    from modloc.training.data import make_loader

    loader = make_loader(VideoLevelDataset(many_files, shuffle=False, pad_to="longest", **PB), 8)
    batches = list(loader)
    assert [len(b) for b in batches] == [8, 8, 8, 8, 3]
    first = batches[0].to("cpu")
    assert first.features.dtype == torch.uint8 and first.features.shape == (8, 4, FEATURE_SIZE)
    assert first.label_weights is None and first.segment_starts is None


# --- test-time segmentation -----------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "windows", "last_valid"),
    [(0, 0, None), (1, 1, 1), (5, 1, 5), (6, 2, 1), (300, 60, 5), (301, 61, 1)],
)
def test_segment_windows(frames, windows, last_valid):
    video = make_video("w", frames)
    cut = segment_windows(video)
    assert cut.features.shape == (windows, 5, FEATURE_SIZE) and cut.features.dtype == np.uint8
    assert cut.starts.tolist() == list(range(0, 5 * windows, 5))
    if windows:
        assert cut.num_frames.tolist() == [5] * (windows - 1) + [last_valid]
        assert cut.partial.tolist() == [False] * (windows - 1) + [last_valid < 5]
    flat = cut.features.reshape(-1, FEATURE_SIZE)
    np.testing.assert_array_equal(flat[:frames], video.features)
    assert not flat[frames:].any()
    # whole windows are a view of the video's array; only a partial window forces a copy
    assert np.shares_memory(cut.features, video.features) == (frames > 0 and frames % 5 == 0)


def test_segment_windows_max_frames():
    video = make_video("w", 301)
    cut = segment_windows(video.features, max_frames=MAX_FRAMES)
    assert len(cut) == 60 and not cut.partial.any()
    with pytest.raises(ValueError, match="uint8"):
        segment_windows(video.features.astype(np.float32))


def test_pack_segment_windows():
    videos = [make_video(f"p{n}", n) for n in (0, 6, 5, 301)]
    packed = pack_segment_windows(videos)
    assert packed.video_ids == ["p0", "p6", "p5", "p301"]
    assert packed.offsets.tolist() == [0, 0, 2, 3, 64]
    assert packed.features.shape == (64, 5, FEATURE_SIZE) and len(packed) == 64
    for index, video in enumerate(videos):
        single, part = segment_windows(video), packed.windows(index)
        for name in ("features", "starts", "num_frames", "partial"):
            np.testing.assert_array_equal(getattr(part, name), getattr(single, name))
            assert getattr(part, name).dtype == getattr(single, name).dtype
    capped = pack_segment_windows(videos, max_frames=300)
    assert capped.offsets.tolist() == [0, 0, 2, 3, 63]
    empty = pack_segment_windows([])
    assert empty.features.shape == (0, 5, FEATURE_SIZE) and empty.offsets.tolist() == [0]
