"""The uint8 → float model-input transform, on the device.

Batches stay ``uint8`` until they reach the model (REFERENCE §5, DESIGN "the data's one
walk"). :class:`FeatureInput` turns them into the float input the models were trained on and
marks padding, which uint8 cannot encode (:mod:`modloc.engine.base.features`): frames at or beyond
``num_frames[b]`` become :func:`modloc.engine.base.features.padding_input` and get mask 0.

The constants are non-persistent buffers: an exported graph folds them, and checkpoints hold
learned state only (the constants come from the shipped eigenvalues, not from training).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modloc.engine.base.features import (
    DEQUANT_BIAS,
    DEQUANT_SCALE,
    FEATURE_SIZE,
    input_affine,
    padding_input,
)

InputTransform = Literal["unwhiten", "l2"]


class FeatureInput(nn.Module):
    """``(B, M, 1152)`` uint8 + ``num_frames (B,)`` → ``(B, M, 1152)`` float32, ``mask (B, M)``.

    Transforms:
        ``"unwhiten"``: the MOD input (REFERENCE §5), ``q * scale + bias`` with
            :func:`modloc.engine.base.features.input_affine`; padding = :func:`modloc.engine.base.features.padding_input`.
        ``"l2"``: the starter code's input (G ``train.py``): dequantize, padding 0.0, then
            L2-normalize every frame over its 1152 dims (TF ``l2_normalize``, so padding
            stays 0). Only the DBoF baseline uses it.

    The mask is float32, 1.0 at valid frames and 0.0 at padding.
    """

    def __init__(self, transform: InputTransform = "unwhiten"):
        super().__init__()
        if transform == "unwhiten":
            scale, bias = input_affine()
            padding = padding_input()
        elif transform == "l2":
            scale = np.full(FEATURE_SIZE, DEQUANT_SCALE, np.float32)
            bias = np.full(FEATURE_SIZE, DEQUANT_BIAS, np.float32)
            padding = np.zeros(FEATURE_SIZE, np.float32)
        else:
            raise ValueError(f"unknown input transform {transform!r}")
        self.transform = transform
        # torch.tensor (a copy) rather than from_numpy: it honours a `with torch.device(...)`
        # context, so a model built on the meta device is entirely meta.
        self.register_buffer("scale", torch.tensor(scale), persistent=False)
        self.register_buffer("bias", torch.tensor(bias), persistent=False)
        self.register_buffer("padding", torch.tensor(padding), persistent=False)

    def forward(self, features: torch.Tensor, num_frames: torch.Tensor):
        """``(B, M, 1152)`` uint8, ``(B,)`` int → (``(B, M, 1152)`` float, ``(B, M)`` float)."""
        frames = torch.arange(features.shape[1], device=features.device)
        valid = frames[None, :] < num_frames.to(features.device)[:, None]
        inputs = features.to(self.scale.dtype) * self.scale + self.bias
        inputs = torch.where(valid[..., None], inputs, self.padding)
        if self.transform == "l2":
            # TF l2_normalize floors the squared norm at 1e-12, i.e. the norm at 1e-6
            inputs = F.normalize(inputs, dim=-1, eps=1e-6)
        return inputs, valid.to(inputs.dtype)

    def extra_repr(self) -> str:
        return f"transform={self.transform!r}"
