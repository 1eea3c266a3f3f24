"""The ``modloc`` command: one entry point, one subcommand per verb.

Every verb is a thin wrapper over a library function of the same name (``synth`` →
:func:`modloc.engine.base.synth.generate`, ``inspect`` → :func:`modloc.engine.base.inspection.inspect`, ``eval`` →
:func:`modloc.engine.base.scoring.evaluate`, ``infer`` → :func:`modloc.engine.runtime.infer.infer`, ``demo`` →
:func:`modloc.demo.run_demo`, ``serve`` → :func:`modloc.engine.service.app.serve`, ``client`` →
:class:`modloc.engine.service.client.LocalizationClient`). On failure a
verb prints one line, ``modloc VERB: error: …``, and exits non-zero; with
``MODLOC_TRACEBACK=1`` in the environment the traceback is shown instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import fields

from tqdm import tqdm

from modloc._version import __version__

log = logging.getLogger("modloc")

Handler = Callable[[argparse.Namespace], int | None]


def _print_json(payload: dict) -> None:
    json.dump(payload, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


# --- synth ----------------------------------------------------------------------------


def _add_synth(subparsers) -> None:
    from modloc.engine.base.synth import PRESETS, SynthConfig

    parser = subparsers.add_parser(
        "synth",
        help="generate a synthetic YouTube-8M-format dataset with a known answer",
        description=(
            "Write train/validate/test frame-level TFRecords (and test_truth/ with the segment "
            "ratings of the test split) under --out, plus synth.json. The model behind the data "
            "and the rating policy are documented in engine/synth.py. Presets: "
            + ", ".join(f"{name} ({cfg.train_videos}/{cfg.validate_videos}/{cfg.test_videos} videos)"
                        for name, cfg in PRESETS.items())
            + "; any field can be overridden. A split written into an existing --out replaces "
            "that split's earlier shard files (other files are left alone)."
        ),
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="processes writing shards in parallel (the bytes do not depend on it)")
    parser.add_argument("--splits", default="train,validate,test",
                        help="comma-separated splits to write (default: all three)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    for item in fields(SynthConfig):
        parser.add_argument(f"--{item.name.replace('_', '-')}", dest=item.name, type=type(item.default),
                            default=None, help=f"(preset value if omitted; demo: {item.default})")
    parser.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from modloc.engine.base.synth import SPLITS, SynthConfig, config_from, generate

    overrides = {item.name: getattr(args, item.name) for item in fields(SynthConfig)}
    config = config_from(args.preset, **overrides)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}: expected some of {SPLITS}")
    total = sum(config.videos(split) for split in splits)
    with tqdm(total=total, unit="video", desc="synth", disable=None, file=sys.stderr) as bar:
        result = generate(config, args.out, workers=args.workers, splits=splits,
                          progress=lambda shard: bar.update(shard.videos))
    if args.json:
        _print_json(result.to_json())
    else:
        for split, totals in result.splits.items():
            print(f"{split:9s} {totals['videos']:7d} videos {totals['frames']:9d} frames "
                  f"{totals['rated_segments']:6d} rated segments ({totals['positive_segments']} positive) "
                  f"in {totals['shards']} shard(s)")
        print(f"wrote {args.out}/synth.json")
    return 0


# --- inspect --------------------------------------------------------------------------


def _add_inspect(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="summarize YouTube-8M TFRecord files",
        description=(
            "Count records, videos, frames, labels and segment ratings in frame-level "
            "(SequenceExample) or video-level (Example) TFRecord files, verifying every CRC. "
            "Corrupt records are counted and described (use --strict to stop at the first)."
        ),
    )
    parser.add_argument("paths", nargs="+", help="files or glob patterns (quote globs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--strict", action="store_true", help="fail on the first corrupt record")
    parser.add_argument("--decoder", default="native", choices=["native", "protobuf"])
    parser.set_defaults(handler=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from modloc.engine.base.inspection import inspect
    from modloc.engine.base.io.tfrecord import expand_paths

    paths = expand_paths(args.paths)
    total = sum(os.path.getsize(p) for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="inspect", disable=None,
              file=sys.stderr) as bar:
        report = inspect(paths, skip_corrupt=not args.strict, decoder=args.decoder,
                         on_file=lambda path: bar.update(os.path.getsize(path)))
    if args.json:
        _print_json(report.to_json())
        return 0
    rows = [(key, value) for key, value in report.to_json().items() if key != "errors"]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for error in report.errors:
        print(f"corrupt: {error}")
    return 0


# --- eval -----------------------------------------------------------------------------


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a submission CSV (segment MAP@K) or a video-level prediction file",
        description=(
            "Score a Kaggle submission CSV (Class,Segments) against segment ratings read from "
            "TFRecord files (validate records or test_truth), with the Kaggle MAP@K; or a "
            "video-level prediction file (VideoId,LabelConfidencePairs) against video labels, "
            "with GAP@20, Hit@1, PERR and per-class MAP."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--submission", help="Kaggle submission CSV")
    source.add_argument("--predictions", help="video-level prediction CSV")
    parser.add_argument("--labels", required=True, nargs="+",
                        help="TFRecord files or globs holding the labels / segment ratings")
    parser.add_argument("--k", type=int, default=100_000,
                        help="segments per class that count (MAP@K; default 100000)")
    parser.add_argument("--top-k", type=int, default=20, help="GAP@top-k for video predictions")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from modloc.engine.base.scoring import evaluate

    result = evaluate(submission=args.submission, predictions=args.predictions, labels=args.labels,
                      k=args.k, top_k=args.top_k)
    if args.json:
        _print_json(result)
    else:
        for key, value in result.items():
            if not isinstance(value, (dict, list)):
                print(f"{key}: {value}")
    return 0


# --- infer ----------------------------------------------------------------------------


def _add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    """Artifacts, backend, batching and fusion options shared by infer and show."""
    from modloc.engine.runtime.localizer import DEFAULT_VARIANT
    from modloc.engine.runtime.pipeline import PipelineConfig

    defaults = PipelineConfig()
    parser.add_argument("artifacts", help="modloc export's output directory (video/<variant>, "
                        "segment/<variant>)")
    parser.add_argument("--video", help=f"video-level variant or artifact directory "
                        f"(default {DEFAULT_VARIANT})")
    parser.add_argument("--segment", help=f"segment-level variant or artifact directory "
                        f"(default {DEFAULT_VARIANT})")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch", "tensorrt"),
                        help="runtime for both models (default onnxruntime)")
    parser.add_argument("--device", help="torch: cpu (default), cuda or cuda:N; onnxruntime: cuda "
                        "(the CUDA execution provider, needs onnxruntime-gpu)")
    parser.add_argument("--compile", action="store_true",
                        help="torch backend: run the models through torch.compile")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="torch backend on CUDA: replay CUDA graphs (one per batch shape)")
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


def _pipeline_settings(args: argparse.Namespace) -> tuple:
    """``(PipelineConfig, backend options)`` from :func:`_add_pipeline_options`' flags."""
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
    device = rank_device(args.device) if args.device else None
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
    _add_pipeline_options(parser)
    parser.add_argument("--data", required=True, nargs="+", help="frame-level TFRecord files or globs")
    parser.add_argument("--out", required=True, help="the submission CSV to write")
    parser.add_argument("--truth", nargs="+", help="TFRecords with the segment ratings (e.g. test_truth/)")
    parser.add_argument("--fallback", action="store_true",
                        help="fill classes with fewer than k segments from video scores "
                        "(REFERENCE section 7 step 5)")
    parser.add_argument("--expansion-cut", action="store_true",
                        help="rank a class's windows only within the first k windows of its "
                        "videos ranked by video score, as the reference submission did "
                        "(REFERENCE section 7 step 3); reads the data twice")
    parser.add_argument("--report", help="also write the report as JSON to this file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_run_infer)


def _run_infer(args: argparse.Namespace) -> int:
    from modloc.engine.runtime.infer import infer

    config, backend_options = _pipeline_settings(args)
    report = infer(args.artifacts, args.data, args.out, truth=args.truth, video=args.video,
                   segment=args.segment, backend=args.backend, config=config,
                   fallback=args.fallback, backend_options=backend_options,
                   expansion_cut=args.expansion_cut)
    if report is None:  # a torchrun rank other than 0
        return 0
    if args.report:
        with open(args.report, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.json:
        _print_json(report)
        return 0
    print(f"wrote {report['submission']}: {report['videos']} videos, {report['windows']} windows "
          f"in {report['seconds']:.1f} s ({report['videos_per_second']:,.0f} videos/s, "
          f"{report['segments_per_second']:,.0f} segments/s) on {report['ranks']} rank(s)")
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
    _add_pipeline_options(parser)
    parser.add_argument("--data", required=True, nargs="+", help="frame-level TFRecords holding the video")
    parser.add_argument("--truth", nargs="+", help="TFRecords with segment ratings (e.g. test_truth/)")
    parser.add_argument("--out", help="the PNG to write (default <VIDEO>.png)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=_run_show)


def _run_show(args: argparse.Namespace) -> int:
    from modloc.engine.runtime.timeline import show

    config, backend_options = _pipeline_settings(args)
    summary = show(args.video_id, args.artifacts, args.data, args.out or f"{args.video_id}.png",
                   truth=args.truth, video=args.video, segment=args.segment, backend=args.backend,
                   config=config, backend_options=backend_options)
    if args.json:
        _print_json(summary)
        return 0
    print(f"wrote {summary['png']}: {summary['frames']} frames, {len(summary['candidates'])} "
          f"candidates, {summary['ratings']} ratings marked")
    return 0


# --- demo -----------------------------------------------------------------------------


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole product end to end on built-in synthetic data",
        description=(
            "Every stage of the product on a synthetic dataset: generate it (synth) and read it "
            "back (inspect); pre-train a small MOD tree on its video labels (train) and "
            "fine-tune it on its rated segments (finetune); score the fused system, the dummy, "
            "random and perfect submissions with the Kaggle MAP@K; export both checkpoints to "
            "ONNX (fp32, INT8) and check ONNX Runtime against PyTorch; localize the test split "
            "offline (infer, plus a timeline PNG); serve the artifacts over gRPC and fetch the "
            "submission from the service (serve, client). Writes everything under --out and a "
            "machine-readable summary, one key per stage, to --out/report.json (engine/demo.py "
            "documents the stages and where the demo departs from the paper's recipes)."
        ),
    )
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--preset", default="demo", help="synthetic dataset preset")
    parser.add_argument("--workers", type=int, default=2, help="processes for data generation")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from modloc.demo import run_demo

    report = run_demo(args.out, preset=args.preset, workers=args.workers)
    print(f"wrote {os.path.join(args.out, 'report.json')}")
    for name, system in report.get("systems", {}).items():
        print(f"  {name:10s} segment MAP@{system['k']}: {system['map']:.4f} "
              f"(ceiling {system['ceiling']:.4f})")
    for precision, scores in report.get("export", {}).get("onnxruntime", {}).items():
        print(f"  mod through ONNX Runtime {precision}: {scores['fused']:.4f}")
    if "infer" in report:
        infer = report["infer"]
        print(f"  modloc infer: {infer['map']:.4f} ({infer['videos_per_second']:,.0f} videos/s) -> "
              f"{infer['submission']}; timeline of {infer['timeline']['video']} -> {infer['timeline']['png']}")
    if "serve" in report:
        served = report["serve"]
        print(f"  modloc serve: {served['map']:.4f} ({served['ingest_videos_per_second']:,.0f} videos/s "
              f"ingested over gRPC) -> {served['submission']}")
    return 0


# --- serve / client -------------------------------------------------------------------


def _add_serve(subparsers) -> None:
    from modloc.engine.runtime.batcher import BatcherConfig
    from modloc.engine.service.config import ServerConfig

    defaults = ServerConfig.__dataclass_fields__
    parser = subparsers.add_parser(
        "serve",
        help="serve the modloc.v1 gRPC API (plus KServe v2, health, reflection)",
        description=(
            "Load exported artifacts and serve Localize/Ingest streams, per-class rankings "
            "(TopSegments, Submission), Stats and ModelInfo over gRPC. Prints 'listening on "
            "HOST:PORT' once serving (port 0 picks a free port). SIGTERM/SIGINT drain: health "
            "turns NOT_SERVING, open streams get --grace seconds, a final snapshot is written."
        ),
    )
    _add_pipeline_options(parser)
    parser.add_argument("--address", default=defaults["address"].default,
                        help="host:port to bind (default %(default)s)")
    parser.add_argument("--state-dir", help="directory of the durable rankings (without it the "
                        "server serves Localize only)")
    parser.add_argument("--processes", type=int, default=1,
                        help="processes sharing the port via SO_REUSEPORT (Localize only; "
                        "refused with --state-dir)")
    parser.add_argument("--snapshot-seconds", type=float, default=defaults["snapshot_seconds"].default)
    parser.add_argument("--snapshot-videos", type=int, default=defaults["snapshot_videos"].default)
    for name in ("max_message_bytes", "max_frames", "max_streams", "max_inflight_videos",
                 "max_id_bytes", "max_top_k"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=defaults[name].default,
                            help="(default %(default)s)")
    parser.add_argument("--batch-wait", type=float, default=BatcherConfig().max_wait,
                        help="seconds the oldest queued video waits for company (default %(default)s)")
    parser.add_argument("--max-queued-videos", type=int, default=BatcherConfig().max_queued_videos)
    parser.add_argument("--grace", type=float, default=defaults["grace_seconds"].default,
                        help="seconds a drain waits for open streams (default %(default)s)")
    parser.add_argument("--token-file", help="bearer tokens, one a line")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="allow listening beyond loopback without tokens")
    parser.add_argument("--tls-cert", help="server certificate (PEM)")
    parser.add_argument("--tls-key", help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from modloc.engine.runtime.batcher import BatcherConfig
    from modloc.engine.service.app import serve
    from modloc.engine.service.config import ServerConfig

    pipeline, backend_options = _pipeline_settings(args)
    batcher = BatcherConfig(max_batch_videos=args.video_batch, max_wait=args.batch_wait,
                            max_queued_videos=args.max_queued_videos)
    config = ServerConfig(
        artifacts=args.artifacts, video=args.video, segment=args.segment, backend=args.backend,
        backend_options=backend_options, pipeline=pipeline, batcher=batcher,
        address=args.address, state_dir=args.state_dir, snapshot_seconds=args.snapshot_seconds,
        snapshot_videos=args.snapshot_videos, max_message_bytes=args.max_message_bytes,
        max_frames=args.max_frames, max_streams=args.max_streams,
        max_inflight_videos=args.max_inflight_videos, max_id_bytes=args.max_id_bytes,
        max_top_k=args.max_top_k, grace_seconds=args.grace, processes=args.processes,
        token_file=args.token_file, insecure_no_auth=args.insecure_no_auth,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        metrics_port=args.metrics_port)
    # the server's events (one key=value line each) go to stderr whatever -v says
    logging.getLogger("modloc.server").setLevel(logging.INFO)
    return serve(config, on_ready=lambda address: print(f"listening on {address}", flush=True))


def _add_client(subparsers) -> None:
    parser = subparsers.add_parser(
        "client",
        help="talk to a modloc server: localize, ingest, top, submission, stats",
        description="Send TFRecord videos to a running 'modloc serve', or read its rankings.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("address", help="host:port of the server")
    common.add_argument("--token-file", help="file whose first token is sent as the bearer token")
    common.add_argument("--tls-ca", help="CA certificate of the server (PEM); enables TLS")
    common.add_argument("--timeout", type=float, help="seconds per call")
    common.add_argument("--max-message-bytes", type=int, help="the server's message limit")
    localize = actions.add_parser("localize", parents=[common], help="localize videos; JSON lines out")
    localize.add_argument("--data", required=True, nargs="+", help="frame-level TFRecords")
    localize.add_argument("--threshold", type=float, default=0.0)
    localize.add_argument("--max-segments", type=int, default=0)
    localize.add_argument("--window", type=positive_int, default=32,
                          help="unanswered videos at most (keep under the server's "
                               "--max-inflight-videos)")
    ingest = actions.add_parser("ingest", parents=[common], help="ingest videos into the rankings")
    ingest.add_argument("--data", required=True, nargs="+", help="frame-level TFRecords")
    ingest.add_argument("--window", type=positive_int, default=32, help="unacknowledged videos at most")
    ingest.add_argument("--reconnect-timeout", type=float, default=60.0,
                        help="seconds each retry waits for the server to come back before "
                             "giving up (default 60)")
    top = actions.add_parser("top", parents=[common], help="one class's ranking")
    top.add_argument("class_id", type=int)
    top.add_argument("--k", type=int, default=10)
    top.add_argument("--offset", type=int, default=0)
    submission = actions.add_parser("submission", parents=[common], help="download the Kaggle CSV")
    submission.add_argument("--out", required=True)
    actions.add_parser("stats", parents=[common], help="the server's counters")
    parser.set_defaults(handler=_run_client)


def _run_client(args: argparse.Namespace) -> int:
    import grpc

    try:
        return _client_action(args)
    except grpc.RpcError as error:
        raise RuntimeError(_rpc_failure(error, args)) from error


def _rpc_failure(error, args: argparse.Namespace) -> str:
    """A failed call in one line: the status code's name and what the server said."""
    import grpc

    code, details = error.code(), error.details()
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"UNAVAILABLE: the server at {args.address} could not be reached ({details})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and args.timeout is not None:
        return (f"DEADLINE_EXCEEDED: the server at {args.address} did not answer within "
                f"--timeout {args.timeout:g} s")
    return f"{code.name}: {details}"


def _client_action(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from modloc.engine.service.client import LocalizationClient
    from modloc.engine.service.config import DEFAULT_MAX_MESSAGE_BYTES

    token = None
    if args.token_file:
        from modloc.engine.service.security import load_tokens

        token = load_tokens(args.token_file)[0]
    with LocalizationClient(args.address, token=token, tls_ca=args.tls_ca, timeout=args.timeout,
                            max_message_bytes=args.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES) as client:
        if args.action == "localize":
            for response in client.localize(args.data, args.threshold, args.max_segments,
                                            window=args.window):
                print(json.dumps(MessageToDict(response, always_print_fields_with_no_presence=True)))
        elif args.action == "ingest":
            acks = client.ingest(args.data, window=args.window, progress=None,
                                 reconnect_timeout=args.reconnect_timeout)
            duplicates = sum(ack.status == ack.DUPLICATE for ack in acks)
            print(f"ingested {len(acks) - duplicates} videos ({duplicates} duplicates)")
        elif args.action == "top":
            for entry in client.top_segments(args.class_id, args.k, args.offset):
                print(f"{entry.rank}\t{entry.video_id}:{entry.start_seconds}\t{entry.score:.6g}")
        elif args.action == "submission":
            data = client.submission(args.out)
            print(f"wrote {args.out} ({len(data)} bytes)")
        else:
            # every counter, zeros included: a script reading one must find it
            _print_json(MessageToDict(client.stats(), always_print_fields_with_no_presence=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modloc",
        description="Temporal concept localization on YouTube-8M features (the MOD system).",
        epilog="On failure a verb prints one line (modloc VERB: error: ...) and exits 1; set "
               "MODLOC_TRACEBACK=1 in the environment to see the traceback instead.",
    )
    parser.add_argument("--version", action="version", version=f"modloc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_synth, _add_inspect, _add_eval, _add_infer, _add_show, _add_demo,
                _add_serve, _add_client):
        add(subparsers)
    # the training and export verbs import no torch until they run (modloc.cli.training,
    # modloc.cli.export), so a serving install without torch still parses every verb
    from modloc.cli import export, training

    training.add_commands(subparsers)
    export.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"modloc {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as error:
        # Bad input (CorruptRecordError and RecordFormatError are ValueErrors), a file or
        # network problem, a device or server failure, a missing optional package: one line
        # for the user; the traceback with MODLOC_TRACEBACK=1 (raised) or -vv (logged).
        if os.environ.get("MODLOC_TRACEBACK", "") not in ("", "0"):
            raise
        log.debug("failure", exc_info=True)
        print(f"modloc {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
