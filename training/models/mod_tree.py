"""MixNeXtVLAD and MOD: a tree of gated logit mixtures over NeXtVLAD leaves (REFERENCE §4).

``branching`` gives the tree: ``(3,)`` is MixNeXtVLAD (one mixture of 3 NeXtVLADs),
``(4, 3)`` the paper's MOD (4 towers of 3 branches, 12 NeXtVLADs), ``(2, 2, 3)`` a 3-layer
tree. Every internal node mixes its children's *logits* with an input-dependent gate::

    gate = softmax(FC(BN(x̄)))
    z_node = Σ_m gate_m · z_child_m

``x̄``, the gate input, is the reference's frame mean: its reader pads every video to
``R = 300`` frames (a segment-mode window is ``R = 5`` frames), and its gate averages the
model input over all of them, padding included (REFERENCE §4). :func:`reference_gate_input`
computes exactly that from the real frames alone, ``(Σ_real x + (R − n) · p) / R`` with
``p`` the model input of a padding frame and ``n`` the real frames, so it does not depend
on how far a batch was padded. A video longer than ``R`` frames (which the reference crops
to ``R``) gets the mean of its ``n`` real frames: the divisor is ``max(n, R)``.
Checkpoints made before the gate input was recorded used ``x.mean(dim=1)`` over the padded
batch (:attr:`MODTreeConfig.gate_input` ``"padded_mean"``), which equals the reference only
for batches padded to exactly ``R`` frames; they keep that form (:mod:`modloc.training.checkpoint`).

The root's logits are the prediction. The forward returns every node's logits so the loss
can supervise each node and distil each parent into its children
(:func:`modloc.training.losses.mod_loss`).

Nodes are addressed by their path from the root: ``()`` is the root, ``(t,)`` child t of
the root, ``(t, m)`` child m of that, … Leaves are numbered in depth-first order, so in a
``(4, 3)`` tree leaf ``i`` is ``(i // 3, i % 3)``: tower ``i // 3``, branch ``i % 3``.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from modloc.engine.base.features import FEATURE_SIZE, MAX_FRAMES, SEGMENT_FRAMES
from modloc.training.models.grouped import grouped_leaf_logits
from modloc.training.models.inputs import FeatureInput
from modloc.training.models.nextvlad import init_linear_, tf_batch_norm
from modloc.training.models.nextvlad_model import NeXtVLADConfig, NeXtVLADModel

Path = tuple[int, ...]
GateInput = Literal["reference", "padded_mean"]
GATE_INPUTS: tuple[GateInput, ...] = ("reference", "padded_mean")


def gate_frames(masked: bool) -> int:
    """``R``, the frames the reference's gate averages over: a video-level input (masked,
    video mode) is padded to 300 frames, a segment-mode input (unmasked) is one 5-frame
    window."""
    return MAX_FRAMES if masked else SEGMENT_FRAMES


def reference_gate_input(x: torch.Tensor, valid: torch.Tensor, padding: torch.Tensor,
                         frames: int) -> torch.Tensor:
    """The reference's gate input from the real frames alone: ``(B, N)``.

    Args:
        x: ``(B, M, N)`` model input (what padded frames hold does not matter).
        valid: ``(B, M)`` 1.0 at real frames, 0.0 at padding.
        padding: ``(N,)`` the model input of a padding frame, ``p``.
        frames: ``R`` (:func:`gate_frames`).

    Returns ``p + Σ_real (x − p) / max(n, R)``, which is ``(Σ_real x + (R − n) · p) / R``
    for ``n ≤ R`` real frames. The sums ``Σ_real (x − p)`` and ``n`` add up over any split
    of the frames (the live encoder keeps them per stream).
    """
    count = valid.sum(dim=1, keepdim=True).clamp(min=frames)
    return padding + ((x - padding) * valid[..., None]).sum(dim=1) / count


@dataclass(frozen=True)
class MODTreeConfig:
    """A mixture tree of identical NeXtVLAD leaves.

    ``branching[d]`` is the number of children of every node at depth ``d``; the leaves sit
    at depth ``len(branching)``. The class count and the mask mode are the leaf's.
    """

    branching: tuple[int, ...] = (4, 3)
    leaf: NeXtVLADConfig = field(default_factory=NeXtVLADConfig)
    gate_input: GateInput = "reference"

    def __post_init__(self):
        object.__setattr__(self, "branching", tuple(self.branching))
        if not self.branching or min(self.branching) < 1:
            raise ValueError(f"branching must be non-empty positive ints, got {self.branching}")
        if self.gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {GATE_INPUTS}, got {self.gate_input!r}")


def node_name(path: Path) -> str:
    """``()`` → ``"root"``, ``(0, 2)`` → ``"0.2"``: the names loss terms are logged under."""
    return ".".join(map(str, path)) if path else "root"


def internal_paths(branching: tuple[int, ...]) -> list[Path]:
    """Every internal node, parents before children."""
    return [path for depth in range(len(branching))
            for path in itertools.product(*(range(n) for n in branching[:depth]))]


def leaf_paths(branching: tuple[int, ...]) -> list[Path]:
    """Every leaf, in leaf-index (depth-first) order."""
    return list(itertools.product(*(range(n) for n in branching)))


def tower_paths(branching: tuple[int, ...]) -> list[Path]:
    """The reference's towers: the root's children, or the root itself in a one-layer tree.

    V3 builds one MixNeXtVLAD per GPU "tower" and mixes the towers at the root; a one-layer
    tree is a single tower. The cumulative-L2 quirk is counted per tower (REFERENCE §4).
    """
    return [()] if len(branching) == 1 else [(t,) for t in range(branching[0])]


@dataclass(eq=False)
class TreeOutput:
    """Everything a tree's forward produces.

    Attributes:
        logits: ``(B, C)`` logits of every node (root, internal nodes, leaves), by path.
        gates: ``(B, children)`` gate weights of every internal node, by path.
        branching: the tree's shape.
    """

    logits: dict[Path, torch.Tensor]
    gates: dict[Path, torch.Tensor]
    branching: tuple[int, ...]

    @property
    def root(self) -> torch.Tensor:
        """``(B, C)`` logits of the whole model; its prediction is ``sigmoid`` of them."""
        return self.logits[()]

    def children(self, path: Path) -> list[Path]:
        return [(*path, i) for i in range(self.branching[len(path)])]


class MixtureGate(nn.Module):
    """``(B, 1152)`` frame mean → ``(B, n)`` softmax weights: BN, FC with bias, softmax."""

    def __init__(self, num_children: int):
        super().__init__()
        self.bn = tf_batch_norm(FEATURE_SIZE)
        self.fc = init_linear_(nn.Linear(FEATURE_SIZE, num_children))

    def forward(self, frame_mean: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(self.bn(frame_mean)), dim=-1)


class MixtureNode(nn.Module):
    """An internal node: a gate over ``branching[0]`` children, each a node or a leaf."""

    def __init__(self, branching: tuple[int, ...], leaf: NeXtVLADConfig):
        super().__init__()
        self.gate = MixtureGate(branching[0])
        self.holds_leaves = len(branching) == 1
        # Set by use_grouped_leaves: siblings as grouped matmuls.
        self.grouped_leaves = False
        self.branches = nn.ModuleList(
            NeXtVLADModel(leaf) if self.holds_leaves else MixtureNode(branching[1:], leaf)
            for _ in range(branching[0])
        )

    def forward(
        self, x: torch.Tensor, frame_mean: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[dict[Path, torch.Tensor], dict[Path, torch.Tensor]]:
        """Logits and gates of this subtree, keyed by path relative to this node."""
        logits: dict[Path, torch.Tensor] = {}
        gates: dict[Path, torch.Tensor] = {}
        if self.holds_leaves:
            branch_logits = self.leaf_logits(x, mask)
            logits.update({(i,): branch_logits[:, i] for i in range(len(self.branches))})
        else:
            for i, branch in enumerate(self.branches):
                sub_logits, sub_gates = branch(x, frame_mean, mask)
                logits.update({(i, *path): z for path, z in sub_logits.items()})
                gates.update({(i, *path): g for path, g in sub_gates.items()})
            branch_logits = torch.stack([logits[(i,)] for i in range(len(self.branches))], dim=1)
        weights = self.gate(frame_mean)
        logits[()] = (weights[..., None] * branch_logits).sum(dim=1)
        gates[()] = weights
        return logits, gates

    def leaf_logits(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``(B, n, C)`` logits of this node's leaves on the same input.

        The one place leaves are evaluated: sibling leaves share the input and the layout,
        so with ``grouped_leaves`` they run as grouped matmuls (:mod:`modloc.training.models.grouped`).
        """
        if self.grouped_leaves:
            return grouped_leaf_logits(list(self.branches), x, mask)
        return torch.stack([leaf.forward_input(x, mask) for leaf in self.branches], dim=1)


