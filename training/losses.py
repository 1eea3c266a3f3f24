"""Losses of the MOD system (REFERENCE §4): BCE, online distillation, classifier L2.

For a tree (:class:`modloc.training.models.MODTree`) the loss is::

    L = Σ_nodes BCE(node)                                     root, internal nodes, leaves
      + Σ_internal λ_d · mean_b Σ_children KL(softmax(z_node/T_d) ‖ softmax(z_child/T_d))
      + Σ_towers L2_t                                         classifier weights and biases

where ``d`` is the parent's depth (0 = root). For the ``(4, 3)`` tree with
``temperatures=(T2, T1)`` this is REFERENCE's total: ``T1/λ1`` inside the towers (V3's
``cl_temperature``/``cl_lambda``), ``T2/λ2`` across them (``final_temperature``/``final_lambda``).

Where this follows the reference on purpose:

- the KL is over the *class* axis (softmax over all classes, not per-class sigmoids), in the
  direction KL(mixture ‖ member), with 1e-8 inside both logs, and **no stop-gradient**: the
  teacher (the mixture, hence the gate) is trained by the KL as well;
- there is no implicit T²: λ carries it, and defaults to T²;
- BCE is summed over classes and averaged over the batch, times ``label_weights`` when given
  (segment mode: only rated classes count).

The default BCE works on logits (numerically stable); ``bce="probabilities"`` is G's
``CrossEntropyLoss`` on ``sigmoid(logits)`` with ε = 1e-5, bit for bit the reference's form.

Two more switches reproduce what V3 does by accident (docs/REFERENCE.md §10, off by
default): ``cumulative_l2`` (tower ``t``'s classifier L2 counted once per tower from ``t``
on) and ``single_tower_ensemble_bce``: with one tower, V3 still builds its ensemble over
it and adds the ensemble's BCE, which equals the tower's, so a one-tower model (a plain
model, or a one-layer tree) trains on ``2·BCE + L2`` (logged as ``bce/ensemble``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from modloc.training.models.mod_tree import (
    MODTree,
    TreeOutput,
    internal_paths,
    node_name,
    tower_paths,
)

KL_EPSILON = 1e-8
BCE_EPSILON = 1e-5


@dataclass(frozen=True)
class LossConfig:
    """Loss settings; the defaults are the video-level pretraining recipe (REFERENCE §6).

    Attributes:
        temperatures: distillation temperature per tree layer, indexed by the parent's depth
            (root first); a single value applies to every layer. ``0`` turns that layer's
            distillation off.
        lambdas: KL weight per layer, same indexing; ``None`` (the recipes') resolves to
            ``T²`` per layer when the config is built, so the config, and the checkpoints
            that record it, always hold the weights in use.
        l2_penalty: scale of ``scale · Σw²/2`` over the classifier weights and biases.
        cumulative_l2: reproduce V3's cumulative L2 (REFERENCE §4): tower ``t`` also counts
            the classifier L2 of every tower before it, so in a 4-tower tree tower 0's is
            counted 4×, tower 3's 1×. Off by default: it is an accident of
            ``tf.losses.get_regularization_losses()``, not a design.
        bce: ``"logits"`` (stable BCE-with-logits) or ``"probabilities"`` (G's form).
        single_tower_ensemble_bce: reproduce V3's one-tower objective (module doc): the
            BCE of a model with one tower (a plain model, a one-layer tree) counted twice.
            Trees of two or more layers have several towers: nothing changes for them.
    """

    temperatures: tuple[float, ...] = (1.0,)
    lambdas: tuple[float, ...] | None = None
    l2_penalty: float = 1e-5
    cumulative_l2: bool = False
    bce: Literal["logits", "probabilities"] = "logits"
    single_tower_ensemble_bce: bool = False

    def __post_init__(self):
        object.__setattr__(self, "temperatures", tuple(self.temperatures))
        lambdas = tuple(t * t for t in self.temperatures) if self.lambdas is None else self.lambdas
        object.__setattr__(self, "lambdas", tuple(lambdas))
        if len(self.lambdas) != len(self.temperatures):
            raise ValueError(f"loss.lambdas (--lambdas) {list(self.lambdas)} and loss.temperatures "
                             f"(--temperatures) {list(self.temperatures)} must have the same "
                             "length (or leave the lambdas out: T² per layer)")
        if self.bce not in ("logits", "probabilities"):
            raise ValueError(f"loss.bce (--bce) must be 'logits' or 'probabilities', got {self.bce!r}")

    def temperature(self, depth: int) -> float:
        return self._per_layer(self.temperatures, depth)

    def kl_weight(self, depth: int) -> float:
        """λ of the layer whose parents sit at ``depth`` (``T²`` unless given)."""
        return self._per_layer(self.lambdas, depth)

    @staticmethod
    def _per_layer(values: tuple[float, ...], depth: int) -> float:
        return values[0] if len(values) == 1 else values[depth]


@dataclass(eq=False)
class LossTerms:
    """The total loss and every named term as it enters the total (``total == Σ terms``).

    Names: ``bce/<node>``, ``kl/<parent>><child>`` (already × λ), ``l2/<tower>`` (already
    cumulative when that quirk is on); nodes as :func:`modloc.training.models.node_name` writes them.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def bce_with_logits(
    logits: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, C)`` logits → scalar: BCE summed over classes, mean over the batch."""
    loss = F.binary_cross_entropy_with_logits(
        logits, labels, weight=label_weights, reduction="none")
    return loss.sum(dim=1).mean()


def bce_on_probabilities(
    probabilities: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """G ``CrossEntropyLoss``: ``−[y·log(p+ε) + (1−y)·log(1−p+ε)]``, ε = 1e-5, × weights,
    summed over classes, mean over the batch."""
    loss = -(labels * torch.log(probabilities + BCE_EPSILON)
             + (1 - labels) * torch.log(1 - probabilities + BCE_EPSILON))
    if label_weights is not None:
        loss = loss * label_weights
    return loss.sum(dim=1).mean()


def bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_weights: torch.Tensor | None,
    form: Literal["logits", "probabilities"] = "logits",
) -> torch.Tensor:
    """BCE of ``(B, C)`` logits in the chosen form."""
    if form == "logits":
        return bce_with_logits(logits, labels, label_weights)
    # at least fp32: under bf16 autocast the logits are bf16, and a bf16 sigmoid rounds
    # p = 0.9999 to 1, which the ε form then scores as log(1e-5)
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return bce_on_probabilities(torch.sigmoid(wide), labels, label_weights)


def distillation_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``(B, C)``, ``(B, C)`` → ``(B,)``: KL(softmax(teacher/T) ‖ softmax(student/T)) over C.

    No stop-gradient: gradients reach the teacher too (REFERENCE §4).
    """
    teacher = torch.softmax(teacher_logits / temperature, dim=-1)
    student = torch.softmax(student_logits / temperature, dim=-1)
    return (teacher * (torch.log(teacher + KL_EPSILON) - torch.log(student + KL_EPSILON))).sum(-1)


def l2_penalty(parameters: list[nn.Parameter], scale: float) -> torch.Tensor:
    """``scale · Σ w² / 2`` over ``parameters`` (slim ``l2_regularizer``)."""
    return scale * sum(p.square().sum() for p in parameters) / 2


def model_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_weights: torch.Tensor | None,
    config: LossConfig,
    *,
    model: nn.Module,
) -> LossTerms:
    """Loss of a single model (NeXtVLAD, DBoF): BCE + L2 of ``model.l2_parameters()``."""
    terms = {"bce": bce(logits, labels, label_weights, config.bce)}
    if config.single_tower_ensemble_bce:  # V3's ensemble over the one tower: the same BCE again
        terms["bce/ensemble"] = terms["bce"]
    if config.l2_penalty:
        terms["l2"] = l2_penalty(model.l2_parameters(), config.l2_penalty)
    return LossTerms(total=sum(terms.values()), terms=terms)


def mod_loss(
    output: TreeOutput,
    labels: torch.Tensor,
    label_weights: torch.Tensor | None,
    config: LossConfig,
    *,
    tree: MODTree,
) -> LossTerms:
    """Loss of a mixture tree: BCE per node, KL per parent→child edge, L2 per tower."""
    depth = len(output.branching)
    if len(config.temperatures) not in (1, depth):
        raise ValueError(f"{len(config.temperatures)} temperatures for a {depth}-layer tree")
    terms: dict[str, torch.Tensor] = {}
    for path, logits in output.logits.items():
        terms[f"bce/{node_name(path)}"] = bce(logits, labels, label_weights, config.bce)
    if config.single_tower_ensemble_bce and depth == 1:  # the root is V3's one tower
        terms["bce/ensemble"] = terms["bce/root"]

    for parent in internal_paths(output.branching):
        temperature = config.temperature(len(parent))
        if temperature == 0:
            continue
        weight = config.kl_weight(len(parent))
        teacher = output.logits[parent]
        for child in output.children(parent):
            kl = distillation_kl(teacher, output.logits[child], temperature).mean()
            terms[f"kl/{node_name(parent)}>{node_name(child)}"] = weight * kl

    if config.l2_penalty:
        towers = tower_paths(output.branching)
        tower_l2 = [l2_penalty([p for leaf in tree.leaves(t) for p in leaf.l2_parameters()],
                               config.l2_penalty) for t in towers]
        if config.cumulative_l2:
            tower_l2 = list(itertools.accumulate(tower_l2))
        terms.update({f"l2/{node_name(t)}": l2 for t, l2 in zip(towers, tower_l2, strict=True)})

    return LossTerms(total=sum(terms.values()), terms=terms)
