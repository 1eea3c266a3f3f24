"""Sibling NeXtVLAD leaves evaluated together: grouped matmuls over a leaf axis.

The leaves of a :class:`~modloc.training.models.mod_tree.MixtureNode` read the same input and share
one layout, so the frame-level work of all ``n`` siblings (everything that scales with
``B·M``, which is nearly all of a NeXtVLAD's FLOPs) can run as a few large kernels instead of
``n`` passes of a Python loop:

- the expansion ``ẋ = W_e x + b_e`` is one GEMM against the siblings' weights concatenated
  along the output axis, so the ``(B·M, N)`` input is read once for all of them;
- the attention and cluster-logit projections are batched GEMMs over the leaf axis, and so
  is the VLAD aggregation (batch ``n·B``);
- the softmax, the attention weighting, the centre subtraction and the intra-normalization
  each run once over an ``(n, …)`` tensor.

What stays per leaf: the BatchNorms (each leaf's own module, so running statistics update
exactly as in the loop) and the video-level head (dropout, hidden FC, gating, classifier),
whose GEMMs have ``B`` rows and whose weights (75M per leaf at the paper's sizes) would cost
more to stack every step than a loop of three calls costs.

The result equals the per-leaf loop up to float summation order (tests: ≤ 1e-5 in fp32,
forward and backward). Only the heads draw dropout masks, leaf by leaf in the loop's order, so
the same RNG state gives the same masks either way.

:func:`use_grouped_leaves` switches a model's leaf-holding nodes over (or back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from modloc.engine.base.features import RGB_SIZE
from modloc.training.models.nextvlad import NeXtVLAD
from modloc.training.models.nextvlad_model import NeXtVLADModel


def grouped_leaf_logits(
    leaves: Sequence[NeXtVLADModel], x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``n`` leaves of one layout on one input → ``(B, n, C)`` logits.

    Args:
        leaves: NeXtVLAD models with equal configs (siblings in a tree always are).
        x: ``(B, M, 1152)`` float model input.
        mask: ``(B, M)`` frame mask, or None (segment mode).

    Equals ``torch.stack([leaf.forward_input(x, mask) for leaf in leaves], dim=1)``.
    """
    if any(leaf.config != leaves[0].config for leaf in leaves):
        raise ValueError("grouped leaves need one config for all leaves")
    vlad = torch.cat([
        grouped_nextvlad([leaf.video_vlad for leaf in leaves], x[..., :RGB_SIZE], mask),
        grouped_nextvlad([leaf.audio_vlad for leaf in leaves], x[..., RGB_SIZE:], mask),
    ], dim=-1)  # (n, B, video F·K + audio F·K)
    # NeXtVLADModel.forward_input's head, leaf by leaf
    return torch.stack([
        leaf.classifier(leaf.gating(leaf.hidden_bn(leaf.hidden(leaf.dropout(pooled)))))
        for leaf, pooled in zip(leaves, vlad, strict=True)
    ], dim=1)


def grouped_nextvlad(
    vlads: Sequence[NeXtVLAD], x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``n`` NeXtVLAD poolings of one layout on one input → ``(n, B, F·K)``.

    Args:
        vlads: the poolings, all with the same N, K, G, λ.
        x: ``(B, M, N)`` input frames.
        mask: ``(B, M)`` frame mask, or None.

    The steps are :meth:`NeXtVLAD.forward`'s with a leading leaf axis; the comments give
    the shapes.
    """
    first = vlads[0]
    n = len(vlads)
    batch, frames, _ = x.shape
    groups, clusters, group_size = first.groups, first.cluster_size, first.group_size
    rows = batch * frames

    expanded = F.linear(x, torch.cat([v.expand.weight for v in vlads]),
                        torch.cat([v.expand.bias for v in vlads]))  # (B, M, n·λN)
    # leaf-major from here on: every per-leaf projection is then one bmm over the leaf axis
    expanded = expanded.view(rows, n, -1).transpose(0, 1).contiguous()  # (n, B·M, λN)

    attention = torch.sigmoid(torch.baddbmm(
        torch.stack([v.attention.bias for v in vlads])[:, None, :],
        expanded,
        torch.stack([v.attention.weight for v in vlads]).transpose(1, 2),
    ))  # (n, B·M, G)
    if mask is not None:
        attention = attention * mask.reshape(1, rows, 1)

    logits = torch.bmm(expanded, torch.stack([v.cluster_logits.weight for v in vlads])
                       .transpose(1, 2))  # (n, B·M, G·K)
    logits = torch.stack([v.cluster_bn(leaf_logits)
                          for v, leaf_logits in zip(vlads, logits, strict=True)])
    assignment = torch.softmax(logits.view(n * batch, frames * groups, clusters), dim=-1)
    assignment = assignment * attention.reshape(n * batch, frames * groups, 1)

    grouped = expanded.view(n * batch, frames * groups, group_size)  # x̃_ig, rows i·G + g
    vlad = torch.bmm(grouped.transpose(1, 2), assignment).view(n, batch, group_size, clusters)
    centers = torch.stack([v.centers for v in vlads])[:, None]  # (n, 1, F, K)
    vlad = vlad - assignment.sum(dim=1).view(n, batch, 1, clusters) * centers

    # TF l2_normalize floors the squared norm at 1e-12, i.e. the norm at 1e-6
    vlad = F.normalize(vlad, dim=2, eps=1e-6).reshape(n, batch, group_size * clusters)
    return torch.stack([v.vlad_bn(leaf_vlad) for v, leaf_vlad in zip(vlads, vlad, strict=True)])
