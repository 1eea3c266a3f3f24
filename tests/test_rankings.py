"""Stage 4's one owner: what enters the rankings, durability, shards, and the CSV."""

from __future__ import annotations

import numpy as np
import pytest

from modloc.engine.base.submission import read_submission
from modloc.engine.runtime.pipeline import VideoLocalization
from modloc.engine.runtime.rankings import Rankings

CLASSES = [3, 4, 5]


def localization(video_id: str, fused: list[list[float]], partial_last: bool = False) -> VideoLocalization:
    """A localized video whose windows 0, 5, 10, ... have the given fused scores per class."""
    fused = np.asarray(fused, np.float64)
    windows = len(fused)
    partial = np.zeros(windows, bool)
    partial[-1] = partial_last
    return VideoLocalization(
        video_id=video_id, num_frames=5 * windows - (2 if partial_last else 0),
        video_class_ids=np.asarray(CLASSES, np.int64), video_scores=np.full(3, 0.5, np.float32),
        candidate_ids=np.asarray(CLASSES, np.int64), candidate_scores=np.full(3, 0.5, np.float32),
        window_starts=np.arange(windows, dtype=np.int64) * 5, partial=partial, fused=fused,
        audio_frames=5 * windows - (2 if partial_last else 0))


def test_a_localized_video_enters_by_its_full_windows_best_first():
    rankings = Rankings(CLASSES, k=10)
    assert rankings.add(localization("a", [[0.9, 0.1, 0.0], [0.2, 0.8, 0.3]], partial_last=True))
    assert rankings.add(localization("b", [[0.5, 0.0, 0.7]]))
    # a's second window is partial: not ranked; zero scores are not ranked
    assert rankings.rows() == {3: ["a:0", "b:0"], 4: ["a:0"], 5: ["b:0"]}
    assert rankings.ranking(3) == [("a", 0, pytest.approx(0.9)), ("b", 0, pytest.approx(0.5))]


def test_a_refused_id_leaves_every_video_of_the_call_out():
    rankings = Rankings(CLASSES, k=10)
    with pytest.raises(ValueError, match="video id 'x:y' cannot be ranked"):
        rankings.add_all([localization("ok", [[0.9, 0.9, 0.9]]), localization("x:y", [[0.9, 0.9, 0.9]])])
    assert rankings.videos == 0 and rankings.rows() == {3: [], 4: [], 5: []}


def test_durable_rankings_survive_a_reopen_and_refuse_a_second_add(tmp_path):
    with Rankings(CLASSES, k=10, directory=tmp_path) as rankings:
        assert rankings.add(localization("a", [[0.9, 0.1, 0.2]]))
        assert not rankings.add(localization("a", [[0.1, 0.9, 0.9]]))  # a duplicate: no change
        rankings.commit()
        before = rankings.submission_csv()
    with Rankings(CLASSES, k=10, directory=tmp_path) as reopened:
        assert reopened.videos == 1 and reopened.submission_csv() == before
    with pytest.raises(ValueError, match="fallback fill keeps no durable state"):
        Rankings(CLASSES, k=10, fallback=True, directory=tmp_path / "other")


def test_shards_merge_into_the_rows_of_one_process(tmp_path):
    videos = [localization(f"v{i}", np.random.default_rng(i).random((4, 3)).round(1).tolist())
              for i in range(8)]
    whole = Rankings(CLASSES, k=5, fallback=True)
    for order, video in enumerate(videos):
        whole.add(video, order)
    shards = [Rankings(CLASSES, k=5, fallback=True) for _ in range(2)]
    for order, video in enumerate(videos):
        shards[order % 2].add(video, order)
    shards[0].merge_state(shards[1].state())
    assert shards[0].rows() == whole.rows()
    path = tmp_path / "out" / "submission.csv"
    shards[0].write_submission(path)
    assert path.read_text() == whole.submission_csv()
    assert read_submission(str(path)) == {c: whole.rows()[c] for c in CLASSES}
