"""Stage 1 and 3 primitives against hand-computed values and REFERENCE §7's constants."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modloc.engine.runtime.fusion import FusionConfig, dummy_pairs, fuse, top_candidates


def test_the_defaults_are_the_final_systems():
    config = FusionConfig()
    # REFERENCE §7: top-20 candidates, P_vid^0.05 · P_seg^0.95, full windows, K = 100,000
    assert (config.top_n, config.video_exponent, config.segment_exponent) == (20, 0.05, 0.95)
    assert (config.include_partial, config.k) == (False, 100_000)


def test_fuse_by_hand():
    assert fuse(0.5, 0.25) == pytest.approx(0.5 ** 0.05 * 0.25 ** 0.95, rel=1e-15)
    assert fuse(0.5, 0.25) == pytest.approx(0.2588162309603444, rel=1e-12)
    windows = fuse(np.array([0.81, 0.16]), np.array([[1.0, 0.5], [0.0, 1.0]]), 0.5, 1.0)
    np.testing.assert_allclose(windows, [[0.9, 0.2], [0.0, 0.4]], rtol=1e-15)
    assert fuse(np.float32(0.5), np.float32(0.25)).dtype == np.float64


@pytest.mark.parametrize(("changes", "message"), [
    ({"top_n": 0}, "top_n and k must be >= 1"), ({"k": 0}, "top_n and k must be >= 1"),
    ({"video_exponent": -1e-9}, "video exponent"), ({"segment_exponent": math.nan}, "segment exponent"),
    ({"video_exponent": math.inf}, "video exponent"), ({"segment_exponent": -math.inf}, "segment"),
])
def test_settings_outside_their_range_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        FusionConfig(**changes)


def test_settings_at_their_edges_are_accepted():
    config = FusionConfig(top_n=1, k=1, video_exponent=0.0, segment_exponent=0.0)
    assert (config.top_n, config.k) == (1, 1)


def test_top_candidates_default_to_20_best_first():
    scores = np.arange(25, dtype=np.float64)[None, :] / 25  # class 100 + j scores j / 25
    ids, top = top_candidates(scores, np.arange(100, 125))
    np.testing.assert_array_equal(ids, [np.arange(124, 104, -1)])
    np.testing.assert_allclose(top, [np.arange(24, 4, -1) / 25])
    # fewer classes than top_n: all of them; no video: (0, n) arrays
    ids, _ = top_candidates(np.array([[0.2, 0.7, 0.2]]), [5, 6, 7], top_n=20)
    np.testing.assert_array_equal(ids, [[6, 5, 7]])  # the tie keeps the lower column first
    empty_ids, empty_scores = top_candidates(np.zeros((0, 25)), np.arange(25))
    assert empty_ids.shape == empty_scores.shape == (0, 20) and empty_ids.dtype == np.int64


def test_dummy_pairs_rank_full_windows_unless_asked():
    # 12 frames: windows at 0 and 5 are full, the one at 10 holds 2 frames
    starts, ids, values = dummy_pairs(12, [7, 3], [0.9, 0.4])
    np.testing.assert_array_equal(starts, [0, 0, 5, 5])
    np.testing.assert_array_equal(ids, [7, 3, 7, 3])
    np.testing.assert_array_equal(values, [0.9, 0.4, 0.9, 0.4])
    starts, ids, _ = dummy_pairs(12, [7, 3], [0.9, 0.4], include_partial=True)
    np.testing.assert_array_equal(starts, [0, 0, 5, 5, 10, 10])
    assert len(dummy_pairs(4, [7], [0.9])[0]) == 0  # no full window
    np.testing.assert_array_equal(dummy_pairs(10, [7], [0.9])[0], [0, 5])
