"""The training loop of both phases (REFERENCE §6): ``train(config) -> TrainResult``.

- **Pre-training** (``phase="pretrain"``) builds the configured preset and trains it on
  video-level examples.
- **Fine-tuning** (``phase="finetune"``) starts from a pre-trained checkpoint
  (``init_from``): every weight and BatchNorm statistic, and with ``restore_optimizer``
  every Adam slot including the step counts behind its bias correction (the reference
  restores every variable, beta-power accumulators included), then resets the global step
  to 0, so the learning-rate schedule starts over. The model's structure is the
  checkpoint's; the run only changes what holds no parameter (dropout, the mask mode).
  The class space is the checkpoint's unless ``data.classes`` names a subset of it, in
  which case the classifier rows (and their Adam slots) of those classes are kept
  (:mod:`modloc.training.checkpoint`); a class the checkpoint lacks is an error.

One step: ``lr = base · decay^floor(step · batch / decay_examples)``; forward (under bf16
autocast on CUDA if asked); the loss (:func:`modloc.training.losses.mod_loss` for a tree, with
every term named); a non-finite loss stops the run with :class:`NonFiniteLossError`
before any weight changes; backward; every gradient tensor clipped to ``clip_norm`` on its
own (:func:`clip_by_norm_`); Adam.

Exact resume: the data order is a function of (seed, epoch, shard)
(:mod:`modloc.training.datasets`), so a checkpoint records the epoch and the batches of it already
consumed, and a resumed run re-reads and skips those; with the weights, the Adam state
and the torch RNG state (dropout) restored, a resumed run repeats the uninterrupted run's
loss sequence. A run stopped between checkpoints resumes from its newest checkpoint.

Outputs in the run directory (``config.out``): ``step-XXXXXXXX/`` checkpoints (the newest
``keep_checkpoints``), ``history.jsonl`` (every logged step and evaluation),
``loss_curves.png`` (rewritten with every checkpoint) and TensorBoard scalars under
``tensorboard/`` (``loss/total``, ``loss/<term>`` for every BCE node, KL edge and L2 tower,
``train/lr``, ``train/examples_per_second``, ``eval/<metric>``).

Model parallelism (a MOD tree of two or more layers; :mod:`modloc.training.parallel`):

- ``devices`` (two or more) wraps the tree in a :class:`~modloc.training.parallel.PlacedTree`:
  its towers on those devices of this process, the root gate and the loss on the first.
- Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank owns a block of towers
  (:class:`~modloc.training.parallel.DistributedMOD`, NCCL on GPUs, gloo on CPUs). Every rank
  builds (or loads) the whole tree on the CPU as a single-process run does, so both start
  from the same weights, then keeps its part. Every rank reads the same batches; the root
  gate's gradients are summed over the ranks before clipping, and clipping and Adam stay
  per rank. The logged loss is the gathered total. Rank 0 alone writes the run directory:
  checkpoints hold the whole tree and every Adam slot (gathered), in the single-process
  format, so a run may resume with another world size or none. Each rank draws its own
  dropout masks (rank 0 the run's stream, rank r a stream seeded from (seed, r)), and
  checkpoints keep every rank's RNG state: a resume on as many ranks is exact, one on
  another number is exact without dropout. Every rank reads the checkpoints: the run
  directory must be shared.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from modloc.engine.base.atomic import write_atomically
from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.io.tfrecord import count_records
from modloc.engine.base.progress import Progress, announce
from modloc.training.checkpoint import (
    TrainingState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_rank_rng_state,
    model_config_from_dict,
    read_checkpoint_config,
    restore_resume_state,
    rng_state,
    save_checkpoint,
    step_directory,
)
from modloc.training.config import TrainConfig, config_from_dict, resolve_classes
from modloc.training.data import TorchBatch, make_loader
from modloc.training.datasets import FrameDataset, SegmentDataset, VideoLevelDataset
from modloc.training.evaluate import evaluate_batches, resolve_device
from modloc.training.losses import LossTerms, mod_loss, model_loss
from modloc.training.models import MODTree, MODTreeConfig, build_model, model_config
from modloc.training.models.registry import ModelConfig, count_parameters
from modloc.training.parallel import DistributedMOD, PlacedTree, init_from_env

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
CURVES_FILE = "loss_curves.png"
TENSORBOARD_DIR = "tensorboard"

# Settings a resumed run may change: they decide when to stop, log, evaluate and save, or
# where the run executes, not which updates it makes.
RESUMABLE_CHANGES = frozenset({
    "out", "resume", "epochs", "max_steps", "log_every", "eval_every", "checkpoint_every",
    "keep_checkpoints", "device", "devices", "bf16", "compile", "progress", "data.eval", "data.eval_batches",
})


class NonFiniteLossError(FloatingPointError, ValueError):
    """The loss of a step is NaN or infinite; names the step and every term's value.

    Also a ValueError, so that the CLI reports it in one line.
    """

    def __init__(self, step: int, total: float, terms: dict[str, float], checkpoint: Path | None):
        bad = {name: value for name, value in terms.items() if not math.isfinite(value)}
        shown = ", ".join(f"{name}={value}" for name, value in bad.items()) or "none (their sum overflows)"
        where = f"; the newest checkpoint is {checkpoint}" if checkpoint else ""
        super().__init__(f"non-finite loss {total} at step {step}; non-finite terms: {shown}{where}")
        self.step = step
        self.terms = terms


@dataclass
class TrainResult:
    """What a call of :func:`train` did.

    Attributes:
        run_dir: the run directory.
        checkpoint: the checkpoint written at the end.
        phase: ``"pretrain"`` or ``"finetune"``.
        start_step: the global step this call started from (0, or a resumed step).
        steps: the global step at the end.
        epoch: the epoch in progress at the end (epochs completed, if it ended on a boundary).
        examples: examples consumed since step 0.
        seconds: wall time of this call.
        total_seconds: wall time since step 0 over every call that trained the run (this
            call's plus, after a resume, the time up to the checkpoint it resumed from).
        losses: the loss of every step this call ran, in order.
        final_terms: every loss term of the last step this call ran, by name (the last step
            is always logged).
        evaluations: the periodic evaluations of this call (``step`` plus metrics).
    """

    run_dir: str
    checkpoint: str
    phase: str
    start_step: int
    steps: int
    epoch: int
    examples: int
    seconds: float
    total_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    final_terms: dict[str, float] = field(default_factory=dict)
    evaluations: list[dict] = field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def to_json(self) -> dict:
        summary = dataclasses.asdict(self)
        summary["final_loss"] = self.final_loss
        return summary


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the training run ``config`` describes; see the module doc.

    A run that fails before its first step removes the run directory if it created it, so
    that a mistake (a wrong preset, unlabelled data) leaves nothing behind.
    """
    run_dir = Path(config.out)
    # the outermost directory this call will create (runs/ of runs/finetune, say)
    created = next((path for path in [*reversed(run_dir.parents), run_dir] if not path.exists()), None)
    trainer = None
    try:
        trainer = Trainer(config)
        return trainer.run()
    except BaseException:
        stepped = trainer is not None and trainer.state.step > trainer.start_step
        if created is not None and not stepped and os.environ.get("RANK", "0") == "0":
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        if trainer is not None and trainer.env is not None:
            dist.destroy_process_group()
            # Free what still refers to the group (the model's tower groups, gathered
            # state) now, while the interpreter is whole: a torchrun rank whose gloo
            # group was left to interpreter finalization once aborted (SIGABRT,
            # "terminate called without an active exception") after finishing its run.
            del trainer
            gc.collect()


def clip_by_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """Rescale each gradient ``g`` to ``g · max_norm / max(‖g‖₂, max_norm)``, in place.

    TF ``clip_by_norm`` applied per variable, as the reference does: each tensor is
    clipped on its own (not by the global norm), and a gradient already within the norm is
    multiplied by exactly 1.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for parameter in parameters:
        if parameter.grad is not None:
            by_device.setdefault(parameter.grad.device, []).append(parameter.grad)
    # the fused kernels torch's own clip_grad_norm_ uses: no host sync, a few launches per
    # device (a tree placed on several devices has gradients on each)
    for grads in by_device.values():
        norms = torch.stack(torch._foreach_norm(grads))
        scales = max_norm / norms.clamp(min=max_norm)
        torch._foreach_mul_(grads, list(scales.unbind()))


def build_run_model_config(name: str, overrides: dict, num_classes: int, dropout: float | None,
                           mode: str) -> ModelConfig:
    """A preset's config with the run's class count, dropout and mask mode."""
    config = model_config(name, num_classes, **overrides)
    return _with_run_settings(config, dropout, mode)


def _with_run_settings(config: ModelConfig, dropout: float | None, mode: str) -> ModelConfig:
    """Dropout and mode go to every NeXtVLAD (a tree's leaf); DBoF has neither, so keeps none."""
    target = config.leaf if isinstance(config, MODTreeConfig) else config
    names = {item.name for item in dataclasses.fields(target)}
    changes = {key: value for key, value in (("drop_rate", dropout), ("mode", mode))
               if key in names and value is not None}
    if not changes:
        return config
    if isinstance(config, MODTreeConfig):
        return dataclasses.replace(config, leaf=dataclasses.replace(config.leaf, **changes))
    return dataclasses.replace(config, **changes)


class Trainer:
    """One run: the model, optimizer, data and logs of ``config``; :meth:`run` trains it.

    ``model`` is what trains: the model, a :class:`PlacedTree` or this rank's
    :class:`DistributedMOD`; checkpoints hold :meth:`_full_model`'s state.
    """

    def __init__(self, config: TrainConfig):
        if not config.data.train:
            raise ValueError("no training data: set data.train (--data)")
        self.env = init_from_env(config.device) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        if self.env is not None and config.devices:
            raise ValueError("devices places a tree's towers in one process; under torchrun "
                             "each rank owns a block of towers on its own device: leave it empty")
        # a distributed run builds the whole tree on the CPU, then keeps its part
        self.device = (torch.device("cpu") if self.env is not None
                       else resolve_device(config.devices[0] if config.devices else config.device))
        run_device = self.env.device if self.env is not None else self.device
        if config.bf16 and run_device.type != "cuda":
            raise ValueError(f"bf16 autocast is for CUDA devices; this run is on {run_device}")
        self.writes = self.env is None or self.env.rank == 0
        self.run_dir = Path(config.out)
        if self.writes:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        resume_from = latest_checkpoint(self.run_dir) if config.resume else None
        if resume_from is None and list_checkpoints(self.run_dir):
            raise ValueError(f"{self.run_dir} already holds checkpoints: resume it (--resume) "
                             "or choose another run directory")
        if resume_from is not None:
            self._resume(config, resume_from)
        elif config.phase == "finetune":
            if config.init_from is None:
                raise ValueError(f"nothing to resume in {self.run_dir} and no checkpoint to fine-tune from "
                                 "(init_from, --from)")
            self._start_finetuning(config)
        else:
            self._start_pretraining(config)
        self.resumed_from = resume_from
        self._parallelize(config)
        if config.bn_momentum is not None:
            for module in self.model.modules():
                if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                    module.momentum = config.bn_momentum
        if config.freeze_root_gate_statistics and isinstance(self.model, MODTree | PlacedTree | DistributedMOD) \
                and len(self.model.config.branching) > 1:
            # momentum 0: the moving statistics stay at their initial 0 and 1 (config doc);
            # every rank's replica of the root gate alike
            self.model.root.gate.bn.momentum = 0.0
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.forward_model = torch.compile(self.model) if config.compile else self.model
        self.dataset = self._dataset(config.data.train, shuffle=True)
        self._check_targets(config)
        self.eval_dataset = self._dataset(config.data.eval, shuffle=False) if config.data.eval else None
        self.start_step = self.state.step
        # video mode: an example per record, so the framing alone gives the epoch's steps
        # (ranks and loader workers all read the same batches); segment mode learns it
        # from its first epoch
        self.records = count_records(self.dataset.paths) if config.data.mode == "video" else None
        self.steps_per_epoch = None if self.records is None else self.records // config.batch_size
        self.last_checkpoint = resume_from
        self.curves = (_Curves(self.run_dir / HISTORY_FILE, self.state.step if resume_from else 0)
                       if self.writes else None)

    # --- set-up -----------------------------------------------------------------------

    def _check_targets(self, config: TrainConfig, videos: int = 64) -> None:
        """Refuse training data whose first ``videos`` videos carry nothing to learn from:
        no video label (video mode; a test split) or no segment rating (segment mode; a
        train split given to fine-tuning). Without this the run would fit all-zero targets,
        or stop later with a less telling message."""
        rated = config.data.mode == "segment"
        for index, video in enumerate(read_videos(self.dataset.paths, require_frames=True)):
            if len(video.segment_labels if rated else video.labels):
                return
            if index + 1 == videos:
                break
        data = ", ".join(config.data.train)
        if rated:
            raise ValueError(f"the training data {data} (--data) holds no rated segment in its first "
                             f"{videos} videos: fine-tuning learns from segment ratings (a validate "
                             "split), not from video labels")
        raise ValueError(f"the training data {data} (--data) holds no video label in its first "
                         f"{videos} videos: an unlabelled split (test) cannot train a model; give "
                         "labelled videos (train or validate)")

    def _announce_plan(self) -> None:
        """What the run is about to do, before its first step: model, data, schedule, device."""
        config = self.config
        parameters = count_parameters(self._whole_model())
        paths = self.dataset.paths
        size = sum(os.path.getsize(path) for path in paths) / 1e6
        epoch = (f" ({self.steps_per_epoch} steps per epoch)" if self.steps_per_epoch is not None
                 else "")
        resumed = f", resuming at step {self.state.step}" if self.resumed_from else ""
        steps = "none" if config.max_steps is None else f"{config.max_steps:,}"
        device = (f"{self.env.world_size} torchrun ranks ({self.env.device.type})" if self.env
                  else ", ".join(config.devices) or str(self.device))
        for line in (
            f"{config.phase}: model {self._model_title()} ({parameters:,} parameters, "
            f"{len(self.class_ids)} classes) -> {self.run_dir}",
            f"{config.phase}: data {len(paths)} file(s), {size:,.1f} MB"
            f"{'' if self.records is None else f', {self.records:,} videos'}, {config.data.mode} mode; "
            f"batch {config.batch_size}, epochs {config.epochs}{epoch}, max steps {steps}{resumed}",
            f"{config.phase}: device {device}, {torch.get_num_threads()} torch thread(s), "
            f"{config.data.workers} loader worker(s)",
        ):
            announce(line, config.progress)

    def _whole_model(self) -> nn.Module:
        """The whole model (a parallel run's tree on rank 0, which alone calls this)."""
        tree = getattr(self, "tree", None)
        return self.model if tree is None else tree

    def _model_title(self) -> str:
        """The model as it trains: a tree's own shape, which overrides may change from its
        preset's (a 2x2 tree built from ``mod_4x3``)."""
        model = self._whole_model()
        if isinstance(model, MODTree):
            return f"{'x'.join(map(str, model.config.branching))} MOD tree (preset {self.preset})"
        return self.preset

    def _planned_steps(self) -> int | None:
        """The step the run will stop at, when the data's size is known."""
        config = self.config
        if config.epochs is None or self.steps_per_epoch is None:
            return config.max_steps
        by_epochs = config.epochs * self.steps_per_epoch
        return by_epochs if config.max_steps is None else min(config.max_steps, by_epochs)

    def _start_pretraining(self, config: TrainConfig) -> None:
        self.class_ids = resolve_classes(config.data.classes)
        self.preset = config.model.name
        self.model = build_model(build_run_model_config(
            config.model.name, dict(config.model.overrides), len(self.class_ids), config.dropout,
            config.data.mode)).to(self.device)
        self.optimizer = self._make_optimizer(config)
        self.config = self._resolved(config)
        self.state = TrainingState(phase=config.phase)

    def _start_finetuning(self, config: TrainConfig) -> None:
        source = read_checkpoint_config(config.init_from)
        saved_config = model_config_from_dict(source["model"]["config"])
        self.class_ids = (tuple(source["classes"]) if config.data.classes is None
                          else resolve_classes(config.data.classes))
        wanted = _with_run_settings(saved_config, config.dropout, config.data.mode)
        checkpoint = load_checkpoint(config.init_from, self.device, class_ids=self.class_ids,
                                     model_changes=_setting_changes(saved_config, wanted))
        if config.model is not None:
            named = build_run_model_config(config.model.name, dict(config.model.overrides),
                                           len(self.class_ids), config.dropout, config.data.mode)
            if named != checkpoint.model_config:
                raise ValueError(f"model {config.model.name} {config.model.overrides} differs from "
                                 f"the checkpoint's {checkpoint.model_config}; fine-tuning restores "
                                 "every variable, so leave the model unset to use the checkpoint's")
        self.model = checkpoint.model
        self.preset = checkpoint.preset
        self.optimizer = self._make_optimizer(config)
        if config.restore_optimizer:
            restore_resume_state(config.init_from, self.model, self.optimizer, rng=False,
                                 class_ids=self.class_ids)
        self.config = self._resolved(config)
        self.state = TrainingState(phase=config.phase)

    def _resume(self, config: TrainConfig, directory: Path) -> None:
        saved = read_checkpoint_config(directory)["training"]
        if not saved or not saved.get("config") or not saved.get("state"):
            raise ValueError(f"{directory}: not a training checkpoint (no training state)")
        saved_config = config_from_dict(saved["config"])
        if config.data.classes is None:
            config = dataclasses.replace(
                config, data=dataclasses.replace(config.data, classes=saved_config.data.classes))
        self.class_ids = resolve_classes(config.data.classes)
        changed = _differences(saved_config.to_dict(), self._resolved(config).to_dict())
        changed = [key for key in changed if key not in RESUMABLE_CHANGES]
        if changed:
            raise ValueError(f"cannot resume {directory} exactly: the config differs in "
                             f"{', '.join(changed)}")
        checkpoint = load_checkpoint(directory, self.device)
        self.model = checkpoint.model
        self.preset = checkpoint.preset
        self.optimizer = self._make_optimizer(config)
        restore_resume_state(directory, self.model, self.optimizer, rng=True)
        self.config = self._resolved(config)
        self.state = checkpoint.state
        log.info("resuming %s at step %d (epoch %d, batch %d)", directory, self.state.step,
                 self.state.epoch, self.state.batch_in_epoch)

    def _resolved(self, config: TrainConfig) -> TrainConfig:
        """``config`` with its class space written out, as the checkpoints record it."""
        return dataclasses.replace(config, data=dataclasses.replace(config.data, classes=tuple(self.class_ids)))

    def _make_optimizer(self, config: TrainConfig, model: nn.Module | None = None) -> torch.optim.Adam:
        """Adam over ``model`` (default: the one that trains)."""
        o, model = config.optimizer, self.model if model is None else model
        # torch's Adam adds ε to sqrt(v̂), TF1's to sqrt(v) (an ε·sqrt(1-β2^t) difference)
        return torch.optim.Adam(model.parameters(), lr=o.learning_rate,
                                betas=(o.beta1, o.beta2), eps=o.epsilon)

    def _parallelize(self, config: TrainConfig) -> None:
        """Spread the tree over ``devices`` or the torchrun ranks, keeping the Adam slots.

        The set-up above built (or loaded) the whole model and its optimizer as a
        single-process run does; this moves them into their parallel form.
        """
        if self.env is None and len(config.devices) < 2:
            return
        if not isinstance(self.model, MODTree):
            raise ValueError(f"model parallelism spreads the towers of a MOD tree; {self.preset} "
                             "is not a tree: train it on one device in one process")
        slots = _optimizer_slots(self.model, self.optimizer)
        tree = self.model
        if self.env is None:
            # every device checked as the first was (resolve_device names one this torch lacks)
            self.model = PlacedTree(tree, [resolve_device(device) for device in config.devices])
        else:
            self.model = DistributedMOD(tree.config, config.seed)
            self.model.load_full_state_dict(tree.state_dict())
            self.model.to(self.env.device)
            self.device = self.env.device
            self._seed_rank(config)
        # rank 0 keeps a whole tree to assemble checkpoints in; a PlacedTree shares its modules
        self.tree = tree if self.writes else None
        self.optimizer = self._make_optimizer(config)
        _load_optimizer_slots(self.model, self.optimizer, slots)

    def _seed_rank(self, config: TrainConfig) -> None:
        """Under torchrun, every rank its own dropout stream: towers on different ranks must
        not share masks (in one process they draw one after another from one stream).

        Rank 0 keeps the run's stream; rank r > 0 starts from a seed of (seed, r). A resume
        with the world size of the checkpoint restores every rank's saved stream (exact); with
        another, ranks r > 0 start afresh from (seed, r, step).
        """
        rank = self.env.rank
        saved = (load_rank_rng_state(self.resumed_from, rank, self.env.world_size)
                 if self.resumed_from is not None else None)
        if saved is not None:
            torch.set_rng_state(saved["cpu"])
            if "cuda" in saved and self.device.type == "cuda":
                torch.cuda.set_rng_state(saved["cuda"], self.device)
            return
        if self.resumed_from is not None:
            log.warning("%s holds no RNG state for %d ranks: dropout of ranks > 0 starts afresh, "
                        "so the resumed run is not the uninterrupted one", self.resumed_from,
                        self.env.world_size)
        if rank > 0:
            key = (config.seed, rank) if self.resumed_from is None else (config.seed, rank, self.state.step)
            torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))

    def _dataset(self, patterns: tuple[str, ...], shuffle: bool) -> FrameDataset:
        data = self.config.data
        common = {"class_ids": self.class_ids, "max_frames": data.max_frames, "shuffle": shuffle,
                  "shuffle_buffer": data.shuffle_buffer, "seed": self.config.seed,
                  "decoder": data.decoder}
        if data.mode == "segment":
            return SegmentDataset(patterns, **common)
        return VideoLevelDataset(patterns, pad_to=data.pad_to, **common)

    def loss(self, output, batch: TorchBatch) -> LossTerms:
        """The whole model's loss terms (under torchrun: gathered, a collective)."""
        return self._losses(output, batch)[1]

    def _losses(self, output, batch: TorchBatch) -> tuple[torch.Tensor, LossTerms]:
        """What this process back-propagates, and the whole model's loss terms."""
        args = (output, batch.labels, batch.label_weights, self.config.loss)
        if isinstance(self.model, DistributedMOD):
            shard = self.model.loss(*args)
            return shard.objective, shard.gather()
        if isinstance(self.model, PlacedTree):
            terms = self.model.loss(*args)
        elif isinstance(self.model, MODTree):
            terms = mod_loss(*args, tree=self.model)
        else:
            terms = model_loss(*args, model=self.model)
        return terms.total, terms

    # --- the loop ---------------------------------------------------------------------

    def run(self) -> TrainResult:
        from torch.utils.tensorboard import SummaryWriter

        config, state = self.config, self.state
        started = time.perf_counter()
        self._seconds_at = (started, state.seconds)
        result = TrainResult(run_dir=str(self.run_dir), checkpoint="", phase=config.phase,
                             start_step=state.step, steps=state.step, epoch=state.epoch,
                             examples=state.examples, seconds=0.0)
        # on resume, TensorBoard drops the events an interrupted run logged past the checkpoint
        writer = (SummaryWriter(str(self.run_dir / TENSORBOARD_DIR),
                                purge_step=state.step + 1 if self.resumed_from else None)
                  if self.writes else _NoWriter())
        try:
            if self.writes:
                self._announce_plan()
            with Progress(config.phase, self._planned_steps(), "step", initial=state.step,
                          enabled=self.writes and config.progress is not False) as bar:
                rate = _Rate(state.examples)
                while not self._finished():
                    self._run_epoch(writer, bar, rate, result)
            if self.eval_dataset is not None and (not result.evaluations
                                                  or result.evaluations[-1]["step"] != state.step):
                result.evaluations.append(self._evaluate(writer))
            if self.last_checkpoint != step_directory(self.run_dir, state.step):
                self._checkpoint(writer)
        finally:
            writer.close()
        result.checkpoint = str(self.last_checkpoint)
        result.steps, result.epoch, result.examples = state.step, state.epoch, state.examples
        result.seconds = round(time.perf_counter() - started, 3)
        result.total_seconds = self._total_seconds()
        return result

    def _total_seconds(self) -> float:
        """Training wall time since step 0, resumes included (see TrainingState.seconds)."""
        call_started, before = self._seconds_at
        return round(before + time.perf_counter() - call_started, 3)

    def _run_epoch(self, writer, bar: Progress, rate: _Rate, result: TrainResult) -> None:
        """Train on the rest of the current epoch, or until the run is finished."""
        config, state = self.config, self.state
        consumed = 0
        whole_epoch = state.batch_in_epoch == 0
        for batch in self._epoch_batches(state.epoch, state.batch_in_epoch):
            terms, value, lr = self._step(batch)
            consumed += 1
            result.losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}", epoch=state.epoch,
                            examples_per_s=f"{bar.rate * config.batch_size:.0f}")
            if state.step % config.log_every == 0 or self._finished():
                result.final_terms = self._log(writer, terms, value, lr, rate.update(state.examples))
            if config.eval_every and state.step % config.eval_every == 0:
                result.evaluations.append(self._evaluate(writer))
            if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                self._checkpoint(writer)
            if self._finished():
                return
        if not consumed and not state.batch_in_epoch:
            examples = (f" (it gave {self.dataset.stats.examples})" if not config.data.workers
                        else "")
            raise ValueError(f"epoch {state.epoch} of {', '.join(config.data.train)} holds no full "
                             f"batch of {config.batch_size} examples{examples}: give a smaller "
                             "--batch-size (batch_size)")
        if whole_epoch and self.steps_per_epoch is None:  # now the run's length is known
            self.steps_per_epoch = consumed
            bar.set_total(self._planned_steps())
        state.epoch += 1
        state.batch_in_epoch = 0

    def _finished(self) -> bool:
        config, state = self.config, self.state
        return ((config.max_steps is not None and state.step >= config.max_steps)
                or (config.epochs is not None and state.epoch >= config.epochs))

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[TorchBatch]:
        """The batches of ``epoch`` after the first ``skip`` (already consumed before a resume)."""
        loader = make_loader(self.dataset, self.config.batch_size, self.config.data.workers,
                             drop_last=True)
        loader.dataset.set_epoch(epoch)
        # Starting a DataLoader draws a seed from the global RNG; dropout must not see that
        # draw, or a resumed run (which starts its loader at another point) would diverge.
        with torch.random.fork_rng(devices=[]):
            batches = iter(loader)
        return itertools.islice(batches, skip, None)

    def _step(self, batch: TorchBatch) -> tuple[LossTerms, float, float]:
        config, state = self.config, self.state
        lr = config.optimizer.learning_rate_at(state.step, config.batch_size)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = batch.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            output = self.forward_model(batch.features, batch.num_frames)
            objective, terms = self._losses(output, batch)
        # one host sync per step: the loss sequence and the finiteness check both need it
        value = terms.total.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(state.step + 1, value, _term_values(terms), self.last_checkpoint)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if isinstance(self.model, DistributedMOD):
            self.model.sync_gradients()  # before clipping: the gate's gradient is the sum
        if config.optimizer.clip_norm:
            clip_by_norm_(self.trainable, config.optimizer.clip_norm)
        self.optimizer.step()
        state.step += 1
        state.batch_in_epoch += 1
        state.examples += len(batch)
        state.loss = value
        return terms, value, lr

    def _log(self, writer, terms: LossTerms, value: float, lr: float, rate: float) -> dict[str, float]:
        """Write the step's loss terms to TensorBoard and the history; returns the terms."""
        step = self.state.step
        values = _term_values(terms)
        writer.add_scalar("loss/total", value, step)
        for name, term in values.items():
            writer.add_scalar(f"loss/{name}", term, step)
        writer.add_scalar("train/lr", lr, step)
        writer.add_scalar("train/examples_per_second", rate, step)
        if self.curves is not None:
            self.curves.append({"step": step, "epoch": self.state.epoch, "examples": self.state.examples,
                                "lr": lr, "loss": value, "examples_per_second": rate,
                                "terms": values})
        return values

    def _evaluate(self, writer) -> dict:
        assert self.eval_dataset is not None
        loader = make_loader(self.eval_dataset, self.config.batch_size, self.config.data.workers)
        with torch.random.fork_rng(devices=[]):  # as in _epoch_batches
            batches = itertools.islice(iter(loader), self.config.data.eval_batches)
        metrics = evaluate_batches(self.model, batches, len(self.class_ids),
                                   lambda output, batch: self.loss(output, batch).total)
        if not metrics["labelled"] and self.writes:
            # e.g. a test split, whose ratings live apart in test_truth/: a loss against
            # all-zero targets is all there is to report
            log.warning("step %d: the evaluation data %s holds no example labelled in the run's "
                        "classes: only the loss is reported", self.state.step,
                        ", ".join(self.config.data.eval))
        for name, value in metrics.items():
            writer.add_scalar(f"eval/{name}", value, self.state.step)
        entry = {"step": self.state.step, **metrics}
        if self.curves is not None:
            self.curves.append({"step": self.state.step, "eval": metrics})
        return entry

    def _checkpoint(self, writer) -> None:
        """Write a checkpoint (under torchrun: a collective; rank 0 writes)."""
        directory = step_directory(self.run_dir, self.state.step)
        self.last_checkpoint = directory
        self.state.seconds = self._total_seconds()
        model, optimizer = self._full_model()
        rank_rng_states = None
        if isinstance(self.model, DistributedMOD):
            rank_rng_states = [None] * self.env.world_size if self.writes else None
            dist.gather_object(rng_state(self.device), rank_rng_states, dst=0)
        if not self.writes:
            return
        save_checkpoint(directory, model, class_ids=self.class_ids,
                        max_frames=self.config.data.max_frames, preset=self.preset,
                        training=self.config.to_dict(), state=self.state, optimizer=optimizer,
                        rank_rng_states=rank_rng_states)
        for old in list_checkpoints(self.run_dir)[: -self.config.keep_checkpoints]:
            shutil.rmtree(old)
        self.curves.plot(self.run_dir / CURVES_FILE, f"{self.config.phase} ({self._model_title()})")
        writer.flush()

    def _full_model(self) -> tuple[nn.Module | None, torch.optim.Optimizer | None]:
        """The whole model and an optimizer holding all its Adam slots, as checkpoints hold them.

        Under torchrun a collective that assembles them on rank 0 (None, None elsewhere).
        """
        if isinstance(self.model, PlacedTree):
            return self.tree, self.optimizer
        if not isinstance(self.model, DistributedMOD):
            return self.model, self.optimizer
        weights = self.model.full_state_dict()
        own = {name: {slot: value.detach().cpu() for slot, value in slots.items()}
               for name, slots in _optimizer_slots(self.model, self.optimizer).items()}
        shards = [None] * self.env.world_size if self.writes else None
        dist.gather_object(own, shards, dst=0)
        if not self.writes:
            return None, None
        self.tree.load_state_dict(weights)
        optimizer = self._make_optimizer(self.config, self.tree)
        optimizer.param_groups[0]["lr"] = self.optimizer.param_groups[0]["lr"]
        slots = {}
        for shard in shards:  # the gate's slots are equal on every rank: rank 0's are kept
            slots.update({name: values for name, values in shard.items() if name not in slots})
        _load_optimizer_slots(self.tree, optimizer, slots)
        return self.tree, optimizer