class MODTree(nn.Module):
    """``(B, M, 1152)`` uint8 + ``num_frames (B,)`` → :class:`TreeOutput`, ``(B, C)`` per node.

    The tree transforms the input once and hands the float input to every leaf; each leaf
    still owns its (parameter-free) :class:`FeatureInput`, so :meth:`leaf` is a plain copy.
    """

    def __init__(self, config: MODTreeConfig):
        super().__init__()
        self.config = config
        self.inputs = FeatureInput()
        self.root = MixtureNode(config.branching, config.leaf)

    def forward(
        self, features: torch.Tensor, num_frames: torch.Tensor, use_mask: bool | None = None
    ) -> TreeOutput:
        """``use_mask`` defaults to ``config.leaf.mode == "video"``."""
        x, valid = self.inputs(features, num_frames)
        use_mask = self.config.leaf.mode == "video" if use_mask is None else use_mask
        return self.forward_input(x, valid, use_mask)

    def forward_input(self, x: torch.Tensor, valid: torch.Tensor, use_mask: bool) -> TreeOutput:
        """``(B, M, 1152)`` float model input, ``(B, M)`` valid-frame mask → :class:`TreeOutput`.

        ``use_mask``: the leaves mask padded frames in their attention (video mode); the
        gates read the real frames either way.
        """
        gate_input = tree_gate_input(self.config, x, valid, self.inputs.padding, use_mask)
        logits, gates = self.root(x, gate_input, valid if use_mask else None)
        return TreeOutput(logits=logits, gates=gates, branching=self.config.branching)

    @property
    def num_leaves(self) -> int:
        return len(leaf_paths(self.config.branching))

    def node(self, path: Path) -> nn.Module:
        """The :class:`MixtureNode` or leaf :class:`NeXtVLADModel` at ``path``."""
        module: nn.Module = self.root
        for index in path:
            module = module.branches[index]
        return module

    def leaves(self, path: Path = ()) -> list[NeXtVLADModel]:
        """The leaves under ``path`` (default: all), in leaf-index order."""
        return [self.node(leaf) for leaf in leaf_paths(self.config.branching)
                if leaf[: len(path)] == path]

    def leaf(self, index: int) -> NeXtVLADModel:
        """A standalone copy of leaf ``index``: its weights and BN statistics (NeXtVLAD_distill).

        In eval mode its forward equals ``self(...).logits[leaf_paths(branching)[index]]``.
        """
        return copy.deepcopy(self.node(leaf_paths(self.config.branching)[index]))


