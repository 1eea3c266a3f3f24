"""The export verbs of ``modloc``: ``export`` (checkpoint → artifacts) and ``build`` (→ TensorRT).

:func:`add_commands` is called by :mod:`modloc.cli` at startup, so this module imports
neither torch nor TensorRT: each handler imports what it runs. Each verb wraps one
library call:

- ``export`` → :func:`modloc.export.exporter.export_checkpoint`;
- ``build`` → :func:`modloc.export.trt.build_plan`, once per artifact directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from modloc.cli.common import print_json
from modloc.engine.runtime.artifacts import GRAPHS, PRECISIONS
from modloc.export.gate import WEIGHT_LAYERS, GateThresholds


def add_commands(subparsers) -> None:
    """Register ``export`` and ``build`` on ``modloc``'s subparsers."""
    _add_export(subparsers)
    _add_build(subparsers)




def _leaf(text: str) -> int | str:
    return text if text == "best" else int(text)


# --- export ---------------------------------------------------------------------------


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX artifact directories (distill leaf, ensemble; precisions)",
        description=(
            "Export a checkpoint as self-describing artifact directories OUT/<graph>-<precision> "
            "(model.onnx, manifest.json, README). Graphs: 'distill' (one NeXtVLAD leaf of a MOD "
            "tree), 'ensemble' (the whole tree), 'single' (a plain NeXtVLAD checkpoint). The "
            "graphs take uint8 frames and a frame mask, with dequantization, RGB un-whitening "
            "and BatchNorm folded in. The fp32 graph must match PyTorch (max relative error "
            "<= 1e-4 over several batch/frame shapes) or the export fails. fp16, bf16 and INT8 "
            "variants pass a quality gate against fp32 on --validation (what each model serves: "
            "5-frame windows, videos): mean and 99th-percentile absolute probability error, "
            "overlap of the top-20 classes, rank correlation of the scores per class, and "
            "segment MAP@K with every class a candidate (export/gate.py documents the "
            "thresholds; --gate and --map-tolerance change them). The manifest records each "
            "measure as quality_gate; a variant that fails is not published, the others are, "
            "and the command names the failed measures and a remedy, exiting 1."
        ),
    )
    parser.add_argument("checkpoint", help="checkpoint directory (model.safetensors + config.json)")
    parser.add_argument("--out", required=True, help="directory receiving the artifact directories")
    parser.add_argument("--graph", nargs="+", choices=GRAPHS,
                        help="graphs to export (default: distill and ensemble for a tree, single "
                             "otherwise)")
    parser.add_argument("--leaf", type=_leaf, default="best",
                        help="distill leaf index, or 'best' (best validation MAP@K; default)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"],
                        help="precisions to export (fp32 is always made; default fp32)")
    parser.add_argument("--opset", type=int, choices=[17, 18], default=18,
                        help="ONNX opset: 18 (default), or 17 for TensorRT 8.6")
    parser.add_argument("--split-streams", action="store_true",
                        help="take rgb (1024) and audio (128) as two uint8 inputs, not features")
    parser.add_argument("--validation", nargs="+",
                        help="rated frame-level TFRecords (validate split): leaf choice and "
                             "precision measurements")
    parser.add_argument("--calibration", nargs="+",
                        help="TFRecords calibrating INT8 (default: --validation)")
    parser.add_argument("--calibration-batches", type=int, default=8,
                        help="calibration batches (default 8)")
    parser.add_argument("--calibration-batch-size", type=int, default=16,
                        help="examples per calibration batch (default 16)")
    parser.add_argument("--int8-float-layers", nargs="+", default=[], choices=WEIGHT_LAYERS,
                        metavar="LAYER", help="weight layers INT8 keeps in float besides the "
                        f"classifiers: {', '.join(WEIGHT_LAYERS)}")
    parser.add_argument("--k", type=int, default=100_000, help="segments per class of MAP@K")
    parser.add_argument("--map-tolerance", type=float, default=GateThresholds.map_drop,
                        help="how far a variant's MAP@K may fall below fp32's (default %(default)s)")
    parser.add_argument("--gate", action="append", default=[], metavar="MEASURE=BOUND",
                        help="another bound for a measure of the quality gate (repeatable): "
                        + ", ".join(f"{item.name} (default {item.default})"
                                    for item in dataclasses.fields(GateThresholds)
                                    if item.name != "map_drop"))
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads for the checks")
    parser.add_argument("--json", action="store_true", help="print the artifacts as JSON")
    parser.set_defaults(handler=_run_export)


