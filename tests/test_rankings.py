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


def video(video_id: str, frames: int, video_scores: list[float], fused: list[list[float]]) -> VideoLocalization:
    """A localized video with its own video scores (classes 3, 4, 5) and fused windows."""
    fused = np.asarray(fused, np.float64)
    return VideoLocalization(
        video_id=video_id, num_frames=frames, video_class_ids=np.asarray(CLASSES, np.int64),
        video_scores=np.asarray(video_scores, np.float32),
        candidate_ids=np.asarray(CLASSES, np.int64), candidate_scores=np.asarray(video_scores),
        window_starts=np.arange(len(fused), dtype=np.int64) * 5,
        partial=np.arange(len(fused)) * 5 + 5 > frames, fused=fused, audio_frames=frames)


def test_the_fallback_fill_by_hand():
    """REFERENCE §7 step 5: a class short of k is filled from its videos in video-score order,
    each expanded into its full windows, skipping what is ranked, until k."""
    from modloc.engine.runtime.rankings import FALLBACK_CLASSES_PER_VIDEO

    assert FALLBACK_CLASSES_PER_VIDEO == 1000  # the reference's …_test_k1000.csv
    rankings = Rankings(CLASSES, k=3, fallback=True)
    rankings.add(video("c", 15, [0.05, 0.01, 0.01], [[0.95, 0, 0], [0.94, 0, 0], [0.93, 0, 0]]))
    rankings.add(video("a", 22, [0.9, 0.5, 0.1], [[0.8, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0],
                                                  [0, 0, 0]]))
    rankings.add(video("b", 10, [0.2, 0.6, 0.3], [[0, 0.7, 0], [0, 0.6, 0]]))
    assert rankings.rows() == {
        3: ["c:0", "c:5", "c:10"],  # full already: nothing added
        4: ["b:0", "b:5", "a:0"],  # b's windows are ranked; then a (0.5) before c (0.01)
        5: ["b:0", "b:5", "a:0"],  # b (0.3) first, both full windows, then a's first
    }
    # without the fill, only what the fused scores ranked
    plain = Rankings(CLASSES, k=3)
    for item in (video("a", 22, [0.9, 0.5, 0.1], [[0.8, 0, 0]] + [[0, 0, 0]] * 4),
                 video("b", 10, [0.2, 0.6, 0.3], [[0, 0.7, 0], [0, 0.6, 0]])):
        plain.add(item)
    assert plain.rows() == {3: ["a:0"], 4: ["b:0", "b:5"], 5: []}


def test_add_all_takes_the_given_orders_as_the_tie_key():
    same = [[0.5, 0.5, 0.5]]
    rankings = Rankings(CLASSES, k=10)
    rankings.add_all([localization("first", same), localization("second", same)], orders=[7, 2])
    assert rankings.rows()[3] == ["second:0", "first:0"]  # order 2 before order 7
    unordered = Rankings(CLASSES, k=10)
    unordered.add_all([localization("first", same), localization("second", same)])
    assert unordered.rows()[3] == ["first:0", "second:0"]  # the order they came in
    with pytest.raises(ValueError, match="1 orders for 2 videos"):
        unordered.add_all([localization("x", same), localization("y", same)], orders=[1])


def test_what_rankings_say_about_themselves(tmp_path):
    memory = Rankings(CLASSES, k=3, fallback=True)
    assert not memory.durable and repr(memory) == "Rankings(3 classes, k=3, 0 videos, fallback)"
    with pytest.raises(ValueError, match="only durable rankings in a directory have snapshots"):
        memory.snapshot()
    with Rankings(CLASSES, k=3, directory=tmp_path / "state") as durable:
        durable.add(localization("a", [[0.9, 0.1, 0.2]]))
        assert durable.durable and repr(durable) == "Rankings(3 classes, k=3, 1 videos, durable)"
        assert durable.snapshot().is_file()


def test_write_submission_into_a_directory_it_makes_or_finds(tmp_path):
    rankings = Rankings(CLASSES, k=3)
    rankings.add(localization("a", [[0.9, 0.1, 0.2]]))
    rankings.write_submission(tmp_path / "new" / "one.csv")  # made
    rankings.write_submission(tmp_path / "new" / "two.csv")  # found
    assert (tmp_path / "new" / "one.csv").read_text() == (tmp_path / "new" / "two.csv").read_text()
def test_infer_refuses_a_file_id_that_a_csv_writer_would_quote(tmp_path):
    """``modloc infer`` checks the ids of its files with the service's rule, before any work."""
    from modloc.engine.base.io.examples import Video, encode_video
    from modloc.engine.base.io.tfrecord import write_records
    from modloc.engine.runtime.infer import ordered_chunks

    path = tmp_path / "test.tfrecord"
    features = np.zeros((5, 1152), np.uint8)
    write_records(path, [encode_video(Video("fine", features)), encode_video(Video('a"b', features))])
    with pytest.raises(ValueError, match=rf"{path}: record 1: video id 'a\"b' cannot be ranked"):
        list(ordered_chunks([(0, str(path))], 8))


def test_settings_and_a_state_policy_need_a_directory():
    from modloc.engine.runtime.topk import StatePolicy

    for options in ({"settings": {"top_n": 20}}, {"policy": StatePolicy(accept_loss=True)}):
        with pytest.raises(ValueError, match="apply to rankings in a directory only"):
            Rankings(CLASSES, k=3, **options)
    Rankings(CLASSES, k=3, policy=StatePolicy())  # the default policy asks for nothing
