"""Training-step throughput: one NeXtVLAD and MOD-12 (4 towers x 3), leaf loop vs grouped leaves.

One step is what training does per batch: the forward on the uint8 batch, the loss
(``model_loss`` for NeXtVLAD, ``mod_loss`` for the tree, with the pretraining settings: video
mode, T = 1, λ = 1, L2 1e-5), the backward and an Adam step. The batch is synthetic and
already on the device (the reader is ``bench_io``'s question). Reported: the median step time
after warm-up steps and examples/s = batch / median.

A tree runs as ``plain loop`` (``MixtureNode.leaf_logits`` evaluates the sibling leaves one
after another) and ``grouped leaves`` (the siblings as grouped matmuls,
:mod:`modloc.training.models.grouped`), each on a fresh model and optimizer from the same
seed, in ``--repeats`` rounds of alternating order. fp32 on the CPU; bf16 autocast and fused
Adam on CUDA.

Defaults are the paper's sizes (batch 80, 300 frames, 3862 classes). The CPU needs smaller
settings: MOD-12 at full size holds 1.06 B parameters (17 GB with Adam's state) and takes
minutes per step on a few cores.

    python benchmarks/bench_train.py                  # GPU: the paper's sizes
    python benchmarks/bench_train.py --batch 8 --frames 60 --hidden-size 256 --steps 3 \
        --warmup 1 --repeats 3 --threads 1            # 2 shared CPU cores, ~6 minutes

Results are written to ``benchmarks/results/bench_train.md``, one section per device (a run
replaces its device's section and keeps the others).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, cpu_model, provenance, write_section

from modloc.engine.base.progress import Progress
from modloc.training.losses import LossConfig, mod_loss, model_loss
from modloc.training.models import MODTree, count_parameters, create_model
from modloc.training.models.mod_tree import use_grouped_leaves

RESULTS_FILE = RESULTS / "bench_train.md"
HEADER = """# Training-step throughput

Examples/s of one training step (forward + loss + backward + Adam) on a synthetic batch, by
`benchmarks/bench_train.py`; one section per device. `plain loop` evaluates a tree's sibling
leaves one after another, `grouped leaves` as grouped matmuls (`modloc.training.models.grouped`).
"""


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    return f"CPU: {cpu_model()}, {threads} thread{'s' if threads > 1 else ''}"


def synthetic_batch(batch: int, frames: int, num_classes: int, device: torch.device, seed: int):
    """uint8 features, frame counts in [frames/2, frames], 3 random positive classes each."""
    rng = np.random.default_rng(seed)
    features = torch.from_numpy(rng.integers(0, 256, (batch, frames, 1152), dtype=np.uint8))
    num_frames = torch.from_numpy(rng.integers(frames // 2, frames + 1, batch).astype(np.int32))
    labels = torch.zeros(batch, num_classes)
    labels[np.repeat(np.arange(batch), 3), rng.integers(0, num_classes, 3 * batch)] = 1.0
    return features.to(device), num_frames.to(device), labels.to(device)


def time_steps(model, optimizer, batch, steps: int, warmup: int, device: torch.device):
    """Seconds of each timed training step (after ``warmup`` untimed ones)."""
    features, num_frames, labels = batch
    config = LossConfig()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    seconds = []
    bar = Progress("training steps", warmup + steps, "step")
    for step in bar.each(range(warmup + steps)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            output = model(features, num_frames)
            if isinstance(model, MODTree):
                loss = mod_loss(output, labels, None, config, tree=model)
            else:
                loss = model_loss(output, labels, None, config, model=model)
        loss.total.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    bar.close()
    return seconds


def fresh_model(name: str, args, device: torch.device):
    """The preset's model from seed 0 and a new Adam: every run starts from the same state."""
    overrides = {} if args.hidden_size is None else {"hidden_size": args.hidden_size}
    torch.manual_seed(0)
    model = create_model(name, num_classes=args.classes, **overrides).to(device).train()
    return model, torch.optim.Adam(model.parameters(), lr=2e-4, fused=device.type == "cuda")


