"""Model-parallel MOD, the paper's distributed design: towers on separate devices or ranks.

V3 builds one MixNeXtVLAD "tower" per GPU, feeds every tower the **same** batch and mixes the
towers' logits at the root (REFERENCE §4). Here a tower is a subtree under the root of a
:class:`~modloc.training.models.MODTree` (``(t,)``); only ``(B, C)`` tower logits cross devices.

**In one process** (:class:`PlacedTree`): the towers sit on a list of devices, the root gate
and the input transform on the first. The uint8 batch moves to each device once and is turned
into the float input there; each tower's logits come back to the first device for the root
mixture. The loss is computed where the logits live (:meth:`PlacedTree.loss`).

**Across processes** (:class:`DistributedMOD`, launched by ``torchrun``): rank ``r`` owns a
contiguous block of towers (:func:`tower_blocks`) and a replica of the (tiny) root gate, and
reads the same batch as every other rank. The forward computes the own towers and all-gathers
their logits with autograd, so every rank has every tower's logits and computes the root
mixture itself. NCCL on GPUs, gloo on CPUs (:func:`init_from_env`).

Gradient scheme (exact: every gradient equals the single-process tree's). Split the
single-process loss (:func:`modloc.training.losses.mod_loss`) as ``L = Σ_t S_t + R`` where

- ``S_t``, tower ``t``'s subtree terms: BCE of ``t`` and every node below it, the KL on every
  edge below ``t``, and ``t``'s classifier L2 (under ``cumulative_l2``, ``(T − t)·L2_t``:
  tower ``t`` is counted once in each of the cumulative terms ``l2/t … l2/T−1``);
- ``R``, the root terms: BCE of the root and ``λ·KL(root ‖ t)`` for every tower ``t``.

Rank ``r`` back-propagates ``L_r = Σ_{t owned by r} S_t + R / W`` (``W`` ranks). ``S_t``
depends on tower ``t`` only, so its gradient is local and complete. ``R`` depends on every
tower's logits and on the root gate, and every rank computes the same ``R``:

- tower logits: the all-gather's backward sums each slot's gradient over the ranks
  (a reduce-scatter), so tower ``t`` receives ``W · (1/W)·∂R/∂z_t = ∂R/∂z_t``;
- root gate: each replica gets ``(1/W)·∂R/∂φ``; :meth:`DistributedMOD.sync_gradients`
  all-reduces (sums) them to ``∂R/∂φ`` on every rank. This is the only gradient traffic; the
  towers' gradients never leave their rank.

Identical replicas, identical batch and identical gate gradients keep the gate replicas (and
their BN statistics) equal after every optimizer step, with no broadcast. Dropout masks are
drawn by each rank's own RNG, as each of the reference's GPUs drew its own.

Checkpoints stay in the single-process format: :meth:`DistributedMOD.full_state_dict`
assembles the :class:`~modloc.training.models.MODTree` state dict on rank 0 and
:meth:`DistributedMOD.load_full_state_dict` loads one into a rank's part; a
:class:`PlacedTree`'s state dict *is* the tree's.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from modloc.training.losses import LossConfig, LossTerms, bce, distillation_kl, l2_penalty
from modloc.training.models.inputs import FeatureInput
from modloc.training.models.mod_tree import (
    MixtureGate,
    MixtureNode,
    MODTree,
    MODTreeConfig,
    Path,
    TreeOutput,
    internal_paths,
    node_name,
    tree_gate_input,
)
from modloc.training.models.nextvlad_model import NeXtVLADModel

# torch 2.13 renamed the single-tensor collectives and warns on the old names; the project
# admits torch >= 2.4, which has only the old ones
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

Layout = Literal["contiguous", "round_robin"]


# --- the tree's loss, split into towers and root ----------------------------------------------


@dataclass(eq=False)
class ShardedTreeOutput(TreeOutput):
    """A :class:`TreeOutput` whose towers were computed apart from the root.

    Attributes:
        tower_logits: ``(B, C)`` logits of every tower ``(t,)``, in tower order, on the root's
            device; what the root mixture and the root's KL terms read.
        towers: the towers whose subtrees this output holds: ``logits`` and ``gates`` have
            the root and every node under these towers, each on its tower's device.
    """

    tower_logits: list[torch.Tensor]
    towers: tuple[int, ...]


def subtree_loss_terms(
    output: TreeOutput,
    tower: int,
    leaves: Sequence[NeXtVLADModel],
    labels: torch.Tensor,
    label_weights: torch.Tensor | None,
    config: LossConfig,
) -> dict[str, torch.Tensor]:
    """Tower ``tower``'s terms of :func:`~modloc.training.losses.mod_loss`, named as it names them.

    BCE of the tower and every node below it, ``λ·KL`` on every edge below it and
    ``l2/<tower>`` = the *plain* L2 of ``leaves``' classifiers (the caller applies the
    cumulative quirk, which mixes towers). ``labels``/``label_weights`` are ``(B, C)`` on
    the tower's device.
    """
    terms = {f"bce/{node_name(path)}": bce(logits, labels, label_weights, config.bce)
             for path, logits in output.logits.items() if path[:1] == (tower,)}
    for parent in internal_paths(output.branching):
        if parent[:1] == (tower,):
            terms.update(_kl_terms(parent, output.logits[parent],
                                   {child: output.logits[child]
                                    for child in output.children(parent)}, config))
    if config.l2_penalty:
        terms[f"l2/{tower}"] = l2_penalty(
            [p for leaf in leaves for p in leaf.l2_parameters()], config.l2_penalty)
    return terms


def root_loss_terms(
    output: ShardedTreeOutput,
    labels: torch.Tensor,
    label_weights: torch.Tensor | None,
    config: LossConfig,
) -> dict[str, torch.Tensor]:
    """The root's terms of :func:`~modloc.training.losses.mod_loss`: its BCE and ``λ·KL(root ‖ t)``."""
    terms = {"bce/root": bce(output.root, labels, label_weights, config.bce)}
    terms.update(_kl_terms((), output.root, {
        (t,): logits for t, logits in enumerate(output.tower_logits)}, config))
    return terms


