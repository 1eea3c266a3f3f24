"""Model-parallel training: a tree's towers on several devices of one process (``devices``)
and on ``torchrun`` ranks, each equal to the single-process run of the same config.

Every run is a tiny tree (branching (2, 2)) on the ``tiny`` synthetic dataset, a few steps.
The "several devices" are ``["cpu", "cpu"]`` (no second accelerator here): real placement and
gathers, one physical device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY_MODEL

from modloc.training.config import load_config
from modloc.training.trainer import train

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def settings(tiny_dataset, tmp_path_factory) -> Path:
    """A config file for 4 steps of video-level training with a checkpoint at step 2 and an
    evaluation at step 3. No dropout: torchrun ranks draw their own masks (as the reference's
    GPUs did), so only a run without dropout repeats the single-process one.

    Adam's ε is 1e-3: the trainer runs in float32, and some BN biases get a gradient that is
    zero but for rounding; with the usual ε = 1e-8 Adam turns that noise into steps of ±lr
    (lr·g/(|g|+ε)), so their weights would differ by ~lr between any two summation orders.
    With ε = 1e-3 a gradient error moves a weight by at most lr/ε times as much."""
    classes = json.loads((tiny_dataset / "synth.json").read_text())
    path = tmp_path_factory.mktemp("settings") / "tiny.json"
    path.write_text(json.dumps({
        "model": {"name": "mod_4x3", "overrides": TINY_MODEL},
        "data": {"train": [str(tiny_dataset / "train" / "*.tfrecord")],
                 "eval": [str(tiny_dataset / "validate" / "*.tfrecord")], "eval_batches": 1,
                 "classes": classes["segment_class_ids"] + classes["extra_class_ids"],
                 "pad_to": "longest"},
        "batch_size": 8, "dropout": 0.0, "optimizer": {"learning_rate": 1e-3, "epsilon": 1e-3},
        "max_steps": 4, "log_every": 1, "eval_every": 3, "checkpoint_every": 2,
        "device": "cpu", "progress": False,
    }))
    return path


@pytest.fixture(scope="module")
def single(settings, tmp_path_factory) -> Path:
    """The single-process, single-device run."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(load_config("pretrain", settings, {"out": str(out)}))
    return out


def losses(run: Path) -> dict[tuple[str, int], float]:
    """The history's training and evaluation losses by (kind, step)."""
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return {("train", row["step"]) if "loss" in row else ("eval", row["step"]):
            row["loss"] if "loss" in row else row["eval"]["loss"] for row in rows}


def assert_same_run(run: Path, reference: Path, tolerance: float) -> None:
    """Equal loss histories (to float32's resolution: the losses are ~90, where an ulp is
    7.6e-6), final weights and Adam slots."""
    actual, expected = losses(run), losses(reference)
    # a run stopped and resumed also evaluated where it stopped
    assert {key: actual[key] for key in expected} == pytest.approx(expected, rel=1e-6)
    final = "step-00000004"
    for name in ("model.safetensors", "state.safetensors"):
        actual, expected = load_file(run / final / name), load_file(reference / final / name)
        expected = {key: value for key, value in expected.items() if not key.startswith("rng/")}
        assert set(expected) <= set(actual), name
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, atol=tolerance, rtol=0, msg=key)


def test_towers_on_two_devices_equal_the_single_device_run(settings, single, tmp_path):
    out = tmp_path / "placed"
    result = train(load_config("pretrain", settings, {"out": str(out), "devices": ["cpu", "cpu"]}))
    assert result.steps == 4 and (out / "loss_curves.png").is_file()
    assert_same_run(out, single, tolerance=1e-5)


def torchrun(settings: Path, out: Path, *flags: str, ranks: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", "-m", "modloc", "train", "--config", str(settings),
               "--out", str(out), *flags]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_torchrun_ranks_equal_the_single_process_run_and_resume(settings, single, tmp_path):
    """Two gloo ranks, one tower each: the same losses, weights and Adam slots, also across
    a resume under torchrun (which loads the gathered checkpoint on every rank)."""
    out = tmp_path / "ranks"
    torchrun(settings, out, "--max-steps", "2")
    torchrun(settings, out, "--resume")
    assert_same_run(out, single, tolerance=1e-5)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())


def test_torchrun_ranks_draw_their_own_dropout_masks_and_resume_them(settings, tmp_path):
    """With dropout each rank has its own stream (the towers of different ranks must not share
    masks), the checkpoint keeps every rank's, and a run stopped and resumed on as many ranks
    repeats the uninterrupted one exactly."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    torchrun(settings, whole, "--dropout", "0.5")
    torchrun(settings, resumed, "--dropout", "0.5", "--max-steps", "2")
    torchrun(settings, resumed, "--dropout", "0.5", "--resume")
    assert_same_run(resumed, whole, tolerance=0.0)
    state = load_file(whole / "step-00000004" / "state.safetensors")
    assert not torch.equal(state["rng/rank/0/cpu"], state["rng/rank/1/cpu"])
    assert torch.equal(state["rng/rank/0/cpu"], state["rng/cpu"])


def test_parallel_runs_need_a_tree_with_towers(settings, tmp_path):
    with pytest.raises(ValueError, match="not a tree"):
        train(load_config("pretrain", settings, {
            "out": str(tmp_path / "dbof"), "model.name": "dbof", "model.overrides": {},
            "devices": ["cpu", "cpu"]}))
    with pytest.raises(ValueError, match="device 'tpu' is not usable here"):
        train(load_config("pretrain", settings, {
            "out": str(tmp_path / "tpu"), "devices": ["cpu", "tpu"]}))
    with pytest.raises(ValueError, match="cannot split 2 towers over 3"):
        train(load_config("pretrain", settings, {
            "out": str(tmp_path / "three"), "devices": ["cpu", "cpu", "cpu"]}))
