"""Tests of modloc.engine.base.metrics: the AP core, Kaggle segment MAP@K and G's video metrics."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from modloc.engine.base.metrics import (
    SegmentTruth,
    VideoMetrics,
    average_precision,
    gap,
    hit_at_one,
    precision_at_equal_recall_rate,
    rank_segments,
    ranked_average_precision,
    ranking_order,
    segment_map,
    top_k_ranking,
)

FAST = settings(max_examples=60, deadline=None)


# --- brute-force references: G's loops, written out, with the documented tie rule ---------


def reference_ap(scores, labels, num_positives=None, n=None) -> float:
    """G's ap_at_n as a plain loop; ties broken by input order instead of G's shuffle."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # sorted() is stable
    numpos = sum(1 for label in labels if label > 0) if num_positives is None else num_positives
    if numpos == 0:
        return 0.0
    if n is not None:
        numpos = min(numpos, n)
    ap, poscount = 0.0, 0
    for i, index in enumerate(order[: len(order) if n is None else n]):
        if labels[index] > 0:
            poscount += 1
            ap += poscount / (i + 1) / numpos
    return ap


def reference_video_metrics(predictions, labels, top_k):
    """G's EvaluationMetrics.get() gap and per-class aps, as loops over one batch."""
    num_videos, num_classes = predictions.shape
    pooled_scores, pooled_labels = [], []  # video order, then rank within the video
    class_pools = [([], []) for _ in range(num_classes)]
    for video in range(num_videos):
        ranked = sorted(range(num_classes), key=lambda c: -predictions[video, c])[:top_k]
        for c in ranked:
            pooled_scores.append(predictions[video, c])
            pooled_labels.append(labels[video, c])
            class_pools[c][0].append(predictions[video, c])
            class_pools[c][1].append(labels[video, c])
    positives = labels.sum(axis=0)
    global_ap = reference_ap(pooled_scores, pooled_labels, num_positives=int(positives.sum()))
    class_aps = {
        c: reference_ap(*class_pools[c], num_positives=int(positives[c]))
        for c in range(num_classes)
        if positives[c] > 0
    }
    return global_ap, class_aps


# --- AP core -------------------------------------------------------------------------------


def test_known_answer_rows_from_tensorflow_models_eval_util_test():
    # tests/data/yt8m/SOURCES.md: row 1 = (1 + 1 + 3/6 + 4/7 + 5/10)/5 = 0.7143,
    # row 2 = (1 + 2/3 + 3/6)/3 = 0.7222.
    predictions = [
        [0.98, 0.88, 0.77, 0.65, 0.64, 0.59, 0.45, 0.43, 0.20, 0.05],
        [0.878, 0.832, 0.759, 0.621, 0.458, 0.285, 0.134],
        [0.98],
        [0.56],
    ]
    labels = [[1, 1, 0, 0, 0, 1, 1, 0, 0, 1], [1, 0, 1, 0, 0, 1, 0], [1], [0]]
    aps = [round(average_precision(p, a), 3) for p, a in zip(predictions, labels, strict=True)]
    assert aps == [0.714, 0.722, 1.000, 0.000]


@pytest.mark.parametrize(
    ("scores", "labels", "num_positives", "n", "expected"),
    [
        # ranked labels 0 1 1: (1/2 + 2/3) / 2
        ([0.9, 0.8, 0.7], [0, 1, 1], None, None, (1 / 2 + 2 / 3) / 2),
        # 2 of 4 positives are outside the list: (1/1) / 4
        ([0.9, 0.1], [1, 0], 4, None, 1 / 4),
        # n=2 keeps ranked labels 1 0 and caps numpos = min(3, 2): (1/1) / 2
        ([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 1], None, 2, 1 / 2),
        # n larger than the list: the whole list, numpos = min(2, 10) = 2: (1/2 + 2/3) / 2
        ([0.3, 0.2, 0.1], [0, 1, 1], None, 10, (1 / 2 + 2 / 3) / 2),
        # no positive: 0 by definition
        ([0.5, 0.4], [0, 0], None, None, 0.0),
        # empty list with positives elsewhere: nothing found
        ([], [], 3, None, 0.0),
        # labels > 0 are positive: 2.0 counts, -1 does not; ranked 1 0: (1/1) / 1
        ([0.9, 0.1], [2.0, -1.0], None, None, 1.0),
    ],
)
def test_average_precision_by_hand(scores, labels, num_positives, n, expected):
    assert average_precision(scores, labels, num_positives, n) == pytest.approx(expected, abs=1e-12)