def _optimizer_slots(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """The optimizer's state of each parameter of ``model`` that has some, by parameter name."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return {names[id(parameter)]: dict(slots) for parameter, slots in optimizer.state.items()}


def _load_optimizer_slots(model: nn.Module, optimizer: torch.optim.Optimizer,
                          slots: dict[str, dict]) -> None:
    """Load :func:`_optimizer_slots`' output for the parameters of ``model`` it names (cast to
    their devices); the slots of parameters ``model`` lacks (other ranks') are skipped."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state = {index: slots[names[id(p)]] for index, p in enumerate(parameters)
             if names[id(p)] in slots}
    optimizer.load_state_dict({"state": state,
                               "param_groups": optimizer.state_dict()["param_groups"]})


def _term_values(terms: LossTerms) -> dict[str, float]:
    """Every loss term as a float, with a single device-to-host copy."""
    values = torch.stack([term.detach().float() for term in terms.terms.values()]).tolist()
    return dict(zip(terms.terms, values, strict=True))


def _setting_changes(saved: ModelConfig, wanted: ModelConfig) -> dict:
    """The leaf (or model) fields that differ between two configs of the same structure."""
    old = saved.leaf if isinstance(saved, MODTreeConfig) else saved
    new = wanted.leaf if isinstance(wanted, MODTreeConfig) else wanted
    return {item.name: getattr(new, item.name) for item in dataclasses.fields(new)
            if getattr(new, item.name) != getattr(old, item.name)}


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "overrides":
            keys.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


