"""What batch-invariant scoring costs, and whether it holds: a video's fused scores against
the videos that share its batch.

The pipeline never runs a model on a one-row batch: ONNX Runtime's CPU matrix product takes
a matrix-vector path for one row whose sums round differently, so a video scored alone
(a quiet server's batches) differed by ~1 ulp from the same video scored in company
(``modloc infer``'s), enough to swap adjacent ties in a Submission. A one-row batch is now
scored as two copies of the row (:meth:`modloc.engine.runtime.pipeline.Pipeline._checked`).

Rows, per model size (the rule's only change is to calls with a one-row batch):

* ``invariance``: the largest difference of any fused score between the videos localized
  in one batch and the same videos in other batchings (each alone; random partitions of
  1 to 16 videos; reversed), with the two-row rule and without it (``single_row``);
* ``cost``: the process CPU seconds per video (this process: the pipeline and ONNX
  Runtime's threads) localizing one video per call (every call has a one-row video batch:
  the rule's whole cost) and 16 videos per call (untouched by the rule: a control for the
  noise), with and without the rule. Calls alternate between the two pipelines, the same
  video back to back in alternating order, so that other load on a shared machine hits
  both alike; the cost is the median over the pairs of CPU with ÷ without, minus one. CPU
  time rather than wall time: on a loaded 2-core machine the wall time of a call measures
  the neighbours more than the call.

Models: one NeXtVLAD with random weights at the tiny size of ``tests/tiny.py`` and at the
paper's (8G 128K X2 2048H r=16), exported as distill fp32 graphs with ``modloc export``'s
code (bench_pipeline's ``export_models``), on ONNX Runtime; synthetic videos of 60-300
frames.

    python benchmarks/bench_batch_invariance.py             # ~6 min on 2 cores
    python benchmarks/bench_batch_invariance.py --sizes tiny --pairs 32
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from _common import RESULTS, provenance, write_section
from bench_pipeline import export_models

from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.synth import config_from, generate
from modloc.engine.runtime.backends import open_backend
from modloc.engine.runtime.pipeline import Pipeline, PipelineConfig, ScoringModel

RESULTS_FILE = RESULTS / "bench_batch_invariance.md"
HEADER = """# Batch invariance: a video's fused scores against its batch companions