def tree_gate_input(config: MODTreeConfig, x: torch.Tensor, valid: torch.Tensor,
                    padding: torch.Tensor, masked: bool) -> torch.Tensor:
    """``(B, 1152)`` input of every gate of a tree with ``config`` (module doc).

    ``x``: ``(B, M, 1152)`` model input; ``valid``: ``(B, M)``; ``padding``: ``(1152,)`` the
    padding frame's input; ``masked``: video mode (``R`` = 300) or not (``R`` = 5).
    """
    if config.gate_input == "padded_mean":
        # the old form: a mean over every frame of the batch as padded, so it depends on the
        # padding (equal to the reference's only for batches of exactly R frames)
        return x.mean(dim=1)
    return reference_gate_input(x, valid, padding, gate_frames(masked))


def use_grouped_leaves(model: nn.Module, enabled: bool = True) -> int:
    """Evaluate the sibling leaves of every leaf-holding node in ``model`` grouped (or not).

    Works on a :class:`MODTree` and on anything holding its nodes (the
    placed and distributed trees of :mod:`modloc.training.parallel`). Parameters, buffers and the
    state dict are untouched: only how ``MixtureNode.leaf_logits`` computes changes, through
    the node's ``grouped_leaves`` flag. Returns the number of nodes switched.
    """
    nodes = [m for m in model.modules() if isinstance(m, MixtureNode) and m.holds_leaves]
    for node in nodes:
        node.grouped_leaves = enabled
    return len(nodes)
