"""Throughput of the whole localization pipeline per backend and batch size.

The engine as ``modloc infer`` and the service run it (:class:`modloc.engine.runtime.localizer.Localizer`):
video-level scores → top-20 candidates → every 5-frame window scored → ``P_vid^a · P_seg^b``
→ per-class top-K (K = 100,000, the native accumulator), over synthetic videos already
decoded in memory (reading is ``bench_io.py``'s question). Rows:

* ``segment model alone``: the backend's ``run`` over the same packed windows in batches of
  the same size, the baseline: the pipeline's segments/s divided by it is the share of the
  device's rate that survives the rest of the pipeline (video model, packing, fusion,
  ranking);
* ``pipeline``: videos/s and segments/s end to end, and where the time goes.

Models: one NeXtVLAD at the paper's size (8G 128K X2 2048H r=16) with random weights,
exported as the distill graph (fp32) with ``modloc export``'s code; the video model has
3862 classes, the segment model 1000. On a CUDA machine a GPU section times the torch
backend on the device (bf16 graph, optionally torch.compile) on 300-frame videos. Goals
(issue 5): on one H200 ≥ 3.0M segments/s for segment scoring and ≥ 30K videos/s for the
whole pipeline at 300 frames.

    python benchmarks/bench_pipeline.py                        # ~6 min on 2 cores
    python benchmarks/bench_pipeline.py --backends onnxruntime --window-batches 1024
    python benchmarks/bench_pipeline.py --backends --compile   # a GPU machine: the GPU section only
    python benchmarks/bench_pipeline.py --video-padding        # ~10 min: the section below only

``--video-padding`` times the video model alone (stage 1, :meth:`Pipeline.candidates`) on
batches padded to 300 frames, as ensemble video graphs were served before their gates
stopped depending on padding (issue 19), against batches padded to their longest video
(rounded up to 30 frames), as they are now; the scores are the same either way (tested in
test_export.py). Two models: the demo's MOD ensemble on the demo's test split through ONNX
Runtime (``--demo``, after ``make demo``), and the paper-size ensemble (4 x 3 NeXtVLADs,
8G 128K X2 2048H r=16, 3862 classes, random weights) in PyTorch eager on synthetic videos
of 60-300 frames (its ~1B-parameter ONNX export does not fit this machine's time budget).
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
from bench_backends import add_model_arguments, random_checkpoint

from modloc.engine.base.io.examples import Video
from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.progress import Progress
from modloc.engine.base.synth import config_from, generate
from modloc.engine.base.windows import pack_segment_windows
from modloc.engine.runtime.backends import open_backend
from modloc.engine.runtime.fusion import FusionConfig
from modloc.engine.runtime.localizer import Localizer
from modloc.engine.runtime.pipeline import Pipeline, PipelineConfig, ScoringModel
from modloc.engine.runtime.rankings import Rankings
from modloc.export.exporter import ExportSettings, export_checkpoint
from modloc.export.gate import GateThresholds

RESULTS_FILE = RESULTS / "bench_pipeline.md"
HEADER = """# The localization pipeline: videos/s and segments/s per backend and batch size

