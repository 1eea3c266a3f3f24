"""The NeXtVLAD video classifier (V3 ``NeXtVLADModel``, one branch of a mixture; REFERENCE §3).

::

    uint8 frames ─ FeatureInput ─┬─ RGB   (B, M, 1024) ─ NeXtVLAD(K, G, λ)      ─┐
                                 └─ audio (B, M, 128)  ─ NeXtVLAD(K/2, G/2, λ)  ─┴─ concat
      ─ dropout ─ FC (no bias) ─ BN (no ReLU) ─ SE context gating ─ logistic FC ─ logits

Video mode masks padded frames in the group attention; segment mode (5-frame windows)
passes no mask, as the reference does. The forward returns logits; probabilities are
``sigmoid(logits)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from modloc.engine.base.features import AUDIO_SIZE, RGB_SIZE
from modloc.training.models.inputs import FeatureInput
from modloc.training.models.nextvlad import NeXtVLAD, init_linear_, tf_batch_norm

Mode = Literal["video", "segment"]


@dataclass(frozen=True)
class NeXtVLADConfig:
    """One NeXtVLAD model; defaults are the paper's NeXtVLAD (8G, 128K, X2, 2048H), r=8.

    ``mode`` only picks the default of ``use_mask``: ``"video"`` masks padded frames in the
    group attention, ``"segment"`` does not (REFERENCE §3 step 2, §10.6).
    """

    num_classes: int = 3862
    cluster_size: int = 128
    groups: int = 8
    expansion: int = 2
    hidden_size: int = 2048
    gating_reduction: int = 8
    drop_rate: float = 0.5
    mode: Mode = "video"

    def __post_init__(self):
        # the audio stream runs with half the clusters and half the groups
        if self.cluster_size < 2 or self.groups < 2:
            raise ValueError("cluster_size and groups must be >= 2 (audio uses half of each)")
        if self.hidden_size % self.gating_reduction:
            raise ValueError("hidden_size must be divisible by gating_reduction")
        if self.mode not in ("video", "segment"):
            raise ValueError(f"mode must be 'video' or 'segment', got {self.mode!r}")


class ContextGating(nn.Module):
    """SE context gating: ``h * sigmoid(W2 · ReLU(BN(W1 · h)))``, ``(B, H) -> (B, H)``.

    W1: H → H/r and W2: H/r → H, both without bias; only W1 is followed by a BN.
    """

    def __init__(self, size: int, reduction: int):
        super().__init__()
        self.squeeze = init_linear_(nn.Linear(size, size // reduction, bias=False))
        self.bn = tf_batch_norm(size // reduction)
        self.excite = init_linear_(nn.Linear(size // reduction, size, bias=False))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gates = torch.relu(self.bn(self.squeeze(h)))
        return h * torch.sigmoid(self.excite(gates))


class NeXtVLADModel(nn.Module):
    """``(B, M, 1152)`` uint8 + ``num_frames (B,)`` → logits ``(B, C)``."""

    def __init__(self, config: NeXtVLADConfig):
        super().__init__()
        self.config = config
        c = config
        self.inputs = FeatureInput()
        self.video_vlad = NeXtVLAD(RGB_SIZE, c.cluster_size, c.groups, c.expansion)
        self.audio_vlad = NeXtVLAD(AUDIO_SIZE, c.cluster_size // 2, c.groups // 2, c.expansion)
        vlad_size = self.video_vlad.output_size + self.audio_vlad.output_size
        self.dropout = nn.Dropout(c.drop_rate)
        self.hidden = init_linear_(nn.Linear(vlad_size, c.hidden_size, bias=False))
        self.hidden_bn = tf_batch_norm(c.hidden_size)
        self.gating = ContextGating(c.hidden_size, c.gating_reduction)
        # LogisticModel; the only layer with weight decay (REFERENCE §4)
        self.classifier = init_linear_(nn.Linear(c.hidden_size, c.num_classes))

    def forward(
        self, features: torch.Tensor, num_frames: torch.Tensor, use_mask: bool | None = None
    ) -> torch.Tensor:
        """``(B, M, 1152)`` uint8, ``(B,)`` int → ``(B, C)`` logits.

        ``use_mask`` defaults to ``config.mode == "video"``.
        """
        x, mask = self.inputs(features, num_frames)
        return self.forward_input(x, mask if self.uses_mask(use_mask) else None)

    def forward_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``(B, M, 1152)`` float model input, ``(B, M)`` mask or None → ``(B, C)`` logits."""
        vlad = torch.cat([
            self.video_vlad(x[..., :RGB_SIZE], mask),
            self.audio_vlad(x[..., RGB_SIZE:], mask),
        ], dim=1)
        hidden = self.hidden_bn(self.hidden(self.dropout(vlad)))
        return self.classifier(self.gating(hidden))

    def uses_mask(self, use_mask: bool | None) -> bool:
        return self.config.mode == "video" if use_mask is None else use_mask

    def l2_parameters(self) -> list[nn.Parameter]:
        """The tensors the reference puts under L2: the classifier's weight and bias."""
        return [self.classifier.weight, self.classifier.bias]
