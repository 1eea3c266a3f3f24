"""The configuration of a training run: typed dataclasses, the two recipes, file and flag loading.

A run is a :class:`TrainConfig`. It starts from a recipe (REFERENCE §6), then a JSON or
TOML file, then command-line flags, each layer overriding the one before::

    config = load_config("finetune", "tiny.json", {"optimizer.learning_rate": 1e-3})

The recipes (:data:`RECIPES`) are plain nested dicts in the config-file layout, so that
``modloc train --print-config`` shows exactly what a run uses and a file can copy any part.

- ``pretrain``: video level, batch 80, Adam lr 2e-4 decayed ×0.8 every 2.5M examples,
  dropout 0.5, classifier L2 1e-5, T = 1 and λ = 1 at both tree layers, the 4×3 MOD tree,
  all 3862 classes, 15 epochs capped at 1M steps.
- ``finetune``: segment level (rated 5-frame segments), batch 512, lr 2e-4 decayed ×0.8
  every 1M examples, dropout 0.75, L2 1e-4, T = 20 and λ = 400, 10 epochs; the model and its
  class space come from the pre-trained checkpoint.

Neither recipe sets λ: it is T² per layer (REFERENCE §4) unless given, so that a run that
changes only the temperatures keeps the recipes' rule; the loaded config holds the resolved
values (:class:`modloc.training.losses.LossConfig`).

This module imports no torch (the CLI reads :data:`OPTIONS` at startup); the loss settings
are :class:`modloc.training.losses.LossConfig`, imported when a config is built.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin, get_type_hints

if TYPE_CHECKING:
    from modloc.training.losses import LossConfig

Phase = Literal["pretrain", "finetune"]
Mode = Literal["video", "segment"]
PadTo = Literal["max_frames", "longest"]
ClassesSpec = str | tuple[int, ...] | None


@dataclass(frozen=True)
class ModelSpec:
    """A model preset of :func:`modloc.training.models.list_models` and overrides of its config.

    For a tree, ``branching`` overrides the tree's shape and every other key the leaf's
    (e.g. ``{"branching": [2, 2], "cluster_size": 8, "hidden_size": 64}``). The class count,
    dropout and mask mode are the run's (:attr:`TrainConfig.dropout`, :attr:`DataConfig.mode`).
    """

    name: str = "mod_4x3"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam with a staircase learning-rate decay and per-variable gradient clipping.

    ``lr(step) = learning_rate · decay_rate ** floor(step · batch_size / decay_examples)``,
    where ``step`` counts the updates done before this one (TF's ``global_step``).
    ``clip_norm`` rescales *each* gradient tensor to an L2 norm of at most ``clip_norm``
    (TF ``clip_by_norm`` per variable, not a global norm); 0 turns clipping off.
    """

    learning_rate: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    decay_rate: float = 0.8
    decay_examples: int = 2_500_000
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.learning_rate <= 0 or self.decay_examples <= 0 or not 0 < self.decay_rate <= 1:
            raise ValueError("need optimizer.learning_rate (--lr) > 0, optimizer.decay_examples "
                             "(--decay-examples) > 0 and 0 < optimizer.decay_rate (--decay-rate) "
                             f"<= 1, got {self.learning_rate}, {self.decay_examples} and "
                             f"{self.decay_rate}")
        if self.clip_norm < 0:
            raise ValueError(f"optimizer.clip_norm (--clip-norm) must be >= 0 (0: off), got "
                             f"{self.clip_norm}")

    def learning_rate_at(self, step: int, batch_size: int) -> float:
        """The learning rate of the update that follows ``step`` earlier updates."""
        return self.learning_rate * self.decay_rate ** math.floor(step * batch_size / self.decay_examples)


