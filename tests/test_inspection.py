"""modloc.engine.base.inspection: what ``modloc inspect`` counts, on records made for the purpose."""

from __future__ import annotations

import numpy as np

from modloc.engine.base.inspection import inspect
from modloc.engine.base.io.examples import Video, encode_truth, encode_video
from modloc.engine.base.io.tfrecord import write_records


def rated(video_id: str, frames: int, starts: list[int]) -> Video:
    features = np.zeros((frames, 1152), np.uint8)
    return Video(video_id, features, labels=np.array([3]), segment_labels=np.full(len(starts), 3),
                 segment_start_times=np.array(starts), segment_scores=np.ones(len(starts), np.float32))


def test_segments_no_submission_can_match_are_counted(tmp_path):
    # starts must be multiples of 5 (REFERENCE §1.2) and inside the video's frames
    write_records(tmp_path / "frames.tfrecord", [encode_video(rated("a", 20, [0, 3, 15, 20, 10000]))])
    report = inspect(str(tmp_path / "frames.tfrecord"))
    assert (report.rated_segments, report.misaligned_segments, report.segments_past_the_end) == (5, 1, 2)
    # a truth file carries the ratings without frames: only the alignment can be checked
    write_records(tmp_path / "truth.tfrecord", [encode_truth(rated("b", 20, [5, 7, 10000]))])
    report = inspect(str(tmp_path / "truth.tfrecord"))
    assert (report.misaligned_segments, report.segments_past_the_end) == (1, 0)