def test_ties_keep_input_order():
    # Equal scores rank in input order: ranked labels 0 1 -> 1/2; ranked 1 0 -> 1.
    assert average_precision([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert average_precision([0.5, 0.5], [1, 0]) == 1.0
    assert ranking_order([0.2, 0.7, 0.2, 0.7]).tolist() == [1, 3, 0, 2]


def test_ap_input_errors():
    with pytest.raises(ValueError, match="NaN"):
        average_precision([0.5, np.nan], [1, 0])
    with pytest.raises(ValueError, match="shape"):
        average_precision([0.5, 0.4], [1])
    with pytest.raises(ValueError, match="n must"):
        average_precision([0.5], [1], n=0)
    with pytest.raises(ValueError, match="smaller than"):
        ranked_average_precision([True, True], num_positives=1)


score_lists = st.lists(
    st.tuples(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.integers(0, 1)), max_size=40
)


@FAST
@given(score_lists, st.one_of(st.none(), st.integers(1, 50)))
def test_ap_matches_the_reference_loop_and_lies_in_unit_interval(items, n):
    scores = [s for s, _ in items]
    labels = [a for _, a in items]
    ap = average_precision(scores, labels, n=n)
    assert ap == pytest.approx(reference_ap(scores, labels, n=n), abs=1e-12)
    assert 0.0 <= ap <= 1.0


@FAST
@given(st.integers(1, 30), st.integers(0, 30), st.randoms(use_true_random=False))
def test_perfect_ranking_scores_exactly_one(num_positive, num_negative, rng):
    scores = [1.0 + rng.random() for _ in range(num_positive)] + [
        rng.random() for _ in range(num_negative)
    ]
    labels = [1] * num_positive + [0] * num_negative
    order = list(range(len(scores)))
    rng.shuffle(order)
    assert average_precision([scores[i] for i in order], [labels[i] for i in order]) == 1.0


@FAST
@given(score_lists, st.randoms(use_true_random=False))
def test_ap_is_invariant_under_permutations_that_keep_the_order_of_ties(items, rng):
    scores = np.array([s for s, _ in items])
    labels = np.array([a for _, a in items])
    shuffled = np.array(rng.sample(range(len(scores)), len(scores)), dtype=np.int64)
    # Within each group of equal scores, restore the input order of the group's members.
    permutation = shuffled.copy()
    for value in np.unique(scores):
        slots = np.flatnonzero(scores[shuffled] == value)
        permutation[slots] = np.sort(shuffled[slots])
    expected = average_precision(scores, labels)
    assert average_precision(scores[permutation], labels[permutation]) == expected


@FAST
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 6), st.integers(1, 25)),
        elements=st.sampled_from([0.0, 0.5, 1.0, 0.25]),
    ),
    st.integers(1, 30),
)
def test_top_k_ranking_is_the_stable_ranking_cut_to_k(scores, k):
    expected = np.stack([ranking_order(row)[:k] for row in scores])
    np.testing.assert_array_equal(top_k_ranking(scores, k), expected)


# --- segment MAP ---------------------------------------------------------------------------


def hand_truth() -> SegmentTruth:
    # class 3: a:0 +, a:5 -, a:10 +, b:0 +  -> N_3 = 3 positives
    # class 7: a:0 -, b:5 +                 -> N_7 = 1
    # class 9: a:0 -                        -> no positive: not scored
    return SegmentTruth(
        ["a", "a", "a", "b", "a", "b", "a"],
        [0, 5, 10, 0, 0, 5, 0],
        [3, 3, 3, 3, 7, 7, 9],
        [1, 0, 1, 1, 0, 1, 0],
    )


