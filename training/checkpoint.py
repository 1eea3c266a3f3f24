"""Checkpoints: safetensors weights plus a JSON config that alone rebuilds the model.

A checkpoint is a directory::

    model.safetensors   the model's state dict: weights and BatchNorm statistics
    config.json         model tree, class ids in output order, preprocessing, the training
                        config and state (step, epoch, position in the epoch), sha256 of
                        model.safetensors
    state.safetensors   what an exact resume needs besides the weights: the optimizer's
                        slots keyed by parameter name ("optimizer/<param>/<slot>") and the
                        torch RNG states ("rng/cpu", "rng/cuda/<i>"); under torchrun also
                        every rank's own ("rng/rank/<r>/cpu", "rng/rank/<r>/cuda")

A directory is written under a temporary name and renamed into place, so a reader sees
either the previous checkpoint or the complete new one. :func:`load_checkpoint` checks the
format, the weights' sha256, the preprocessing and every tensor's name and shape, and says
which one differs.

Gate input. A tree's config records its gates' input (``gate_input``, see
:mod:`modloc.training.models.mod_tree`); a config written before it existed loads as
``"padded_mean"``, the form it was trained with, so an older checkpoint gives its old
outputs (and its ensemble still needs batches padded to 300 frames).

Class spaces. A checkpoint's classes can be narrowed when it is loaded (``class_ids``, a
subset of its own, e.g. fine-tuning a 3862-class pre-trained model on the segment
classes): every tensor with a per-class leading axis (classifier weights and biases, and
their Adam slots) keeps the rows of those classes, in the new order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modloc._version import __version__
from modloc.engine.base.atomic import fsync_path, replace_directory
from modloc.engine.base.vocab import ClassSpace, data_path
from modloc.training.models import (
    DBoFConfig,
    FeatureInput,
    MODTreeConfig,
    NeXtVLADConfig,
    build_model,
)
from modloc.training.models.registry import ModelConfig

FORMAT = "modloc-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.safetensors"
STEP_PREFIX = "step-"

_CONFIG_TYPES = {cls.__name__: cls for cls in (NeXtVLADConfig, DBoFConfig, MODTreeConfig)}


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, or does not fit the model it is loaded into."""


@dataclass
class TrainingState:
    """Where a run stands after ``step`` updates.

    Attributes:
        phase: ``"pretrain"`` or ``"finetune"``.
        step: updates done (the global step; it restarts at 0 when fine-tuning begins).
        epoch: the epoch in progress.
        batch_in_epoch: batches of that epoch already consumed; a resumed run skips them.
        examples: examples consumed since step 0.
        loss: the loss of the last update, if any.
        seconds: wall time spent training since step 0, summed over every call that trained
            the run (an interrupted run's time up to its checkpoint, then the resumed call's).
    """

    phase: str
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    examples: int = 0
    loss: float | None = None
    seconds: float = 0.0


@dataclass(eq=False)
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, on the requested device) and its config.

    Attributes:
        path: the checkpoint directory.
        model: the rebuilt model holding the saved weights.
        model_config: the config it was built from (class count already narrowed, if asked).
        preset: the registry preset the model came from, if any.
        class_ids: ``(C,)`` vocabulary ids of the model's outputs, in output order.
        preprocessing: how uint8 features become the model's input (see :func:`preprocessing`).
        training: the run's :class:`modloc.training.config.TrainConfig` as a dict, if saved by a run.
        state: the run's :class:`TrainingState`, if saved by a run.
    """

    path: Path
    model: nn.Module
    model_config: ModelConfig
    preset: str | None
    class_ids: tuple[int, ...]
    preprocessing: dict
    training: dict | None
    state: TrainingState | None


# --- model configs as JSON ------------------------------------------------------------


def model_config_to_dict(config: ModelConfig) -> dict:
    """``{"type": <config class>, **fields}``; a tree's leaf nests the same way."""
    if type(config).__name__ not in _CONFIG_TYPES:
        raise TypeError(f"not a model config: {type(config).__name__}")
    return {"type": type(config).__name__, **json.loads(json.dumps(dataclasses.asdict(config)))}


def model_config_from_dict(data: dict) -> ModelConfig:
    """Inverse of :func:`model_config_to_dict`."""
    fields = dict(data)
    kind = fields.pop("type", None)
    if kind not in _CONFIG_TYPES:
        raise CheckpointError(f"unknown model config type {kind!r}; known: {sorted(_CONFIG_TYPES)}")
    if kind == "MODTreeConfig":
        # a config written before the gate input was recorded is the old form
        return MODTreeConfig(branching=tuple(fields["branching"]),
                             leaf=NeXtVLADConfig(**fields["leaf"]),
                             gate_input=fields.get("gate_input", "padded_mean"))
    return _CONFIG_TYPES[kind](**fields)


