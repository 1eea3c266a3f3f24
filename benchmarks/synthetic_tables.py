"""The paper's Tables 1–2 (REFERENCE §9) reproduced on a synthetic benchmark, resumably.

    python benchmarks/synthetic_tables.py                         # the full run (hours on 2 cores)
    python benchmarks/synthetic_tables.py --jobs 2                # the same, two seeds at a time
    python benchmarks/synthetic_tables.py --scale smoke --rows dummy,mix_t20 --out /tmp/t.md
    python benchmarks/synthetic_tables.py --time-steps 20          # measure s/step, estimate the run
    python benchmarks/synthetic_tables.py --synth signal=0.55 --rows dummy,nextvlad --seeds 1
                                                  # a variant dataset, in its own work directory

What one run does
-----------------
1. **Data.** Generates one fixed dataset with :mod:`modloc.engine.base.synth` (seed 0; the scale's
   settings below): a large noisy video-labelled ``train`` split, a small clean
   segment-rated ``validate`` split (the fine-tuning data, as the 2019 ``validate`` was) and
   a rated ``test`` split whose truth is in ``test_truth``. Every seed trains on this same
   dataset: the spread over seeds is the spread of training (initialization, dropout, data
   order), not of the data.
2. **Training.** Every row of the paper's tables, at a size scaled down from the paper's
   that keeps the rows' *relative* sizes (cluster size, hidden size and expansion, number of
   leaves; :data:`SCALES`), with the recipes' semantics (REFERENCE §6): pre-training on the
   video labels of ``train`` (the ``pretrain`` recipe, T = λ = 1), then fine-tuning on the
   rated segments of ``validate`` (the ``finetune`` recipe: dropout 0.75, L2 1e-4, Adam
   state restored, the row's T and λ = T²), with the demo's shortened schedules
   (:data:`modloc.training.small_scale.SMALL_PRETRAIN`, :data:`~modloc.training.small_scale.SMALL_FINETUNE`: a few epochs, a
   larger learning rate and BatchNorm momentum) and the demo's trainer entry point.
3. **Scoring.** Segment MAP@K on ``test`` through the engine's pipeline
   (:func:`modloc.training.evaluate.evaluate_segments`: top-20 candidates from the video model,
   every 5-frame window scored by the row's model, ``P_vid^0.05 · P_seg^0.95``), with its
   ceiling (the same segments in the best order: what the video model's candidates allow);
   then again with every class of the video model a candidate, which scores the row's
   segment model alone.
4. **Report.** ``--out`` (``tables.md``): per row the mean ± std over seeds and a 95%
   Student-t interval, parameters of the paper-scale preset and of the scaled model, training
   seconds, the device it ran on, the paper's numbers beside them, and the paired comparisons
   behind the paper's claims (``docs/CLAIMS.md``) with the seeds each would need to resolve
   at its measured mean and std; ``tables.png`` (bar charts with std error bars: the
   pipeline, and every class a candidate) and ``tables.json`` (every number,
   machine-readable) next to it.

Decisions
---------
- **One video model per seed.** The paper's pipeline takes its candidates from one
  video-level model; here that is the scaled NeXtVLAD pre-trained on ``train`` (the
  ``video`` run), trained once per seed and shared by every row of that seed. It is also
  the Dummy prediction's model (every segment gets its video's score) and the starting point
  of the "NeXtVLAD pre-trained + fine-tuned" row.
- **Temperature rows share their pre-training.** MixNeXtVLAD T = 0/1/10/20 fine-tune one
  pre-trained mixture (the recipe's T = λ = 1) with their own T (λ = T²; T = 0: no
  distillation), so the rows differ in the fine-tuning temperature only.
- **NeXtVLAD_distill** is leaf 0 of the fine-tuned MOD 4×3 tree of the same seed
  (:meth:`modloc.training.models.MODTree.leaf`, what ``modloc export`` exports as the distill
  graph), scored on its own: no extra training, and leaf 0 is fixed beforehand rather than
  picked as the best leaf on data the tree was fine-tuned on.
- **"Without pre-training"** rows (DBoF + MoE, NeXtVLAD) train from a random
  initialization with the fine-tuning recipe on the rated segments only.
- **3-layer tree** [2, 2, 3] (12 leaves, as MOD 4×3) answers the paper's open question.
- Parameter counts: the paper-scale presets at 1000 classes (the paper's column, REFERENCE
  §3 [inferred]) and the scaled models at the dataset's class count.

Resuming
--------
Under ``--work``: ``data-<hash>/`` (the dataset), ``runs/seed-<s>/<run>-<hash>/`` (each
training run; ``run.json`` marks it finished) and ``results/<row>/seed-<s>.json`` (each
(row, seed) result, written as soon as it is scored). A rerun skips every finished result
and training run whose configuration hash still matches, and retrains what a change of
settings touches; a training run killed midway resumes from its newest checkpoint (one
every :data:`CHECKPOINT_EVERY` steps; the trainer's resume is exact, and the run's training
time counts both parts), so the full run may be stopped and continued at any time.
The hashes cover the settings, not the code: after changing a model or the trainer, give a
fresh ``--work``.

Parallel: ``--jobs N`` runs N processes (one torch thread each), one per seed, and gives
the last seeds a second process that works through their rows from the end, so that the
cores stay busy to the last seed. A ``<path>.lock`` beside each run and result (``flock``)
keeps two processes from training one run or scoring one result at once.

Progress: a line when each (row, seed) starts and finishes and for each training run, and
after every result an estimate of the time left (the pending runs' steps × batch × frames ×
per-frame parameters at this invocation's measured rate, plus its mean scoring time).
``--time-steps N`` measures instead: it trains every needed run of seed 0 for N steps in a
scratch directory and prints each run's seconds per step and the extrapolated total.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _common import RESULTS, cpu_model, provenance

from modloc.engine.base.atomic import write_atomically
from modloc.engine.base.metrics.segment import MAX_SEGMENTS_PER_CLASS
from modloc.engine.base.synth import SynthConfig, config_from, generate
from modloc.training.small_scale import SMALL_FINETUNE, SMALL_PRETRAIN, single_threaded, train_run

RESULTS_FILE = RESULTS / "tables.md"
# Steps between a training run's checkpoints, from which a killed run resumes: about five
# minutes of the longest runs (the 12-leaf trees) on one CPU thread.
CHECKPOINT_EVERY = 100

# --- scales -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """Everything a scale fixes: the dataset, the model sizes, the schedules, the seeds.

    ``synth`` overrides the ``bench`` preset; the model dicts override the registry presets
    (``modloc.training.models.registry``); ``pretrain``/``finetune`` override the demo's schedules.
    """

    name: str
    synth: dict
    nextvlad: dict
    nextvlad_large: dict
    mod_leaf: dict
    dbof: dict
    pretrain: dict
    finetune: dict
    seeds: int
    k: int = MAX_SEGMENTS_PER_CLASS


SCALES: dict[str, Scale] = {
    # The paper's sizes divided by 4 in clusters and hidden size (K 128 → 32, large 256 → 64,
    # H 2048 → 512; DBoF 2048 clusters / 1024 hidden → 512 / 256) and by 2 in expansion
    # (X2 → X1, X4 → X2): NeXtVLAD_large keeps twice the clusters and twice the expansion of
    # NeXtVLAD, the trees keep their leaf counts (3, 4, 4×3, 2×2×3), groups (8) and SE
    # reductions (r=8; r=16 in the MOD leaves) are the paper's. Why ÷4 and not less: the
    # per-frame cost is the expansion FC (λ·1024²), which K and H do not touch, while the
    # parameters sit in the hidden FC (∝ λ·K·H); at ÷4 the hidden FC still dominates, so the
    # parameter ratios stay near the paper's (large/base 3.3 vs 3.8; MOD 4×3 46M < 4×large
    # 52M, as 990M < 1274M), which a smaller K·H would invert. The dataset is the `bench`
    # preset's class world (100 rated + 100 video-only classes, 12 verticals) with a fifth of
    # its training videos, half its validate/test videos and videos of 60–150 s, so the whole
    # table (~40 leaf-trainings per seed) stays within CPU reach; docs/CLAIMS.md gives the
    # measured estimate. The class signal is 0.1, not the preset's 0.55: at 0.55 every
    # fine-tuned row reached 99% of the MAP its candidates allow (0.98 with every class a
    # candidate), leaving claims 2-4 nothing to show. 0.1 was chosen on the Dummy and NeXtVLAD
    # rows only (none of the claims' rows was run), as the signal at which fine-tuned
    # NeXtVLAD's share of its ceiling (88%) comes near the real system's (~82%) while the
    # models still learn much (every class a candidate: Dummy 0.51, NeXtVLAD 0.72); the sweep
    # is in docs/CLAIMS.md.
    "default": Scale(
        name="default",
        synth={"train_videos": 4000, "validate_videos": 1000, "test_videos": 1000,
               "videos_per_shard": 250, "max_frames": 150, "signal": 0.1},
        nextvlad={"cluster_size": 32, "groups": 8, "expansion": 1, "hidden_size": 512},
        nextvlad_large={"cluster_size": 64, "groups": 8, "expansion": 2, "hidden_size": 512},
        mod_leaf={"cluster_size": 32, "groups": 8, "expansion": 1, "hidden_size": 512},
        dbof={"cluster_size": 512, "hidden_size": 256},
        pretrain={"epochs": 3},
        finetune={"epochs": 10},
        seeds=3,
    ),
    # End to end in seconds (the test): the `tiny` dataset, tiny models of the same relative
    # sizes, a handful of steps. Its numbers mean nothing.
    "smoke": Scale(
        name="smoke",
        synth={"train_videos": 48, "validate_videos": 24, "test_videos": 24,
               "videos_per_shard": 16, "segment_classes": 12, "extra_classes": 6,
               "verticals": 3, "min_frames": 8, "max_frames": 40},
        nextvlad={"cluster_size": 4, "groups": 2, "expansion": 1, "hidden_size": 16,
                  "gating_reduction": 4},
        nextvlad_large={"cluster_size": 8, "groups": 2, "expansion": 2, "hidden_size": 16,
                        "gating_reduction": 4},
        mod_leaf={"cluster_size": 4, "groups": 2, "expansion": 1, "hidden_size": 16,
                  "gating_reduction": 8},
        dbof={"cluster_size": 16, "hidden_size": 8},
        pretrain={"batch_size": 8, "epochs": None, "max_steps": 6, "data.max_frames": 40,
                  "data.workers": 0},
        finetune={"batch_size": 8, "epochs": None, "max_steps": 3},
        seeds=1,
    ),
}

# --- what trains ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One training run of a seed.

    ``kind``: ``pretrain`` (video labels of ``train``), ``finetune`` (rated segments of
    ``validate``, from ``parent``'s checkpoint, at ``temperature`` with λ = T²) or
    ``scratch`` (the fine-tuning recipe from a random initialization).
    """

    key: str
    kind: str
    preset: str | None = None
    overrides: dict = field(default_factory=dict)
    parent: str | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class Row:
    """A row of the paper's tables: the run whose checkpoint scores the windows, and how.

    ``view``: ``fused`` (the run's whole model), ``leaf`` (leaf ``leaf`` of its tree alone)
    or ``dummy`` (the video model's score for every segment). ``paper_preset`` and
    ``paper_overrides`` give the paper-scale model for the parameter column; ``paper`` is the
    paper's (private, public) MAP@100000, REFERENCE §9.
    """

    key: str
    group: str
    label: str
    run: str
    paper_preset: str
    paper_overrides: dict = field(default_factory=dict)
    view: str = "fused"
    leaf: int | None = None
    paper: tuple[float, float] | None = None