def test_segment_map_by_hand():
    submission = {
        3: ["a:0", "x:0", "a:5", "a:10", "a:0"],  # x:0 unrated, second a:0 a duplicate
        7: ["b:5"],
        9: ["a:0"],  # no positive in the truth: ignored
        11: ["z:0"],  # not rated at all: ignored
    }
    result = segment_map(submission, hand_truth())
    # class 3: ranked a:0 +, a:5 -, a:10 + over N=3 -> (1/1 + 2/3) / 3 = 5/9
    # class 7: b:5 + over N=1 -> 1
    assert result.class_ap == pytest.approx({3: 5 / 9, 7: 1.0})
    assert result.map == pytest.approx((5 / 9 + 1) / 2)
    assert result.classes == 2
    assert result.missing_classes == ()
    assert result.ignored_classes == (9, 11)
    assert (result.submitted, result.truncated, result.unrated, result.duplicates) == (6, 0, 1, 1)
    assert result.scored == 4
    # the ceiling: class 3's two submitted positives of 3 first (2/3), class 7's one (1)
    assert result.ceiling == pytest.approx((2 / 3 + 1) / 2)
    assert result.found_positives == 3


def test_ceiling_counts_positives_within_k_once_and_missing_classes_as_zero():
    result = segment_map({7: ["u:0", "b:5", "b:5"]}, hand_truth(), k=2)
    assert (result.ceiling, result.found_positives) == (0.5, 1)  # class 3 missing: 0
    assert segment_map({7: ["u:0", "b:5"]}, hand_truth(), k=1).ceiling == 0.0


def test_class_missing_from_submission_counts_zero():
    result = segment_map({3: ["a:0", "a:10", "b:0"]}, hand_truth())
    # class 3 perfect (1), class 7 absent (0): (1 + 0) / 2
    assert result.map == 0.5
    assert result.missing_classes == (7,)


def test_empty_submission_scores_zero():
    result = segment_map({}, hand_truth())
    assert result.map == 0.0
    assert result.missing_classes == (3, 7)
    assert result.submitted == 0


def test_a_repeated_positive_counts_once():
    # G's script would count b:5 twice: (1/1 + 2/2) / 1 = 2.
    assert segment_map({7: ["b:5", "b:5"], 3: []}, hand_truth()).class_ap[7] == 1.0


@pytest.mark.parametrize(("k", "expected_ap"), [(4, 0.0), (5, 1.0), (6, 1.0)])
def test_truncation_to_k_comes_before_unrated_removal(k, expected_ap):
    # The only positive of class 7 (b:5) sits at position 5, behind 4 unrated ids. Cut at
    # k=4 it is gone (AP 0); at k>=5 the unrated ids are removed and it ranks first (AP 1).
    row = ["u:0", "u:5", "u:10", "u:15", "b:5", "u:20"]
    result = segment_map({7: row}, hand_truth(), k=k)
    assert result.class_ap[7] == expected_ap
    assert result.truncated == len(row) - min(k, len(row))


def test_duplicates_take_up_row_positions_before_truncation():
    # The row is cut to k=3 first, so b:5 (4th) is out even though two of the first three
    # entries are repeats that dedupe would remove: a Kaggle row holds k entries, repeats
    # included.
    result = segment_map({7: ["a:0", "a:0", "a:0", "b:5"]}, hand_truth(), k=3)
    assert result.class_ap[7] == 0.0
    assert (result.truncated, result.duplicates) == (1, 2)
    assert (result.submitted, result.unrated, result.scored) == (4, 0, 1)  # 4 − 1 − 0 − 2


def test_the_limits_of_k_and_num_positives_are_exact():
    scores = np.array([[0.3, 0.9, 0.1]])
    np.testing.assert_array_equal(top_k_ranking(scores, 1), [[1]])  # 1: the smallest k
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        top_k_ranking(scores, 0)
    assert average_precision([0.9, 0.1], [0, 0], num_positives=0) == 0.0  # 0: allowed
    with pytest.raises(ValueError, match="num_positives must be >= 0, got -1"):
        average_precision([0.9, 0.1], [1, 0], num_positives=-1)


