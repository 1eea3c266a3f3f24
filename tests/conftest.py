"""Shared fixtures: the real YouTube-8M files beside the repository, synthetic datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _real_data_dir() -> Path:
    return Path(os.environ.get("MODLOC_YT8M_DATA", REPO.parent / "shared" / "data" / "yt8m"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/yt8m`` (or $MODLOC_YT8M_DATA): real YouTube-8M shards and records."""
    path = _real_data_dir()
    if not (path / "video_level_v2_2018").is_dir():
        pytest.skip(f"real YouTube-8M sample files not found at {path} (set MODLOC_YT8M_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The ``tiny`` synthetic preset, generated once per test session."""
    from engine.synth import config_from, generate

    out = tmp_path_factory.mktemp("tiny")
    generate(config_from("tiny"), out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_dataset, tmp_path_factory) -> dict[str, str]:
    """A tiny video-level tree pre-trained for 12 steps, and a segment-level one fine-tuned
    from it for 6 (:data:`tiny.TINY_MODEL`), trained once per session."""
    from tiny import TINY_MODEL, split, synth_manifest

    from training.config import load_config
    from training.trainer import train

    out = tmp_path_factory.mktemp("runs")
    classes = synth_manifest(tiny_dataset)
    pretrained = train(load_config("pretrain", None, {
        "model.overrides": TINY_MODEL, "data.train": [split(tiny_dataset, "train")],
        "data.classes": classes["segment_class_ids"] + classes["extra_class_ids"],
        "data.pad_to": "longest", "batch_size": 8, "optimizer.learning_rate": 1e-3,
        "max_steps": 12, "log_every": 100, "progress": False, "out": str(out / "pretrain")}))
    finetuned = train(load_config("finetune", None, {
        "init_from": pretrained.checkpoint, "data.train": [split(tiny_dataset, "validate")],
        "data.classes": ",".join(map(str, classes["segment_class_ids"])), "batch_size": 8,
        "optimizer.learning_rate": 1e-3, "max_steps": 6, "epochs": None, "log_every": 100,
        "progress": False, "out": str(out / "finetune")}))
    return {"video": pretrained.checkpoint, "segment": finetuned.checkpoint}


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoints, tmp_path_factory) -> Path:
    """Both tiny checkpoints exported (distill leaf 0 and ensemble, fp32) as ``modloc
    export`` lays them out: ``<root>/{video,segment}/{distill,ensemble}-fp32``."""
    from export.exporter import ExportSettings, export_checkpoint

    root = tmp_path_factory.mktemp("artifacts")
    settings = ExportSettings(graphs=("distill", "ensemble"), leaf=0)
    for kind in ("video", "segment"):
        export_checkpoint(tiny_checkpoints[kind], root / kind, settings)
    return root