One section per machine. `segment model alone` is the backend's `run` over the packed
5-frame windows in batches of the given size (the baseline); `pipeline` is the whole engine
(video model, candidates, window packing, segment model, fusion, per-class top-K with
K = 100,000) on the same videos. `share of model rate` = pipeline segments/s ÷ segment
model alone. `time in segment model` is the pipeline's own stage accounting.
"""


def export_models(scratch: Path, args, precisions: tuple[str, ...]) -> Path:
    """Random paper-size video (3862 classes) and segment (1000) models, exported."""
    root = scratch / "artifacts"
    settings = ExportSettings(graphs=("distill",), leaf=0, precisions=precisions,
                              validation=str(scratch / "data" / "validate" / "*.tfrecord"),
                              gate=GateThresholds.measure_only(), threads=args.threads)
    for kind in ("video", "segment"):
        checkpoint = random_checkpoint(scratch / "checkpoints", kind, args)
        export_checkpoint(checkpoint, root / kind, settings)
    return root


def median_pass(run, repeats: int) -> float:
    run()  # warm-up: first-call allocations, kernel selection, compilation
    seconds = []
    with Progress(run.__name__, repeats, "pass") as bar:
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
            bar.update()
    return statistics.median(seconds)


def bench_backend(root: Path, videos, backend: str, window_batches, args, options: dict,
                  variant: str = "distill-fp32") -> list[dict]:
    video_backend = open_backend(root / "video" / variant, backend, **options)
    segment_backend = open_backend(root / "segment" / variant, backend, **options)
    packed = pack_segment_windows(videos)
    rows = []
    for window_batch in window_batches:
        def model_alone(size=window_batch):
            for begin in range(0, len(packed), size):
                segment_backend.run(packed.features[begin:begin + size],
                                    num_frames=packed.num_frames[begin:begin + size])

        config = PipelineConfig(fusion=FusionConfig(), video_batch_size=args.video_batch,
                                window_batch_size=window_batch)
        pipeline = Pipeline(ScoringModel.from_backend(video_backend),
                            ScoringModel.from_backend(segment_backend), config)

        def whole_pipeline(pipeline=pipeline):
            # fresh rankings per pass
            localizer = Localizer(pipeline, Rankings(segment_backend.class_ids, pipeline.config.fusion.k))
            for begin in range(0, len(videos), args.chunk):
                localizer.localize(videos[begin:begin + args.chunk])

        alone = median_pass(model_alone, args.repeats)
        before = dict(pipeline.times.seconds)
        whole = median_pass(whole_pipeline, args.repeats)
        spent = {stage: pipeline.times.seconds[stage] - before[stage] for stage in before}
        label = f"{backend} {variant}" + (f" on {options['device']}" if "device" in options else "") \
            + (" compiled" if options.get("compile") else "")
        rows.append({"backend": label,
                     "window_batch": window_batch, "videos": len(videos), "windows": len(packed),
                     "alone_segments_per_s": len(packed) / alone,
                     "videos_per_s": len(videos) / whole, "segments_per_s": len(packed) / whole,
                     "segment_model_share": spent["segment_model"] / max(sum(spent.values()), 1e-12)})
        print(f"  {rows[-1]['backend']} batch {window_batch}: model alone "
              f"{rows[-1]['alone_segments_per_s']:,.0f} seg/s, pipeline {rows[-1]['videos_per_s']:,.1f} "
              f"videos/s, {rows[-1]['segments_per_s']:,.0f} seg/s", flush=True)
    video_backend.close()
    segment_backend.close()
    return rows


def render_table(rows: list[dict]) -> str:
    lines = ["| backend | window batch | segment model alone (seg/s) | pipeline videos/s | "
             "pipeline seg/s | share of model rate | time in segment model |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['backend']} | {row['window_batch']} | {row['alone_segments_per_s']:,.0f} | "
                     f"{row['videos_per_s']:,.1f} | {row['segments_per_s']:,.0f} | "
                     f"{row['segments_per_s'] / row['alone_segments_per_s']:.0%} | "
                     f"{row['segment_model_share']:.0%} |")
    return "\n".join(lines)


def video_model_seconds(model: ScoringModel, videos: list[Video], batch: int,
                        repeats: int) -> tuple[float, float]:
    """Median seconds per video-model call over ``repeats`` passes, and the mean frames a
    batch was padded to."""
    frames: list[int] = []

    def recorded(features, num_frames):
        frames.append(features.shape[1])
        return model.score(features, num_frames)

    timed = ScoringModel(recorded, model.class_ids, model.fixed_frames, model.name)
    pipeline = Pipeline(timed, ScoringModel(model.score, model.class_ids), PipelineConfig(
        video_batch_size=batch))
    pipeline.candidates(videos)  # warm-up
    per_batch = []
    for _ in range(repeats):
        seconds, batches = pipeline.times.seconds["video_model"], pipeline.times.video_batches
        pipeline.candidates(videos)
        per_batch.append((pipeline.times.seconds["video_model"] - seconds)
                         / (pipeline.times.video_batches - batches))
    return statistics.median(per_batch), float(np.mean(frames))


def padding_rows(name: str, model: ScoringModel, videos: list[Video], batch: int,
                 repeats: int) -> dict:
    """Padded to 300 frames (before) and to the longest video (after), one row."""
    assert model.fixed_frames is None, f"{name} still asks for fixed frames"
    before, before_frames = video_model_seconds(
        ScoringModel(model.score, model.class_ids, 300, model.name), videos, batch, repeats)
    after, after_frames = video_model_seconds(model, videos, batch, repeats)
    row = {"model": name, "videos": len(videos), "batch": batch, "before": before, "after": after,
           "before_frames": before_frames, "after_frames": after_frames}
    print(f"  {name}: {before:.3f} s per batch at {before_frames:.0f} frames -> {after:.3f} s at "
          f"{after_frames:.0f} frames ({before / after:.2f}x)", flush=True)
    return row


def paper_ensemble_scorer(seed: int) -> ScoringModel:
    """The paper's MOD (4 x 3 NeXtVLADs, r=16, 3862 classes), random weights and BatchNorm
    statistics, in PyTorch eager."""
    from modloc.training.models import MODTree, MODTreeConfig, NeXtVLADConfig

    torch.manual_seed(seed)
    tree = MODTree(MODTreeConfig((4, 3), NeXtVLADConfig(gating_reduction=16))).eval()
    generator = torch.Generator().manual_seed(seed)
    for module in tree.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_(0.0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)

    def score(features: np.ndarray, num_frames: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.sigmoid(tree(torch.from_numpy(features), torch.from_numpy(num_frames)).root).numpy()
    return ScoringModel(score, tuple(range(3862)), name="paper MOD 4x3")


def video_padding_section(args, videos: list[Video]) -> str:
    rows = []
    demo = Path(args.demo)
    artifact = demo / "export" / "video" / "ensemble-fp32"
    if artifact.is_dir():
        print(f"timing the demo's video ensemble ({artifact}) ...", flush=True)
        backend = open_backend(artifact, "onnxruntime", threads=args.threads,
                               session_config={"session.intra_op.allow_spinning": "0"})
        demo_videos = list(read_videos(str(demo / "data" / "test" / "*.tfrecord")))
        rows.append(padding_rows("demo MOD 2x2 ensemble-fp32, ONNX Runtime, demo test split",
                                 ScoringModel.from_backend(backend), demo_videos, args.video_batch,
                                 args.repeats))
        backend.close()
    else:
        print(f"no demo artifacts at {artifact}: run make demo first for the demo's row", flush=True)
    print("building the paper-size ensemble ...", flush=True)
    rows.append(padding_rows("paper MOD 4x3 (3862 classes), PyTorch eager, synthetic",
                             paper_ensemble_scorer(args.seed), videos[: args.paper_videos],
                             args.paper_batch, args.repeats))
    lines = ["| model | videos | videos per batch | frames per batch before -> after (mean) | "
             "s per batch before (300) | s per batch after (longest) | speedup |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['videos']} | {row['batch']} | "
                     f"{row['before_frames']:.0f} -> {row['after_frames']:.0f} | {row['before']:.3f} | "
                     f"{row['after']:.3f} | {row['before'] / row['after']:.2f}x |")
    return (f"## Video model: batches padded to 300 frames (before) vs to their longest video (after)\n\n"
            f"{provenance()}\n- Python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}; {args.threads} threads\n"
            f"- a 2-core CPU machine shared with other work; median of {args.repeats} passes "
            f"(one warm-up); the video model alone (stage 1), same scores either way\n\n"
            + "\n".join(lines) + "\n")


def gpu_video_set(videos: list[Video], count: int, frames: int = 300) -> list[Video]:
    """``count`` distinct videos of exactly ``frames`` frames (the goal's setting): the
    synthetic videos (60-300 frames) in turn, each repeated along time to ``frames``, under
    ids of their own so that every one is ranked."""
    return [Video(f"{video.id}-{index}", np.resize(video.features, (frames, video.features.shape[1])))
            for index, video in ((index, videos[index % len(videos)]) for index in range(count))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="*", default=["onnxruntime", "torch"],
                        choices=["onnxruntime", "torch"],
                        help="CPU backends timed (none: only the GPU section)")
    parser.add_argument("--window-batches", nargs="+", type=int, default=[256, 1024, 4096],
                        help="windows per segment-model call")
    parser.add_argument("--video-batch", type=int, default=32, help="videos per video-model call")
    parser.add_argument("--chunk", type=int, default=256, help="videos per engine call")
    parser.add_argument("--videos", type=int, default=48, help="synthetic videos (60-300 frames)")
    parser.add_argument("--gpu-videos", type=int, default=2048, help="300-frame videos on the GPU")
    parser.add_argument("--gpu-window-batch", type=int, default=16384)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on the GPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median kept)")
    parser.add_argument("--video-padding", action="store_true",
                        help="only time the video model padded to 300 frames vs to the longest")
    parser.add_argument("--demo", default="runs/demo", help="the demo's output (--video-padding)")
    parser.add_argument("--paper-videos", type=int, default=32,
                        help="videos for the paper-size ensemble (--video-padding)")
    parser.add_argument("--paper-batch", type=int, default=16,
                        help="videos per batch for the paper-size ensemble (--video-padding)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    add_model_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_FILE)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if not args.backends and not cuda:
        parser.error("nothing to time: no CPU backend given and no CUDA device here")

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as scratch_dir:
        scratch = Path(scratch_dir)
        generate(config_from("tiny", validate_videos=16, test_videos=args.videos, min_frames=60,
                             max_frames=300, seed=args.seed), scratch / "data", splits=("validate", "test"))
        if args.video_padding:
            section = video_padding_section(
                args, list(read_videos(str(scratch / "data" / "test" / "*.tfrecord"))))
            print(section)
            write_section(args.out, section, HEADER)
            print(f"wrote {args.out}")
            return 0
        print("building and exporting the models ...", flush=True)
        root = export_models(scratch, args, ("fp32", "bf16") if cuda else ("fp32",))
        videos = list(read_videos(str(scratch / "data" / "test" / "*.tfrecord")))
        rows, sections = [], []
        for backend in args.backends:
            # torch's threads are process-wide (set above); ONNX Runtime's idle threads must
            # not spin while the rest of the pipeline runs on the same cores
            options = {} if backend == "torch" else {
                "threads": args.threads, "session_config": {"session.intra_op.allow_spinning": "0"}}
            rows += bench_backend(root, videos, backend, args.window_batches, args, options)
        if rows:
            sections.append(
                f"## CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n\n"
                f"{provenance()}\n- Python {platform.python_version()}, torch {torch.__version__}, "
                f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}\n"
                f"- {len(videos)} synthetic videos of 60-300 frames; {args.video_batch} videos per "
                f"video-model call, {args.chunk} per engine call; median of {args.repeats} passes\n\n"
                f"{render_table(rows)}\n")
        if cuda:
            gpu_videos = gpu_video_set(videos, args.gpu_videos)
            gpu_rows = []
            for compile_ in ([False, True] if args.compile else [False]):
                gpu_rows += bench_backend(root, gpu_videos, "torch", [args.gpu_window_batch], args,
                                          {"device": "cuda", "compile": compile_}, variant="distill-bf16")
            sections.append(f"## GPU: {torch.cuda.get_device_name()}\n\n{provenance()}\n"
                            f"- {len(gpu_videos)} videos of 300 frames; torch backend, bf16 graph\n\n"
                            f"{render_table(gpu_rows)}\n")
    for text in sections:
        print(text)
        write_section(args.out, text, HEADER)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
