"""The export verbs of ``modloc``: ``export`` (checkpoint → artifacts) and ``build`` (→ TensorRT).

:func:`add_commands` is called by :mod:`modloc.cli` at startup, so this module imports
neither torch nor TensorRT: each handler imports what it runs. Each verb wraps one
library call:

- ``export`` → :func:`modloc.export.exporter.export_checkpoint`;
- ``build`` → :func:`modloc.export.trt.build_plan`, once per artifact directory.
"""

from __future__ import annotations

import argparse
import sys

from modloc.cli.common import print_json
from modloc.engine.runtime.artifacts import GRAPHS, PRECISIONS


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
            "<= 1e-4 over several batch/frame shapes) or the export fails; fp16, bf16 and INT8 "
            "variants are measured against fp32 by segment MAP@K on --validation and fail "
            "beyond --map-tolerance."
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
    parser.add_argument("--k", type=int, default=100_000, help="segments per class of MAP@K")
    parser.add_argument("--map-tolerance", type=float, default=0.005,
                        help="largest |MAP@K - fp32's| of a variant (default 0.005)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads for the checks")
    parser.add_argument("--json", action="store_true", help="print the artifacts as JSON")
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from modloc.export.exporter import ExportSettings, export_checkpoint

    settings = ExportSettings(
        graphs=tuple(args.graph) if args.graph else None, leaf=args.leaf,
        precisions=tuple(args.precision), opset=args.opset, split_streams=args.split_streams,
        validation=args.validation, calibration=args.calibration,
        calibration_batches=args.calibration_batches,
        calibration_batch_size=args.calibration_batch_size, k=args.k,
        map_tolerance=args.map_tolerance, threads=args.threads)
    artifacts = export_checkpoint(args.checkpoint, args.out, settings)
    if args.json:
        print_json({"checkpoint": args.checkpoint, "artifacts": artifacts})
        return 0
    for item in artifacts:
        measured = "" if item["map"] is None else f"  MAP@K {item['map']:.4f}"
        if item["map_difference"] is not None:
            measured += f" ({item['map_difference']:+.4f} vs fp32)"
        print(f"{item['path']}: {item['kind']} {item['graph']} {item['precision']}, parity "
              f"{item['parity_max_rel_error']:.2e}{measured}")
    return 0


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
