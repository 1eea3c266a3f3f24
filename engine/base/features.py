"""Feature (de)quantization and the model-input transform of the MOD system.

- Quantization (Google's extractor): ``q = round((clip(x, -2, 2) + 2) * 255 / 4)``.
- Dequantization (G ``utils.Dequantize``): ``x = q * 4/255 + (4/512 - 2)``; note the
  ``+4/512`` offset, so ``q = 0`` maps to ``-1.9921875``, not ``-2``.
- Model input (REFERENCE §5, "reverse whitening", RGB only):
  ``rgb_in = (x - 4/512) * (sqrt(e) + 1e-4)`` with ``e`` the first 1024 PCA eigenvalues;
  audio is the dequantized value unchanged.

Because every step is an affine map per feature dimension, the whole uint8 → model-input
transform is ``q * scale + bias`` (:func:`input_affine`), which is what exported graphs
fold into their first layer. Padding frames are 0.0 *after dequantization* (as in G's
reader), so in model-input space their RGB dims are ``-4/512 * (sqrt(e) + 1e-4)``.
"""

from __future__ import annotations

import functools

import numpy as np

from modloc.engine.base.io.examples import AUDIO_SIZE, FEATURE_SIZE, RGB_SIZE
from modloc.engine.base.vocab import data_path

QUANT_MIN = -2.0
QUANT_MAX = 2.0
DEQUANT_SCALE = (QUANT_MAX - QUANT_MIN) / 255.0
DEQUANT_BIAS = (QUANT_MAX - QUANT_MIN) / 512.0 + QUANT_MIN
RGB_OFFSET = 4.0 / 512.0
SEGMENT_FRAMES = 5
MAX_FRAMES = 300


def quantize(values: np.ndarray) -> np.ndarray:
    """float features → uint8, exactly as the YouTube-8M extractor does."""
    clipped = np.clip(np.asarray(values, dtype=np.float64), QUANT_MIN, QUANT_MAX)
    return np.round((clipped - QUANT_MIN) * 255.0 / (QUANT_MAX - QUANT_MIN)).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def rgb_unwhitening_scale() -> np.ndarray:
    """``(1024,)`` float32 ``sqrt(e) + 1e-4`` from the shipped PCA eigenvalues."""
    eigenvalues = np.load(data_path("eigenvals.npy")).astype(np.float64).reshape(-1)[:RGB_SIZE]
    scale = (np.sqrt(eigenvalues) + 1e-4).astype(np.float32)
    scale.setflags(write=False)
    return scale


@functools.lru_cache(maxsize=1)
def input_affine() -> tuple[np.ndarray, np.ndarray]:
    """``(scale, bias)``, each ``(1152,)`` float32: model input = ``q * scale + bias``.

    RGB: ``(q * s + b - 4/512) * u``; audio: ``q * s + b`` (s, b the dequantization
    constants, u the un-whitening scale).
    """
    unwhiten = rgb_unwhitening_scale().astype(np.float64)
    scale = np.empty(FEATURE_SIZE, np.float64)
    bias = np.empty(FEATURE_SIZE, np.float64)
    scale[:RGB_SIZE] = DEQUANT_SCALE * unwhiten
    bias[:RGB_SIZE] = (DEQUANT_BIAS - RGB_OFFSET) * unwhiten
    scale[RGB_SIZE:] = DEQUANT_SCALE
    bias[RGB_SIZE:] = DEQUANT_BIAS
    scale32, bias32 = scale.astype(np.float32), bias.astype(np.float32)
    scale32.setflags(write=False)
    bias32.setflags(write=False)
    return scale32, bias32


def padding_input() -> np.ndarray:
    """``(1152,)`` float32 model input of a padding frame (0.0 after dequantization)."""
    padding = np.zeros(FEATURE_SIZE, np.float32)
    padding[:RGB_SIZE] = -RGB_OFFSET * rgb_unwhitening_scale()
    return padding


def model_input(quantized: np.ndarray) -> np.ndarray:
    """``(..., 1152)`` uint8 → ``(..., 1152)`` float32 model input (REFERENCE §5)."""
    quantized = np.asarray(quantized)
    if quantized.shape[-1] != FEATURE_SIZE:
        raise ValueError(f"expected (..., {FEATURE_SIZE}) features, got shape {quantized.shape}")
    scale, bias = input_affine()
    return quantized.astype(np.float32) * scale + bias


def masked_model_input(quantized: np.ndarray, num_frames: np.ndarray) -> np.ndarray:
    """``(B, M, 1152)`` uint8 + ``(B,)`` valid frame counts → ``(B, M, 1152)`` float32.

    Frames at or beyond ``num_frames[b]`` are padding: uint8 has no code for a dequantized
    0.0, so batches carry counts and padding is filled here with :func:`padding_input`.
    """
    inputs = model_input(quantized)
    frame_index = np.arange(inputs.shape[1])
    padded = frame_index[None, :] >= np.asarray(num_frames).reshape(-1, 1)
    inputs[padded] = padding_input()
    return inputs


def num_segments(num_frames: int, segment_frames: int = SEGMENT_FRAMES) -> int:
    """Non-overlapping windows at 0, 5, 10, …: ``ceil(num_frames / 5)`` (REFERENCE §7)."""
    return -(-int(num_frames) // segment_frames)


__all__ = [
    "AUDIO_SIZE", "DEQUANT_BIAS", "DEQUANT_SCALE", "FEATURE_SIZE", "MAX_FRAMES", "RGB_OFFSET",
    "RGB_SIZE", "SEGMENT_FRAMES", "input_affine", "masked_model_input", "model_input",
    "num_segments",
    "padding_input", "quantize", "rgb_unwhitening_scale",
]
