"""The training verbs of ``modloc``: ``models``, ``train``, ``finetune`` and ``evaluate``.

:func:`add_commands` is called by :mod:`modloc.cli` at startup, so this module imports no
torch: each handler imports what it runs. Every verb wraps one library function:

- ``models`` → :func:`modloc.training.models.list_models` (built on the meta device: no memory);
- ``train`` / ``finetune`` → :func:`modloc.training.trainer.train` with the ``pretrain`` /
  ``finetune`` recipe of :mod:`modloc.training.config`, a config file and the flags on top;
- ``evaluate`` → :func:`modloc.training.evaluate.evaluate`: checkpoints, scored on videos and on
  test segments. (``modloc eval`` scores prediction *files*; this verb scores checkpoints.)
"""

from __future__ import annotations

import argparse
import os

from modloc.cli.common import positive_int, print_json
from modloc.training.config import (
    OPTIONS,
    Option,
    option_help,
    parse_assignment,
    parse_option_value,
)

_TRAIN_VERBS = {
    "train": ("pretrain", "pre-train a model on video-level labels (the paper's recipe, docs/REFERENCE.md)"),
    "finetune": ("finetune", "fine-tune a pre-trained checkpoint on rated segments (--from CKPT; the paper's recipe, docs/REFERENCE.md)"),
}


def add_commands(subparsers) -> None:
    """Register the training verbs on ``modloc``'s subparsers."""
    _add_models(subparsers)
    for verb, (recipe, summary) in _TRAIN_VERBS.items():
        _add_train(subparsers, verb, recipe, summary)
    _add_evaluate(subparsers)




# --- models ---------------------------------------------------------------------------


def _add_models(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the model presets with their parameter counts",
        description="List every model preset (the paper's rows) with its trainable parameter "
                    "count (BN γ/β included, running statistics not). The paper's counts match "
                    "1000-way classifiers: --classes 1000.",
    )
    parser.add_argument("--classes", type=positive_int, default=3862,
                        help="classifier width the counts assume (default 3862)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from modloc.training.models import list_models

    models = list_models(num_classes=args.classes)
    if args.json:
        print_json({"num_classes": args.classes, "models": [
            {"name": m.name, "description": m.description, "parameters": m.num_params}
            for m in models]})
        return 0
    width = max(len(m.name) for m in models)
    print(f"{'model':<{width}}  {'params':>8}  description ({args.classes} classes)")
    for m in models:
        print(f"{m.name:<{width}}  {m.num_params / 1e6:7.1f}M  {m.description}")
    return 0


# --- train / finetune -----------------------------------------------------------------


def _add_train(subparsers, verb: str, recipe: str, summary: str) -> None:
    parser = subparsers.add_parser(
        verb,
        help=summary,
        description=(
            f"{summary}. Settings start from the {recipe!r} recipe, then --config, then the "
            "flags; --print-config shows the result. The run directory (--out) receives "
            "checkpoints (step-XXXXXXXX/: model.safetensors, config.json, state.safetensors), "
            "history.jsonl, loss_curves.png and TensorBoard events (tensorboard/). --resume "
            "continues exactly from the newest checkpoint. Model parallelism for a MOD tree: "
            "--devices cuda:0,cuda:1 places its towers on several devices of one process; "
            f"`torchrun --nproc-per-node N -m modloc {verb} ...` (or `torchrun "
            f"--nproc-per-node N --no-python modloc {verb} ...`) gives each of N ranks a block of "
            "towers (NCCL on GPUs, gloo on CPUs): every rank reads the same batches, only tower "
            "logits and the root gate's gradients are exchanged, rank 0 writes the outputs."
        ),
    )
    parser.add_argument("--config", help="JSON or TOML file of settings (the layout of --print-config)")
    for option in OPTIONS:
        if recipe in option.phases:
            _add_option(parser, option, recipe)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any setting by its dotted path, VALUE in JSON "
                             "(e.g. --set data.shuffle_buffer=400)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings as JSON and exit")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=_run_train, recipe=recipe)


def _add_option(parser: argparse.ArgumentParser, option: Option, recipe: str) -> None:
    # unset flags stay out of the namespace: only given flags override the recipe and file
    common = {"dest": option.path, "default": argparse.SUPPRESS, "help": option_help(option, recipe)}
    metavar = option.flag.lstrip("-").upper().replace("-", "_")
    if option.kind == "bool":
        parser.add_argument(option.flag, action=argparse.BooleanOptionalAction, **common)
    elif option.kind == "assign":
        parser.add_argument(option.flag, action="append", metavar="KEY=VALUE", **common)
    elif option.kind in ("floats", "strs"):
        parser.add_argument(option.flag, nargs="+", type=float if option.kind == "floats" else str,
                            metavar=metavar, **common)
    elif option.kind in ("int?", "float?"):
        parser.add_argument(option.flag, type=_number_or_none(option.kind),
                            metavar="N|none" if option.kind == "int?" else "X|none", **common)
    else:
        parser.add_argument(option.flag, type={"int": int, "float": float}.get(option.kind, str),
                            choices=option.choices, metavar=None if option.choices else metavar,
                            **common)


def _number_or_none(kind: str):
    """The argparse type of an ``int?`` or ``float?`` option: a number, or ``none`` for null."""
    number = int if kind == "int?" else float

    def parse(text: str) -> int | float | None:
        return None if text.lower() == "none" else number(text)

    parse.__name__ = f"{number.__name__}-or-none"  # argparse's "invalid int-or-none value"
    return parse