def _kl_terms(
    parent: Path, teacher: torch.Tensor, children: dict[Path, torch.Tensor], config: LossConfig
) -> dict[str, torch.Tensor]:
    temperature = config.temperature(len(parent))
    if temperature == 0:
        return {}
    weight = config.kl_weight(len(parent))
    return {f"kl/{node_name(parent)}>{node_name(child)}":
            weight * distillation_kl(teacher, student, temperature).mean()
            for child, student in children.items()}


def _check_loss_config(config: LossConfig, branching: tuple[int, ...]) -> None:
    if len(config.temperatures) not in (1, len(branching)):
        raise ValueError(f"{len(config.temperatures)} temperatures for a "
                         f"{len(branching)}-layer tree")


def _check_towered(branching: tuple[int, ...]) -> None:
    if len(branching) < 2:
        raise ValueError(f"a {branching} tree has no towers to spread: the root's children "
                         "are leaves (use a tree of two or more layers, e.g. (4, 3))")


def _tower_leaves(tower: nn.Module) -> list[NeXtVLADModel]:
    """The leaves under a tower in leaf-index order (module order is depth-first)."""
    return [m for m in tower.modules() if isinstance(m, NeXtVLADModel)]


def _root_mixture(
    gate: MixtureGate, frame_mean: torch.Tensor, tower_logits: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MixtureNode.forward``'s mixing step: (``(B, C)`` root logits, ``(B, T)`` weights)."""
    weights = gate(frame_mean)
    return (weights[..., None] * torch.stack(list(tower_logits), dim=1)).sum(dim=1), weights


# --- one process, several devices -------------------------------------------------------------


def tower_devices(
    num_towers: int, devices: Sequence[str | torch.device], layout: Layout = "contiguous"
) -> list[torch.device]:
    """The device of each tower.

    ``"contiguous"``: blocks of consecutive towers per device, the first ``T mod D`` devices
    one tower more (4 towers on 2 devices: ``0 0 1 1``). ``"round_robin"``: tower ``t`` on
    device ``t mod D`` (``0 1 0 1``). The root gate always sits on ``devices[0]``.
    """
    devices = [torch.device(d) for d in devices]
    blocks = tower_blocks(num_towers, len(devices))  # checks the count for both layouts
    if layout == "contiguous":
        return [devices[index] for index, block in enumerate(blocks) for _ in block]
    if layout == "round_robin":
        return [devices[t % len(devices)] for t in range(num_towers)]
    raise ValueError(f"layout must be 'contiguous' or 'round_robin', got {layout!r}")


class PlacedTree(nn.Module):
    """A :class:`~modloc.training.models.MODTree` with its towers on several devices of this process.

    Takes over ``tree``'s modules (moving them), so its state dict has the tree's keys and
    loads the tree's checkpoints. Do not ``.to()`` it afterwards: that would collapse the
    placement; build a new one instead.

    Args:
        tree: a tree of two or more layers.
        devices: where the towers go (:func:`tower_devices`); ``devices[0]`` also holds the
            root gate, the root's logits and the loss.
        layout: ``"contiguous"`` or ``"round_robin"``.
    """

    def __init__(self, tree: MODTree, devices: Sequence[str | torch.device],
                 layout: Layout = "contiguous"):
        super().__init__()
        _check_towered(tree.config.branching)
        self.config: MODTreeConfig = tree.config
        self.tower_devices = tower_devices(tree.config.branching[0], devices, layout)
        self.root_device = torch.device(devices[0])
        self.root = tree.root
        self.root.gate.to(self.root_device)
        for tower, device in zip(self.root.branches, self.tower_devices, strict=True):
            tower.to(device)
        # the input transform once per device, where that device's float input is made; not
        # submodules: they hold no state (no state-dict entries, as in the tree) and must
        # not follow a .to()
        self._transforms = {device: FeatureInput(tree.inputs.transform).to(device)
                            for device in dict.fromkeys([self.root_device, *self.tower_devices])}

    def forward(
        self, features: torch.Tensor, num_frames: torch.Tensor, use_mask: bool | None = None
    ) -> ShardedTreeOutput:
        """``(B, M, 1152)`` uint8 + ``(B,)`` frame counts → every node's ``(B, C)`` logits.

        Each node's logits stay on its tower's device; the root's and ``tower_logits`` are on
        ``devices[0]``. ``use_mask`` defaults to ``config.leaf.mode == "video"``.
        """
        use_mask = self.config.leaf.mode == "video" if use_mask is None else use_mask
        inputs = {}
        for device, transform in self._transforms.items():
            x, valid = transform(features.to(device, non_blocking=True), num_frames)
            inputs[device] = (x, tree_gate_input(self.config, x, valid, transform.padding, use_mask),
                              valid if use_mask else None)

        logits: dict[Path, torch.Tensor] = {}
        gates: dict[Path, torch.Tensor] = {}
        # every tower is launched before any logits move, so CUDA devices work concurrently
        for t, tower in enumerate(self.root.branches):
            sub_logits, sub_gates = tower(*inputs[self.tower_devices[t]])
            logits.update({(t, *path): z for path, z in sub_logits.items()})
            gates.update({(t, *path): g for path, g in sub_gates.items()})
        tower_logits = [logits[(t,)].to(self.root_device) for t in range(len(self.tower_devices))]
        logits[()], gates[()] = _root_mixture(
            self.root.gate, inputs[self.root_device][1], tower_logits)
        return ShardedTreeOutput(logits=logits, gates=gates, branching=self.config.branching,
                                 tower_logits=tower_logits,
                                 towers=tuple(range(len(self.tower_devices))))

    def loss(
        self,
        output: ShardedTreeOutput,
        labels: torch.Tensor,
        label_weights: torch.Tensor | None,
        config: LossConfig,
    ) -> LossTerms:
        """:func:`~modloc.training.losses.mod_loss` of ``output``, each term computed where its logits
        live; the scalars gather on ``devices[0]``. Same names and values as ``mod_loss``."""
        _check_loss_config(config, self.config.branching)
        targets = {device: (labels.to(device),
                            None if label_weights is None else label_weights.to(device))
                   for device in self._transforms}
        terms: dict[str, torch.Tensor] = {}
        for t, tower in enumerate(self.root.branches):
            tower_terms = subtree_loss_terms(output, t, _tower_leaves(tower),
                                             *targets[self.tower_devices[t]], config)
            terms.update({name: v.to(self.root_device) for name, v in tower_terms.items()})
        terms.update(root_loss_terms(output, *targets[self.root_device], config))
        if config.l2_penalty and config.cumulative_l2:
            names = [f"l2/{t}" for t in range(len(self.tower_devices))]
            terms.update(zip(names, itertools.accumulate(terms[name] for name in names),
                             strict=True))
        return LossTerms(total=sum(terms.values()), terms=terms)


# --- several processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a ``torchrun`` job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_from_env(device: str | torch.device = "auto") -> DistEnv:
    """Join the process group ``torchrun`` describes in the environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    ``device`` is the run's: ``cuda`` (or ``auto`` where CUDA is present) gives backend NCCL
    and device ``cuda:LOCAL_RANK`` (made current; a device index is the rank's, not the
    caller's), ``cpu`` gloo on the CPU. Joining twice is a no-op.
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: launch with torchrun "
                           "(e.g. torchrun --nproc-per-node=4 ...)")
    rank, world_size, local_rank = (int(os.environ[name]) for name in names[:3])
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else torch.device(device).type
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"torchrun ranks run on cuda or cpu, not {device}")
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only "
                               f"{torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def tower_blocks(num_towers: int, world_size: int) -> list[range]:
    """Contiguous blocks of towers, one per rank; the first ``T mod W`` ranks get one more.

    4 towers on 2 ranks: ``[0, 1], [2, 3]``; on 3 ranks: ``[0, 1], [2], [3]``.
    """
    if not 1 <= world_size <= num_towers:
        raise ValueError(f"cannot split {num_towers} towers over {world_size} ranks or devices: "
                         f"each must own at least one tower, so use 1 to {num_towers}")
    base, extra = divmod(num_towers, world_size)
    bounds = list(itertools.accumulate((base + (r < extra) for r in range(world_size)),
                                       initial=0))
    return [range(lo, hi) for lo, hi in itertools.pairwise(bounds)]


class _AllGather(torch.autograd.Function):
    """``(k, …)`` on each rank → ``(W·k, …)`` on every rank, rank-major.

    Backward: a reduce-scatter, so each rank's input receives the sum over ranks of the
    gradient that reached its slot.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        world_size = dist.get_world_size(group)
        gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_single(gathered, tensor.contiguous(), group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        world_size = dist.get_world_size(ctx.group)
        summed = grad.new_empty((grad.shape[0] // world_size, *grad.shape[1:]))
        _reduce_scatter_single(summed, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return summed, None


def all_gather_towers(
    own_logits: Sequence[torch.Tensor], blocks: Sequence[range], group=None
) -> list[torch.Tensor]:
    """Every rank's tower logits, with autograd: ``k`` × ``(B, C)`` here → ``T`` × ``(B, C)``.

    ``blocks`` are the ranks' towers (:func:`tower_blocks`). Uneven blocks are padded with
    zeros to the largest for the collective; the padding gets no gradient.
    """
    width = max(len(block) for block in blocks)
    stacked = torch.stack(list(own_logits))
    if len(own_logits) < width:
        stacked = torch.cat([stacked, stacked.new_zeros((width - len(own_logits),
                                                         *stacked.shape[1:]))])
    gathered = _AllGather.apply(stacked, group).view(len(blocks), width, *stacked.shape[1:])
    return [gathered[rank, slot] for rank, block in enumerate(blocks)
            for slot in range(len(block))]


class _RootShard(nn.Module):
    """The part of a :class:`MixtureNode` root one rank holds: the gate and its own towers.

    ``branches`` is keyed by tower index, so parameter names are the tree's
    (``root.branches.2.…``).
    """

    def __init__(self, gate: MixtureGate, towers: dict[int, MixtureNode]):
        super().__init__()
        self.gate = gate
        self.branches = nn.ModuleDict({str(t): tower for t, tower in towers.items()})


@dataclass(eq=False)
class ShardLoss:
    """One rank's share of the loss.

    Attributes:
        objective: what this rank back-propagates: ``Σ own S_t + R / W`` (module docstring).
        terms: the unscaled named terms this rank computed: its towers' ``bce``/``kl`` terms,
            each own tower's **plain** ``l2/<t>``, and the root terms (identical on every
            rank). :meth:`gather` turns them into ``mod_loss``'s full set.
    """

    objective: torch.Tensor
    terms: dict[str, torch.Tensor]
    num_towers: int
    cumulative_l2: bool
    group: dist.ProcessGroup

    def gather(self) -> LossTerms:
        """Collective: every term of the whole tree, as :func:`~modloc.training.losses.mod_loss`
        names and values them, and their total; detached 0-dim float64 CPU tensors."""
        names = list(self.terms)
        values = torch.stack([v.detach().double() for v in self.terms.values()]).tolist()
        shards: list[dict[str, float] | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(shards, dict(zip(names, values, strict=True)), group=self.group)
        merged: dict[str, float] = {}
        for shard in shards:
            merged.update(shard)  # the root terms repeat, with equal values
        l2_names = [f"l2/{t}" for t in range(self.num_towers)]
        if self.cumulative_l2 and l2_names[0] in merged:
            merged.update(zip(l2_names, itertools.accumulate(merged[n] for n in l2_names),
                              strict=True))
        terms = {name: torch.tensor(value, dtype=torch.float64) for name, value in merged.items()}
        return LossTerms(total=sum(terms.values()), terms=terms)


class DistributedMOD(nn.Module):
    """This rank's part of a MOD tree: a block of towers and a replica of the root gate.

    Every rank must construct it with the same ``config`` and ``seed``. Each part is
    initialized from its own seed (``seed`` and the part's index), so the gate replicas start
    equal and the initial weights do not depend on the world size; load a checkpoint with
    :meth:`load_full_state_dict`. Build on the CPU, then ``.to(env.device)``.

    One training step::

        output = model(features, num_frames)         # the same batch on every rank
        loss = model.loss(output, labels, label_weights, loss_config)
        loss.objective.backward()
        model.sync_gradients()                       # the root gate's gradients
        optimizer.step()                             # over model.parameters(), per rank

    Args:
        config: a tree of two or more layers.
        seed: the initialization seed.
        group: the process group (default: the world).
    """

    def __init__(self, config: MODTreeConfig, seed: int = 0, group=None):
        super().__init__()
        _check_towered(config.branching)
        self.config = config
        self.group = dist.group.WORLD if group is None else group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.blocks = tower_blocks(config.branching[0], self.world_size)
        self.inputs = FeatureInput()
        gate = _seeded(seed, 0, lambda: MixtureGate(config.branching[0]))
        towers = {t: _seeded(seed, 1 + t, lambda: MixtureNode(config.branching[1:], config.leaf))
                  for t in self.blocks[self.rank]}
        self.root = _RootShard(gate, towers)

    @property
    def towers(self) -> tuple[int, ...]:
        """The towers this rank owns."""
        return tuple(self.blocks[self.rank])

    def forward(
        self, features: torch.Tensor, num_frames: torch.Tensor, use_mask: bool | None = None
    ) -> ShardedTreeOutput:
        """Collective. ``(B, M, 1152)`` uint8 + ``(B,)`` → the root, every tower's logits
        (``tower_logits``) and every node of the own towers (``logits``, ``gates``).

        ``use_mask`` defaults to ``config.leaf.mode == "video"``.
        """
        use_mask = self.config.leaf.mode == "video" if use_mask is None else use_mask
        x, valid = self.inputs(features, num_frames)
        frame_mean = tree_gate_input(self.config, x, valid, self.inputs.padding, use_mask)
        logits: dict[Path, torch.Tensor] = {}
        gates: dict[Path, torch.Tensor] = {}
        for t in self.towers:
            sub_logits, sub_gates = self.root.branches[str(t)](
                x, frame_mean, valid if use_mask else None)
            logits.update({(t, *path): z for path, z in sub_logits.items()})
            gates.update({(t, *path): g for path, g in sub_gates.items()})
        tower_logits = all_gather_towers([logits[(t,)] for t in self.towers], self.blocks,
                                         self.group)
        logits[()], gates[()] = _root_mixture(self.root.gate, frame_mean, tower_logits)
        return ShardedTreeOutput(logits=logits, gates=gates, branching=self.config.branching,
                                 tower_logits=tower_logits, towers=self.towers)

    def loss(
        self,
        output: ShardedTreeOutput,
        labels: torch.Tensor,
        label_weights: torch.Tensor | None,
        config: LossConfig,
    ) -> ShardLoss:
        """This rank's :class:`ShardLoss` (the scheme in the module docstring)."""
        _check_loss_config(config, self.config.branching)
        num_towers = self.config.branching[0]
        terms: dict[str, torch.Tensor] = {}
        own: list[torch.Tensor] = []
        for t in self.towers:
            tower_terms = subtree_loss_terms(
                output, t, _tower_leaves(self.root.branches[str(t)]), labels, label_weights,
                config)
            terms.update(tower_terms)
            own.append(sum(tower_terms.values()))
            if config.l2_penalty and config.cumulative_l2:
                # counted once above; each of the cumulative l2/t … l2/T−1 includes it
                own.append((num_towers - t - 1) * tower_terms[f"l2/{t}"])
        root_terms = root_loss_terms(output, labels, label_weights, config)
        terms.update(root_terms)
        objective = sum(own) + sum(root_terms.values()) / self.world_size
        return ShardLoss(objective=objective, terms=terms, num_towers=num_towers,
                         cumulative_l2=config.cumulative_l2, group=self.group)

    def sync_gradients(self) -> None:
        """Collective, after ``backward``: sum the root gate's gradients over the ranks."""
        params = list(self.root.gate.parameters())
        if any(p.grad is None for p in params):
            raise RuntimeError("the root gate has no gradients: call backward first")
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        for p, grad in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad.copy_(grad.view_as(p))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: the whole tree's state dict on rank 0 (CPU tensors), None elsewhere.

        Keys and order are :class:`~modloc.training.models.MODTree`'s; the gate is rank 0's replica.
        Rank 0 holds the whole model in CPU memory for the moment.
        """
        own = {name: value.detach().cpu() for name, value in self.state_dict().items()}
        shards: list[dict[str, torch.Tensor] | None] | None = (
            [None] * self.world_size if self.rank == 0 else None)
        dist.gather_object(own, shards, dst=dist.get_global_rank(self.group, 0),
                           group=self.group)
        if shards is None:
            return None
        full: dict[str, torch.Tensor] = {}
        for shard in shards:
            full.update({k: v for k, v in shard.items() if k not in full})
        return full

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load this rank's part (gate, own towers) of a whole tree's state dict.

        Raises on a missing key of the own part; other towers' entries are skipped.
        """
        own = self.state_dict()
        missing = [name for name in own if name not in state]
        if missing:
            raise KeyError(f"state dict lacks {len(missing)} keys of rank {self.rank}'s part, "
                           f"e.g. {missing[0]!r}")
        self.load_state_dict({name: state[name] for name in own})


def _seeded(seed: int, part: int, build):
    """``build()`` with the global RNG seeded from ``(seed, part)``, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: fork_rng restores no CUDA state, and a resumed run's
        # CUDA dropout streams must go on where the checkpoint left them
        torch.default_generator.manual_seed(int(np.random.SeedSequence((seed, part)).generate_state(1)[0]))
        return build()
