"""The readers on real YouTube-8M bytes (tests/data/yt8m/SOURCES.md gives where each file came from and its counts)."""

from __future__ import annotations

import numpy as np
import pytest

from modloc.engine.base.inspection import inspect
from modloc.engine.base.io import RecordKindError, read_video_level, read_videos
from modloc.engine.runtime.infer import ordered_chunks
from modloc.engine.runtime.offline_eval import localize_split
from modloc.engine.runtime.pipeline import Pipeline, ScoringModel
from modloc.training.datasets import SegmentDataset, VideoLevelDataset

# file → (records, labels, sum of label ids, float64 sum of mean_rgb, of mean_audio, first id)
VIDEO_LEVEL = {
    "video_level_v2_2018/validate0000.tfrecord": (284, 920, 290311, 137.713257, 174.133990, "02aa"),
    "video_level_v2_2018/validate0001.tfrecord": (305, 929, 299790, 235.153067, 192.642295, "vsab"),
    "video_level_v1_2017/validatea0.tfrecord": (368, 1280, 370106, 734.076990, 45.625159, "a0OhZbhxhvk"),
    "video_level_v1_2017/testa0.tfrecord": (163, 0, 0, 256.885387, -98.843328, "100273987"),
}


@pytest.mark.parametrize("name", sorted(VIDEO_LEVEL))
def test_video_level_shards(real_data, name):
    records_expected, labels, label_sum, rgb_sum, audio_sum, first_id = VIDEO_LEVEL[name]
    records = list(read_video_level(real_data / name))
    assert len(records) == records_expected
    assert records[0].id == first_id
    assert sum(len(r.labels) for r in records) == labels
    assert sum(int(r.labels.sum()) for r in records) == label_sum
    assert sum(r.mean_rgb.astype(np.float64).sum() for r in records) == pytest.approx(rgb_sum, abs=5e-6)
    assert sum(r.mean_audio.astype(np.float64).sum() for r in records) == pytest.approx(audio_sum, abs=5e-6)
    # The 2017 test shard has no `labels` key at all; the others always have one.
    assert all(r.has_labels for r in records) == ("testa0" not in name)


def test_first_2018_record_values(real_data):
    first = next(read_video_level(real_data / "video_level_v2_2018/validate0000.tfrecord"))
    assert first.labels.tolist() == [3, 4, 9, 34]
    np.testing.assert_allclose(first.mean_rgb[:4], [-0.781625, 0.104963, 1.563943, -0.00275], atol=1e-6)


@pytest.mark.parametrize("decoder", ["protobuf", "native"])
def test_frame_level_records_from_googles_extractor(real_data, decoder):
    videos = list(read_videos(sorted((real_data / "frame_level_extractor").glob("*.tfrecord")),
                              decoder=decoder))
    assert [v.id for v in videos] == ["D:/codeFile/pyFile/ve/test_data/v1.mp4",
                                      "D:/codeFile/pyFile/ve/test_data/v2.mp4"]
    assert [v.num_frames for v in videos] == [184, 141]
    assert [v.labels.tolist() for v in videos] == [[1, 2], [2]]
    assert all(v.rgb_frames == v.audio_frames == v.num_frames for v in videos)
    assert all(not v.audio.any() for v in videos)  # the extractor wrote silent audio
    assert videos[0].rgb[0, :4].tolist() == [117, 115, 167, 135]


def test_inspect_counts_real_files(real_data):
    report = inspect([str(real_data / "video_level_v2_2018" / "*.tfrecord"),
                      str(real_data / "frame_level_extractor" / "*.tfrecord")])
    assert report.files == 4
    assert report.records == 284 + 305 + 2
    assert report.video_level_records == 589 and report.videos == 2
    assert report.frames == 184 + 141
    assert report.labels == 920 + 929 + 3
    assert report.corrupt_records == 0


@pytest.mark.parametrize("decoder", ["protobuf", "native"])
def test_frame_level_readers_refuse_a_real_video_level_shard(real_data, decoder):
    path = real_data / "video_level_v2_2018" / "validate0000.tfrecord"
    located = rf"{path}: record 0 at byte offset 0: video '02aa' is a video-level Example"
    with pytest.raises(RecordKindError, match=located):
        next(read_videos(path, decoder=decoder))
    for dataset in (VideoLevelDataset, SegmentDataset):  # modloc train / finetune / evaluate
        with pytest.raises(RecordKindError, match=located):
            next(dataset(str(path), decoder=decoder, skip_corrupt=True).batches(8))


def test_the_extractor_ids_are_localized_but_refused_for_a_submission(real_data):
    # Their ids ('D:/…/v1.mp4') hold ':', which a segment id '<video id>:<start>' cannot carry.
    files = sorted((real_data / "frame_level_extractor").glob("*.tfrecord"))
    model = ScoringModel(lambda features, num_frames: np.full((len(features), 2), 0.5, np.float32),
                         (1, 2))
    videos = list(read_videos(files))
    results = Pipeline(model, model).localize(videos)  # `modloc show`, the Localize service
    assert [r.video_id for r in results] == [v.id for v in videos]
    refused = rf"{files[0]}: record 0: video id 'D:/codeFile/pyFile/ve/test_data/v1.mp4' cannot be ranked"
    with pytest.raises(ValueError, match=refused):
        next(ordered_chunks(list(enumerate(map(str, files))), 8))  # modloc infer
    with pytest.raises(ValueError, match=refused):
        localize_split(model, model, [str(f) for f in files], [str(f) for f in files], class_ids=[1, 2])
