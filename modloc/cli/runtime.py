"""The runtime verbs of ``modloc``: ``infer`` (offline localization into a submission) and
``show`` (one video's timeline), over exported artifacts.
"""

from __future__ import annotations

import argparse
import json

from modloc.cli.common import print_json


def add_commands(subparsers) -> None:
    """Register these verbs on ``modloc``'s subparsers."""
    _add_infer(subparsers)
    _add_show(subparsers)


def add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    """Artifacts, backend, batching and fusion options shared by infer and show."""
    from modloc.engine.runtime.backends import BACKENDS
    from modloc.engine.runtime.localizer import DEFAULT_VARIANT
    from modloc.engine.runtime.pipeline import PipelineConfig

    defaults = PipelineConfig()
    parser.add_argument("artifacts", help="modloc export's output directory (video/<variant>, "
                        "segment/<variant>)")
    parser.add_argument("--video", help=f"video-level variant or artifact directory "
                        f"(default {DEFAULT_VARIANT})")
    parser.add_argument("--segment", help=f"segment-level variant or artifact directory "
                        f"(default {DEFAULT_VARIANT})")
    parser.add_argument("--backend", default="onnxruntime", choices=tuple(BACKENDS),
                        help="runtime for both models (default onnxruntime)")
    parser.add_argument("--device", help="torch: cpu (default), cuda or cuda:N; onnxruntime: cuda "
                        "(the CUDA execution provider, needs onnxruntime-gpu)")
    parser.add_argument("--compile", action="store_true",
                        help="torch backend: run the models through torch.compile")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="torch backend on CUDA: replay CUDA graphs (one per batch shape)")
    parser.add_argument("--rebuild-plans", action="store_true",
                        help="tensorrt backend: rebuild a plan built for another GPU or TensorRT "
                        "version from the artifact's model.onnx before serving it (as modloc build "
                        "would; needs the export extra), instead of refusing it")
    parser.add_argument("--top-n", type=int, default=defaults.fusion.top_n,
                        help="candidate classes per video (default %(default)s)")
    parser.add_argument("--video-exponent", type=float, default=defaults.fusion.video_exponent,
                        help="a in P_vid^a * P_seg^b (default %(default)s)")
    parser.add_argument("--segment-exponent", type=float, default=defaults.fusion.segment_exponent,
                        help="b in P_vid^a * P_seg^b (default %(default)s)")
    parser.add_argument("--include-partial", action="store_true",
                        help="also rank each video's zero-padded last partial window (the "
                        "reference does not)")
    parser.add_argument("--k", type=int, default=defaults.fusion.k,
                        help="segments kept per class (default %(default)s)")
    parser.add_argument("--video-batch", type=int, default=defaults.video_batch_size,
                        help="videos per video-model call (default %(default)s)")
    parser.add_argument("--window-batch", type=int, default=defaults.window_batch_size,
                        help="5-frame windows per segment-model call (default %(default)s)")


def pipeline_settings(args: argparse.Namespace) -> tuple:
    """``(PipelineConfig, backend options)`` from :func:`add_pipeline_options`' flags."""
    from modloc.engine.runtime.distributed import rank_device
    from modloc.engine.runtime.fusion import FusionConfig
    from modloc.engine.runtime.pipeline import PipelineConfig

    fusion = FusionConfig(top_n=args.top_n, video_exponent=args.video_exponent,
                          segment_exponent=args.segment_exponent,
                          include_partial=args.include_partial, k=args.k)
    config = PipelineConfig(fusion=fusion, video_batch_size=args.video_batch,
                            window_batch_size=args.window_batch)
    if (args.compile or args.cuda_graphs) and args.backend != "torch":
        raise ValueError("--compile and --cuda-graphs are options of the torch backend")
    if args.rebuild_plans and args.backend != "tensorrt":
        raise ValueError("--rebuild-plans is an option of the tensorrt backend")
    device = rank_device(args.device) if args.device else None
    if args.rebuild_plans:
        if device:
            raise ValueError(f"--device {args.device} is not an option of the tensorrt backend "
                             "(it picks its device itself)")
        from modloc.export.trt import rebuild_plan

        return config, {"rebuild": rebuild_plan}
    if args.backend == "torch":
        options = {"compile": args.compile, "cuda_graphs": args.cuda_graphs}
        return config, ({"device": device, **options} if device else options)
    if not device:
        return config, {}
    if args.backend == "onnxruntime" and device.split(":")[0] == "cuda":
        # ONNX Runtime picks a CUDA device through its provider (needs onnxruntime-gpu)
        index = int(device.partition(":")[2] or 0)
        return config, {"providers": (("CUDAExecutionProvider", {"device_id": index}),
                                      "CPUExecutionProvider")}
    raise ValueError(f"--device {args.device} is not an option of the {args.backend} backend "
                     "(torch: cpu, cuda, cuda:N; onnxruntime: cuda; tensorrt picks its device itself)")