def with_num_classes(config: ModelConfig, num_classes: int) -> ModelConfig:
    """``config`` with its class count (a tree's leaf's) replaced."""
    if isinstance(config, MODTreeConfig):
        return dataclasses.replace(config, leaf=dataclasses.replace(config.leaf, num_classes=num_classes))
    return dataclasses.replace(config, num_classes=num_classes)


def num_classes_of(config: ModelConfig) -> int:
    return config.leaf.num_classes if isinstance(config, MODTreeConfig) else config.num_classes


def preprocessing(model: nn.Module, max_frames: int) -> dict:
    """How this install turns uint8 frames into ``model``'s input (recorded and checked).

    ``input_transform`` is the model's :class:`modloc.training.models.FeatureInput` transform; the
    un-whitening one depends on the shipped PCA eigenvalues, identified by their sha256.
    """
    transform = model.inputs.transform
    eigenvalues = _sha256(data_path("eigenvals.npy")) if transform == "unwhiten" else None
    return {"input_transform": transform, "eigenvalues_sha256": eigenvalues,
            "max_frames": max_frames, "segment_frames": 5}


# --- saving ---------------------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    *,
    class_ids: Sequence[int],
    max_frames: int = 300,
    preset: str | None = None,
    training: dict | None = None,
    state: TrainingState | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    rank_rng_states: Sequence[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a checkpoint of ``model`` (and, with ``optimizer``, the resume state) atomically.

    Args:
        directory: the checkpoint directory; an existing one is replaced.
        model: a model of :mod:`modloc.training.models` (its ``config`` is what rebuilds it).
        class_ids: ``(C,)`` vocabulary ids of its outputs.
        max_frames: frames per video the model was trained on.
        preset: the registry name it was created from, for the record.
        training: the run's config as a dict; ``state``: where the run stands.
        optimizer: its slots (by parameter name) and the RNG states go to state.safetensors.
        rank_rng_states: under torchrun, every rank's :func:`rng_state`, in rank order (with
            ``optimizer``): each rank draws its own dropout masks, and resumes its own stream.
    """
    directory = Path(directory)
    if len(class_ids) != num_classes_of(model.config):
        raise ValueError(f"{len(class_ids)} class ids for a model with "
                         f"{num_classes_of(model.config)} outputs")
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {name: tensor.detach().to("cpu").contiguous()
               for name, tensor in model.state_dict().items()}
    save_file(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"preset": preset, "config": model_config_to_dict(model.config)},
        "classes": [int(c) for c in class_ids],
        "preprocessing": preprocessing(model, max_frames),
        "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(tmp / WEIGHTS_FILE)},
        "training": None,
        "versions": {"modloc": __version__, "torch": torch.__version__},
    }
    if training is not None or state is not None:
        config["training"] = {"config": training,
                              "state": dataclasses.asdict(state) if state is not None else None}
    if optimizer is not None:
        tensors = _resume_tensors(model, optimizer)
        for rank, states in enumerate(rank_rng_states or ()):
            tensors.update({f"rng/rank/{rank}/{kind}": value for kind, value in states.items()})
        save_file(tensors, tmp / STATE_FILE)
        config["optimizer"] = {
            "type": type(optimizer).__name__,
            "param_groups": [{k: v for k, v in group.items() if k != "params"}
                             for group in optimizer.state_dict()["param_groups"]],
        }
    (tmp / CONFIG_FILE).write_text(_config_text(config))
    for path in tmp.iterdir():
        fsync_path(path)
    replace_directory(tmp, directory)
    return directory


def _resume_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for parameter, slots in optimizer.state.items():
        if id(parameter) not in names:
            raise ValueError("the optimizer holds a tensor that is not a parameter of the model")
        for slot, value in slots.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"optimizer/{names[id(parameter)]}/{slot}"] = value.detach().to("cpu").contiguous()
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{index}"] = rng
    return tensors


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states that dropout on ``device`` draws from: ``cpu`` (and ``cuda``)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def load_rank_rng_state(directory: str | os.PathLike, rank: int,
                        world_size: int) -> dict[str, torch.Tensor] | None:
    """Rank ``rank``'s RNG states saved by a torchrun run of ``world_size`` ranks, or None when
    the checkpoint holds none or was written by another number of ranks."""
    tensors = load_file(Path(directory) / STATE_FILE)
    saved_ranks = {key.split("/")[2] for key in tensors if key.startswith("rng/rank/")}
    if len(saved_ranks) != world_size:
        return None
    prefix = f"rng/rank/{rank}/"
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def _config_text(config: dict) -> str:
    """Indented JSON with the (up to 3862) class ids on one line."""
    placeholder = '"@classes@"'
    text = json.dumps({**config, "classes": placeholder[1:-1]}, indent=2, default=_json_default)
    return text.replace(placeholder, json.dumps(config["classes"])) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# --- loading --------------------------------------------------------------------------


def read_checkpoint_config(directory: str | os.PathLike) -> dict:
    """config.json of a checkpoint, after checking the format."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a {FORMAT} config (a JSON {type(config).__name__})")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} config (format {config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {config.get('format_version')}, this "
                              f"install reads version {FORMAT_VERSION}")
    return config


def load_checkpoint(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    class_ids: Sequence[int] | None = None,
    model_changes: dict[str, Any] | None = None,
    verify: bool = True,
) -> Checkpoint:
    """Rebuild the model from config.json and load its weights.

    Args:
        directory: the checkpoint directory.
        device: where the model goes.
        class_ids: narrow the outputs to these classes, a subset of the checkpoint's (module
            doc); None keeps them all.
        model_changes: config fields that do not change the parameters, to replace (e.g.
            ``{"drop_rate": 0.75, "mode": "segment"}``; a tree's leaf takes them).
        verify: check the weights' sha256 against config.json first.

    Raises:
        CheckpointError: naming what is missing, corrupt or different.
    """
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    weights_path = directory / config["weights"]["file"]
    if not weights_path.is_file():
        raise CheckpointError(f"{directory}: weights file {weights_path.name} is missing")
    if verify:
        digest = _sha256(weights_path)
        if digest != config["weights"]["sha256"]:
            raise CheckpointError(f"{weights_path}: sha256 {digest} differs from the "
                                  f"{config['weights']['sha256']} recorded in {CONFIG_FILE}")
    saved_ids = tuple(int(c) for c in config["classes"])
    selection = _class_selection(saved_ids, class_ids)
    new_ids = saved_ids if class_ids is None else tuple(int(c) for c in class_ids)
    model_config = with_num_classes(model_config_from_dict(config["model"]["config"]), len(new_ids))
    if model_changes:
        model_config = _replace_model_fields(model_config, model_changes)
    # built without memory; the loaded tensors are assigned in place of the meta ones
    with torch.device("meta"):
        model = build_model(model_config)
    _check_preprocessing(config["preprocessing"], model, directory)
    weights = load_file(weights_path)
    weights = _narrow(weights, dict(_expected_shapes(model)), len(saved_ids), selection, "weights")
    _load_state_dict(model, weights, directory)
    _rebuild_input_constants(model)
    model.to(device)
    model.eval()
    training = config.get("training") or {}
    state = training.get("state")
    return Checkpoint(
        path=directory,
        model=model,
        model_config=model_config,
        preset=config["model"].get("preset"),
        class_ids=new_ids,
        preprocessing=config["preprocessing"],
        training=training.get("config"),
        state=TrainingState(**state) if state else None,
    )


def restore_resume_state(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    rng: bool = True,
    class_ids: Sequence[int] | None = None,
) -> None:
    """Load state.safetensors: the optimizer's slots into ``optimizer``, and the RNG states.

    ``model`` is the one ``optimizer`` updates (its parameter names key the slots);
    ``class_ids`` narrows per-class slots as :func:`load_checkpoint` narrows the weights.
    """
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {STATE_FILE} (a weights-only checkpoint cannot "
                              "restore optimizer or RNG state)")
    tensors = load_file(path)
    if optimizer is not None:
        saved_ids = tuple(int(c) for c in read_checkpoint_config(directory)["classes"])
        _load_optimizer(model, optimizer, tensors, len(saved_ids),
                        _class_selection(saved_ids, class_ids), directory)
    if rng:
        torch.set_rng_state(tensors["rng/cpu"])
        cuda_states = [tensors[key] for key in sorted((k for k in tensors if k.startswith("rng/cuda/")),
                                                      key=lambda k: int(k.rpartition("/")[2]))]
        if cuda_states and torch.cuda.is_available():
            if len(cuda_states) != torch.cuda.device_count():
                raise CheckpointError(f"{path}: RNG states of {len(cuda_states)} GPUs, "
                                      f"{torch.cuda.device_count()} present")
            torch.cuda.set_rng_state_all(cuda_states)


def _load_optimizer(model, optimizer, tensors, saved_classes, selection, directory) -> None:
    parameters = dict(model.named_parameters())
    slots: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith("optimizer/"):
            name, _, slot = key[len("optimizer/"):].rpartition("/")
            slots.setdefault(name, {})[slot] = tensor
    unknown = sorted(set(slots) - set(parameters))
    if unknown:
        raise CheckpointError(f"{directory}: optimizer state for parameters the model lacks: "
                              f"{unknown[:5]}")
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, values in slots.items():
        shapes = {slot: tuple(parameters[name].shape) if tensor.dim() else ()
                  for slot, tensor in values.items()}
        values = _narrow(values, shapes, saved_classes, selection, f"optimizer state of {name}")
        for slot, tensor in values.items():
            if tensor.dim() and tuple(tensor.shape) != tuple(parameters[name].shape):
                raise CheckpointError(f"{directory}: optimizer slot {slot} of {name} has shape "
                                      f"{tuple(tensor.shape)}, the parameter "
                                      f"{tuple(parameters[name].shape)}")
        state[index[id(parameters[name])]] = values
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _load_state_dict(model: nn.Module, weights: dict[str, torch.Tensor], directory: Path) -> None:
    expected = dict(_expected_shapes(model))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{name} {tuple(weights[name].shape)} (model: {expected[name]})"
             for name in expected if name in weights and tuple(weights[name].shape) != expected[name]]
    if missing or unexpected or wrong:
        parts = [f"{label}: {items[:5]}{' ...' if len(items) > 5 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("shape differs", wrong)) if items]
        raise CheckpointError(f"{directory}: the weights do not fit the model its config "
                              f"describes; " + "; ".join(parts))
    model.load_state_dict(weights, strict=True, assign=True)


def _rebuild_input_constants(model: nn.Module) -> None:
    """Compute the constants of every :class:`FeatureInput` of a model built on meta.

    They are non-persistent buffers (computed from the shipped eigenvalues, not learned),
    so the checkpoint does not hold them.
    """
    for module in model.modules():
        if isinstance(module, FeatureInput):
            for name, buffer in FeatureInput(module.transform).named_buffers():
                module.register_buffer(name, buffer, persistent=False)


def _expected_shapes(model: nn.Module):
    for name, tensor in model.state_dict().items():
        yield name, tuple(tensor.shape)


def _class_selection(saved_ids: tuple[int, ...], class_ids: Sequence[int] | None) -> np.ndarray | None:
    """Positions in the checkpoint's outputs of ``class_ids`` (None: keep every output)."""
    if class_ids is None or tuple(int(c) for c in class_ids) == saved_ids:
        return None
    positions = ClassSpace(saved_ids).positions(np.asarray(class_ids, dtype=np.int64))
    absent = np.asarray(class_ids)[positions < 0]
    if len(absent):
        raise CheckpointError(f"classes {absent[:10].tolist()} are not among the checkpoint's "
                              f"{len(saved_ids)} classes: a class space can only be narrowed")
    return positions


def _narrow(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], saved_classes: int,
            selection: np.ndarray | None, what: str) -> dict[str, torch.Tensor]:
    """Keep the selected classes' rows of every tensor whose leading axis is per class.

    A tensor whose shape differs from the model's and whose leading axis is
    ``saved_classes × m`` (``m`` rows per class: 1 for a logistic classifier, E + 1 for a
    MoE gate) becomes ``len(selection) × m`` rows, class by class.
    """
    if selection is None:
        return tensors
    index = torch.from_numpy(selection)
    narrowed = {}
    for name, tensor in tensors.items():
        target = shapes.get(name)
        if (target is not None and tensor.dim() and tuple(tensor.shape) != target
                and tensor.shape[0] % saved_classes == 0
                and target == ((tensor.shape[0] // saved_classes) * len(selection), *tensor.shape[1:])):
            per_class = tensor.unflatten(0, (saved_classes, tensor.shape[0] // saved_classes))
            tensor = per_class[index].flatten(0, 1).contiguous()
        narrowed[name] = tensor
    return narrowed


def _replace_model_fields(config: ModelConfig, changes: dict[str, Any]) -> ModelConfig:
    if isinstance(config, MODTreeConfig):
        return dataclasses.replace(config, leaf=dataclasses.replace(config.leaf, **changes))
    return dataclasses.replace(config, **changes)


def _check_preprocessing(saved: dict, model: nn.Module, directory: Path) -> None:
    current = preprocessing(model, saved.get("max_frames", 300))
    for key in ("input_transform", "eigenvalues_sha256"):
        if saved.get(key) != current[key]:
            raise CheckpointError(f"{directory}: trained with {key} {saved.get(key)!r}, but this "
                                  f"install's model uses {current[key]!r}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- run directories ------------------------------------------------------------------


def step_directory(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete step checkpoints of a run directory, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [path for path in run_dir.glob(f"{STEP_PREFIX}*")
             if path.is_dir() and path.name[len(STEP_PREFIX):].isdigit()
             and (path / CONFIG_FILE).is_file()]
    return sorted(found, key=lambda path: int(path.name[len(STEP_PREFIX):]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


__all__ = [
    "CONFIG_FILE", "STATE_FILE", "WEIGHTS_FILE", "Checkpoint", "CheckpointError", "TrainingState",
    "latest_checkpoint", "list_checkpoints", "load_checkpoint", "model_config_from_dict",
    "model_config_to_dict", "num_classes_of", "preprocessing", "read_checkpoint_config",
    "restore_resume_state", "save_checkpoint", "step_directory", "with_num_classes",
]
