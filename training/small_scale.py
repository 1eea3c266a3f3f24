"""The small-scale schedules that ``modloc demo`` and the synthetic benchmark train with.

The paper's recipes (:mod:`modloc.training.config`: ``pretrain`` and ``finetune``) run for
a million steps on the whole YouTube-8M; these overrides train the same system in minutes
on 2 CPU cores (:data:`SMALL_PRETRAIN`, :data:`SMALL_FINETUNE`, the tree
:data:`SMALL_MODEL`), and :func:`train_run` runs one and summarizes it as a report entry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

# The small MOD tree: the final system's layout (a 2-layer tree of NeXtVLADs) at a size
# that trains in about a minute on 2 CPU cores: 2 towers × 2 leaves, 8 clusters, 2 groups,
# no expansion, hidden 64 (the paper's: 4 × 3, 128, 8, ×2, 2048).
SMALL_MODEL = {"branching": [2, 2], "cluster_size": 8, "groups": 2, "expansion": 1,
              "hidden_size": 64, "gating_reduction": 4}
# Where the small scale departs from the recipes, and why:
# - a few hundred steps instead of a million: a larger learning rate and BatchNorm momentum
#   (slim's 0.001 momentum leaves eval-mode statistics at their initial values for
#   thousands of steps);
# - videos cut to their first 60 frames when pre-training (a fifth of the compute; the
#   evaluation reads whole videos);
# - fine-tuning batches of 64, not 512: the validate split holds about 1200 rated segments.
SMALL_PRETRAIN = {"model.overrides": SMALL_MODEL, "batch_size": 16, "epochs": 3, "max_steps": None,
                 "optimizer.learning_rate": 4e-3, "bn_momentum": 0.1, "data.max_frames": 60,
                 "data.pad_to": "longest", "data.workers": 1}
SMALL_FINETUNE = {"batch_size": 64, "epochs": 10, "optimizer.learning_rate": 1e-3,
                 "bn_momentum": 0.1}


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One torch thread for training at this scale (data loading takes the other core).

    The models are small: on a 2-core machine that is also busy, two intra-op
    threads spend more time synchronizing than computing (tenfold slower steps, measured).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_run(run_dir: Path, recipe: str, settings: dict, *, checkpoint_every: int | None = None,
              resume: bool = False, progress: bool = True) -> dict:
    """Train with ``recipe`` and ``settings``; the report's summary of the run.

    ``checkpoint_every`` steps a checkpoint is written (besides the final one); ``resume``
    continues the run from the newest checkpoint in ``run_dir``; ``progress`` reports the
    plan and the steps on stderr (:mod:`modloc.engine.base.progress`). ``seconds`` in the summary
    is the run's training time since step 0, resumes included.
    """
    from modloc.training.checkpoint import read_checkpoint_config
    from modloc.training.config import load_config
    from modloc.training.trainer import CURVES_FILE, train

    config = load_config(recipe, None, {**settings, "out": str(run_dir), "eval_every": None,
                                        "checkpoint_every": checkpoint_every, "keep_checkpoints": 1,
                                        "resume": resume, "log_every": 10, "progress": progress})
    result = train(config)
    saved = read_checkpoint_config(result.checkpoint)
    sums = {kind: sum(value for name, value in result.final_terms.items()
                      if name.split("/")[0] == kind) for kind in ("bce", "kl", "l2")}
    return {
        "model": saved["model"]["preset"],
        "steps": result.steps,
        "epochs": result.epoch,
        "examples": result.examples,
        "seconds": result.total_seconds,
        "resumed_at_step": result.start_step,
        "examples_per_second": round(result.examples / result.total_seconds, 1),
        # step 1's loss is known to a call that began there; a resume that found the run
        # already at its end ran no step, and its final loss is the checkpoint's
        "first_loss": result.losses[0] if result.start_step == 0 else None,
        "final_loss": result.final_loss if result.losses else saved["training"]["state"]["loss"],
        "final_terms": sums,
        "loss_terms": len(result.final_terms),
        "temperatures": list(config.loss.temperatures),
        "lambdas": list(config.loss.lambdas),
        "checkpoint": result.checkpoint,
        "loss_curves": str(run_dir / CURVES_FILE),
    }


__all__ = ["SMALL_FINETUNE", "SMALL_MODEL", "SMALL_PRETRAIN", "single_threaded", "train_run"]
