"""The data verbs of ``modloc``: ``synth``, ``inspect`` and ``eval`` (the base layer's
formats, synthetic data and metrics; no model).
"""

from __future__ import annotations

import argparse
import os

from modloc.cli.common import add_field_options, field_values, positive_int, print_json


def add_commands(subparsers) -> None:
    """Register these verbs on ``modloc``'s subparsers."""
    _add_synth(subparsers)
    _add_inspect(subparsers)
    _add_eval(subparsers)


def _add_synth(subparsers) -> None:
    from modloc.engine.base.synth import PRESETS, SynthConfig

    parser = subparsers.add_parser(
        "synth",
        help="generate a synthetic YouTube-8M-format dataset with a known answer",
        description=(
            "Write train/validate/test frame-level TFRecords (and test_truth/ with the segment "
            "ratings of the test split) under --out, plus synth.json. The model behind the data "
            "and the rating policy are documented in engine/base/synth.py. Presets: "
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
    add_field_options(parser, SynthConfig, defaults=False)
    parser.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from modloc.engine.base.synth import SPLITS, SynthConfig, config_from, generate

    config = config_from(args.preset, **field_values(args, SynthConfig))
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}: expected some of {SPLITS}")
    total = sum(config.videos(split) for split in splits)
    from modloc.engine.base.progress import Progress

    with Progress("synth", total, "video") as bar:
        result = generate(config, args.out, workers=args.workers, splits=splits,
                          progress=lambda shard: bar.update(shard.videos))
    if args.json:
        print_json(result.to_json())
    else:
        for split, totals in result.splits.items():
            print(f"{split:9s} {totals['videos']:7d} videos {totals['frames']:9d} frames "
                  f"{totals['rated_segments']:6d} rated segments ({totals['positive_segments']} positive) "
                  f"in {totals['shards']} shard(s)")
        print(f"wrote {args.out}/synth.json")
    return 0

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
    from modloc.engine.base.progress import Progress

    paths = expand_paths(args.paths)
    total = sum(os.path.getsize(p) for p in paths)
    with Progress("inspect", total, "B", unit_scale=True) as bar:
        report = inspect(paths, skip_corrupt=not args.strict, decoder=args.decoder,
                         on_file=lambda path: bar.update(os.path.getsize(path)))
    if args.json:
        print_json(report.to_json())
        return 0
    rows = [(key, value) for key, value in report.to_json().items() if key != "errors"]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for error in report.errors:
        print(f"corrupt: {error}")
    return 0

def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a submission CSV (segment MAP@K) or a video-level prediction file",
        description=(
            "Score a Kaggle submission CSV (Class,Segments) against segment ratings read from "
            "TFRecord files (validate records or test_truth), with the Kaggle MAP@K over the "
            "class space of those ratings (the classes with a positive rating; rows of other "
            "classes are counted and left out; --kaggle-rows requires the 1,000 rows of a real "
            "Kaggle submission); or a video-level prediction file (VideoId,LabelConfidencePairs, "
            "as modloc infer --video-predictions writes it) against video labels, with GAP@20, "
            "Hit@1, PERR and per-class MAP. Labels that share fewer than half of their videos "
            "with the file are refused (another split's labels score a meaningless number)."
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
    parser.add_argument("--kaggle-rows", action="store_true",
                        help="require a Kaggle submission's rows: exactly one per class of "
                             "segment_label_ids.csv (the 1,000 segment classes)")
    parser.add_argument("--allow-low-overlap", action="store_true",
                        help="score labels that share fewer than half of their videos with the "
                             "file, with a warning instead of an error")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from modloc.engine.base.scoring import evaluate

    result = evaluate(submission=args.submission, predictions=args.predictions, labels=args.labels,
                      k=args.k, top_k=args.top_k, kaggle_rows=args.kaggle_rows,
                      allow_low_overlap=args.allow_low_overlap)
    if args.json:
        print_json(result)
    else:
        for key, value in result.items():
            if not isinstance(value, (dict, list)):
                print(f"{key}: {value}")
    return 0