def _gate(args: argparse.Namespace):
    """The quality gate's thresholds from --map-tolerance and the --gate bounds."""
    bounds = {"map_drop": args.map_tolerance}
    known = [item.name for item in dataclasses.fields(GateThresholds) if item.name != "map_drop"]
    for text in args.gate:
        name, _, value = text.partition("=")
        if name not in known:
            raise ValueError(f"--gate {text}: no measure {name!r}; the measures: {', '.join(known)}")
        try:
            bounds[name] = float(value)
        except ValueError:
            raise ValueError(f"--gate {text}: expected MEASURE=NUMBER") from None
    return GateThresholds(**bounds)


def _run_export(args: argparse.Namespace) -> int:
    from modloc.export.exporter import ExportSettings, export_checkpoint

    settings = ExportSettings(
        graphs=tuple(args.graph) if args.graph else None, leaf=args.leaf,
        precisions=tuple(args.precision), opset=args.opset, split_streams=args.split_streams,
        validation=args.validation, calibration=args.calibration,
        calibration_batches=args.calibration_batches,
        calibration_batch_size=args.calibration_batch_size,
        int8_float_layers=tuple(args.int8_float_layers), k=args.k, gate=_gate(args),
        threads=args.threads)
    artifacts = export_checkpoint(args.checkpoint, args.out, settings)
    if args.json:
        print_json({"checkpoint": args.checkpoint, "artifacts": artifacts})
    else:
        for item in artifacts:
            measured = "" if item["map"] is None else f"  MAP@K {item['map']:.4f} (every class a candidate)"
            if item["map_difference"] is not None:
                measured += f" ({item['map_difference']:+.4f} vs fp32)"
            gate = item["quality_gate"]
            if gate is not None:
                measured += "; quality gate " + ("passed" if gate["passed"] else "FAILED") + ": " + ", ".join(
                    f"{m['metric']} {m['value']:.4g}" for m in gate["measures"])
            where = item["path"] if item["published"] else f"{item['path']} (not published)"
            print(f"{where}: {item['kind']} {item['graph']} {item['precision']}, parity max abs "
                  f"error {item['parity_max_abs_error']:.2e}{measured}")
    failures = [item["failure"] for item in artifacts if not item["published"]]
    for failure in failures:  # the others are published; the command still fails
        print(f"modloc export: error: {failure}", file=sys.stderr)
    return 1 if failures else 0


# --- build ----------------------------------------------------------------------------


def _add_build(subparsers) -> None:
    parser = subparsers.add_parser(
        "build",
        help="build TensorRT engines (model.plan) for artifact directories",
        description=(
            "Build model.plan from an artifact's model.onnx with TensorRT and record it in the "
            "manifest (TensorRT version, GPU name and compute capability, profiles, ONNX "
            "sha256). TensorRT >= 10 builds a strongly typed network (the precision is the "
            "graph's); TensorRT 8.6 (Pascal GPUs) uses builder flags. Needs TensorRT and an "
            "NVIDIA GPU (pip install 'modloc[trt]')."
        ),
    )
    parser.add_argument("artifacts", nargs="+", help="artifact directories")
    parser.add_argument("--batch", help="batch range MIN,OPT,MAX (default: 1,256,1024 for "
                                        "segment models, 1,32,128 for video models)")
    parser.add_argument("--frames", help="frame range MIN,OPT,MAX (default: 5 for segment "
                                         "models, 1,300,300 for video models)")
    parser.add_argument("--workspace-mib", type=int, default=4096, help="builder workspace limit")
    parser.add_argument("--timing-cache", help="timing cache file to read and update (default: "
                                               "beside the artifacts, per TensorRT and GPU)")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")
    parser.add_argument("--json", action="store_true", help="print the plan records as JSON")
    parser.set_defaults(handler=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from modloc.export.trt import BuildSettings, ShapeRange, build_plan

    settings = BuildSettings(
        batch=ShapeRange.parse(args.batch) if args.batch else None,
        frames=ShapeRange.parse(args.frames) if args.frames else None,
        workspace_mib=args.workspace_mib,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None, device=args.device)
    plans = {}
    for directory in args.artifacts:
        try:
            plans[directory] = build_plan(directory, settings).plan
        except ImportError as error:  # no TensorRT here: one line, as for any other failure
            print(f"modloc build: error: {error}", file=sys.stderr)
            return 1
        if not args.json:
            plan = plans[directory]
            print(f"{directory}/model.plan: TensorRT {plan['tensorrt_version']} on "
                  f"{plan['device']['name']} (sm {plan['device']['compute_capability']}), "
                  f"{plan['build_seconds']} s")
    if args.json:
        print_json(plans)
    return 0


__all__ = ["add_commands"]