@dataclass(frozen=True)
class DataConfig:
    """What the run reads.

    ``classes`` is the model's class space: ``"all"`` (the 3862-class vocabulary),
    ``"segment"`` (the 1000 segment classes), a file (a JSON list of ids, a JSON object
    with ``segment_class_ids`` such as a synthetic dataset's ``synth.json``, or a CSV with
    an ``Index`` column such as ``segment_label_ids.csv``), comma-separated ids, or a list
    of ids. ``None`` (fine-tuning only) keeps the pre-trained checkpoint's.
    """

    train: tuple[str, ...] = ()
    eval: tuple[str, ...] = ()
    mode: Mode = "video"
    classes: ClassesSpec = "all"
    max_frames: int = 300
    pad_to: PadTo = "max_frames"
    shuffle_buffer: int | None = None
    eval_batches: int | None = None
    workers: int = 0
    decoder: Literal["native", "protobuf"] = "native"


@dataclass(frozen=True)
class TrainConfig:
    """One training run (pre-training or fine-tuning); see the module doc for the recipes.

    ``out`` is the run directory: checkpoints ``step-XXXXXXXX/``, ``history.jsonl``,
    ``loss_curves.png`` and the TensorBoard events under ``tensorboard/``. With ``resume``
    a run continues from the newest checkpoint in ``out``. ``init_from`` (fine-tuning)
    names the pre-trained checkpoint; ``restore_optimizer`` also restores its Adam state.

    ``bn_momentum`` overrides the momentum of every BatchNorm's moving averages; None keeps
    the models' 0.001 (slim's decay 0.999), which takes thousands of steps to settle: a
    run of a few hundred steps (the demo) needs a larger one, or its eval-mode statistics
    are still those of the initialization.

    ``freeze_root_gate_statistics`` reproduces what V3 does by accident (docs/REFERENCE.md
    §10, off by default): the root (ensemble) gate's BatchNorm never updates its moving
    mean and variance (its update ops are collected before that gate is built), so
    evaluation normalizes the root gate's input with mean 0 and variance 1. Training
    itself (batch statistics) is unchanged. Only trees of two or more layers have such a
    gate; elsewhere the switch changes nothing.

    ``devices`` (two or more) spreads a MOD tree's towers over devices of this process,
    e.g. ``("cuda:0", "cuda:1")``: only tower logits cross devices (:class:`modloc.training.parallel.
    PlacedTree`); empty or one device: the whole model on ``device`` (or that one device).
    Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank owns a block of towers instead
    (:mod:`modloc.training.trainer`); ``devices`` must then be empty.
    """

    phase: Phase = "pretrain"
    out: str = "runs/train"
    model: ModelSpec | None = field(default_factory=ModelSpec)
    init_from: str | None = None
    restore_optimizer: bool = True
    resume: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 80
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=lambda: _loss_config_class()())
    dropout: float | None = 0.5
    bn_momentum: float | None = None
    freeze_root_gate_statistics: bool = False
    epochs: int | None = 15
    max_steps: int | None = 1_000_000
    seed: int = 0
    device: str = "auto"
    devices: tuple[str, ...] = ()
    bf16: bool = False
    compile: bool = False
    log_every: int = 10
    eval_every: int | None = 1000
    checkpoint_every: int | None = 1000
    keep_checkpoints: int = 3
    progress: bool | None = None

    def __post_init__(self):
        # each problem names the config key and, for the command line, its flag
        problems = []
        if self.batch_size < 1:
            problems.append(f"{_named('batch_size')} must be >= 1, got {self.batch_size}")
        if self.epochs is None and self.max_steps is None:
            problems.append(f"set {_named('epochs')} or {_named('max_steps')} (or both)")
        for name in ("epochs", "max_steps", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{_named(name)} must be >= 1 or none, got {value}")
        for name in ("log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{_named(name)} must be >= 1, got {getattr(self, name)}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            problems.append(f"{_named('dropout')} must be in [0, 1), got {self.dropout}")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            problems.append(f"{_named('bn_momentum')} must be in (0, 1] or none, got "
                            f"{self.bn_momentum}")
        if self.phase == "pretrain" and self.init_from is not None:
            problems.append("init_from is for fine-tuning (modloc finetune --from)")
        if self.init_from is None and not self.resume:
            # a fine-tuning run lacking its checkpoint lacks its model and classes too: one problem
            if self.phase == "finetune":
                problems.append("fine-tuning starts from a pre-trained checkpoint: set "
                                f"{_named('init_from')}")
            else:
                if self.model is None:
                    problems.append(f"no model: set {_named('model.name')}")
                if self.data.classes is None:
                    problems.append(f"{_named('data.classes')}: null keeps a checkpoint's class "
                                    "space, and there is none")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        """The config as the nested dict a config file holds (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _loss_config_class():
    from modloc.training.losses import LossConfig

    return LossConfig


def _named(path: str) -> str:
    """A config key with the flag that sets it, e.g. ``init_from (--from)``."""
    flags = [option.flag for option in OPTIONS if option.path == path]
    return f"{path} ({flags[0]})" if flags else path


# --- recipes --------------------------------------------------------------------------

RECIPES: dict[str, dict] = {
    "pretrain": {
        "phase": "pretrain",
        "out": "runs/pretrain",
        "model": {"name": "mod_4x3", "overrides": {}},
        "data": {"mode": "video", "classes": "all"},
        "batch_size": 80,
        "optimizer": {"learning_rate": 2e-4, "decay_rate": 0.8, "decay_examples": 2_500_000},
        "loss": {"temperatures": [1.0], "l2_penalty": 1e-5, "cumulative_l2": False,
                 "bce": "logits", "single_tower_ensemble_bce": False},
        "freeze_root_gate_statistics": False,
        "dropout": 0.5,
        "epochs": 15,
        "max_steps": 1_000_000,
        "log_every": 10,
        "eval_every": 1000,
        "checkpoint_every": 1000,
    },
    "finetune": {
        "phase": "finetune",
        "out": "runs/finetune",
        "model": None,
        "data": {"mode": "segment", "classes": None},
        "batch_size": 512,
        "optimizer": {"learning_rate": 2e-4, "decay_rate": 0.8, "decay_examples": 1_000_000},
        "loss": {"temperatures": [20.0], "l2_penalty": 1e-4, "cumulative_l2": False,
                 "bce": "logits", "single_tower_ensemble_bce": False},
        "freeze_root_gate_statistics": False,
        "dropout": 0.75,
        "epochs": 10,
        "max_steps": None,
        "log_every": 10,
        "eval_every": 500,
        # the reference exports every 2000 steps
        "checkpoint_every": 2000,
    },
}


def _recipe_dict(name: str) -> dict:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: expected one of {sorted(RECIPES)}")
    return RECIPES[name]


# --- loading --------------------------------------------------------------------------


def load_config(
    recipe_name: str,
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Recipe ← config file ← overrides (dotted paths such as ``"optimizer.learning_rate"``).

    A file is JSON (``.json``) or TOML (``.toml``) in the layout of
    :meth:`TrainConfig.to_dict`; it may leave out anything. Unknown keys and values of the
    wrong type are errors that name the key.
    """
    merged = copy.deepcopy(_recipe_dict(recipe_name))
    if path is not None:
        _deep_merge(merged, read_config_file(path))
    for dotted, value in (overrides or {}).items():
        _set_dotted(merged, dotted, value)
    return _from_dict(TrainConfig, merged, "")


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """A config from a complete nested dict (as :meth:`TrainConfig.to_dict` writes it)."""
    return _from_dict(TrainConfig, data, "")


def read_config_file(path: str | Path) -> dict:
    """The settings of a ``.json`` or ``.toml`` config file, as a nested dict."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ValueError(f"{path}: TOML configs need Python 3.11+; use JSON") from None
        data = tomllib.loads(text)
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None
    else:
        raise ValueError(f"{path}: a config file is .json or .toml")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of settings at the top level")
    return data


def _deep_merge(base: dict, update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{dotted}: {key!r} is not a section")
        node = child
    node[last] = value


def _from_dict(cls: type, data: Any, where: str):
    """Instantiate dataclass ``cls`` from ``data``, converting and checking every field."""
    if isinstance(data, cls):
        return data
    section = where.rstrip(".") or "config"
    if not isinstance(data, Mapping):
        raise ValueError(f"{section}: expected a section (object), got {data!r}")
    hints = get_type_hints(cls, localns={"LossConfig": _loss_config_class()})
    names = [item.name for item in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}; known: {names}")
    values = {name: _convert(data[name], hints[name], f"{where}{name}") for name in names
              if name in data}
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(f"{section}: {error}") from None


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked (and lists made tuples) against the type ``hint`` of field ``where``."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ValueError(f"{where}: must not be null")
        failures = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ValueError as error:
                failures.append(str(error))
        raise ValueError(failures[0] if len(failures) == 1 else
                         f"{where}: {value!r} matches none of the accepted types")
    if origin is Literal:
        if value in get_args(hint):
            return value
        raise ValueError(f"{where}: {value!r} is not one of {list(get_args(hint))}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(item, get_args(hint)[0], f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected an object, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, f"{where}.")
    if value is None:
        raise ValueError(f"{where}: must not be null")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{where}: unsupported field type {hint!r}")
    raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")


# --- class spaces ---------------------------------------------------------------------


def resolve_classes(spec: ClassesSpec) -> tuple[int, ...]:
    """The vocabulary ids of a :attr:`DataConfig.classes` spec, in output order: distinct
    ids of the 3862-class vocabulary (ValueError naming the first that is not)."""
    from modloc.engine.base.vocab import NUM_VIDEO_CLASSES

    ids = _class_ids_of(spec)
    if not ids:
        raise ValueError(f"classes {spec!r}: no class id")
    seen: set[int] = set()
    for class_id in ids:
        if not 0 <= class_id < NUM_VIDEO_CLASSES:
            raise ValueError(f"classes {_describe(spec)}: class id {class_id} is outside the "
                             f"{NUM_VIDEO_CLASSES}-class vocabulary")
        if class_id in seen:
            raise ValueError(f"classes {_describe(spec)}: class id {class_id} is given twice")
        seen.add(class_id)
    return ids


def _describe(spec: ClassesSpec) -> str:
    return f"({len(spec)} ids)" if isinstance(spec, tuple) else repr(spec)


def _class_ids_of(spec: ClassesSpec) -> tuple[int, ...]:
    from modloc.engine.base.vocab import NUM_VIDEO_CLASSES, default_segment_class_ids

    if spec is None:
        raise ValueError("no class space given")
    if isinstance(spec, tuple):
        return spec
    if spec == "all":
        return tuple(range(NUM_VIDEO_CLASSES))
    if spec == "segment":
        return tuple(int(i) for i in default_segment_class_ids())
    path = Path(spec)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        ids = data.get("segment_class_ids") if isinstance(data, dict) else data
        if not isinstance(ids, list):
            raise ValueError(f"{path}: expected a list of class ids or an object with segment_class_ids")
        return tuple(int(i) for i in ids)
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "Index" not in rows[0]:
            raise ValueError(f"{path}: expected a CSV with an 'Index' column")
        return tuple(int(row["Index"]) for row in rows)
    try:
        return tuple(int(part) for part in spec.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"classes {spec!r}: expected 'all', 'segment', a .json/.csv file or comma-separated ids"
        ) from None


# --- command-line options -------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """A command-line flag that sets one config path.

    ``kind``: ``int``, ``float``, ``str``, ``bool`` (``--x/--no-x``), ``floats``/``strs``
    (one or more values), ``csv`` (comma-separated strings), ``int?``/``float?`` (a number
    or ``none``) or ``assign`` (repeatable ``KEY=VALUE`` into a dict, VALUE read as JSON
    when it parses). ``default_help`` describes a default the recipes do not spell out.
    """

    flag: str
    path: str
    kind: str
    help: str
    choices: tuple[str, ...] | None = None
    phases: tuple[str, ...] = ("pretrain", "finetune")
    default_help: str | None = None


def recipe_default(phase: str, path: str) -> Any:
    """The value ``phase``'s recipe gives ``path``, else the dataclass default."""
    node: Any = RECIPES[phase]
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return _dataclass_default(path)
        node = node[key]
    return node


def _dataclass_default(path: str) -> Any:
    cls: Any = TrainConfig
    *sections, last = path.split(".")
    for key in sections:
        cls = {"data": DataConfig, "optimizer": OptimizerConfig, "model": ModelSpec}.get(key)
        if cls is None:  # the loss section: LossConfig defaults live with the loss
            return None
    item = {f.name: f for f in dataclasses.fields(cls)}[last]
    return item.default if item.default is not dataclasses.MISSING else None


OPTIONS: tuple[Option, ...] = (
    Option("--out", "out", "str", "run directory: checkpoints, history, loss curves, TensorBoard"),
    Option("--model", "model.name", "str", "model preset (see `modloc models`)", phases=("pretrain",)),
    Option("--model-override", "model.overrides", "assign",
           "KEY=VALUE (repeatable; VALUE in JSON) replacing a field of the preset's config, "
           "e.g. branching=[2,2] or hidden_size=64", phases=("pretrain",)),
    Option("--data", "data.train", "strs", "training TFRecord files or globs (quote globs)"),
    Option("--eval-data", "data.eval", "strs",
           "TFRecord files or globs for periodic evaluation (video: labelled videos; segment: "
           "rated segments)"),
    Option("--classes", "data.classes", "str",
           "class space: all | segment | FILE (.json list or synth.json, .csv with Index) | "
           "comma-separated ids; fine-tuning defaults to the checkpoint's"),
    Option("--max-frames", "data.max_frames", "int", "frames read per video"),
    Option("--pad-to", "data.pad_to", "str",
           "video mode: pad every video to max_frames (the reference; padding enters the BN "
           "statistics) or to the longest of the batch (faster)", choices=("max_frames", "longest")),
    Option("--eval-batches", "data.eval_batches", "int?", "batches per periodic evaluation (none: all)"),
    Option("--workers", "data.workers", "int",
           "DataLoader worker processes (part of the data order: keep it when resuming)"),
    Option("--batch-size", "batch_size", "int", "examples per step"),
    Option("--lr", "optimizer.learning_rate", "float", "base learning rate of Adam"),
    Option("--decay-rate", "optimizer.decay_rate", "float",
           "staircase decay: lr = base * rate^floor(step * batch / decay_examples)"),
    Option("--decay-examples", "optimizer.decay_examples", "int", "examples per decay stair"),
    Option("--clip-norm", "optimizer.clip_norm", "float",
           "clip each gradient tensor to this L2 norm (per variable); 0: off"),
    Option("--adam-beta1", "optimizer.beta1", "float", "Adam β1"),
    Option("--adam-beta2", "optimizer.beta2", "float", "Adam β2"),
    Option("--adam-epsilon", "optimizer.epsilon", "float", "Adam ε"),
    Option("--epochs", "epochs", "int?", "passes over the training data (none: until max-steps)"),
    Option("--max-steps", "max_steps", "int?", "stop after this many steps (none: after the epochs)"),
    Option("--dropout", "dropout", "float", "dropout rate before the hidden layer of every NeXtVLAD"),
    Option("--bn-momentum", "bn_momentum", "float?",
           "momentum of the BatchNorm moving averages (none: the models' 0.001, slim's decay "
           "0.999; short runs need more)"),
    Option("--l2", "loss.l2_penalty", "float", "L2 scale on the classifier weights and biases"),
    Option("--temperatures", "loss.temperatures", "floats",
           "distillation temperature per tree layer, root layer first (one value: every layer; "
           "0: no distillation)"),
    Option("--lambdas", "loss.lambdas", "floats",
           "KL weight per tree layer, root layer first, as many as --temperatures",
           default_help="T² of each layer's temperature"),
    Option("--cumulative-l2", "loss.cumulative_l2", "bool",
           "count tower t's classifier L2 once per tower from t on, as V3 does by accident"),
    Option("--bce", "loss.bce", "str", "BCE on logits (stable) or on probabilities (G's form)",
           choices=("logits", "probabilities")),
    Option("--single-tower-ensemble-bce", "loss.single_tower_ensemble_bce", "bool",
           "count a one-tower model's BCE twice, as V3's ensemble over its one tower does by "
           "accident (2·BCE + L2)"),
    Option("--freeze-root-gate-statistics", "freeze_root_gate_statistics", "bool",
           "never update the root gate's BatchNorm moving statistics (evaluation normalizes "
           "with mean 0, variance 1), as V3 does by accident"),
    Option("--seed", "seed", "int", "seed of the model init, dropout and the data order"),
    Option("--device", "device", "str", "auto | cpu | cuda | cuda:N"),
    Option("--devices", "devices", "csv",
           "model parallelism in one process: a MOD tree's towers spread over these devices "
           "(comma-separated, e.g. cuda:0,cuda:1), only tower logits crossing devices"),
    Option("--bf16", "bf16", "bool", "bf16 autocast (CUDA only)"),
    Option("--compile", "compile", "bool", "torch.compile the model"),
    Option("--log-every", "log_every", "int", "steps between TensorBoard/history entries"),
    Option("--eval-every", "eval_every", "int?", "steps between periodic evaluations"),
    Option("--checkpoint-every", "checkpoint_every", "int?",
           "steps between checkpoints (one is always written at the end)"),
    Option("--keep-checkpoints", "keep_checkpoints", "int", "most recent checkpoints kept"),
    Option("--resume", "resume", "bool", "continue from the newest checkpoint in --out"),
    Option("--progress", "progress", "bool", "show the progress bar (none: only on a terminal)"),
    Option("--from", "init_from", "str", "the pre-trained checkpoint to start from",
           phases=("finetune",)),
    Option("--restore-optimizer", "restore_optimizer", "bool",
           "restore the checkpoint's Adam state as the reference does", phases=("finetune",)),
)


def option_help(option: Option, phase: str) -> str:
    """The option's help with the recipe's default."""
    if option.default_help is not None:
        return f"{option.help} (default: {option.default_help})"
    default = recipe_default(phase, option.path)
    if isinstance(default, (list, tuple, dict)):
        default = " ".join(map(str, default))
    shown = "none" if default in (None, "") else default
    return f"{option.help} (default: {shown})"


def parse_option_value(option: Option, raw: Any) -> dict[str, Any]:
    """A flag's argparse value (``int?``/``float?``: already a number or None) →
    ``{dotted path: config value}`` overrides."""
    if option.kind == "assign":
        return dict(parse_assignment(item, option.path) for item in raw)
    if option.kind == "csv":
        return {option.path: [part.strip() for part in raw.split(",") if part.strip()]}
    return {option.path: list(raw) if option.kind in ("floats", "strs") else raw}


def parse_assignment(text: str, prefix: str = "") -> tuple[str, Any]:
    """``"key=value"`` → ``("prefix.key", value)``; the value is JSON when it parses, else text."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return (f"{prefix}.{key}" if prefix else key), parsed


__all__ = [
    "OPTIONS", "RECIPES", "ClassesSpec", "DataConfig", "ModelSpec", "Option", "OptimizerConfig",
    "TrainConfig", "config_from_dict", "load_config", "option_help", "parse_option_value",
    "parse_assignment", "read_config_file", "recipe_default", "resolve_classes",
]
