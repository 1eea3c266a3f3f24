"""``modloc demo``: the whole job on built-in synthetic data (:func:`modloc.demo.run_demo`).
"""

from __future__ import annotations

import argparse
import os


def add_commands(subparsers) -> None:
    """Register these verbs on ``modloc``'s subparsers."""
    _add_demo(subparsers)


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
            "machine-readable summary, one key per stage, to --out/report.json (modloc/demo/__init__.py "
            "documents the stages, training/small_scale.py where the demo departs from the paper's "
            "recipes). Each stage says on stderr when it starts and ends."
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
    for variant, gate in report.get("export", {}).get("quality_gates", {}).items():
        shown = ", ".join(f"{metric} {value:.4g}" for metric, (_, value, _, _) in gate.items())
        verdict = "passed" if all(passed for *_, passed in gate.values()) else "FAILED"
        print(f"  quality gate {variant}: {verdict} ({shown})")
    if "infer" in report:
        infer = report["infer"]
        print(f"  modloc infer: {infer['map']:.4f} ({infer['videos_per_second']:,.0f} videos/s) -> "
              f"{infer['submission']}; timeline of {infer['timeline']['video']} -> {infer['timeline']['png']}")
    if "serve" in report:
        served = report["serve"]
        print(f"  modloc serve: {served['map']:.4f} ({served['ingest_videos_per_second']:,.0f} videos/s "
              f"ingested over gRPC) -> {served['submission']}")
    if "live" in report:
        live = report["live"]
        print(f"  LocalizeLive: {live['video']} ({live['frames']} frames at {live['speed']:g}x): "
              f"{live['window_events']} window events, latency p50 {live['latency_ms']['p50']:.0f} ms "
              f"p99 {live['latency_ms']['p99']:.0f} ms; final answer = Localize's "
              f"(max relative difference {live['max_relative_difference']:.1e})")
    return 0