One section per machine. `max |Δ fused|` is the largest difference of a fused score between
one batch of every video and other batchings (each video alone, random partitions of 1-16,
reversed order); `two-row rule` scores a one-row batch as two copies of the row (what the
pipeline does), `single row` does not. CPU ms/video is the process's CPU per video, one
video per call (the rule's whole cost) and 16 per call (a control: the rule changes nothing
there, so its "cost" is the measurement's noise); `cost` = median over alternating pairs
of calls of CPU with ÷ without, minus one.
"""
SIZES = {"paper": dict(cluster_size=128, groups=8, expansion=2, hidden=2048, gating_reduction=16),
         "tiny": dict(cluster_size=4, groups=2, expansion=2, hidden=16, gating_reduction=4)}


class SingleRowPipeline(Pipeline):
    """The pipeline without the two-row rule: what it did before (the baseline)."""

    @staticmethod
    def _checked(model, features, num_frames):
        return np.asarray(model.score(features, num_frames))


def fused_by_video(pipeline: Pipeline, videos, groups) -> dict[str, np.ndarray]:
    scores = {}
    for group in groups:
        for result in pipeline.localize([videos[i] for i in group]):
            scores[result.video_id] = result.fused
    return scores


def largest_difference(pipeline: Pipeline, videos, seed: int) -> float:
    """Max |Δ| of any fused score between one batch and the other batchings."""
    everything = fused_by_video(pipeline, videos, [list(range(len(videos)))])
    rng = np.random.default_rng(seed)
    batchings = [[[i] for i in range(len(videos))], [list(range(len(videos)))[::-1]]]
    for _ in range(3):
        order, cuts = rng.permutation(len(videos)).tolist(), []
        while order:
            size = int(rng.integers(1, 17))
            cuts.append(order[:size])
            order = order[size:]
        batchings.append(cuts)
    worst = 0.0
    for groups in batchings:
        other = fused_by_video(pipeline, videos, groups)
        for video_id, fused in everything.items():
            if fused.size:
                worst = max(worst, float(np.nanmax(np.abs(fused - other[video_id]))))
    return worst


def paired_cost(pipelines: dict[str, Pipeline], videos, per_call: int, pairs: int) -> dict:
    """CPU seconds per video of each pipeline over ``pairs`` alternating pairs of calls,
    and the median ratio rule ÷ single row of the pairs."""
    seconds = {name: [] for name in pipelines}
    for pair in range(pairs):
        begin = (pair * per_call) % len(videos)
        chunk = videos[begin:begin + per_call]
        order = list(pipelines) if pair % 2 else list(pipelines)[::-1]
        for name in order:
            start = time.process_time()
            pipelines[name].localize(chunk)
            seconds[name].append((time.process_time() - start) / len(chunk))
    ratios = [rule / single for rule, single in zip(seconds["rule"], seconds["single"], strict=True)
              if single > 0]
    return {"rule_ms": 1e3 * statistics.median(seconds["rule"]),
            "single_ms": 1e3 * statistics.median(seconds["single"]),
            "cost": statistics.median(ratios) - 1}


def measure(root: Path, videos, args) -> dict:
    video_backend = open_backend(root / "video" / "distill-fp32", "onnxruntime")
    segment_backend = open_backend(root / "segment" / "distill-fp32", "onnxruntime")
    models = (ScoringModel.from_backend(video_backend), ScoringModel.from_backend(segment_backend))
    config = PipelineConfig(video_batch_size=32)
    pipelines = {"rule": Pipeline(*models, config), "single": SingleRowPipeline(*models, config)}
    row = {name: largest_difference(pipeline, videos, args.seed) for name, pipeline in pipelines.items()}
    for pipeline in pipelines.values():  # warm-up: first-call allocations
        pipeline.localize(videos[:16])
        pipeline.localize(videos[:1])
    row["costs"] = {per_call: paired_cost(pipelines, videos, per_call, args.pairs // per_call * 4 or 8)
                    for per_call in (1, 16)}
    video_backend.close()
    segment_backend.close()
    return row


def render(rows: dict[str, dict]) -> str:
    lines = ["| model | max \\|Δ fused\\| two-row rule | max \\|Δ fused\\| single row | CPU ms/video, 1 "
             "per call: rule / single row | cost | CPU ms/video, 16 per call: rule / single row | "
             "cost (control) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for size, row in rows.items():
        cells = []
        for per_call in (1, 16):
            cost = row["costs"][per_call]
            cells += [f"{cost['rule_ms']:.2f} / {cost['single_ms']:.2f}", f"{cost['cost']:+.1%}"]
        lines.append(f"| {size} | {row['rule']:.3g} | {row['single']:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "paper"], choices=list(SIZES))
    parser.add_argument("--videos", type=int, default=32, help="synthetic videos (60-300 frames)")
    parser.add_argument("--pairs", type=int, default=64,
                        help="pairs of one-video calls timed (16-video calls: a quarter as many)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="export threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_FILE)
    args = parser.parse_args(argv)
    args.branching = (1,)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-invariance-") as scratch_dir:
        scratch = Path(scratch_dir)
        generate(config_from("tiny", validate_videos=16, test_videos=args.videos, min_frames=60,
                             max_frames=300, seed=args.seed), scratch / "data", splits=("validate", "test"))
        videos = list(read_videos(str(scratch / "data" / "test" / "*.tfrecord")))
        for size in args.sizes:
            for name, value in SIZES[size].items():
                setattr(args, name, value)
            torch.manual_seed(args.seed)
            print(f"exporting the {size} models ...", flush=True)
            (scratch / size).mkdir()
            (scratch / size / "data").symlink_to(scratch / "data")  # export validates on it
            root = export_models(scratch / size, args, ("fp32",))
            rows[size] = measure(root, videos, args)
            print(f"  {size}: {rows[size]}", flush=True)
    frames = sum(len(video.features) for video in videos) / len(videos)
    section = (
        f"## CPU: {platform.machine()}, {os.cpu_count()} cores\n\n{provenance()}\n"
        f"- Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, numpy "
        f"{np.__version__}; load average {os.getloadavg()[0]:.2f} at the end (a shared machine)\n"
        f"- {len(videos)} synthetic videos, {frames:.0f} frames on average; one NeXtVLAD per "
        f"size with random weights, distill fp32 on ONNX Runtime; {args.pairs} pairs of one-video "
        f"calls, {args.pairs // 4} of 16-video calls, medians\n\n{render(rows)}\n")
    print(section)
    write_section(args.out, section, HEADER)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