def bench_model(name: str, args, device: torch.device) -> list[tuple]:
    """Rows ``(model, variant, leaves, params, median s, examples/s, speed vs the first
    variant)`` for one preset.

    Each of ``--repeats`` rounds runs every variant once on a fresh model and optimizer, in
    alternating order (so neither variant always inherits the other's warm caches or meets
    the same moment of a shared machine's load); a variant's step time is the median over
    rounds of its runs' medians, and its speed ratio the median of the within-round ratios.
    """
    model, _ = fresh_model(name, args, device)
    is_tree = isinstance(model, MODTree)
    leaves = model.num_leaves if is_tree else 1
    params = count_parameters(model)
    del model
    batch = synthetic_batch(args.batch, args.frames, args.classes, device, args.seed)
    variants = ["plain loop", "grouped leaves"] if is_tree else ["single model"]
    medians: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_ in range(args.repeats):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            model, optimizer = fresh_model(name, args, device)
            if is_tree:
                use_grouped_leaves(model, variant == "grouped leaves")
            print(f"{name} / {variant}, round {round_ + 1}/{args.repeats}: {args.warmup} warm-up + "
                  f"{args.steps} timed steps ...", flush=True)
            medians[variant].append(statistics.median(
                time_steps(model, optimizer, batch, args.steps, args.warmup, device)))
            del model, optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    first = medians[variants[0]]
    rows = []
    for variant in variants:
        median = statistics.median(medians[variant])
        speed = statistics.median(f / v for f, v in zip(first, medians[variant], strict=True))
        rows.append((name, variant, leaves, params, median, args.batch / median, speed))
    return rows


def render_section(rows: list[tuple], args, device: torch.device) -> str:
    header = ("| model | leaves | variant | params | step ms | examples/s | vs plain loop |\n"
              "|---|---:|---|---:|---:|---:|---:|")
    lines = [header]
    for name, variant, leaves, params, median, rate, speed in rows:
        lines.append(f"| {name} | {leaves} | {variant} | {params / 1e6:,.1f}M | "
                     f"{median * 1e3:,.1f} | {rate:,.1f} | {speed:.2f}x |")
    table = "\n".join(lines)
    precision = "bf16 autocast, fused Adam" if device.type == "cuda" else "fp32, foreach Adam"
    hidden = "preset" if args.hidden_size is None else str(args.hidden_size)
    versions = f"Python {platform.python_version()}, torch {torch.__version__}"
    if device.type == "cuda":
        versions += f", CUDA {torch.version.cuda}"
    return f"""## {device_label(device)}

{provenance()}
- {versions}
- batch {args.batch}, {args.frames} frames (video mode, masked), {args.classes} classes, \
hidden size {hidden}; {precision}
- {args.repeats} rounds, each running every variant on a fresh model and optimizer (seed 0) in \
alternating order; per run the median of {args.steps} steps after {args.warmup} warm-up steps; \
step ms = median over rounds, "vs plain loop" = median of the within-round speed ratios; one \
step = forward + loss + backward + Adam

{table}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="nextvlad,mod_4x3",
                        help="comma-separated presets (default nextvlad,mod_4x3)")
    parser.add_argument("--classes", type=int, default=3862, help="classes (default 3862)")
    parser.add_argument("--batch", type=int, default=80, help="batch size (default 80)")
    parser.add_argument("--frames", type=int, default=300, help="frames per video (default 300)")
    parser.add_argument("--hidden-size", type=int,
                        help="override the leaves' hidden size (default: the preset's 2048)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of every variant on a fresh model, order alternating (default 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default cuda when present, else cpu)")
    parser.add_argument("--threads", type=int,
                        help="CPU intra-op threads (default: torch's). On shared cores 1 avoids "
                             "threaded kernels stalling while a core is busy elsewhere")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic batch")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE,
                        help="results file (default benchmarks/results/bench_train.md)")
    args = parser.parse_args(argv)
    if min(args.batch, args.frames, args.steps, args.classes, args.repeats) < 1 or args.warmup < 0:
        parser.error("--batch, --frames, --steps, --classes and --repeats must be positive")
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows = []
    for name in args.models.split(","):
        rows.extend(bench_model(name.strip(), args, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    section = render_section(rows, args, device)
    print(section)
    write_section(args.out, section, HEADER)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