def test_video_metrics_default_to_gap_at_20():
    # YouTube-8M's GAP pools each video's top 20 classes: with 21 classes and the only
    # positive ranked 21st, GAP@20 sees no hit
    predictions = np.linspace(1.0, 0.0, 21)[None, :]
    labels = np.zeros((1, 21))
    labels[0, 20] = 1
    metrics = VideoMetrics(21)
    metrics.accumulate(predictions, labels)
    assert metrics.top_k == 20 and metrics.get().gap == 0.0
    assert gap(predictions, labels) == 0.0 and gap(predictions, labels, top_k=21) > 0


def test_segment_map_rejects_a_truth_without_positives_and_a_bad_k():
    truth = SegmentTruth(["a"], [0], [3], [0])
    with pytest.raises(ValueError, match="no positive"):
        segment_map({3: ["a:0"]}, truth)
    with pytest.raises(ValueError, match="k must"):
        segment_map({}, hand_truth(), k=0)


def test_truth_repeated_ratings():
    same = SegmentTruth(["a", "a"], [5, 5], [3, 3], [1.0, 1.0])
    assert len(same) == 1 and same.num_positives[3] == 1
    with pytest.raises(ValueError, match=r"video 'a', start 5, class 3"):
        SegmentTruth(["a", "a"], [5, 5], [3, 3], [1, 0])


def test_truth_input_errors():
    with pytest.raises(ValueError, match="length"):
        SegmentTruth(["a"], [0, 5], [3], [1])
    with pytest.raises(ValueError, match="0 or 1"):
        SegmentTruth(["a"], [0], [3], [0.5])
    with pytest.raises(ValueError, match="integers"):
        SegmentTruth(["a"], [0.5], [3], [1])
    with pytest.raises(TypeError, match="str"):
        SegmentTruth([b"a"], [0], [3], [1])


def test_truth_from_videos():
    videos = [
        SimpleNamespace(
            id="a",
            segment_labels=np.array([3, 3, 3, 7]),
            segment_start_times=np.array([0, 5, 10, 0]),
            segment_scores=np.array([1.0, 0.0, 1.0, 0.0]),
        ),
        SimpleNamespace(
            id="b",
            segment_labels=np.array([3, 7]),
            segment_start_times=np.array([0, 5]),
            segment_scores=np.array([1.0, 1.0]),
        ),
    ]
    truth = SegmentTruth.from_videos(videos)
    assert truth.num_positives == {3: 3, 7: 1}
    assert truth.ratings(3) == {"a:0": True, "a:5": False, "a:10": True, "b:0": True}
    assert truth.positive_classes() == [3, 7]
    assert len(SegmentTruth.from_videos([])) == 0

    videos[1].segment_scores = np.array([1.0])
    with pytest.raises(ValueError, match="video 'b'"):
        SegmentTruth.from_videos(videos)


@st.composite
def truths(draw):
    """A random truth over a few videos and classes, as parallel rating lists."""
    ratings = draw(
        st.dictionaries(
            st.tuples(
                st.sampled_from("abcd"), st.integers(0, 5).map(lambda i: 5 * i), st.integers(0, 4)
            ),
            st.integers(0, 1),
            min_size=1,
            max_size=40,
        )
    )
    keys = list(ratings)
    return SegmentTruth(
        [v for v, _, _ in keys],
        [s for _, s, _ in keys],
        [c for _, _, c in keys],
        list(ratings.values()),
    )


