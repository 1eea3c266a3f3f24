"""Dequantization and RGB un-whitening against constants written out from their definitions.

The parity tests compare two callers of :func:`input_affine`, so a wrong constant there
would pass them; these check its values against numbers computed by hand from the
YouTube-8M definitions (REFERENCE §2, §5) and the shipped eigenvalues file read directly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from modloc.engine.base import features
from modloc.engine.base.vocab import data_path

RGB, AUDIO = 1024, 128


def eigenvalues() -> np.ndarray:
    """The first 1024 PCA eigenvalues, read from the file without the module's helper."""
    return np.load(data_path("eigenvals.npy"))[:RGB, 0].astype(np.float64)


def test_dequantization_constants_are_youtube8m_s():
    # G utils.Dequantize(max=2, min=-2): q * (4 / 255) + 4 / 512 - 2
    assert features.DEQUANT_SCALE == pytest.approx(0.01568627450980392, rel=1e-15)
    assert features.DEQUANT_BIAS == pytest.approx(-1.9921875, rel=1e-15)
    assert features.RGB_OFFSET == 0.0078125
    assert (features.SEGMENT_FRAMES, features.MAX_FRAMES) == (5, 300)


def test_the_eigenvalues_file_is_the_v2_one():
    # REFERENCE §2: float32 (2048, 1), e[0] = 14.7385, sqrt(e[:1024]) in [0.1239, 3.839]
    raw = np.load(data_path("eigenvals.npy"))
    assert raw.shape == (2048, 1) and raw.dtype == np.float32
    assert raw[0, 0] == pytest.approx(14.7385, abs=1e-4)
    roots = np.sqrt(eigenvalues())
    assert roots.min() == pytest.approx(0.1239, abs=1e-4)
    assert roots.max() == pytest.approx(3.839, abs=1e-3)


def test_unwhitening_scale_is_sqrt_e_plus_1e_4():
    scale = features.rgb_unwhitening_scale()
    assert scale.shape == (RGB,) and scale.dtype == np.float32
    # first and last RGB dims written out: sqrt(14.738506) + 1e-4, and e[1023] from the file
    assert scale[0] == pytest.approx(math.sqrt(14.738506) + 1e-4, rel=1e-6)
    np.testing.assert_allclose(scale, np.sqrt(eigenvalues()) + 1e-4, rtol=1e-6)
    # not the extractor's sqrt(e + 1e-4) (REFERENCE §5): the two differ most on small e
    assert not np.allclose(scale, np.sqrt(eigenvalues() + 1e-4), rtol=1e-5)


@pytest.mark.parametrize("q", [0, 1, 127, 128, 254, 255])
def test_model_input_of_every_dimension_from_the_definitions(q):
    e = eigenvalues()
    x = q * 4 / 255 + 4 / 512 - 2  # the dequantized value
    got = features.model_input(np.full((1, 1152), q, np.uint8))[0]
    # float32 q·scale + bias cancels near q = 127.5: a few ulps of 8 (1e-6) absolute; a wrong
    # constant moves values by ≥ 4e-4 (1e-4 · 3.8, the smallest term)
    np.testing.assert_allclose(got[:RGB], (x - 4 / 512) * (np.sqrt(e) + 1e-4), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(got[RGB:], np.full(AUDIO, x), rtol=2e-6, atol=1e-6)


def test_model_input_at_the_ends_of_the_uint8_range():
    # q = 0 → -1.9921875, q = 255 → 2.0078125 (REFERENCE §2); RGB then loses 4/512
    s0 = math.sqrt(14.738506) + 1e-4
    low = features.model_input(np.zeros((1152,), np.uint8))
    high = features.model_input(np.full((1152,), 255, np.uint8))
    assert low[RGB] == pytest.approx(-1.9921875, abs=1e-6)
    assert high[-1] == pytest.approx(2.0078125, abs=1e-6)
    assert low[0] == pytest.approx(-2.0 * s0, rel=1e-6)
    assert high[0] == pytest.approx(2.0 * s0, rel=1e-6)


def test_a_padding_frame_is_zero_after_dequantization():
    e = eigenvalues()
    padding = features.padding_input()
    np.testing.assert_allclose(padding[:RGB], -4 / 512 * (np.sqrt(e) + 1e-4), rtol=1e-6)
    assert np.all(padding[RGB:] == 0.0)
    quantized = np.full((2, 3, 1152), 200, np.uint8)
    masked = features.masked_model_input(quantized, np.array([3, 1]))
    np.testing.assert_array_equal(masked[0], features.model_input(quantized[0]))
    np.testing.assert_array_equal(masked[1, 0], features.model_input(quantized[1, 0]))
    np.testing.assert_array_equal(masked[1, 1:], np.broadcast_to(padding, (2, 1152)))


def test_quantize_is_the_extractors_rounding_and_inverts_dequantization():
    # q = round((clip(x, -2, 2) + 2) * 255 / 4)
    values = np.array([-3.0, -2.0, -1.0, 0.0, 0.0078, 1.0, 2.0, 5.0])
    np.testing.assert_array_equal(features.quantize(values), [0, 0, 64, 128, 128, 191, 255, 255])
    codes = np.arange(256, dtype=np.uint8)
    # dequantize(q) = q·4/255 − 2 + 4/512 lies 4/512 above the code's centre: quantizing it
    # gives q back (the offset is under half a step, 4/510)
    dequantized = codes.astype(np.float64) * 4 / 255 + 4 / 512 - 2
    np.testing.assert_array_equal(features.quantize(dequantized), codes)
    assert features.quantize(values).dtype == np.uint8


def test_model_input_refuses_the_wrong_width():
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 1152\) features, got shape \(2, 1151\)"):
        features.model_input(np.zeros((2, 1151), np.uint8))


@pytest.mark.parametrize(("frames", "segments"), [(0, 0), (1, 1), (5, 1), (6, 2), (300, 60),
                                                  (301, 61)])
def test_num_segments_is_ceil_frames_over_5(frames, segments):
    assert features.num_segments(frames) == segments


def test_the_cached_transforms_are_read_only():
    # input_affine() and rgb_unwhitening_scale() are shared caches: a caller writing into
    # them would change every later model input
    for array in (*features.input_affine(), features.rgb_unwhitening_scale()):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0.0
