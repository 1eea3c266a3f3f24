"""Training: config and recipes, checkpoints, the loop (pre-training, fine-tuning, exact
resume), logging, fusion, checkpoint evaluation and the training verbs of the CLI.

Every run is a tiny tree (branching (2, 2), K=4, G=2, λ=2, H=16) on the ``tiny`` synthetic
dataset, a few steps long.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY_MODEL, split, synth_manifest

from modloc.cli import main
from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.metrics import SegmentTruth, segment_map
from modloc.engine.base.submission import read_submission
from modloc.engine.runtime.fusion import dummy_pairs, fuse, top_candidates
from modloc.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_config_from_dict,
    read_checkpoint_config,
)
from modloc.training.config import OptimizerConfig, load_config
from modloc.training.models import build_model
from modloc.training.trainer import NonFiniteLossError, Trainer, clip_by_norm_, train


def pretrain_settings(dataset: Path, out: Path, **overrides) -> dict:
    """A few steps of video-level training on the tiny train split, over its 18 classes."""
    classes = synth_manifest(dataset)
    return {
        "model.overrides": TINY_MODEL,
        "data.train": [split(dataset, "train")],
        "data.eval": [split(dataset, "validate")],
        "data.classes": classes["segment_class_ids"] + classes["extra_class_ids"],
        "data.pad_to": "longest",  # the tiny videos hold 8..40 frames, not 300
        "batch_size": 8,
        "optimizer.learning_rate": 1e-3,
        # lr × 0.8 every 5 steps: the staircase is visible within the run
        "optimizer.decay_examples": 40,
        "max_steps": 10,
        "log_every": 1,
        "eval_every": 5,
        "checkpoint_every": 5,
        "progress": False,
        "out": str(out),
        **overrides,
    }


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pretrained(tiny_dataset, tmp_path_factory):
    """An uninterrupted 10-step pre-training run (6 batches an epoch: it crosses epoch 0)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    config = load_config("pretrain", None, pretrain_settings(tiny_dataset, out))
    return config, train(config)


# --- config ---------------------------------------------------------------------------


def test_recipes_are_the_reference_settings():
    pretrain = load_config("pretrain")
    assert (pretrain.batch_size, pretrain.dropout, pretrain.data.mode) == (80, 0.5, "video")
    assert pretrain.optimizer == OptimizerConfig(2e-4, 0.9, 0.999, 1e-8, 0.8, 2_500_000, 1.0)
    assert (pretrain.loss.l2_penalty, pretrain.loss.temperatures, pretrain.loss.lambdas) == (
        1e-5, (1.0,), (1.0,))
    assert (pretrain.epochs, pretrain.max_steps, pretrain.model.name) == (15, 1_000_000, "mod_4x3")

    finetune = load_config("finetune", None, {"init_from": "ckpt"})
    assert (finetune.batch_size, finetune.dropout, finetune.data.mode) == (512, 0.75, "segment")
    assert (finetune.optimizer.learning_rate, finetune.optimizer.decay_examples) == (2e-4, 1_000_000)
    assert (finetune.loss.l2_penalty, finetune.loss.temperatures, finetune.loss.lambdas) == (
        1e-4, (20.0,), (400.0,))
    assert (finetune.epochs, finetune.model, finetune.data.classes) == (10, None, None)


def test_config_file_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('batch_size = 16\n[optimizer]\nlearning_rate = 1e-3\n[loss]\ntemperatures = [3.0]\n')
    config = load_config("pretrain", toml, {"batch_size": 4})
    assert (config.batch_size, config.optimizer.learning_rate) == (4, 1e-3)
    assert config.optimizer.decay_rate == 0.8 and config.loss.temperatures == (3.0,)

    (tmp_path / "bad.json").write_text('{"optimizer": {"lr": 1}}')
    with pytest.raises(ValueError, match=r"optimizer: unknown key\(s\) \['lr'\]"):
        load_config("pretrain", tmp_path / "bad.json")
    with pytest.raises(ValueError, match="batch_size: expected int"):
        load_config("pretrain", None, {"batch_size": "many"})
    with pytest.raises(ValueError, match=r"set init_from \(--from\)$"):
        load_config("finetune")