@FAST
@given(truths(), st.randoms(use_true_random=False))
def test_perfect_submission_scores_exactly_one_and_reversed_does_not_beat_it(truth, rng):
    classes = truth.positive_classes()
    if not classes:
        return
    perfect = {}
    for c in classes:
        positives = [s for s, positive in truth.ratings(c).items() if positive]
        negatives = [s for s, positive in truth.ratings(c).items() if not positive]
        rng.shuffle(positives)
        rng.shuffle(negatives)
        perfect[c] = positives + ["zz:0"] + negatives  # an unrated id changes nothing
    assert segment_map(perfect, truth).map == 1.0
    reversed_map = segment_map({c: row[::-1] for c, row in perfect.items()}, truth).map
    has_negatives = any(len(truth.ratings(c)) > truth.num_positives[c] for c in classes)
    assert reversed_map < 1.0 if has_negatives else reversed_map == 1.0


@FAST
@given(truths(), st.randoms(use_true_random=False))
def test_ceiling_is_the_map_of_the_best_reordering_and_bounds_every_order(truth, rng):
    classes = truth.positive_classes()
    if not classes:
        return
    submission = {}
    for c in classes:
        rated = list(truth.ratings(c))
        submission[c] = rng.sample(rated, rng.randint(0, len(rated))) + ["zz:0"]
    result = segment_map(submission, truth)
    best_first = {c: sorted(row, key=lambda s: not truth.ratings(c).get(s, False))
                  for c, row in submission.items()}
    assert result.ceiling == pytest.approx(segment_map(best_first, truth).map)
    assert result.map <= result.ceiling + 1e-12
    assert result.found_positives == sum(
        sum(truth.ratings(c).get(s, False) for s in row) for c, row in submission.items())


def test_rank_segments_orders_by_score_with_ties_in_segment_order():
    ids = ["a:0", "a:5", "b:0", "b:5"]
    scores = np.array([[0.2, 0.9], [0.8, 0.9], [0.2, 0.1], [0.5, 0.9]])
    rows = rank_segments(ids, scores, [3, 7], k=3)
    assert rows == {3: ["a:5", "b:5", "a:0"], 7: ["a:0", "a:5", "b:5"]}
    assert rank_segments([], np.zeros((0, 2)), [3, 7]) == {3: [], 7: []}
    with pytest.raises(ValueError, match="shape"):
        rank_segments(ids, scores, [3])


def test_scoring_a_score_matrix_goes_through_rank_segments():
    truth = hand_truth()
    ids = ["a:0", "a:5", "a:10", "b:0", "b:5"]
    # Class 3 scored perfectly; class 7 puts its positive b:5 second behind the negative a:0.
    scores = np.array([[0.9, 0.9], [0.1, 0.1], [0.8, 0.1], [0.7, 0.1], [0.2, 0.5]])
    result = segment_map(rank_segments(ids, scores, [3, 7]), truth)
    # class 3: 1; class 7: ranked a:0 -, b:5 + -> (1/2) / 1
    assert result.class_ap == {3: 1.0, 7: 0.5}


# --- video metrics -------------------------------------------------------------------------


def test_hit_at_one_and_perr_by_hand():
    predictions = np.array([[0.1, 0.9, 0.3, 0.0], [0.8, 0.1, 0.2, 0.0], [0.9, 0.8, 0.1, 0.0]])
    labels = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 0]])
    # hit@1: best classes 1, 0, 0 -> hits 1, 0, 1 -> 2/3
    assert hit_at_one(predictions, labels) == pytest.approx(2 / 3)
    # PERR: video 0 top-1 {1} -> 1/1; video 1 top-1 {0} -> 0/1; video 2 top-2 {0, 1} -> 1/2
    assert precision_at_equal_recall_rate(predictions, labels) == pytest.approx((1 + 0 + 0.5) / 3)


def test_perr_zero_scores_and_unlabelled_videos():
    # A hit needs a score > 0 (video 0: top-1 is class 0 by the tie rule, at score 0), and a
    # video without labels scores 0 (video 1): (0 + 0) / 2.
    predictions = np.array([[0.0, 0.0], [0.3, 0.7]])
    labels = np.array([[1, 0], [0, 0]])
    assert precision_at_equal_recall_rate(predictions, labels) == 0.0