def _run_train(args: argparse.Namespace) -> int:
    from modloc.training.config import load_config
    from modloc.training.trainer import train

    overrides: dict = {}
    for option in OPTIONS:
        if option.path in vars(args):
            overrides.update(parse_option_value(option, getattr(args, option.path)))
    overrides.update(parse_assignment(item) for item in args.set)
    config = load_config(args.recipe, args.config, overrides)
    if config.model is not None:  # a wrong preset or override field fails here, before any work
        from modloc.training.models.registry import model_config

        model_config(config.model.name, **config.model.overrides)
    if args.print_config:
        print_json(config.to_dict())
        return 0
    result = train(config)
    if os.environ.get("RANK", "0") != "0":  # a torchrun rank: rank 0 reports
        return 0
    if args.json:
        print_json(result.to_json())
    else:
        if result.losses:
            print(f"{result.phase}: {result.steps} steps ({result.steps - result.start_step} in "
                  f"this run, {result.seconds:.1f} s), final loss {result.final_loss}")
        else:  # a resume that found the run already at its max_steps or epochs
            print(f"{result.phase}: nothing left to train: the run is already at step "
                  f"{result.steps} (raise --max-steps or --epochs to continue it)")
        for evaluation in result.evaluations[-1:]:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items()
                              if isinstance(v, float))
            print(f"evaluation at step {evaluation['step']}: {shown}")
        print(f"checkpoint: {result.checkpoint}")
    return 0


# --- evaluate -------------------------------------------------------------------------


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate checkpoints: video metrics, segment MAP@K of the fused system and dummy",
        description=(
            "Evaluate a checkpoint. With --labels: GAP@20, Hit@1, PERR and MAP on labelled "
            "videos. With --test and --truth: the inference pipeline (top-N video candidates, "
            "5-frame windows through the segment model, P_vid^a * P_seg^b fusion, full windows "
            "only) scored with the Kaggle segment MAP@K, next to the dummy prediction (every "
            "full segment gets its video's score). `modloc eval` scores prediction files; "
            "this verb scores checkpoints."
        ),
    )
    parser.add_argument("--checkpoint", required=True,
                        help="video-level checkpoint (a step-XXXXXXXX directory)")
    parser.add_argument("--segment-checkpoint",
                        help="segment-level checkpoint scoring the windows (default: --checkpoint)")
    parser.add_argument("--labels", nargs="+", help="labelled videos (TFRecord files or globs)")
    parser.add_argument("--test", nargs="+", help="test split frames (TFRecord files or globs)")
    parser.add_argument("--truth", nargs="+", help="segment ratings of the test split")
    parser.add_argument("--classes", default="segment",
                        help="classes to rank: segment (the 1000) | all | FILE (.json, synth.json, "
                             ".csv) | comma-separated ids (default: segment)")
    parser.add_argument("--k", type=int, default=100_000, help="segments per class (MAP@K)")
    parser.add_argument("--top-n", type=int, default=20, help="candidate classes per video")
    parser.add_argument("--video-exponent", type=float, default=0.05, help="a in P_vid^a * P_seg^b")
    parser.add_argument("--segment-exponent", type=float, default=0.95, help="b in P_vid^a * P_seg^b")
    parser.add_argument("--include-partial", action="store_true",
                        help="also rank each video's zero-padded last partial window")
    parser.add_argument("--batch-size", type=int, default=32, help="videos per batch")
    parser.add_argument("--window-batch-size", type=int, default=1024, help="windows per batch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--submissions", help="directory to write fused.csv and dummy.csv")
    parser.add_argument("--allow-low-overlap", action="store_true",
                        help="score truth files that rate fewer than half of the test videos "
                             "(another split's, say) with a warning instead of an error")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from modloc.engine.runtime.fusion import FusionConfig
    from modloc.training.config import resolve_classes
    from modloc.training.evaluate import evaluate

    fusion = FusionConfig(top_n=args.top_n, video_exponent=args.video_exponent,
                          segment_exponent=args.segment_exponent,
                          include_partial=args.include_partial, k=args.k)
    result = evaluate(args.checkpoint, args.segment_checkpoint, labels=args.labels, test=args.test,
                      truth=args.truth, class_ids=resolve_classes(args.classes), fusion=fusion,
                      batch_size=args.batch_size, window_batch_size=args.window_batch_size,
                      workers=args.workers, device=args.device, submissions=args.submissions,
                      allow_low_overlap=args.allow_low_overlap)
    if args.json:
        print_json(result)
        return 0
    if "video" in result:
        video = result["video"]
        print(f"videos {video['videos']}: GAP@{video['top_k']} {video['gap']:.4f}  Hit@1 "
              f"{video['hit_at_one']:.4f}  PERR {video['perr']:.4f}  MAP {video['map']:.4f}")
    if "segments" in result:
        segments = result["segments"]
        for name in ("fused", "dummy"):
            system = segments[name]
            print(f"{name:6s} segment MAP@{segments['k']}: {system['map']:.4f} "
                  f"({system['classes']} classes, {segments['videos']} videos; ceiling "
                  f"{system['ceiling']:.4f}: its {system['found_positives']} of the "
                  f"{segments['positives']} positives ranked first)")
    return 0


__all__ = ["add_commands"]
