"""Named model presets (the paper's rows, REFERENCE §9), in the style of timm's ``list_models``.

``create_model("mod_4x3", drop_rate=0.75, mode="segment")`` is the fine-tuning model.

Overrides replace fields of the preset's config; for a tree, ``branching`` is the tree's and
every other field is the leaf's. Parameter counts are trainable parameters (weights, biases,
BN γ/β), not BN running statistics, as REFERENCE §3 counts them.

The paper's parameter column matches 1000-way classifiers (REFERENCE §3, [inferred]); the
code trains 3862-way ones. ``list_models(num_classes=1000)`` reproduces the column:
NeXtVLAD 83.0M, NeXtVLAD_large 318M, DBoF 15.7M, MixNeXtVLAD 249M, MixNeXtVLAD_large 1274M,
MOD 990M (paper: 83M, 320M, 16M, 250M, 1280M, 1000M).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import NamedTuple

import torch
from torch import nn

from modloc.training.models.dbof import DBoFConfig, DBoFModel
from modloc.training.models.mod_tree import MODTree, MODTreeConfig
from modloc.training.models.nextvlad_model import NeXtVLADConfig, NeXtVLADModel

ModelConfig = NeXtVLADConfig | DBoFConfig | MODTreeConfig

_NEXTVLAD = NeXtVLADConfig()  # 8G, 128K, X2, 2048H, r=8
_NEXTVLAD_LARGE = NeXtVLADConfig(cluster_size=256, expansion=4)
# the MOD scripts (video pretraining and segment fine-tuning) run r=16 (REFERENCE §6)
_MOD_LEAF = NeXtVLADConfig(gating_reduction=16)

_PRESETS: dict[str, tuple[str, ModelConfig]] = {
    "nextvlad": ("NeXtVLAD (8G, 128K, X2, 2048H), r=8", _NEXTVLAD),
    "nextvlad_large": ("NeXtVLAD_large (8G, 256K, X4, 2048H), r=8", _NEXTVLAD_LARGE),
    "dbof": ("DBoF baseline (2048 clusters, hidden 1024, MoE with 5 experts)", DBoFConfig()),
    "mix_nextvlad": ("MixNeXtVLAD: gated mixture of 3 NeXtVLADs", MODTreeConfig((3,), _NEXTVLAD)),
    "mix_nextvlad_large": ("MixNeXtVLAD_large: gated mixture of 4 NeXtVLAD_large",
                           MODTreeConfig((4,), _NEXTVLAD_LARGE)),
    "mod_4x3": ("MOD: 4 towers x 3 NeXtVLADs (r=16), the final system",
                MODTreeConfig((4, 3), _MOD_LEAF)),
    "mod_2x2x3": ("3-layer MOD tree: 2 x 2 x 3 NeXtVLADs (r=16)",
                  MODTreeConfig((2, 2, 3), _MOD_LEAF)),
}


class ModelInfo(NamedTuple):
    name: str
    description: str
    num_params: int


def model_config(name: str, num_classes: int = 3862, **overrides) -> ModelConfig:
    """The preset's config with ``num_classes`` and ``overrides`` applied.

    Raises:
        ValueError: an unknown preset or override field, naming the close matches.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}{_close(name, _PRESETS)}; known: {', '.join(_PRESETS)}")
    config = _PRESETS[name][1]
    if isinstance(config, MODTreeConfig):
        tree_fields = {f.name for f in dataclasses.fields(MODTreeConfig)} - {"leaf"}
        tree = {k: v for k, v in overrides.items() if k in tree_fields}
        leaf = {k: v for k, v in overrides.items() if k not in tree_fields}
        _check_fields(name, leaf, config.leaf, tree_fields)
        return dataclasses.replace(
            config, **tree, leaf=dataclasses.replace(config.leaf, num_classes=num_classes, **leaf))
    _check_fields(name, overrides, config)
    return dataclasses.replace(config, num_classes=num_classes, **overrides)


def _check_fields(name: str, overrides: dict, config: ModelConfig, extra: set[str] = frozenset()) -> None:
    """Refuse an override that names no field of ``config`` (or ``extra``, a tree's fields)."""
    known = sorted({f.name for f in dataclasses.fields(config)} - {"num_classes"} | extra)
    for key in overrides:
        if key not in known:
            raise ValueError(f"model {name}: no setting {key!r} to override{_close(key, known)}; "
                             f"its settings: {', '.join(known)}")


def _close(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def build_model(config: ModelConfig) -> nn.Module:
    """The model a config describes."""
    if isinstance(config, NeXtVLADConfig):
        return NeXtVLADModel(config)
    if isinstance(config, DBoFConfig):
        return DBoFModel(config)
    if isinstance(config, MODTreeConfig):
        return MODTree(config)
    raise TypeError(f"not a model config: {type(config).__name__}")


def create_model(name: str, num_classes: int = 3862, **overrides) -> nn.Module:
    """Build preset ``name``; ``with torch.device("meta"):`` builds it without memory."""
    return build_model(model_config(name, num_classes, **overrides))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BN γ/β included, BN running statistics not)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def list_models(num_classes: int = 3862) -> list[ModelInfo]:
    """Every preset with its description and parameter count at ``num_classes`` classes."""
    with torch.device("meta"):
        return [ModelInfo(name, description, count_parameters(create_model(name, num_classes)))
                for name, (description, _) in _PRESETS.items()]
