"""NeXtVLAD pooling, exactly as the MOD code implements it (REFERENCE §3), and TF1 init helpers.

Notation: input ``x: (B, M, N)``, expansion λ, groups G, clusters K, ``F = λN / G``.

1. ``ẋ = W_e x + b_e`` (N → λN).
2. ``att = sigmoid(W_a ẋ + b_a)``: one attention weight per frame and group, ``(B, M, G)``,
   times the frame mask when one is given (video mode).
3. Cluster logits from the *full* ``ẋ``: ``W_c: λN → G·K`` (no bias), BatchNorm over all
   ``B·M`` rows (padded frames included in the statistics), softmax over K per group.
4. ``y_jk = Σ_{i,g} att_ig · α_igk · (x̃_igj − c_jk)`` where ``x̃_ig`` is group g's slice
   ``ẋ_i[gF:(g+1)F]`` and the centers ``C: (F, K)`` are shared by all groups.
5. L2-normalize over F per cluster, flatten to ``j·K + k``, BatchNorm. No global L2.

The helpers replicate the TF1 defaults the reference relies on, so every model file
initializes and normalizes the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# slim.batch_norm defaults: decay 0.999 (PyTorch momentum = 1 - decay), epsilon 0.001
BN_EPS = 1e-3
BN_MOMENTUM = 1e-3


def tf_batch_norm(num_features: int) -> nn.BatchNorm1d:
    """BatchNorm with slim's defaults (center and scale on, as every reference BN sets).

    One known difference: TF's non-fused BN feeds the biased batch variance into its moving
    average, PyTorch the unbiased one (a factor ``n/(n-1)``, negligible at the reference's
    batch sizes). Normalization in training uses the biased variance in both.
    """
    return nn.BatchNorm1d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM)


def variance_scaling_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """TF1 ``slim.variance_scaling_initializer()`` (factor 2, FAN_IN, truncated normal).

    TF1 contrib widens the stddev to ``sqrt(1.3 * 2 / fan_in)`` to compensate for cutting the
    normal at two standard deviations.
    """
    std = math.sqrt(1.3 * 2.0 / fan_in)
    return nn.init.trunc_normal_(tensor, std=std, a=-2.0 * std, b=2.0 * std)


def init_linear_(linear: nn.Linear) -> nn.Linear:
    """Variance-scaling weights (fan_in = input features), zero bias."""
    variance_scaling_(linear.weight, fan_in=linear.in_features)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class NeXtVLAD(nn.Module):
    """NeXtVLAD pooling: ``(B, M, N) -> (B, F·K)`` with ``F = expansion·N / groups``.

    Args:
        feature_size: N, the per-frame input dimension.
        cluster_size: K.
        groups: G.
        expansion: λ.
    """

    def __init__(self, feature_size: int, cluster_size: int, groups: int, expansion: int):
        super().__init__()
        expanded = expansion * feature_size
        if expanded % groups:
            raise ValueError(f"expansion*feature_size={expanded} not divisible by groups={groups}")
        self.feature_size = feature_size
        self.cluster_size = cluster_size
        self.groups = groups
        self.expansion = expansion
        self.group_size = expanded // groups  # F

        self.expand = init_linear_(nn.Linear(feature_size, expanded))
        self.attention = init_linear_(nn.Linear(expanded, groups))
        self.cluster_logits = init_linear_(nn.Linear(expanded, groups * cluster_size, bias=False))
        self.cluster_bn = tf_batch_norm(groups * cluster_size)
        # TF shape (1, F, K): its fan_in is F
        self.centers = nn.Parameter(torch.empty(self.group_size, cluster_size))
        variance_scaling_(self.centers, fan_in=self.group_size)
        self.vlad_bn = tf_batch_norm(self.output_size)

    @property
    def output_size(self) -> int:
        return self.group_size * self.cluster_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, M, N)``, optional ``(B, M)`` frame mask → ``(B, F·K)``."""
        batch, frames, _ = x.shape
        groups, clusters = self.groups, self.cluster_size
        x = self.expand(x)  # (B, M, λN)

        attention = torch.sigmoid(self.attention(x))  # (B, M, G)
        if mask is not None:
            attention = attention * mask[..., None]
        attention = attention.reshape(batch, frames * groups, 1)

        logits = self.cluster_bn(self.cluster_logits(x).reshape(batch * frames, groups * clusters))
        assignment = torch.softmax(logits.reshape(batch, frames * groups, clusters), dim=-1)
        assignment = assignment * attention  # att_ig · α_igk, rows i·G + g

        grouped = x.reshape(batch, frames * groups, self.group_size)  # x̃_ig, same row order
        vlad = torch.bmm(grouped.transpose(1, 2), assignment)  # (B, F, K)
        vlad = vlad - assignment.sum(dim=1, keepdim=True) * self.centers

        # TF l2_normalize floors the squared norm at 1e-12, i.e. the norm at 1e-6
        vlad = F.normalize(vlad, dim=1, eps=1e-6)
        return self.vlad_bn(vlad.reshape(batch, self.output_size))

    def extra_repr(self) -> str:
        return (f"feature_size={self.feature_size}, cluster_size={self.cluster_size}, "
                f"groups={self.groups}, expansion={self.expansion}")