def test_hit_at_one_is_gs_argmax_even_on_a_zero_row():
    # REFERENCE §8.4: actual[argmax(pred)], no score condition (PERR has one): video 1
    # predicts nothing, argmax picks class 0, one of its labels
    predictions = np.array([[0.2, 0.9], [0.0, 0.0]])
    labels = np.array([[0, 1], [1, 0]])
    assert hit_at_one(predictions, labels) == 1.0
    assert precision_at_equal_recall_rate(predictions, labels) == 0.5


def test_gap_by_hand():
    predictions = np.array([[0.9, 0.8, 0.1], [0.7, 0.6, 0.5]])
    labels = np.array([[1, 0, 1], [0, 1, 0]])
    # top-2 pools: (0.9, 1) (0.8, 0) | (0.7, 0) (0.6, 1); N = 3 positives, one of which
    # (video 0, class 2) is outside the top-2: (1/1 + 2/4) / 3 = 0.5
    assert gap(predictions, labels, top_k=2) == pytest.approx(0.5)
    # top_k beyond the class count keeps every class: ranked 1 0 0 1 0 1 -> (1 + 2/4 + 3/6) / 3
    assert gap(predictions, labels, top_k=10) == pytest.approx((1 + 2 / 4 + 3 / 6) / 3)


@FAST
@given(
    hnp.arrays(np.bool_, st.tuples(st.integers(1, 8), st.integers(3, 12))),
    st.randoms(use_true_random=False),
)
def test_gap_of_a_perfect_prediction_is_one(labels, rng):
    labels = labels.copy()
    labels[:, 3:] = False  # at most 3 labels per video, so they all fit in its top-3
    if not labels.any():
        labels[0, 0] = True
    noise = np.array([[rng.random() * 0.5 for _ in row] for row in labels])
    predictions = labels + noise  # every positive outscores every negative
    assert gap(predictions, labels, top_k=3) == 1.0
    metrics = VideoMetrics(labels.shape[1], top_k=3)
    metrics.accumulate(predictions, labels)
    assert metrics.get().map == 1.0


@FAST
@given(
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 10), st.integers(1, 8)),
        elements=st.sampled_from([0.0, 0.2, 0.4, 0.6, 0.8]),
    ),
    st.data(),
)
def test_video_metrics_match_g_loops_over_batches(predictions, data):
    labels = data.draw(hnp.arrays(np.int64, predictions.shape, elements=st.integers(0, 1)))
    top_k = data.draw(st.integers(1, 5))
    split = data.draw(st.integers(1, len(predictions)))
    metrics = VideoMetrics(predictions.shape[1], top_k=top_k)
    metrics.accumulate(predictions[:split], labels[:split])
    if split < len(predictions):
        metrics.accumulate(predictions[split:], labels[split:])
    result = metrics.get()

    expected_gap, expected_aps = reference_video_metrics(predictions, labels, top_k)
    assert result.gap == pytest.approx(expected_gap, abs=1e-12)
    assert result.gap == pytest.approx(gap(predictions, labels, top_k), abs=1e-12)
    assert result.hit_at_one == pytest.approx(hit_at_one(predictions, labels))
    assert result.perr == pytest.approx(precision_at_equal_recall_rate(predictions, labels))
    assert result.num_videos == len(predictions)
    assert {c: result.class_ap[c] for c in expected_aps} == pytest.approx(expected_aps, abs=1e-12)
    assert np.isnan(result.class_ap[labels.sum(axis=0) == 0]).all()
    if expected_aps:
        assert result.map == pytest.approx(np.mean(list(expected_aps.values())), abs=1e-12)
    else:
        assert np.isnan(result.map)


def test_video_metrics_errors_and_clear():
    metrics = VideoMetrics(3)
    with pytest.raises(ValueError, match="no videos"):
        metrics.get()
    with pytest.raises(ValueError, match="3 classes"):
        metrics.accumulate(np.zeros((2, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.accumulate(np.full((1, 3), np.nan), np.zeros((1, 3)))
    metrics.accumulate(np.array([[0.9, 0.1, 0.0]]), np.array([[1, 0, 0]]))
    assert metrics.get().gap == 1.0
    metrics.clear()
    with pytest.raises(ValueError, match="no videos"):
        metrics.get()