VIDEO_RUN = "video"
TEMPERATURES = (0.0, 1.0, 10.0, 20.0)


def plan_runs(scale: Scale) -> dict[str, RunSpec]:
    """Every training run a seed may need, by key."""
    leaf = scale.mod_leaf
    runs = [
        RunSpec(VIDEO_RUN, "pretrain", "nextvlad", scale.nextvlad),
        RunSpec("pretrain/nextvlad_large", "pretrain", "nextvlad_large", scale.nextvlad_large),
        RunSpec("pretrain/mix", "pretrain", "mix_nextvlad", scale.nextvlad),
        RunSpec("pretrain/mix_large", "pretrain", "mix_nextvlad_large", scale.nextvlad_large),
        RunSpec("pretrain/mod_4x3", "pretrain", "mod_4x3", leaf),
        RunSpec("pretrain/mod_2x2x3", "pretrain", "mod_2x2x3", leaf),
        RunSpec("scratch/dbof", "scratch", "dbof", scale.dbof),
        RunSpec("scratch/nextvlad", "scratch", "nextvlad", scale.nextvlad),
        RunSpec("finetune/nextvlad", "finetune", parent=VIDEO_RUN, temperature=20.0),
        RunSpec("finetune/nextvlad_large", "finetune", parent="pretrain/nextvlad_large",
                temperature=20.0),
        *(RunSpec(f"finetune/mix_t{t:g}", "finetune", parent="pretrain/mix", temperature=t)
          for t in TEMPERATURES),
        RunSpec("finetune/mix_large", "finetune", parent="pretrain/mix_large", temperature=20.0),
        RunSpec("finetune/mod_4x3", "finetune", parent="pretrain/mod_4x3", temperature=20.0),
        RunSpec("finetune/mod_2x2x3", "finetune", parent="pretrain/mod_2x2x3", temperature=20.0),
    ]
    return {run.key: run for run in runs}


_MIX_PAPER = {0.0: (0.80797, 0.81688), 1.0: (0.81125, 0.82023), 10.0: (0.81617, 0.82477),
              20.0: (0.81984, 0.82699)}

ROWS: tuple[Row, ...] = (
    Row("dummy", "no fine-tune", "Dummy prediction", VIDEO_RUN, "nextvlad", view="dummy",
        paper=(0.64809, 0.66188)),
    Row("dbof", "no pretrain", "DBoF + MoE", "scratch/dbof", "dbof", paper=(0.69882, 0.71077)),
    Row("nextvlad_scratch", "no pretrain", "NeXtVLAD", "scratch/nextvlad", "nextvlad",
        paper=(0.77009, 0.77730)),
    Row("nextvlad", "pretrain + fine-tune", "NeXtVLAD", "finetune/nextvlad", "nextvlad",
        paper=(0.79642, 0.80635)),
    Row("nextvlad_large", "pretrain + fine-tune", "NeXtVLAD_large", "finetune/nextvlad_large",
        "nextvlad_large", paper=(0.80586, 0.81611)),
    Row("nextvlad_distill", "pretrain + fine-tune", "NeXtVLAD_distill (leaf 0 of MOD 4×3)",
        "finetune/mod_4x3", "nextvlad", {"gating_reduction": 16}, view="leaf", leaf=0,
        paper=(0.81509, 0.82267)),
    *(Row(f"mix_t{t:g}", "one-layer mixture", f"MixNeXtVLAD (T={t:g})", f"finetune/mix_t{t:g}",
          "mix_nextvlad", paper=_MIX_PAPER[t]) for t in TEMPERATURES),
    Row("mix_large", "one-layer mixture", "MixNeXtVLAD_large (T=20)", "finetune/mix_large",
        "mix_nextvlad_large", paper=(0.82262, 0.83014)),
    Row("mod_4x3", "two-layer mixture", "MODNeXtVLAD 4×3 (T=20)", "finetune/mod_4x3", "mod_4x3",
        paper=(0.82512, 0.83251)),
    Row("mod_2x2x3", "three-layer mixture", "MOD 2×2×3 (T=20), not in the paper",
        "finetune/mod_2x2x3", "mod_2x2x3"),
)
ROW_KEYS = tuple(row.key for row in ROWS)