class _NoWriter:
    """The TensorBoard writer of torchrun ranks other than 0: they log nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    flush = close = add_scalar


class _Rate:
    """Examples per second since the previous :meth:`update`."""

    def __init__(self, examples: int):
        self.examples, self.time = examples, time.perf_counter()

    def update(self, examples: int) -> float:
        now = time.perf_counter()
        rate = (examples - self.examples) / max(now - self.time, 1e-9)
        self.examples, self.time = examples, now
        return rate


class _Curves:
    """The run's history: appended to ``history.jsonl``; summed per kind for the PNG.

    Only what the plot needs stays in memory (total, BCE, KL and L2 per logged step, and
    the evaluation losses), not every term of every step.
    """

    def __init__(self, path: Path, up_to_step: int):
        """Keep the file's rows up to ``up_to_step`` (a resumed run's checkpoint), drop the rest.

        A fresh run (``up_to_step=0``) starts an empty history; a resumed one drops what
        an interrupted run logged after its newest checkpoint.
        """
        self.path = path
        self.train: list[tuple[int, float, float, float, float]] = []
        self.eval: list[tuple[int, float]] = []
        rows = []
        if up_to_step and path.is_file():
            rows = [row for row in map(json.loads, path.read_text().splitlines())
                    if row["step"] <= up_to_step]
        write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
        for row in rows:
            self._keep(row)

    def append(self, row: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        self._keep(row)

    def _keep(self, row: dict) -> None:
        if "eval" in row:
            if "loss" in row["eval"]:
                self.eval.append((row["step"], row["eval"]["loss"]))
            return
        sums = {kind: sum(v for name, v in row["terms"].items() if name.split("/")[0] == kind)
                for kind in ("bce", "kl", "l2")}
        self.train.append((row["step"], row["loss"], sums["bce"], sums["kl"], sums["l2"]))

    def plot(self, path: Path, title: str) -> None:
        """Total loss (and evaluation loss) on top, BCE/KL/L2 sums below; written atomically."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(8, 6), tight_layout=True)
        top, bottom = figure.subplots(2, 1, sharex=True)
        if self.train:
            steps, total, bce, kl, l2 = zip(*self.train, strict=True)
            top.plot(steps, total, label="train loss")
            # the terms differ by orders of magnitude (λ = 400 KL vs 1e-4 L2): log scale,
            # so a term that is off (all zeros) is left out
            for label, series in (("BCE (all nodes)", bce), ("KL (all edges)", kl), ("L2", l2)):
                if min(series) > 0:
                    bottom.plot(steps, series, label=label)
            bottom.set_yscale("log")
        if self.eval:
            top.plot(*zip(*self.eval, strict=True), "o-", label="eval loss")
        top.set_title(title)
        top.set_ylabel("loss")
        bottom.set_ylabel("term sums")
        bottom.set_xlabel("step")
        for axes in (top, bottom):
            if axes.lines:
                axes.legend()
            axes.grid(alpha=0.3)
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=100)
        write_atomically(path, png.getvalue())


__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "build_run_model_config", "clip_by_norm_",
           "train"]
