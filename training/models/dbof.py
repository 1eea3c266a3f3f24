"""The starter code's baseline: Deep Bag of Frames + Mixture of Experts.

G ``frame_level_models.DbofModel`` (with ``dbof_add_batch_norm``, max pooling) feeding G's
classic ``video_level_models.MoeModel``; the paper's baseline row uses 2048 clusters,
hidden 1024 and 5 experts (REFERENCE §9)::

    frames ─ L2-normalize ─ BN ─ FC (no bias) ─ BN ─ ReLU6 ─ max over frames
           ─ FC (no bias) ─ BN ─ ReLU6 ─ MoE ─ logits

What differs from G, on purpose:

- G samples 30 frames (with replacement) among the valid frames, in training and in
  evaluation alike. Here every valid frame is used once: deterministic, and for max pooling
  the limit of G's sampling. Both BatchNorms before the pooling therefore see the valid
  frames only (G's see the sampled ones), never padding.
- G's MoE returns probabilities ``p = Σ_e g_e σ(a_e)`` (the softmax gate has a dummy
  expert that always predicts 0). Every model in this package returns logits, so the MoE
  returns ``log p − log(1 − p)``, computed in log space: exact and stable, no clamping.
  ``sigmoid`` of it is G's probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from modloc.engine.base.features import FEATURE_SIZE
from modloc.training.models.inputs import FeatureInput
from modloc.training.models.nextvlad import tf_batch_norm


@dataclass(frozen=True)
class DBoFConfig:
    """The paper's DBoF baseline; G's own defaults are 8192 clusters and 2 experts.

    G regularizes the MoE weights (not the expert biases) with L2 scale 1e-8, its
    ``MoeModel`` default; :meth:`DBoFModel.l2_parameters` lists those tensors.
    """

    num_classes: int = 3862
    cluster_size: int = 2048
    hidden_size: int = 1024
    num_experts: int = 5
    pooling: Literal["max", "average"] = "max"

    def __post_init__(self):
        if self.pooling not in ("max", "average"):
            raise ValueError(f"pooling must be 'max' or 'average', got {self.pooling!r}")


class MoEClassifier(nn.Module):
    """G's classic MoE, ``(B, H) -> (B, C)`` logits of ``p = Σ_e g_e σ(a_e)``.

    Per class, a softmax gate over ``E + 1`` experts (the last is a dummy that predicts 0)
    mixes logistic experts in probability space. Gate logits have no bias; slim's default
    (Xavier uniform) initializes both layers.
    """

    def __init__(self, in_features: int, num_classes: int, num_experts: int):
        super().__init__()
        self.num_classes = num_classes
        self.num_experts = num_experts
        self.gates = nn.Linear(in_features, num_classes * (num_experts + 1), bias=False)
        self.experts = nn.Linear(in_features, num_classes * num_experts)
        nn.init.xavier_uniform_(self.gates.weight)
        nn.init.xavier_uniform_(self.experts.weight)
        nn.init.zeros_(self.experts.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # G reshapes (B, C·(E+1)) to (B·C, E+1): output unit c·(E+1) + e is expert e of class c
        experts = self.num_experts
        gate_logits = self.gates(h).unflatten(-1, (self.num_classes, experts + 1))
        log_gates = torch.log_softmax(gate_logits, dim=-1)
        log_gates, log_dummy = log_gates[..., :experts], log_gates[..., experts:]
        expert_logits = self.experts(h).unflatten(-1, (self.num_classes, experts))
        # p = Σ g_e σ(a_e) and, as the gate sums to 1, 1 − p = g_dummy + Σ g_e σ(−a_e)
        log_p = torch.logsumexp(log_gates + F.logsigmoid(expert_logits), dim=-1)
        log_not_p = torch.logsumexp(
            torch.cat([log_dummy, log_gates + F.logsigmoid(-expert_logits)], dim=-1), dim=-1)
        return log_p - log_not_p


class DBoFModel(nn.Module):
    """``(B, M, 1152)`` uint8 + ``num_frames (B,)`` → logits ``(B, C)``."""

    def __init__(self, config: DBoFConfig):
        super().__init__()
        self.config = config
        c = config
        self.inputs = FeatureInput("l2")
        self.input_bn = tf_batch_norm(FEATURE_SIZE)
        self.cluster = nn.Linear(FEATURE_SIZE, c.cluster_size, bias=False)
        self.cluster_bn = tf_batch_norm(c.cluster_size)
        self.hidden = nn.Linear(c.cluster_size, c.hidden_size, bias=False)
        self.hidden_bn = tf_batch_norm(c.hidden_size)
        self.classifier = MoEClassifier(c.hidden_size, c.num_classes, c.num_experts)
        # G: random_normal with stddev 1/sqrt(fan_in), untruncated
        nn.init.normal_(self.cluster.weight, std=1.0 / math.sqrt(FEATURE_SIZE))
        nn.init.normal_(self.hidden.weight, std=1.0 / math.sqrt(c.cluster_size))

    def forward(self, features: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
        """``(B, M, 1152)`` uint8, ``(B,)`` int → ``(B, C)`` logits."""
        return self.forward_input(*self.inputs(features, num_frames))

    def forward_input(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, M, 1152)`` float model input, ``(B, M)`` mask → ``(B, C)`` logits."""
        batch, frames, _ = x.shape
        valid = mask.reshape(-1).bool()
        rows = x.reshape(batch * frames, -1)[valid]
        rows = F.relu6(self.cluster_bn(self.cluster(self.input_bn(rows))))
        # padding stays 0, which ReLU6 outputs never undercut: max pooling ignores it and an
        # all-padding row pools to 0
        clusters = rows.new_zeros(batch * frames, rows.shape[-1])
        clusters[valid] = rows
        clusters = clusters.reshape(batch, frames, -1)
        if self.config.pooling == "max":
            pooled = clusters.amax(dim=1)
        else:
            pooled = clusters.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        hidden = F.relu6(self.hidden_bn(self.hidden(pooled)))
        return self.classifier(hidden)

    def l2_parameters(self) -> list[nn.Parameter]:
        """The tensors G puts under L2 (scale 1e-8): the MoE's gate and expert weights."""
        return [self.classifier.gates.weight, self.classifier.experts.weight]