# The paper's claims as paired (per-seed) differences: (claim, better row, other row).
# Every claim is tested on both metrics; the family Holm's correction covers is all of them.
ALPHA = 0.05
CLAIMS = (
    ("pre-training then fine-tuning beats fine-tuning alone", "nextvlad", "nextvlad_scratch"),
    ("online distillation beats a wider single model", "nextvlad_distill", "nextvlad_large"),
    # not one of the four: what the distilled leaf gained over the same NeXtVLAD trained alone
    # (the paper's +0.0187), which separates "distillation helps" from "beats a 3× wider model"
    ("(beside claim 2) the distilled leaf beats the same NeXtVLAD trained alone",
     "nextvlad_distill", "nextvlad"),
    ("a higher temperature generalizes better (T=20 vs T=0)", "mix_t20", "mix_t0"),
    ("the two-layer tree beats the one-layer mixture with fewer parameters", "mod_4x3",
     "mix_large"),
    ("open question: a three-layer tree beats the two-layer one", "mod_2x2x3", "mod_4x3"),
)

# --- statistics -------------------------------------------------------------------------


def student_t_two_sided(t: float, dof: int) -> float:
    """``P(|T| <= t)`` for Student's t with ``dof`` degrees of freedom (integer, exact).

    The finite series of Abramowitz & Stegun 26.7.3–26.7.4 in ``θ = atan(t / √dof)``; no
    scipy needed for the one quantile the tables use.
    """
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    theta = math.atan(abs(t) / math.sqrt(dof))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if dof % 2:  # odd: (2/π)(θ + sinθ cosθ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + …))
        term, total = 1.0, 1.0 if dof > 1 else 0.0
        for n in range(1, (dof - 3) // 2 + 1):
            term *= cos2 * (2 * n) / (2 * n + 1)
            total += term
        return 2 / math.pi * (theta + sin * math.cos(theta) * total)
    term = total = 1.0  # even: sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + …)
    for n in range(1, (dof - 2) // 2 + 1):
        term *= cos2 * (2 * n - 1) / (2 * n)
        total += term
    return sin * total


def t_quantile(confidence: float, dof: int) -> float:
    """The ``t`` with ``P(|T| <= t) = confidence`` (bisection to 1e-10)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while student_t_two_sided(high, dof) < confidence:
        high *= 2
    while high - low > 1e-10:
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_two_sided(middle, dof) < confidence else (low, middle)
    return (low + high) / 2


def mean_interval(values: list[float], confidence: float = 0.95) -> dict:
    """Mean, sample std and the Student-t interval of the mean (None below 2 values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"n": len(values), "mean": mean, "std": None, "ci": None}
    std = statistics.stdev(values)
    half = t_quantile(confidence, len(values) - 1) * std / math.sqrt(len(values))
    return {"n": len(values), "mean": mean, "std": std, "ci": [mean - half, mean + half]}


def paired_p_value(stats: dict) -> float | None:
    """Two-sided p-value of the paired t-test of a zero mean difference, from
    ``mean_interval``'s stats (None below 2 values)."""
    if stats["std"] is None:
        return None
    if stats["std"] == 0:
        return 0.0 if stats["mean"] != 0 else 1.0
    t = stats["mean"] / (stats["std"] / math.sqrt(stats["n"]))
    return max(0.0, 1.0 - student_t_two_sided(t, stats["n"] - 1))


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment: the family-wise error of every test together stays
    at most α when each adjusted p is compared with α. ``None`` (no test) is kept and not
    counted in the family."""
    tested = sorted((p, index) for index, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[index] = running
    return adjusted


def seeds_to_resolve(stats: dict, confidence: float = 0.95, limit: int = 1000) -> int | None:
    """The fewest seeds whose interval of the mean would exclude 0 if the mean and sample std
    stayed as ``stats`` (``mean_interval``'s) measured them: the benchmark's power at that
    effect, an extrapolation. None without a std, for a zero mean, or above ``limit``."""
    mean, std = abs(stats["mean"]), stats["std"]
    if std is None or mean == 0:
        return None
    if std == 0:
        return 2
    # t(confidence, n - 1) > z(confidence), so no n below (z · std / mean)² can do
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    n = max(2, math.floor((z * std / mean) ** 2))
    while n <= limit:
        if t_quantile(confidence, n - 1) * std / math.sqrt(n) < mean:
            return n
        n += 1
    return None


# --- hashing, files, logging ------------------------------------------------------------


def digest(value) -> str:
    """sha256 of the canonical JSON of ``value``: the identity of a configuration."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(payload, indent=2) + "\n")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # absent, or torn by a kill: redo it
        return None


def device_name(device: str) -> str:
    """Where runs execute; on the CPU training and scoring run with one torch thread."""
    import torch

    from modloc.training.evaluate import resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(resolved)}"
    return f"CPU: {cpu_model()}, 1 torch thread"


@contextlib.contextmanager
def claimed(path: Path) -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` while the block runs (``flock``: the kernel drops
    it when the process dies). Processes sharing a ``--work`` (``--jobs``) thus never train
    one run or score one result twice at once: the second waits, then finds it done."""
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- the benchmark ----------------------------------------------------------------------


@dataclass
class Dataset:
    path: Path
    config: SynthConfig
    hash: str
    manifest: dict

    def glob(self, split: str) -> str:
        return str(self.path / self.manifest["layout"][split])

    @property
    def segment_classes(self) -> list[int]:
        return self.manifest["segment_class_ids"]

    @property
    def all_classes(self) -> list[int]:
        return self.manifest["segment_class_ids"] + self.manifest["extra_class_ids"]


def prepare_dataset(scale: Scale, work: Path, workers: int) -> Dataset:
    """The scale's dataset under ``work`` (generated unless a complete copy is there)."""
    config = config_from("bench", **scale.synth)
    config_hash = digest(dataclasses.asdict(config))
    path = work / f"data-{config_hash[:10]}"
    manifest = read_json(path / "synth.json")  # written last: its presence means complete
    if manifest is None or manifest["config"] != json.loads(json.dumps(dataclasses.asdict(config))):
        shutil.rmtree(path, ignore_errors=True)
        say(f"generating the {scale.name} dataset into {path} ...")
        started = time.perf_counter()
        generate(config, path, workers=workers)
        manifest = json.loads((path / "synth.json").read_text())
        say(f"dataset ready in {time.perf_counter() - started:.0f} s: "
            + ", ".join(f"{split} {counts['videos']} videos" for split, counts in manifest["splits"].items()))
    return Dataset(path, config, config_hash, manifest)


class Benchmark:
    """Trains, scores and caches the (row, seed) results of one scale under ``work``.

    ``trained`` and ``evaluated`` count what this invocation did (0 and 0 on a rerun that
    finds everything finished).
    """

    def __init__(self, scale: Scale, dataset: Dataset, work: Path, device: str,
                 steps_cap: int | None = None):
        self.scale, self.data, self.work, self.device = scale, dataset, work, device
        self.runs = plan_runs(scale)
        self.steps_cap = steps_cap
        self.trained = self.evaluated = 0
        self.timings: list[dict] = []  # finished runs of this invocation, for the estimate
        self.scorings: list[float] = []  # seconds of each scoring of this invocation
        self.device_label = device_name(device)

    # run configuration ------------------------------------------------------------------

    def settings(self, run: RunSpec, seed: int, parent_checkpoint: str | None,
                 capped: bool = True) -> tuple[str, dict]:
        """The recipe and overrides ``modloc.training.small_scale.train_run`` gets for ``run`` (with
        ``capped``, ``steps_cap`` replaces the schedule's length)."""
        common = {"seed": seed, "device": self.device}
        if run.kind == "pretrain":
            recipe = "pretrain"
            settings = {**SMALL_PRETRAIN, **self.scale.pretrain, "model.name": run.preset,
                        "model.overrides": dict(run.overrides),
                        "data.train": [self.data.glob("train")], "data.classes": self.data.all_classes}
        elif run.kind == "scratch":
            # the fine-tuning recipe (segment mode, dropout 0.75, L2 1e-4) on a fresh model
            recipe = "finetune"
            settings = {**SMALL_FINETUNE, **self.scale.finetune, "phase": "pretrain",
                        "model.name": run.preset, "model.overrides": dict(run.overrides),
                        "data.train": [self.data.glob("validate")],
                        "data.classes": self.data.segment_classes}
        elif run.kind == "finetune":
            recipe = "finetune"
            settings = {**SMALL_FINETUNE, **self.scale.finetune, "init_from": parent_checkpoint,
                        "data.train": [self.data.glob("validate")],
                        "loss.temperatures": [run.temperature],
                        "loss.lambdas": [run.temperature ** 2]}
        else:
            raise ValueError(f"unknown run kind {run.kind!r}")
        settings = {**settings, **common}
        if capped and self.steps_cap is not None:
            settings.update(max_steps=self.steps_cap, epochs=None)
        return recipe, settings

    def run_hash(self, key: str, seed: int) -> str:
        """The identity of a run: its settings, its parent's identity and the dataset's."""
        run = self.runs[key]
        parent = self.run_hash(run.parent, seed) if run.parent else None
        recipe, settings = self.settings(run, seed, None)
        settings = {k: v for k, v in settings.items() if k not in ("data.train", "init_from", "device")}
        return digest({"run": dataclasses.asdict(run), "recipe": recipe, "settings": settings,
                       "parent": parent, "data": self.data.hash})

    def run_dir(self, key: str, seed: int) -> Path:
        return self.work / "runs" / f"seed-{seed}" / f"{key.replace('/', '-')}-{self.run_hash(key, seed)[:10]}"

    def ensure_run(self, key: str, seed: int) -> dict:
        """The finished run's record (``run.json``), training it (and its parent) if needed."""
        run, directory = self.runs[key], self.run_dir(key, seed)
        record = self._finished_run(directory)
        if record is not None:
            return record
        from modloc.training.checkpoint import latest_checkpoint, list_checkpoints

        parent = self.ensure_run(run.parent, seed)["checkpoint"] if run.parent else None
        with claimed(directory):
            record = self._finished_run(directory)  # trained by another process meanwhile
            if record is not None:
                return record
            # A run killed midway continues from its newest checkpoint (the trainer's resume
            # is exact); one killed before its first checkpoint starts over.
            resume = directory.is_dir() and bool(list_checkpoints(directory))
            if not resume:
                shutil.rmtree(directory, ignore_errors=True)
            recipe, settings = self.settings(run, seed, parent)
            say(f"train {key} seed {seed}: " + (f"resume from {latest_checkpoint(directory).name}"
                                                if resume else "start"))
            with self._threads():
                summary = train_run(directory, recipe, settings, checkpoint_every=CHECKPOINT_EVERY,
                                      resume=resume)
            record = {**summary, "run": key, "seed": seed, "hash": self.run_hash(key, seed),
                      "device": self.device_label, "parameters": self._parameters(summary["checkpoint"])}
            write_json(directory / "run.json", record)
        self.trained += 1
        self.timings.append({"units": self.work_units(key), "seconds": summary["seconds"]})
        say(f"train {key} seed {seed}: done, {summary['steps']} steps in {summary['seconds']:.0f} s, "
            f"final loss {summary['final_loss']:.4g}")
        return record

    @staticmethod
    def _finished_run(directory: Path) -> dict | None:
        """``run.json`` of a finished run, its checkpoint found beside it (whatever path
        ``--work`` was given as when it was written); None when not finished."""
        record = read_json(directory / "run.json")
        if record is None:
            return None
        record["checkpoint"] = str(directory / Path(record["checkpoint"]).name)
        return record if Path(record["checkpoint"]).is_dir() else None

    def _threads(self):
        """One torch thread on the CPU (the demo's reasoning: small models, shared cores)."""
        import contextlib

        return single_threaded() if not self.device_label.startswith("CUDA") else contextlib.nullcontext()

    @staticmethod
    def _parameters(checkpoint: str) -> int:
        from modloc.training.checkpoint import load_checkpoint
        from modloc.training.models import count_parameters

        return count_parameters(load_checkpoint(checkpoint).model)

    # estimate ---------------------------------------------------------------------------

    def planned_steps(self, key: str) -> int:
        """Steps ``key`` will train: its epochs over the split (or its step cap)."""
        run = self.runs[key]
        _, settings = self.settings(run, 0, None, capped=False)
        split = "train" if run.kind == "pretrain" else "validate"
        examples = self.data.manifest["splits"][split]["videos" if split == "train" else "rated_segments"]
        per_epoch = max(1, examples // settings["batch_size"])
        epochs, cap = settings.get("epochs"), settings.get("max_steps")
        steps = per_epoch * epochs if epochs is not None else cap
        return min(steps, cap) if cap is not None else steps

    def work_units(self, key: str) -> float:
        """A rough cost of a run: steps × batch × frames × per-frame parameters."""
        run = self.runs[key]
        _, settings = self.settings(run, 0, None, capped=False)
        frames = settings.get("data.max_frames", 300) if run.kind == "pretrain" else 5
        return self.planned_steps(key) * settings["batch_size"] * frames * self.frame_parameters(key)

    def frame_parameters(self, key: str) -> int:
        """Parameters applied to every frame (the NeXtVLAD layers; all of DBoF's, roughly):
        a step's cost is about proportional to them times the frames."""
        import torch

        from modloc.training.models import NeXtVLAD, build_model, count_parameters
        from modloc.training.trainer import build_run_model_config

        run = self.runs[key]
        while run.kind == "finetune":
            run = self.runs[run.parent]
        with torch.device("meta"):
            model = build_model(build_run_model_config(run.preset, dict(run.overrides),
                                                       len(self.data.all_classes), None, "video"))
        per_frame = sum(count_parameters(m) for m in model.modules() if isinstance(m, NeXtVLAD))
        return per_frame or count_parameters(model)

    def remaining_seconds(self, later: list[tuple[Row, int]]) -> float | None:
        """Seconds the unfinished (row, seed) results of ``later`` should take: their runs
        not trained yet (steps × batch × frames × per-frame parameters) at this invocation's
        training rate, plus their scorings at its mean scoring time; None before it has
        trained and scored anything."""
        if not self.timings or not self.scorings:
            return None
        later = [(row, seed) for row, seed in later if self.cached_result(row, seed) is None]
        pending = dict.fromkeys((key, seed) for row, seed in later for key in self.runs_needed(row)
                                if read_json(self.run_dir(key, seed) / "run.json") is None)
        rate = sum(t["seconds"] for t in self.timings) / sum(t["units"] for t in self.timings)
        return (rate * sum(self.work_units(key) for key, _ in pending)
                + len(later) * statistics.fmean(self.scorings))

    # rows ---------------------------------------------------------------------------------

    def row_hash(self, row: Row, seed: int) -> str:
        return digest({"row": dataclasses.asdict(row), "run": self.run_hash(row.run, seed),
                       "video": self.run_hash(VIDEO_RUN, seed), "k": self.scale.k, "seed": seed})

    def result_path(self, row: Row, seed: int) -> Path:
        return self.work / "results" / row.key / f"seed-{seed}.json"

    def cached_result(self, row: Row, seed: int) -> dict | None:
        result = read_json(self.result_path(row, seed))
        # a result from before the ceiling and the every-class score were recorded is scored again
        current = result is not None and result.get("hash") == self.row_hash(row, seed)
        every_class = current and result.get("all_classes_top_n") == len(self.data.all_classes)
        return result if every_class else None

    def runs_needed(self, row: Row) -> list[str]:
        """The runs behind ``row``, each after its parent: the video model first."""
        chain, key = [], row.run
        while key is not None:
            chain.append(key)
            key = self.runs[key].parent
        return list(dict.fromkeys([VIDEO_RUN, *reversed(chain)]))

    def train_seconds(self, row: Row, seed: int) -> dict:
        """Training seconds behind a row: the run it starts from and its own fine-tuning."""
        run = self.runs[row.run]
        seconds = {key: self.ensure_run(key, seed)["seconds"] for key in self.runs_needed(row)}
        if row.view == "dummy":
            return {"pretrain": seconds[VIDEO_RUN], "finetune": 0.0}
        if run.kind == "finetune":
            return {"pretrain": seconds[run.parent], "finetune": seconds[row.run]}
        return {"pretrain": 0.0, "finetune": seconds[row.run]}

    def score(self, row: Row, seed: int) -> dict:
        """Train what ``row`` needs for ``seed``, score it on ``test`` and store the result
        (unless another process has meanwhile)."""
        with claimed(self.result_path(row, seed)):
            return self.cached_result(row, seed) or self._score(row, seed)

    def _score(self, row: Row, seed: int) -> dict:
        from modloc.engine.runtime.fusion import FusionConfig
        from modloc.training.checkpoint import load_checkpoint
        from modloc.training.evaluate import evaluate_segments, resolve_device
        from modloc.training.models import count_parameters

        started = time.perf_counter()
        say(f"{row.key} seed {seed}: start")
        video_run = self.ensure_run(VIDEO_RUN, seed)
        run = self.ensure_run(row.run, seed)
        target = resolve_device(self.device)
        video = load_checkpoint(video_run["checkpoint"], target)
        segment = video if row.run == VIDEO_RUN else load_checkpoint(run["checkpoint"], target)
        if row.view == "leaf":
            leaf = segment.model.leaf(row.leaf)
            segment = dataclasses.replace(segment, model=leaf, model_config=leaf.config)
        def evaluate(top_n: int) -> dict:
            return evaluate_segments(video, segment, self.data.glob("test"), self.data.glob("test_truth"),
                                     self.data.segment_classes, FusionConfig(top_n=top_n, k=self.scale.k),
                                     progress=False)

        with self._threads():
            scored = evaluate(FusionConfig.top_n)  # the paper's pipeline
            # the segment model alone: every class of the video model is a candidate
            all_classes = evaluate(len(video.class_ids))
        system = "dummy" if row.view == "dummy" else "fused"
        result = {
            "row": row.key, "seed": seed, "hash": self.row_hash(row, seed),
            "map": scored[system]["map"], "classes": scored[system]["classes"],
            "ceiling": scored[system]["ceiling"], "all_classes_map": all_classes[system]["map"],
            "all_classes_top_n": len(video.class_ids),
            "found_positives": scored[system]["found_positives"], "positives": scored["positives"],
            "dummy_map": scored["dummy"]["map"], "k": scored["k"],
            "scaled_parameters": count_parameters(segment.model),
            "train_seconds": self.train_seconds(row, seed),
            "runs": {key: self.run_hash(key, seed)[:10] for key in self.runs_needed(row)},
            "device": run["device"], "score_seconds": scored["seconds"] + all_classes["seconds"],
            "seconds": round(time.perf_counter() - started, 2),
        }
        write_json(self.result_path(row, seed), result)
        self.evaluated += 1
        self.scorings.append(result["score_seconds"])
        say(f"{row.key} seed {seed}: done in {result['seconds']:.0f} s, MAP@K {result['map']:.4f} "
            f"(dummy {result['dummy_map']:.4f}, ceiling {result['ceiling']:.4f}; every class a "
            f"candidate {result['all_classes_map']:.4f}; scoring {result['score_seconds']:.0f} s)")
        return result


# --- the report -------------------------------------------------------------------------


def paper_parameters(row: Row) -> int:
    """Parameters of the row's paper-scale model at 1000 classes (the paper's column)."""
    import torch

    from modloc.training.models import count_parameters, create_model

    with torch.device("meta"):
        return count_parameters(create_model(row.paper_preset, 1000, **row.paper_overrides))


def _millions(count: int) -> str:
    return f"{count / 1e6:,.1f}M" if count >= 1e5 else f"{count / 1e3:,.1f}K"


def _seconds(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def paired_differences(results: dict[str, list[dict]], better: str, other: str, metric: str) -> list[float]:
    """``metric`` of ``better`` minus that of ``other``, per seed that both rows have."""
    pairs = {r["seed"]: r[metric] for r in results[better]}
    return [pairs[r["seed"]] - r[metric] for r in results[other] if r["seed"] in pairs]


def summarize(rows: list[Row], results: dict[str, list[dict]], pre_registered_seeds: int) -> dict:
    """Per row the statistics over seeds; per claim the paired-difference interval, its
    p-value and the p-value after Holm's correction over every test of the claims' table
    (each claim on both metrics).

    A table is *confirmatory* when every row has exactly ``pre_registered_seeds`` seeds, the
    scale's count fixed in :data:`SCALES` before any result was seen; otherwise (seeds added
    or left out after looking) it is *exploratory*, and its verdicts say so.
    """
    table = {}
    for row in rows:
        found = sorted(results.get(row.key, []), key=lambda r: r["seed"])
        if not found:
            continue
        table[row.key] = {
            "label": row.label, "group": row.group, **mean_interval([r["map"] for r in found]),
            "seeds": [r["seed"] for r in found], "maps": [r["map"] for r in found],
            "ceiling": statistics.fmean(r["ceiling"] for r in found),
            "of_ceiling": statistics.fmean(r["map"] / r["ceiling"] for r in found),
            "all_classes": mean_interval([r["all_classes_map"] for r in found]),
            "paper_parameters": paper_parameters(row),
            "scaled_parameters": found[0]["scaled_parameters"],
            "pretrain_seconds": statistics.fmean(r["train_seconds"]["pretrain"] for r in found),
            "finetune_seconds": statistics.fmean(r["train_seconds"]["finetune"] for r in found),
            "devices": sorted({r["device"] for r in found}), "paper": row.paper,
        }
    claims = []
    for claim, better, other in CLAIMS:
        if better not in table or other not in table:
            continue
        differences = paired_differences(results, better, other, "map")
        if differences:
            difference = mean_interval(differences)
            all_classes_difference = mean_interval(
                paired_differences(results, better, other, "all_classes_map"))
            claims.append({"claim": claim, "better": better, "other": other,
                           "difference": difference,
                           "all_classes_difference": all_classes_difference,
                           "seeds_to_resolve": [seeds_to_resolve(difference),
                                                seeds_to_resolve(all_classes_difference)],
                           # the most `better` could have gained: `other`'s distance to the
                           # ceiling that both rows' candidates set
                           "headroom": table[other]["ceiling"] - table[other]["mean"],
                           "parameters": [table[better]["scaled_parameters"],
                                          table[other]["scaled_parameters"]]})
    p_values = [paired_p_value(claim[metric]) for claim in claims
                for metric in ("difference", "all_classes_difference")]
    adjusted = holm(p_values)
    for index, claim in enumerate(claims):
        claim["p"] = p_values[2 * index: 2 * index + 2]
        claim["holm_p"] = adjusted[2 * index: 2 * index + 2]
    seed_counts = {row["n"] for row in table.values()}
    design = {"pre_registered_seeds": pre_registered_seeds, "seeds": sorted(seed_counts),
              "confirmatory": seed_counts == {pre_registered_seeds}, "correction": "Holm",
              "family": sum(p is not None for p in p_values), "alpha": ALPHA}
    by_seed: dict[int, list[float]] = {}
    for row in rows:
        for result in results.get(row.key, []):
            by_seed.setdefault(result["seed"], []).append(result["ceiling"])
    ceilings = {seed: statistics.fmean(values) for seed, values in sorted(by_seed.items())}
    return {"rows": table, "claims": claims, "ceilings": ceilings, "design": design}


def _schedule(demo: dict, changes: dict) -> dict:
    """The demo's schedule with a scale's changes, without the demo's model (rows set theirs)."""
    return {key: value for key, value in {**demo, **changes}.items() if key != "model.overrides"}


def _mean_std(stats: dict) -> str:
    return f"{stats['mean']:.4f}" + ("" if stats["std"] is None else f" ± {stats['std']:.4f}")


def _interval(difference: dict) -> str:
    ci = difference["ci"]
    return "—" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _verdict(difference: dict, holm_p: float | None, confirmatory: bool) -> str:
    """The verdict of Holm's procedure (adjusted p below α), marked exploratory where the
    table's seed count was not the one fixed in advance."""
    if difference["ci"] is None or holm_p is None:
        return "needs ≥ 2 seeds"
    verdict = ("not resolved" if holm_p >= ALPHA
               else "yes" if difference["mean"] > 0 else "no (reversed)")
    return verdict if confirmatory else f"exploratory: {verdict}"


def _p(p: float | None) -> str:
    return "—" if p is None else "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def _seeds_needed(count: int | None, stats: dict) -> str:
    return "—" if stats["std"] is None else f"{count:,}" if count is not None else "> 1,000"


def render(summary: dict, scale: Scale, dataset: Dataset, counts: dict) -> str:
    header = ("| group | model | params (paper scale) | params (scaled) | MAP@K mean ± std | "
              "95% CI | of ceiling | every class a candidate | seeds | pretrain s | fine-tune s | "
              "ran on | paper private / public |\n"
              "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|")
    lines = [header]
    for key, row in summary["rows"].items():
        ci = "—" if row["ci"] is None else f"[{row['ci'][0]:.4f}, {row['ci'][1]:.4f}]"
        paper = "—" if row["paper"] is None else f"{row['paper'][0]:.5f} / {row['paper'][1]:.5f}"
        lines.append(
            f"| {row['group']} | {row['label']} (`{key}`) | {_millions(row['paper_parameters'])} | "
            f"{_millions(row['scaled_parameters'])} | {_mean_std(row)} | {ci} | "
            f"{row['of_ceiling']:.1%} | {_mean_std(row['all_classes'])} | {row['n']} | "
            f"{_seconds(row['pretrain_seconds'])} | {_seconds(row['finetune_seconds'])} | "
            f"{'; '.join(row['devices'])} | {paper} |")
    ceilings = ", ".join(f"seed {seed} {value:.4f}" for seed, value in summary["ceilings"].items())
    splits = ", ".join(f"{name} {c['videos']} videos ({c['rated_segments']} rated segments)"
                       if c["rated_segments"] else f"{name} {c['videos']} videos"
                       for name, c in dataset.manifest["splits"].items())
    import torch

    return f"""# The paper's Tables 1–2 on synthetic data

Segment MAP@K (K = {scale.k:,}) on the synthetic `test` split, scored through the engine's
pipeline (top-20 candidates from the seed's pre-trained NeXtVLAD video model,
`P_vid^0.05 · P_seg^0.95`), by `benchmarks/synthetic_tables.py` (its docstring explains every
choice; `docs/CLAIMS.md` the comparisons). Mean ± sample std over seeds; the 95% interval is
Student's t on the seeds. Parameters: the paper's presets at 1000 classes, and the scaled
models at this dataset's {len(dataset.all_classes)} classes. Seconds are training time per
seed (pretrain: the run this row starts from, shared by rows that start from it).

*Of ceiling*: MAP@K over the ceiling, the MAP@K of the same submitted segments with every
positive ranked first (`modloc.engine.base.metrics.segment_map`). Every row of a seed ranks the windows
of the same candidates, its video model's top 20 per video, so the ceiling is the seed's:
{ceilings}. No segment model can score above it; *headroom*, in the claims' table, is the
other row's distance to it, the most the better row could have gained.

*Every class a candidate*: the same row scored with all {len(dataset.all_classes)} classes of
the video model as every video's candidates, so that each ranked class's list holds every
window of every video: the row's segment model alone, without the video model's top-20 cut
(ceiling 1 when the lists hold every rated window).

{provenance()}
- Python {platform.python_version()}, torch {torch.__version__}
- scale `{scale.name}`: dataset `bench` preset with {json.dumps(scale.synth)} (seed {dataset.config.seed}):
  {splits}
- models: NeXtVLAD {json.dumps(scale.nextvlad)}, large {json.dumps(scale.nextvlad_large)},
  MOD leaves {json.dumps(scale.mod_leaf)}, DBoF {json.dumps(scale.dbof)}
- schedules (`training/small_scale.py`, with the scale's changes): pretrain
  {json.dumps(_schedule(SMALL_PRETRAIN, scale.pretrain))}; fine-tune
  {json.dumps(_schedule(SMALL_FINETUNE, scale.finetune))}
- this invocation: {counts['trained']} runs trained, {counts['evaluated']} (row, seed) results scored,
  {counts['cached']} taken from `{counts['work']}`

{chr(10).join(lines)}

{render_claims(summary)}"""


CLAIMS_HEADING = "## The paper's claims (paired differences over seeds)"


def render_claims(summary: dict) -> str:
    """The claims' section of ``tables.md``: the design, then one line per claim."""
    design = summary["design"]
    if design["confirmatory"]:
        status = (f"**Confirmatory.** {design['pre_registered_seeds']} seeds, the count fixed in "
                  "the script (`SCALES`) before any result was seen. The family is every test of "
                  f"this table ({design['family']}: each claim on both metrics); *holds?* is "
                  f"Holm's step-down procedure at family-wise α = {design['alpha']} on the "
                  "paired t-tests' p-values. The intervals are each a plain 95% interval "
                  "(uncorrected), shown for size, not for the verdict.")
    else:
        status = (f"**Exploratory.** {', '.join(map(str, design['seeds']))} seeds where "
                  f"{design['pre_registered_seeds']} were fixed in advance: seeds chosen after "
                  "results were seen (optional stopping) make the tests' error rates unknown. "
                  "Each interval is a plain 95% interval, uncorrected for the "
                  f"{design['family']} comparisons; *holds?* applies Holm's procedure as for a "
                  "confirmatory table, but none of this table confirms a claim: it suggests "
                  "what a new, pre-registered run should test.")
    if not summary["claims"]:
        return f"{CLAIMS_HEADING}\n\nNone of the claims' row pairs was run (`--rows`).\n"
    lines = ["| claim | rows (better − other) | mean difference | 95% CI (paired t, uncorrected) | "
             "p | p (Holm) | seeds | headroom | params (scaled) | holds? | seeds to resolve | "
             "every class a candidate: difference, 95% CI | p (Holm) | holds? | seeds to resolve |",
             "|---|---|---:|---|---:|---:|---:|---:|---|---|---:|---|---:|---|---:|"]
    for claim in summary["claims"]:
        d, alone = claim["difference"], claim["all_classes_difference"]
        needed, needed_alone = claim["seeds_to_resolve"]
        (p, _), (holm_p, holm_alone) = claim["p"], claim["holm_p"]
        lines.append(
            f"| {claim['claim']} | `{claim['better']}` − `{claim['other']}` | {d['mean']:+.4f} | "
            f"{_interval(d)} | {_p(p)} | {_p(holm_p)} | {d['n']} | {claim['headroom']:.4f} | "
            f"{_millions(claim['parameters'][0])} vs {_millions(claim['parameters'][1])} | "
            f"{_verdict(d, holm_p, design['confirmatory'])} | {_seeds_needed(needed, d)} | "
            f"{alone['mean']:+.4f}, {_interval(alone)} | {_p(holm_alone)} | "
            f"{_verdict(alone, holm_alone, design['confirmatory'])} | "
            f"{_seeds_needed(needed_alone, alone)} |")
    return f"""{CLAIMS_HEADING}

{status}

*Seeds to resolve*: the fewest seeds whose paired interval would exclude 0 if the difference's
mean and std stayed as measured here, an extrapolation of this benchmark's power for planning
the next pre-registered run, not a result.

{chr(10).join(lines)}
"""


def recompute_claims(payload_path: Path) -> None:
    """Recompute a finished table's claims (statistics only, no training) from its .json and
    rewrite its claims section in the .md beside it and the .json's claims."""
    payload = json.loads(payload_path.read_text())
    results = payload["results"]
    rows = [row for row in ROWS if row.key in results]
    summary = summarize(rows, results, SCALES[payload["scale"]].seeds)
    payload.update(claims=summary["claims"], design=summary["design"])
    write_json(payload_path, payload)
    table = payload_path.with_suffix(".md")
    text = table.read_text()
    start = text.index(CLAIMS_HEADING)
    write_atomically(table, text[:start] + render_claims(summary))
    say(f"recomputed the claims of {table} and {payload_path}")


def plot(summary: dict, path: Path, title: str) -> None:
    """:func:`chart` as a PNG (atomic)."""
    import io

    png = io.BytesIO()
    # "tight": the figure grows to hold the legend below the panels
    chart(summary, title).savefig(png, format="png", dpi=100, bbox_inches="tight")
    write_atomically(path, png.getvalue())


def chart(summary: dict, title: str):
    """Bar charts of the mean MAP@K per row with std error bars, coloured by group: through
    the pipeline, with the seeds' mean ceiling, and with every class a candidate. A row
    whose name another row shares (NeXtVLAD with and without pre-training) is named with
    its group; the legend sits below the panels, off the bars."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = list(summary["rows"].values())
    colours = {group: f"C{i}" for i, group in enumerate(dict.fromkeys(r["group"] for r in rows))}
    names = [row["label"].split(" (leaf")[0] for row in rows]
    names = [f"{name} ({row['group']})" if names.count(name) > 1 else name
             for name, row in zip(names, rows, strict=True)]
    figure = Figure(figsize=(2 * max(5, 0.6 * len(rows) + 2), 5.5), tight_layout=True)
    figure.suptitle(title)
    panels = (("the pipeline: top-20 candidates", lambda row: row),
              ("every class a candidate: the segment model alone", lambda row: row["all_classes"]))
    for axes, (name, stats) in zip(figure.subplots(1, 2), panels, strict=True):
        axes.bar(range(len(rows)), [stats(row)["mean"] for row in rows],
                 yerr=[stats(row)["std"] or 0.0 for row in rows], capsize=4,
                 color=[colours[row["group"]] for row in rows])
        axes.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
        axes.set_title(name, fontsize=10)
        axes.set_ylabel("segment MAP@K (mean ± std over seeds)")
        axes.grid(axis="y", alpha=0.3)
    first = figure.axes[0]
    if summary["ceilings"]:
        first.axhline(statistics.fmean(summary["ceilings"].values()), color="black", linestyle="--",
                      linewidth=1, label="ceiling (mean over seeds)")
    handles = [*first.get_legend_handles_labels()[0],
               *(Patch(color=colour, label=group) for group, colour in colours.items())]
    figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  ncol=min(len(handles), 4), fontsize=8, frameon=False)
    return figure


# --- main --------------------------------------------------------------------------------


def parse_rows(text: str | None) -> list[Row]:
    if not text:
        return list(ROWS)
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [key for key in wanted if key not in ROW_KEYS]
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; known: {', '.join(ROW_KEYS)}")
    return [row for row in ROWS if row.key in wanted]


def step_seconds(run_dir: Path, batch_size: int) -> float:
    """Seconds per step of a finished run, from its last logged rate (the trainer logs the
    examples/s since the previous log line: steps only, no set-up or checkpoint writing)."""
    rates = [row["examples_per_second"] for row in map(json.loads, (run_dir / "history.jsonl")
             .read_text().splitlines()) if "examples_per_second" in row]
    if not rates:
        raise ValueError(f"{run_dir}: no logged training rate; time more steps")
    return batch_size / rates[-1]


def time_runs(bench: Benchmark, rows: list[Row], seeds: int, steps: int) -> int:
    """``--time-steps``: train each needed run of seed 0 for ``steps`` steps, extrapolate."""
    needed = list(dict.fromkeys(key for row in rows for key in bench.runs_needed(row)))
    total = 0.0
    print(f"\n| run | per-frame params | s/step (last 10 of {steps} steps) | planned steps | "
          "estimated s per seed |\n|---|---:|---:|---:|---:|")
    for key in needed:
        bench.ensure_run(key, 0)
        _, settings = bench.settings(bench.runs[key], 0, None)
        per_step = step_seconds(bench.run_dir(key, 0), settings["batch_size"])
        planned = bench.planned_steps(key)
        total += per_step * planned
        print(f"| {key} | {bench.frame_parameters(key):,} | {per_step:.3f} | {planned:,} | "
              f"{per_step * planned:,.0f} |", flush=True)
    print(f"\nestimated training time: {total:,.0f} s per seed, {total * seeds / 3600:.1f} h for "
          f"{seeds} seed(s) on {bench.device_label} (scoring not included)")
    return 0


def score_seed(scale: Scale, dataset: Dataset, work: Path, device: str, row_keys: list[str],
               seed: int, reverse: bool = False) -> tuple[int, int]:
    """One ``--jobs`` process: trains and scores every unfinished row of ``seed`` into the
    cache under ``work`` (last row first with ``reverse``); returns (runs trained, rows
    scored)."""
    bench = Benchmark(scale, dataset, work, device)
    rows = parse_rows(",".join(row_keys))[::-1 if reverse else 1]
    for index, row in enumerate(rows):
        if bench.cached_result(row, seed) is None:
            bench.score(row, seed)
            eta = bench.remaining_seconds([(later, seed) for later in rows[index + 1:]])
            if eta is not None and index + 1 < len(rows):
                say(f"seed {seed}: {index + 1}/{len(rows)} rows done, about {eta / 60:.0f} min "
                    "left for this seed")
    return bench.trained, bench.evaluated


def score_seeds_in_parallel(bench: Benchmark, rows: list[Row], seeds: int, jobs: int) -> None:
    """``--jobs``: ``jobs`` processes over the seeds with unfinished rows, one seed each;
    the last ``jobs - 1`` seeds get a second process that runs their rows in reverse, so
    that no core idles while the last seed trains (their locks keep them from doing the same
    run twice). Results land in the cache."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pending = [seed for seed in range(seeds) if any(bench.cached_result(row, seed) is None for row in rows)]
    if not pending:
        return
    tasks = [(seed, False) for seed in pending] + [(seed, True) for seed in pending[max(0, len(pending) - jobs + 1):]]
    say(f"seeds {pending}: {jobs} processes")
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(score_seed, bench.scale, bench.data, bench.work, bench.device,
                               [row.key for row in rows], seed, reverse) for seed, reverse in tasks]
        for (seed, reverse), future in zip(tasks, futures, strict=True):
            trained, evaluated = future.result()
            bench.trained += trained
            bench.evaluated += evaluated
            say(f"seed {seed}{' (reversed)' if reverse else ''}: every row finished")


def parse_synth_changes(items: list[str]) -> dict:
    """``["signal=0.2", "verticals=4"]`` → ``{"signal": 0.2, "verticals": 4}`` (JSON values)."""
    changes = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            changes[key] = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{item!r}: the value is not a number or JSON ({error})") from None
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="default",
                        help="sizes, schedules and dataset (default: default)")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: 3; smoke: 1)")
    parser.add_argument("--rows", help=f"comma-separated subset of: {', '.join(ROW_KEYS)}")
    parser.add_argument("--synth", action="append", default=[], metavar="KEY=VALUE",
                        help="change one setting of the scale's dataset (a field of "
                             "modloc.engine.base.synth.SynthConfig, e.g. signal=0.2; repeatable): a variant "
                             "benchmark, with its own default --work and --out")
    parser.add_argument("--out", type=Path,
                        help="the table (default benchmarks/results/tables.md; with --synth "
                             "WORK/tables.md); .png and .json beside it")
    parser.add_argument("--work", type=Path,
                        help="dataset, training runs and per-(row, seed) results (default "
                             "runs/tables; with --synth runs/tables-synth-<hash of the changes>)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating the dataset")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes training at once, one torch thread each, one seed each "
                             "(the last seeds two) (default 1; up to the CPU cores; CPU only)")
    parser.add_argument("--recompute-claims", type=Path, metavar="JSON",
                        help="only recompute the claims' statistics of a finished table from its "
                             ".json (no training) and rewrite its claims section")
    parser.add_argument("--time-steps", type=int, metavar="N",
                        help="only measure: train every needed run of seed 0 for N steps in a "
                             "scratch directory and print the estimated time of the full run")
    args = parser.parse_args(argv)
    if args.recompute_claims is not None:
        recompute_claims(args.recompute_claims)
        return 0
    try:
        rows = parse_rows(args.rows)
    except ValueError as error:
        parser.error(str(error))
    scale = SCALES[args.scale]
    try:
        changes = parse_synth_changes(args.synth)
        config_from("bench", **{**scale.synth, **changes})
    except ValueError as error:
        parser.error(f"--synth: {error}")
    if changes:
        # a variant: its own dataset, hence its own runs and results (one result per (row,
        # seed) is kept per work directory)
        scale = dataclasses.replace(scale, synth={**scale.synth, **changes})
        args.work = args.work or Path(f"runs/tables-synth-{digest(changes)[:8]}")
        args.out = args.out or args.work / "tables.md"
    args.work = args.work or Path("runs/tables")
    args.out = args.out or RESULTS_FILE
    seeds = scale.seeds if args.seeds is None else args.seeds
    if seeds < 1 or args.jobs < 1 or (args.time_steps is not None and args.time_steps < 1):
        parser.error("--seeds, --jobs and --time-steps must be >= 1")

    args.work.mkdir(parents=True, exist_ok=True)
    dataset = prepare_dataset(scale, args.work, args.workers)
    if args.time_steps is not None:
        with tempfile.TemporaryDirectory(dir=args.work, prefix="timing-") as scratch:
            bench = Benchmark(scale, dataset, Path(scratch), args.device, steps_cap=args.time_steps)
            return time_runs(bench, rows, seeds, args.time_steps)

    bench = Benchmark(scale, dataset, args.work, args.device)
    if args.jobs > 1:
        if bench.device_label.startswith("CUDA"):
            parser.error("--jobs is for CPU runs: on a GPU the seeds run one after another")
        score_seeds_in_parallel(bench, rows, seeds, args.jobs)
    jobs = [(row, seed) for seed in range(seeds) for row in rows]
    results: dict[str, list[dict]] = {}
    cached = 0
    say(f"{len(jobs)} (row, seed) results wanted, scale {scale.name}, on {bench.device_label}")
    for index, (row, seed) in enumerate(jobs):
        result = bench.cached_result(row, seed)
        if result is not None:
            cached += 1
            say(f"{row.key} seed {seed}: finished earlier, MAP@K {result['map']:.4f}")
        else:
            result = bench.score(row, seed)
            eta = bench.remaining_seconds(jobs[index + 1:])
            if eta is not None and index + 1 < len(jobs):
                # the pending runs' steps × batch × frames × per-frame parameters at this
                # invocation's training rate, plus its mean scoring time per result
                say(f"{index + 1}/{len(jobs)} done, about {eta / 60:.0f} min left")
        results.setdefault(row.key, []).append(result)

    summary = summarize(rows, results, scale.seeds)
    counts = {"trained": bench.trained, "evaluated": bench.evaluated, "cached": cached,
              "work": str(args.work)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(args.out, render(summary, scale, dataset, counts))
    png, payload = args.out.with_suffix(".png"), args.out.with_suffix(".json")
    plot(summary, png, f"Tables 1–2 on synthetic data ({scale.name} scale)")
    write_json(payload, {"scale": scale.name, **counts, **summary,
                         "results": {key: value for key, value in results.items()}})
    say(f"wrote {args.out}, {png} and {payload}: {bench.trained} runs trained, "
        f"{bench.evaluated} scored, {cached} cached")
    return 0


if __name__ == "__main__":
    sys.exit(main())