def test_lambdas_default_to_the_square_of_the_temperatures(capsys):
    """λ = T² per layer unless given (REFERENCE §4), whatever the recipe's temperatures."""
    for recipe, extra in (("pretrain", {}), ("finetune", {"init_from": "ckpt"})):
        assert load_config(recipe, None, {**extra, "loss.temperatures": [5.0]}).loss.lambdas == (25.0,)
        assert load_config(recipe, None, {**extra, "loss.temperatures": [2.0, 3.0]}).loss.lambdas == (
            4.0, 9.0)
        given = load_config(recipe, None, {**extra, "loss.temperatures": [2.0, 3.0],
                                           "loss.lambdas": [1.0, 5.0]})
        assert given.loss.lambdas == (1.0, 5.0)
    # the resolved values are what --print-config shows
    assert main(["train", "--temperatures", "2", "3", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"]["lambdas"] == [4.0, 9.0]
    assert main(["train", "--temperatures", "2", "3", "--lambdas", "1", "--print-config"]) == 1
    assert "loss.lambdas (--lambdas) [1.0] and loss.temperatures (--temperatures) [2.0, 3.0]" in (
        capsys.readouterr().err)


def test_bn_momentum_none_keeps_the_models(capsys):
    assert main(["train", "--bn-momentum", "0.1", "--bn-momentum", "none", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["bn_momentum"] is None
    assert main(["train", "--bn-momentum", "0.1", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["bn_momentum"] == 0.1


def test_staircase_learning_rate_at_the_boundaries():
    pretrain = load_config("pretrain").optimizer  # 0.8 every 2.5M examples, batch 80
    assert pretrain.learning_rate_at(0, 80) == 2e-4
    assert pretrain.learning_rate_at(31_249, 80) == 2e-4  # 2,499,920 examples
    assert pretrain.learning_rate_at(31_250, 80) == pytest.approx(2e-4 * 0.8, rel=1e-12)
    assert pretrain.learning_rate_at(62_500, 80) == pytest.approx(2e-4 * 0.8**2, rel=1e-12)
    assert pretrain.learning_rate_at(583_262, 80) == pytest.approx(2e-4 * 0.8**18, rel=1e-12)
    finetune = load_config("finetune", None, {"init_from": "x"}).optimizer  # per 1M, batch 512
    assert finetune.learning_rate_at(1953, 512) == 2e-4  # 999,936 examples
    assert finetune.learning_rate_at(1954, 512) == pytest.approx(1.6e-4, rel=1e-12)


@pytest.mark.parametrize(("spec", "message"), [
    ("99999", "class id 99999 is outside the 3862-class vocabulary"),
    ("3,5,3", "class id 3 is given twice"),
    (",", "no class id"),
])
def test_class_spaces_are_checked(spec, message):
    from modloc.training.config import resolve_classes

    with pytest.raises(ValueError, match=message):
        resolve_classes(spec)


def test_clipping_is_per_variable():
    big, small, other = (torch.nn.Parameter(torch.zeros(n)) for n in (4, 3, 2))
    big.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    small.grad = torch.tensor([0.1, -0.2, 0.3])  # norm 0.37: untouched
    other.grad = torch.tensor([0.0, -2.0])  # norm 2
    untouched = small.grad.clone()
    clip_by_norm_([big, small, other], 1.0)
    assert torch.allclose(big.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert torch.equal(small.grad, untouched)
    assert torch.allclose(other.grad, torch.tensor([0.0, -1.0]))  # not scaled by the global norm


def test_clipping_takes_gradients_on_several_devices():
    # a tree placed on several devices has gradients on each: clipped per device, no stacking
    # across them ("meta" stands in for a second device: shapes only)
    here, there = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device="meta"))
    here.grad, there.grad = torch.tensor([0.0, -2.0]), torch.ones(2, device="meta")
    clip_by_norm_([here, there], 1.0)
    assert torch.allclose(here.grad, torch.tensor([0.0, -1.0])) and there.grad.device.type == "meta"


# --- pre-training, logging, checkpoints -----------------------------------------------


def test_pretraining_learns_and_logs(pretrained):
    config, result = pretrained
    assert (result.start_step, result.steps, result.epoch, result.examples) == (0, 10, 1, 80)
    assert all(math.isfinite(loss) for loss in result.losses) and len(result.losses) == 10
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    run = Path(result.run_dir)
    assert result.checkpoint == str(run / "step-00000010")
    assert [e["step"] for e in result.evaluations] == [5, 10]
    assert 0 <= result.evaluations[-1]["gap"] <= 1 and result.evaluations[-1]["loss"] > 0

    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    steps = [row for row in history if "terms" in row]
    assert [row["step"] for row in steps] == list(range(1, 11))
    # the lr of update k (after k - 1 steps of 8 examples): base · 0.8^floor((k - 1) · 8 / 40)
    assert [row["lr"] for row in steps] == [
        config.optimizer.learning_rate_at(step - 1, 8) for step in range(1, 11)]
    assert steps[4]["lr"] == 1e-3 and steps[5]["lr"] == pytest.approx(8e-4)
    terms = steps[-1]["terms"]
    assert {"bce/root", "bce/0", "bce/1.1", "kl/root>0", "kl/1>1.0", "l2/0", "l2/1"} <= terms.keys()
    assert math.isclose(sum(terms.values()), steps[-1]["loss"], rel_tol=1e-5)

    assert (run / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/total", "train/lr", "train/examples_per_second", "eval/gap"} <= scalars
    assert {f"loss/{name}" for name in terms} <= scalars
    assert len(events.Scalars("loss/kl/root>1")) == 10


def test_checkpoint_round_trip_and_mismatch_errors(pretrained, tmp_path):
    _, result = pretrained
    directory = Path(result.checkpoint)
    checkpoint = load_checkpoint(directory)
    saved = load_file(directory / "model.safetensors")
    loaded = checkpoint.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[name], loaded[name]) for name in saved)

    # config.json alone describes the model
    config = read_checkpoint_config(directory)
    assert config["model"]["preset"] == "mod_4x3" and len(config["classes"]) == 18
    assert config["training"]["state"] == {"phase": "pretrain", "step": 10, "epoch": 1,
                                           "batch_in_epoch": 4, "examples": 80,
                                           "loss": result.final_loss,
                                           "seconds": config["training"]["state"]["seconds"]}
    assert 0 < config["training"]["state"]["seconds"] <= result.total_seconds
    rebuilt = build_model(model_config_from_dict(config["model"]["config"]))
    rebuilt.load_state_dict(saved)
    rebuilt.eval()
    features = torch.randint(0, 256, (3, 7, 1152), dtype=torch.uint8)
    frames = torch.tensor([7, 4, 1])
    assert torch.equal(rebuilt(features, frames).root, checkpoint.model(features, frames).root)

    truncated = tmp_path / "truncated"
    shutil.copytree(directory, truncated)
    (truncated / "config.json").write_text((directory / "config.json").read_text()[:2])
    with pytest.raises(CheckpointError, match=r"truncated/config.json: not valid JSON \(Expecting"):
        load_checkpoint(truncated)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(directory, corrupt)
    raw = bytearray((corrupt / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(corrupt)

    reshaped = tmp_path / "reshaped"
    shutil.copytree(directory, reshaped)
    edited = read_checkpoint_config(reshaped)
    edited["model"]["config"]["leaf"]["hidden_size"] = 32
    (reshaped / "config.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match=r"shape differs: \['root.branches.0.branches.0"):
        load_checkpoint(reshaped)
    with pytest.raises(CheckpointError, match=r"classes \[5\] are not among"):
        load_checkpoint(directory, class_ids=[3, 5])


def test_resume_repeats_the_uninterrupted_run_exactly(pretrained, tiny_dataset, tmp_path):
    _, uninterrupted = pretrained
    out = tmp_path / "run"
    first = train(load_config("pretrain", None, pretrain_settings(tiny_dataset, out, max_steps=5)))
    assert first.steps == 5  # stopped inside epoch 0 (6 batches)

    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(load_config("pretrain", None, pretrain_settings(tiny_dataset, out)))
    with pytest.raises(ValueError, match="differs in optimizer.learning_rate"):
        Trainer(load_config("pretrain", None, pretrain_settings(
            tiny_dataset, out, resume=True, **{"optimizer.learning_rate": 2e-3})))

    rest = train(load_config("pretrain", None, pretrain_settings(tiny_dataset, out, resume=True)))
    assert rest.start_step == 5 and rest.steps == 10
    assert first.losses + rest.losses == uninterrupted.losses  # bitwise
    # the run's training time counts both calls: the first up to its checkpoint
    before = read_checkpoint_config(first.checkpoint)["training"]["state"]["seconds"]
    assert 0 < before <= first.total_seconds
    assert rest.total_seconds == pytest.approx(before + rest.seconds, abs=0.01)
    assert [e["gap"] for e in rest.evaluations] == [e["gap"] for e in uninterrupted.evaluations[1:]]
    resumed = load_file(Path(rest.checkpoint) / "model.safetensors")
    reference = load_file(Path(uninterrupted.checkpoint) / "model.safetensors")
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)
    history = (out / "history.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in history if "terms" in row] == list(range(1, 11))


def test_resuming_a_finished_run_checks_the_config_and_trains_nothing(pretrained, tiny_dataset,
                                                                     tmp_path, capsys):
    _, finished = pretrained
    out = tmp_path / "run"
    shutil.copytree(finished.run_dir, out)
    settings = pretrain_settings(tiny_dataset, out, resume=True)
    for change in ({"batch_size": 4}, {"model.overrides": {**TINY_MODEL, "hidden_size": 32}}):
        with pytest.raises(ValueError, match=f"differs in {next(iter(change))}$"):
            Trainer(load_config("pretrain", None, {**settings, **change}))

    # the same run on the command line
    flags = [*(f"--model-override={key}={json.dumps(value)}" for key, value in TINY_MODEL.items()),
             "--classes", ",".join(map(str, settings["data.classes"])), "--pad-to", "longest",
             "--batch-size", "8", "--lr", "1e-3", "--decay-examples", "40", "--max-steps", "10",
             "--data", split(tiny_dataset, "train"), "--out", str(out), "--resume", "--no-progress"]
    assert main(["train", *flags, "--batch-size", "4"]) == 1
    assert "differs in batch_size" in capsys.readouterr().err
    assert main(["train", *flags]) == 0
    shown = capsys.readouterr().out
    assert "nothing left to train: the run is already at step 10" in shown
    assert "final loss" not in shown


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_training_on_cuda_resumes_and_loads_on_the_cpu(tiny_dataset, tmp_path):
    """The GPU recipe (bf16 autocast, fused Adam's device) end to end: finite losses, fp32
    master weights in the checkpoint, the CUDA RNG state saved and restored on resume, and a
    checkpoint that scores alike on the GPU and on the CPU."""
    out = tmp_path / "run"
    settings = pretrain_settings(tiny_dataset, out, device="cuda", bf16=True, max_steps=5,
                                 eval_every=None)
    first = train(load_config("pretrain", None, settings))
    assert first.steps == 5 and all(math.isfinite(loss) for loss in first.losses)
    state = load_file(Path(first.checkpoint) / "state.safetensors")
    assert any(key.startswith("rng/cuda/") for key in state)
    rest = train(load_config("pretrain", None, {**settings, "max_steps": 8, "resume": True}))
    assert rest.start_step == 5 and rest.steps == 8 and all(math.isfinite(x) for x in rest.losses)

    weights = load_file(Path(rest.checkpoint) / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values() if tensor.is_floating_point()} == {torch.float32}
    on_gpu, on_cpu = load_checkpoint(rest.checkpoint, "cuda"), load_checkpoint(rest.checkpoint, "cpu")
    features = torch.randint(0, 256, (4, 30, 1152), dtype=torch.uint8)
    frames = torch.tensor([30, 12, 5, 1])
    with torch.no_grad():
        expected = on_cpu.model(features, frames).root
        actual = on_gpu.model(features.cuda(), frames.cuda()).root.cpu()
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4)


class _FixedLogits(torch.nn.Module):
    """Stands in for a model: row b's logits are ``logits[b]``, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, features, num_frames, use_mask=None):
        return self.logits[: len(features)]


def test_segment_mode_evaluation_counts_negatively_rated_segments():
    from modloc.training.data import TorchBatch
    from modloc.training.evaluate import evaluate_batches

    # two segments rated for class 0: the positive one scored 0.3, the negative one 0.9;
    # G's eval.py (REFERENCE §8.4) weights both rows and counts both: GAP 0.5, Hit@1 0.5
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    model = _FixedLogits([[logit(0.3), 0.0], [logit(0.9), 0.0]])
    batch = TorchBatch(["a", "b"], torch.zeros(2, 5, 1152, dtype=torch.uint8), torch.tensor([5, 5]),
                       labels=torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
                       label_weights=torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    result = evaluate_batches(model, [batch], num_classes=2)
    assert result["labelled"] == 2
    assert (result["gap"], result["hit_at_one"], result["perr"]) == pytest.approx((0.5, 0.5, 0.5))


def test_frozen_root_gate_statistics_change_evaluation_only(tiny_dataset, tmp_path):
    """V3 never updates the ensemble gate's BatchNorm moving statistics (docs/REFERENCE.md
    §10): with the switch the same training (same losses, same leaves) leaves the root
    gate's statistics at 0 and 1, and the tree's evaluation-mode answer differs."""
    models, losses = {}, {}
    for freeze in (False, True):
        config = load_config("pretrain", None, pretrain_settings(
            tiny_dataset, tmp_path / str(freeze), max_steps=3, dropout=0.0, bn_momentum=0.5,
            eval_every=None, checkpoint_every=None, freeze_root_gate_statistics=freeze,
            **{"data.eval": []}))
        losses[freeze] = train(config).losses
        models[freeze] = load_checkpoint(tmp_path / str(freeze) / "step-00000003").model.eval()
    assert losses[True] == losses[False]  # training uses batch statistics either way
    frozen, updated = models[True].root.gate.bn, models[False].root.gate.bn
    assert not frozen.running_mean.any() and (frozen.running_var == 1).all()
    assert updated.running_mean.abs().sum() > 0
    # below the root, the same statistics and the same answers
    torch.testing.assert_close(models[True].node((0,)).gate.bn.running_mean,
                               models[False].node((0,)).gate.bn.running_mean)
    video = next(read_videos(split(tiny_dataset, "validate")))
    features = torch.from_numpy(video.features[None])
    num_frames = torch.tensor([len(video.features)], dtype=torch.int32)
    with torch.inference_mode():
        out = {freeze: model(features, num_frames) for freeze, model in models.items()}
    torch.testing.assert_close(out[True].logits[(0,)], out[False].logits[(0,)])
    assert not torch.allclose(out[True].gates[()], out[False].gates[()])
    assert not torch.allclose(out[True].root, out[False].root)


def test_evaluating_on_unlabelled_data_warns(tiny_dataset, tmp_path, caplog):
    # the test split's ratings live in test_truth/: its records carry no labels
    settings = pretrain_settings(tiny_dataset, tmp_path / "run", max_steps=2, eval_every=2,
                                 **{"data.eval": [split(tiny_dataset, "test")]})
    with caplog.at_level("WARNING", logger="modloc.training.trainer"):
        result = train(load_config("pretrain", None, settings))
    assert result.evaluations[-1]["labelled"] == 0 and "loss" in result.evaluations[-1]
    assert "holds no example labelled in the run's classes" in caplog.text


def test_finetuning_restores_weights_and_adam_state(pretrained, tiny_dataset, tmp_path):
    _, result = pretrained
    segment_ids = synth_manifest(tiny_dataset)["segment_class_ids"]
    config = load_config("finetune", None, {
        "init_from": result.checkpoint, "data.train": [split(tiny_dataset, "validate")],
        "data.classes": ",".join(map(str, segment_ids)),  # narrowed from the 18 pre-trained classes
        "batch_size": 8, "max_steps": 4, "epochs": None, "log_every": 1, "eval_every": None,
        "progress": False, "out": str(tmp_path / "finetune")})
    trainer = Trainer(config)
    assert trainer.state.step == 0 and trainer.class_ids == tuple(segment_ids)
    assert trainer.model.config.leaf.mode == "segment" and trainer.model.config.leaf.drop_rate == 0.75

    name = "root.branches.1.branches.0.classifier.weight"
    pretrained_weights = load_file(Path(result.checkpoint) / "model.safetensors")
    slots = load_file(Path(result.checkpoint) / "state.safetensors")
    rows = torch.tensor(range(len(segment_ids)))  # the segment classes lead the pre-trained list
    parameter = dict(trainer.model.named_parameters())[name]
    assert torch.equal(parameter.detach(), pretrained_weights[name][rows])
    adam = trainer.optimizer.state[parameter]
    assert torch.equal(adam["exp_avg_sq"], slots[f"optimizer/{name}/exp_avg_sq"][rows])
    assert float(adam["step"]) == 10  # the bias correction continues from pre-training
    hidden = "root.branches.0.branches.1.hidden.weight"
    assert torch.equal(dict(trainer.model.named_parameters())[hidden].detach(), pretrained_weights[hidden])

    finetuned = trainer.run()
    assert (finetuned.start_step, finetuned.steps) == (0, 4)
    assert all(math.isfinite(loss) for loss in finetuned.losses)
    history = [json.loads(row) for row in (tmp_path / "finetune" / "history.jsonl").read_text().splitlines()]
    assert history[0]["lr"] == 2e-4  # the global step restarted at 0: the schedule too
    assert history[0]["terms"]["kl/root>0"] > 0  # T = 20, λ = 400 distillation is on

    fresh = Trainer(load_config("finetune", None, {
        "init_from": result.checkpoint, "data.train": [split(tiny_dataset, "validate")],
        "restore_optimizer": False, "max_steps": 1, "out": str(tmp_path / "fresh")}))
    assert not fresh.optimizer.state


@pytest.mark.parametrize("preset, overrides", [
    ("nextvlad", {k: v for k, v in TINY_MODEL.items() if k != "branching"}),
    ("dbof", {"cluster_size": 8, "hidden_size": 16, "num_experts": 2}),
])
def test_single_models_train_and_reload(tiny_dataset, tmp_path, preset, overrides):
    result = train(load_config("pretrain", None, pretrain_settings(
        tiny_dataset, tmp_path, max_steps=2, eval_every=None,
        **{"model.name": preset, "model.overrides": overrides})))
    assert set(result.final_terms) == {"bce", "l2"}
    checkpoint = load_checkpoint(result.checkpoint)
    assert checkpoint.preset == preset and type(checkpoint.model).__name__ in ("NeXtVLADModel", "DBoFModel")
    saved = load_file(Path(result.checkpoint) / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in checkpoint.model.state_dict().items())


def test_non_finite_loss_stops_with_the_step_and_the_terms(tiny_dataset, tmp_path):
    config = load_config("pretrain", None, pretrain_settings(
        tiny_dataset, tmp_path / "run", **{"loss.l2_penalty": float("inf")}))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss inf at step 1; non-finite terms: "
                                                 r"l2/0=inf, l2/1=inf"):
        train(config)


def test_bf16_needs_cuda(tiny_dataset, tmp_path):
    config = load_config("pretrain", None, pretrain_settings(tiny_dataset, tmp_path, bf16=True,
                                                             device="cpu"))
    with pytest.raises(ValueError, match="bf16 autocast is for CUDA"):
        Trainer(config)


# --- fusion ---------------------------------------------------------------------------


def test_top_candidates_break_ties_by_column():
    ids, scores = top_candidates([[0.1, 0.9, 0.5, 0.9], [0.3, 0.2, 0.1, 0.0]], [10, 11, 12, 13], 2)
    assert ids.tolist() == [[11, 13], [10, 11]]
    assert scores.tolist() == [[0.9, 0.9], [0.3, 0.2]]


def test_fuse_exponents():
    assert fuse([0.5], [[0.25]], video_exponent=1, segment_exponent=0).tolist() == [[0.5]]
    assert fuse([0.5], [[0.25]], video_exponent=0, segment_exponent=1).tolist() == [[0.25]]
    assert fuse([0.5], [[0.25]], 0.5, 0.5).tolist() == [[math.sqrt(0.125)]]
    # per-window video scores broadcast the same way
    np.testing.assert_allclose(fuse([[0.5], [0.25]], [[0.25], [0.5]], 1, 1), [[0.125], [0.125]])


def test_dummy_prediction_gives_full_windows_the_video_score():
    starts, classes, values = dummy_pairs(17, [3, 8], [0.9, 0.4])
    assert starts.tolist() == [0, 0, 5, 5, 10, 10]  # 15..16 is partial
    assert classes.tolist() == [3, 8] * 3 and values.tolist() == [0.9, 0.4] * 3
    assert dummy_pairs(17, [3], [0.9], include_partial=True)[0].tolist() == [0, 5, 10, 15]


# --- evaluation and the CLI -----------------------------------------------------------


def test_models_json_lists_every_preset_with_the_reference_counts(capsys):
    assert main(["models", "--json"]) == 0
    counts = {m["name"]: m["parameters"] for m in json.loads(capsys.readouterr().out)["models"]}
    assert counts.keys() == {"nextvlad", "nextvlad_large", "dbof", "mix_nextvlad",
                             "mix_nextvlad_large", "mod_4x3", "mod_2x2x3"}
    # REFERENCE §3: VLAD 4,425,484 + hidden FC 75,497,472 + its BN 4,096 + gating 1,049,088
    # + logistic 7,913,238
    assert counts["nextvlad"] == 88_889_378
    assert main(["models", "--json", "--classes", "1000"]) == 0
    paper = {m["name"]: m["parameters"] for m in json.loads(capsys.readouterr().out)["models"]}
    for name, millions in {"nextvlad": 83, "nextvlad_large": 320, "dbof": 16, "mix_nextvlad": 250,
                           "mix_nextvlad_large": 1280, "mod_4x3": 1000}.items():
        assert paper[name] / 1e6 == pytest.approx(millions, rel=0.02), name


@pytest.mark.parametrize("verb", ["models", "train", "finetune", "evaluate"])
def test_training_verbs_have_help(capsys, verb):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: modloc {verb}" in capsys.readouterr().out


def test_cli_train_finetune_evaluate_end_to_end(capsys, tiny_dataset, tmp_path):
    classes = synth_manifest(tiny_dataset)
    settings = tmp_path / "tiny.json"
    settings.write_text(json.dumps({"model": {"name": "mod_4x3", "overrides": TINY_MODEL},
                                    "data": {"classes": classes["segment_class_ids"]},
                                    "batch_size": 8, "optimizer": {"learning_rate": 1e-3}}))
    assert main(["train", "--config", str(settings), "--data", split(tiny_dataset, "train"),
                 "--max-steps", "3", "--out", str(tmp_path / "pre"), "--no-progress", "--json"]) == 0
    pretrained = json.loads(capsys.readouterr().out)
    assert pretrained["steps"] == 3 and pretrained["phase"] == "pretrain"

    assert main(["finetune", "--from", pretrained["checkpoint"], "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["loss"]["temperatures"] == [20.0] and shown["batch_size"] == 512

    assert main(["finetune", "--from", pretrained["checkpoint"], "--data",
                 split(tiny_dataset, "validate"), "--batch-size", "8", "--max-steps", "2",
                 "--out", str(tmp_path / "fine"), "--no-progress", "--json"]) == 0
    finetuned = json.loads(capsys.readouterr().out)
    assert finetuned["steps"] == 2 and finetuned["phase"] == "finetune"

    assert main(["evaluate", "--checkpoint", pretrained["checkpoint"], "--segment-checkpoint",
                 finetuned["checkpoint"], "--labels", split(tiny_dataset, "validate"),
                 "--test", split(tiny_dataset, "test"), "--truth", split(tiny_dataset, "test_truth"),
                 "--classes", str(tiny_dataset / "synth.json"), "--submissions",
                 str(tmp_path / "submissions"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["video"]["gap"] <= 1 and result["video"]["videos"] > 0
    segments = result["segments"]
    assert segments["videos"] == 24 and segments["k"] == 100_000
    truth = SegmentTruth.from_videos(read_videos(split(tiny_dataset, "test_truth")))
    for system in ("fused", "dummy"):
        assert 0 < segments[system]["map"] <= 1 and segments[system]["classes"] > 0
        assert Path(segments[system]["submission"]).read_text().startswith("Class,Segments\n")
        # the ceiling is the submission's own: what the metric finds in the written CSV
        scored = segment_map(read_submission(segments[system]["submission"]), truth)
        assert segments[system]["ceiling"] == pytest.approx(scored.ceiling)
        assert segments[system]["map"] <= segments[system]["ceiling"] <= 1
        assert 0 < segments[system]["found_positives"] <= segments["positives"]
    # both rank the windows of the same candidates
    assert segments["fused"]["ceiling"] == segments["dummy"]["ceiling"]
