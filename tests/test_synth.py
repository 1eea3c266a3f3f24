"""The synthetic YouTube-8M-format dataset: layout, determinism and the rating policy."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from modloc.engine.base.io import read_videos
from modloc.engine.base.synth import (
    PRESETS,
    build_class_space,
    config_from,
    generate,
    iter_split,
    video_id,
)
from modloc.engine.base.vocab import default_segment_class_ids

TINY = PRESETS["tiny"]


def test_layout_and_counts(tiny_dataset):
    manifest = json.loads((tiny_dataset / "synth.json").read_text())
    for split in ("train", "validate", "test"):
        videos = list(read_videos(str(tiny_dataset / split / "*.tfrecord"), decoder="protobuf"))
        assert len(videos) == TINY.videos(split) == manifest["splits"][split]["videos"]
        assert all(TINY.min_frames <= v.num_frames <= TINY.max_frames for v in videos)
        assert sum(v.num_frames for v in videos) == manifest["splits"][split]["frames"]
    train = list(read_videos(str(tiny_dataset / "train/*.tfrecord"), decoder="protobuf"))
    assert all(len(v.segment_labels) == 0 for v in train)
    test = list(read_videos(str(tiny_dataset / "test/*.tfrecord"), decoder="protobuf"))
    assert all(len(v.labels) == 0 and len(v.segment_labels) == 0 for v in test)
    truth = list(read_videos(str(tiny_dataset / "test_truth/*.tfrecord"), decoder="protobuf"))
    assert [v.id for v in truth] == [v.id for v in test]
    assert all(v.num_frames == 0 for v in truth)
    assert sum(len(v.segment_labels) for v in truth) == manifest["splits"]["test"]["rated_segments"] > 0
    assert manifest["segment_class_ids"] == default_segment_class_ids()[: TINY.segment_classes].tolist()


def test_bytes_do_not_depend_on_workers(tmp_path):
    config = replace(TINY, train_videos=20, validate_videos=20, test_videos=10, videos_per_shard=7)
    generate(config, tmp_path / "one", workers=1)
    generate(config, tmp_path / "two", workers=2)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.tfrecord"))
    assert len(files) == 3 + 3 + 2 + 2
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    generate(replace(config, seed=1), tmp_path / "other", splits=("train",))
    assert (tmp_path / "other/train/train0000.tfrecord").read_bytes() != (
        tmp_path / "one/train/train0000.tfrecord").read_bytes()


def test_a_rerun_replaces_its_splits_shards_and_leaves_other_files(tmp_path):
    small = replace(TINY, train_videos=24, validate_videos=8, test_videos=24, videos_per_shard=8)
    generate(small, tmp_path)  # 3 train, 1 validate, 3 test and 3 truth shards
    (tmp_path / "train" / "train0009.tfrecord.tmp").write_bytes(b"left by a crashed run")
    keep = [tmp_path / "train" / name for name in ("mine.tfrecord", "train0001.csv", "notes.txt")]
    for path in keep:
        path.write_text("the user's own file")
    generate(replace(small, videos_per_shard=16), tmp_path, splits=("train", "test"))

    def names(directory: str) -> list[str]:
        return sorted(p.name for p in (tmp_path / directory).iterdir())

    assert names("train") == ["mine.tfrecord", "notes.txt", "train0000.tfrecord",
                              "train0001.csv", "train0001.tfrecord"]
    assert names("test") == names("test_truth") == ["test0000.tfrecord", "test0001.tfrecord"]
    assert names("validate") == ["validate0000.tfrecord"]  # a split not generated is kept
    train = [v.id for v in read_videos(str(tmp_path / "train" / "train*.tfrecord"))]
    assert len(train) == len(set(train)) == 24  # no duplicate videos from the first run
    assert all(path.read_text() == "the user's own file" for path in keep)


def test_rating_policy_follows_the_truth():
    config = config_from("demo", validate_videos=150, videos_per_shard=150)
    space = build_class_space(config)
    segment_ids = set(space.class_ids[: space.segment_classes].tolist())
    within_video_negatives = absent_class_negatives = positives = 0
    for item in iter_split(config, "validate", 0, space):
        video = item.video
        starts = video.segment_start_times
        assert len(np.unique(starts)) == len(starts), "one rated class per segment"
        assert np.all(starts % 5 == 0) and np.all(starts + 5 <= video.num_frames), "full segments only"
        assert np.all(video.segment_end_times == starts + 5)
        true_ids = space.class_ids[item.true_positions].tolist()
        for class_id, start, score in zip(video.segment_labels, starts, video.segment_scores, strict=True):
            assert class_id in segment_ids
            if class_id in true_ids:
                shows = item.presence[true_ids.index(class_id), start // 5]
                assert shows == (score == 1.0)
                positives += score == 1.0
                within_video_negatives += score == 0.0
            else:
                assert score == 0.0
                absent_class_negatives += 1
    # Both parts of the task are rated: where a labelled class shows, and absent classes.
    assert positives > 100 and within_video_negatives > 50 and absent_class_negatives > 50


def test_labels_presence_and_noise_statistics():
    config = config_from("demo", train_videos=400, videos_per_shard=400)
    space = build_class_space(config)
    items = list(iter_split(config, "train", 0, space))
    true_counts = np.array([len(item.true_positions) for item in items])
    assert 2.6 < true_counts.mean() < 3.4
    coverage = np.concatenate([item.presence.mean(axis=1) for item in items])
    assert 0.1 < coverage.mean() < 0.7 and coverage.max() < 1.0  # never the whole video
    missed = spurious = 0
    for item in items:
        truth = set(space.class_ids[item.true_positions].tolist())
        noisy = set(item.video.labels.tolist())
        missed += len(truth - noisy)
        spurious += len(noisy - truth)
    assert 0.08 < missed / true_counts.sum() < 0.22
    assert 0.15 < spurious / len(items) < 0.45
    # Popularity is long-tailed: the most common class is far more frequent than the median.
    label_counts = np.bincount(np.concatenate([i.true_positions for i in items]),
                               minlength=len(space.class_ids))
    assert label_counts.max() > 5 * max(1, np.median(label_counts))


def test_video_ids_are_unique_and_split_specific():
    ids = {video_id(split, i) for split in ("train", "validate", "test") for i in range(5000)}
    assert len(ids) == 15000
    with pytest.raises(ValueError):
        video_id("train", 36**5)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="min_frames"):
        config_from("tiny", min_frames=50, max_frames=10)
    with pytest.raises(ValueError, match="unknown synth parameters"):
        config_from("tiny", frames=3)
    with pytest.raises(ValueError, match="unknown preset"):
        config_from("huge")
    with pytest.raises(ValueError, match="noise must be >= 0"):
        config_from("tiny", noise=-1.0)
    with pytest.raises(ValueError, match="signal must be >= 0"):
        config_from("tiny", signal=float("nan"))