def _add_infer(subparsers) -> None:
    parser = subparsers.add_parser(
        "infer",
        help="localize TFRecord videos offline with exported artifacts; write a submission",
        description=(
            "Stream frame-level TFRecords through the engine (video-level candidates, every "
            "5-frame window scored, P_vid^a * P_seg^b fusion, per-class top-K) and write the "
            "Kaggle submission CSV. Reports segment MAP@K when ratings exist (--truth, or the "
            "ratings the records carry). Under torchrun the files are sharded across ranks and "
            "rank 0 merges the rankings exactly: the CSV equals the single-process one."
        ),
    )
    add_pipeline_options(parser)
    parser.add_argument("--data", required=True, nargs="+", help="frame-level TFRecord files or globs")
    parser.add_argument("--out", required=True, help="the submission CSV to write")
    parser.add_argument("--truth", nargs="+", help="TFRecords with the segment ratings (e.g. test_truth/)")
    parser.add_argument("--fallback", action="store_true",
                        help="fill classes with fewer than k segments from video scores "
                        "(docs/REFERENCE.md §7, step 5)")
    parser.add_argument("--expansion-cut", action="store_true",
                        help="rank a class's windows only within the first k windows of its "
                        "videos ranked by video score, as the reference submission did "
                        "(docs/REFERENCE.md §7, step 3); reads the data twice")
    parser.add_argument("--video-predictions", metavar="FILE",
                        help="also write the video-level predictions (VideoId,LabelConfidencePairs: "
                             "each video's --top-n candidate classes with their video scores, the "
                             "starter code's format), which modloc eval --predictions scores")
    parser.add_argument("--allow-low-overlap", action="store_true",
                        help="score --truth files that rate fewer than half of the videos, with a "
                             "warning instead of an error")
    parser.add_argument("--report", help="also write the report as JSON to this file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_run_infer)


def _run_infer(args: argparse.Namespace) -> int:
    from modloc.engine.runtime.infer import infer

    config, backend_options = pipeline_settings(args)
    report = infer(args.artifacts, args.data, args.out, truth=args.truth, video=args.video,
                   segment=args.segment, backend=args.backend, config=config,
                   fallback=args.fallback, backend_options=backend_options,
                   expansion_cut=args.expansion_cut, video_predictions=args.video_predictions,
                   allow_low_overlap=args.allow_low_overlap)
    if report is None:  # a torchrun rank other than 0
        return 0
    if args.report:
        with open(args.report, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.json:
        print_json(report)
        return 0
    print(f"wrote {report['submission']}: {report['videos']} videos, {report['windows']} windows "
          f"in {report['seconds']:.1f} s ({report['videos_per_second']:,.0f} videos/s, "
          f"{report['segments_per_second']:,.0f} segments/s) on {report['ranks']} rank(s)")
    if "video_predictions" in report:
        print(f"wrote {report['video_predictions']}: the video-level predictions")
    if "map" in report:
        print(f"segment MAP@{report['k']}: {report['map']:.4f} over {report['classes']} classes "
              f"(ceiling {report['ceiling']:.4f}: the ranked segments in the best order)")
    return 0


def _add_show(subparsers) -> None:
    parser = subparsers.add_parser(
        "show",
        help="draw one video's localization as a PNG timeline",
        description=(
            "Localize one video with exported artifacts and draw its candidate classes x "
            "5-second segments, coloured by fused score, with known ratings marked (from "
            "--truth, or those the record carries)."
        ),
    )
    parser.add_argument("video_id", metavar="VIDEO", help="the video's id")
    add_pipeline_options(parser)
    parser.add_argument("--data", required=True, nargs="+", help="frame-level TFRecords holding the video")
    parser.add_argument("--truth", nargs="+", help="TFRecords with segment ratings (e.g. test_truth/)")
    parser.add_argument("--out", help="the PNG to write (default <VIDEO>.png)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=_run_show)


def _run_show(args: argparse.Namespace) -> int:
    from modloc.engine.runtime.timeline import show

    config, backend_options = pipeline_settings(args)
    summary = show(args.video_id, args.artifacts, args.data, args.out or f"{args.video_id}.png",
                   truth=args.truth, video=args.video, segment=args.segment, backend=args.backend,
                   config=config, backend_options=backend_options)
    if args.json:
        print_json(summary)
        return 0
    print(f"wrote {summary['png']}: {summary['frames']} frames, {len(summary['candidates'])} "
          f"candidates, {summary['ratings']} ratings marked")
    return 0
