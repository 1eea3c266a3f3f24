"""Models and losses: parameter counts, the NeXtVLAD formula, masking, trees, losses.

Paper-size models are only built on the meta device (counting); forward passes use tiny
configs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from test_losses import kl_from_formula

from modloc.engine.base.features import masked_model_input
from modloc.training.losses import (
    LossConfig,
    bce,
    bce_on_probabilities,
    bce_with_logits,
    distillation_kl,
    l2_penalty,
    mod_loss,
    model_loss,
)
from modloc.training.models import (
    DBoFConfig,
    DBoFModel,
    FeatureInput,
    MODTree,
    MODTreeConfig,
    NeXtVLAD,
    NeXtVLADConfig,
    NeXtVLADModel,
    count_parameters,
    create_model,
    leaf_paths,
    list_models,
    tree_gate_input,
)

TINY = NeXtVLADConfig(num_classes=7, cluster_size=4, groups=2, expansion=2, hidden_size=16,
                      gating_reduction=4)
SEGMENT_TINY = dataclasses.replace(TINY, mode="segment")
TINY_DBOF = DBoFConfig(num_classes=7, cluster_size=8, hidden_size=16, num_experts=2)


def make_batch(num_frames=(6, 3, 1), frames=6, seed=0):
    """uint8 features, zero at padding as the batch contract says, and int32 frame counts."""
    rng = np.random.default_rng(seed)
    features = rng.integers(0, 256, (len(num_frames), frames, 1152), dtype=np.uint8)
    for row, valid in enumerate(num_frames):
        features[row, valid:] = 0
    return torch.from_numpy(features), torch.tensor(num_frames, dtype=torch.int32)


def tree(branching, leaf=TINY, seed=0):
    torch.manual_seed(seed)
    return MODTree(MODTreeConfig(branching, leaf))


def randomize_batch_norms(module: torch.nn.Module, seed=0):
    """Non-trivial γ, β and running statistics, so eval-mode checks see every BN."""
    generator = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm1d):
            n = bn.num_features
            with torch.no_grad():  # copy_ keeps each tensor's dtype
                bn.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=generator))
                bn.running_mean.copy_(torch.randn(n, generator=generator))
                bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


# --- parameter counts (meta device) ---------------------------------------------------------


def meta_count(name, num_classes=3862, **overrides):
    with torch.device("meta"):
        return count_parameters(create_model(name, num_classes, **overrides))


def test_nextvlad_components_match_reference():
    with torch.device("meta"):
        model = create_model("nextvlad", 3862)
    assert count_parameters(model.video_vlad) + count_parameters(model.audio_vlad) == 4_425_484
    assert count_parameters(model.hidden) == 75_497_472
    assert count_parameters(model.gating) == 1_049_088
    assert count_parameters(model.classifier) == 7_913_238
    # REFERENCE's component list omits hidden1_bn's γ/β; its 83.03M total needs them
    assert count_parameters(model.hidden_bn) == 2 * 2048
    assert count_parameters(model) == 88_889_378


@pytest.mark.parametrize("num_classes, overrides, millions", [
    (3862, {}, 88.89),
    (1000, {}, 83.03),
    (3862, {"gating_reduction": 16}, 88.36),
    (3862, {"expansion": 1, "cluster_size": 256, "gating_reduction": 16}, 87.29),
])
def test_nextvlad_totals_match_reference(num_classes, overrides, millions):
    assert round(meta_count("nextvlad", num_classes, **overrides) / 1e6, 2) == millions


@pytest.mark.parametrize("name, paper_millions", [
    ("nextvlad", 83), ("nextvlad_large", 320), ("dbof", 16), ("mix_nextvlad", 250),
    ("mix_nextvlad_large", 1280), ("mod_4x3", 1000),
])
def test_paper_parameter_column_is_1000_way(name, paper_millions):
    # the paper's column (REFERENCE §9) fits 1000-way classifiers to within its rounding
    assert meta_count(name, 1000) / 1e6 == pytest.approx(paper_millions, rel=0.02)


def test_list_models_and_overrides():
    infos = {info.name: info for info in list_models(1000)}
    assert set(infos) == {"nextvlad", "nextvlad_large", "dbof", "mix_nextvlad",
                          "mix_nextvlad_large", "mod_4x3", "mod_2x2x3"}
    assert infos["nextvlad"].num_params == 83_025_140
    with torch.device("meta"):
        mod = create_model("mod_4x3", num_classes=7, drop_rate=0.75, mode="segment")
        mix = create_model("mix_nextvlad", branching=(2,))
    assert mod.config.branching == (4, 3) and mod.num_leaves == 12
    assert mod.config.leaf == NeXtVLADConfig(num_classes=7, gating_reduction=16, drop_rate=0.75,
                                             mode="segment")
    assert mix.num_leaves == 2
    with pytest.raises(ValueError, match="unknown model 'netvlad' \\(did you mean 'nextvlad'\\?\\)"):
        create_model("netvlad")
    with pytest.raises(ValueError, match="mod_4x3: no setting 'hidden' to override \\(did you "
                                         "mean 'hidden_size'\\?\\); its settings: branching, "):
        create_model("mod_4x3", hidden=64)


# --- input transform ------------------------------------------------------------------------


def test_feature_input_matches_engine_transform():
    features, num_frames = make_batch()
    x, mask = FeatureInput()(features, num_frames)
    expected = masked_model_input(features.numpy(), num_frames.numpy())
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert mask.dtype == torch.float32
    assert mask.tolist() == [[1.0] * 6, [1.0] * 3 + [0.0] * 3, [1.0] + [0.0] * 5]


def test_feature_input_l2_transform():
    features, num_frames = make_batch()
    x, mask = FeatureInput("l2")(features, num_frames)
    norms = x.norm(dim=-1)
    torch.testing.assert_close(norms[mask.bool()], torch.ones(int(mask.sum())))
    assert (x[~mask.bool()] == 0).all()


# --- NeXtVLAD pooling -----------------------------------------------------------------------


def loop_nextvlad(layer: NeXtVLAD, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REFERENCE §3 written out with loops (eval-mode BN), in float64."""

    def bn(value, module, index):
        scale = module.weight[index] / math.sqrt(module.running_var[index] + module.eps)
        return (value - module.running_mean[index]) * scale + module.bias[index]

    G, K, Fs = layer.groups, layer.cluster_size, layer.group_size
    out = torch.zeros(x.shape[0], Fs * K, dtype=torch.float64)
    for b in range(x.shape[0]):
        y = torch.zeros(Fs, K, dtype=torch.float64)
        for i in range(x.shape[1]):
            expanded = layer.expand.weight @ x[b, i] + layer.expand.bias
            attention = torch.sigmoid(layer.attention.weight @ expanded + layer.attention.bias)
            logits = layer.cluster_logits.weight @ expanded  # from the full expanded vector
            for g in range(G):
                att = attention[g] * mask[b, i]
                row = [bn(logits[g * K + k], layer.cluster_bn, g * K + k) for k in range(K)]
                alpha = torch.softmax(torch.stack(row), dim=0)
                for j in range(Fs):
                    for k in range(K):
                        y[j, k] += att * alpha[k] * (expanded[g * Fs + j] - layer.centers[j, k])
        for k in range(K):
            y[:, k] /= max(y[:, k].norm(), 1e-6)
        for j in range(Fs):
            for k in range(K):
                out[b, j * K + k] = bn(y[j, k], layer.vlad_bn, j * K + k)
    return out


def test_nextvlad_matches_loop_reference():
    torch.manual_seed(0)
    layer = NeXtVLAD(feature_size=5, cluster_size=3, groups=2, expansion=2).double().eval()
    randomize_batch_norms(layer)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, mask), loop_nextvlad(layer, x, mask))
        torch.testing.assert_close(layer(x), loop_nextvlad(layer, x, torch.ones_like(mask)))


def test_masked_frames_do_not_change_vlad_in_eval():
    torch.manual_seed(0)
    layer = NeXtVLAD(feature_size=8, cluster_size=4, groups=2, expansion=2).eval()
    randomize_batch_norms(layer)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 0.0, 0.0, 0.0]])
    changed = x.clone()
    changed[1, 2:] = torch.randn(3, 8) * 10
    with torch.no_grad():
        assert torch.equal(layer(changed, mask), layer(x, mask))
        assert not torch.allclose(layer(changed), layer(x))  # without a mask padding counts


def test_segment_mode_passes_no_mask():
    features, num_frames = make_batch()
    torch.manual_seed(0)
    model = NeXtVLADModel(TINY).eval()
    x, mask = model.inputs(features, num_frames)
    with torch.no_grad():
        torch.testing.assert_close(model(features, num_frames), model.forward_input(x, mask))
        torch.testing.assert_close(model(features, num_frames, use_mask=False),
                                   model.forward_input(x, None))
    with torch.device("meta"):
        segment = NeXtVLADModel(SEGMENT_TINY)
    assert not segment.uses_mask(None) and model.uses_mask(None)


# --- forward shapes -------------------------------------------------------------------------


MODELS = {
    "nextvlad": lambda: NeXtVLADModel(TINY),
    "dbof": lambda: DBoFModel(TINY_DBOF),
    "mix_3": lambda: MODTree(MODTreeConfig((3,), TINY)),
    "tree_2x1x2": lambda: MODTree(MODTreeConfig((2, 1, 2), TINY)),
    "tree_2x2_segment": lambda: MODTree(MODTreeConfig((2, 2), SEGMENT_TINY)),
}


def root_logits(output):
    return output if isinstance(output, torch.Tensor) else output.root


@pytest.mark.parametrize("name", MODELS)
def test_forward_shapes(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    features, num_frames = make_batch()
    logits = root_logits(model(features, num_frames))  # training mode, padded rows
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    logits.sum().backward()
    # every parameter takes part in the root's logits (a one-child gate's gradient is 0: its
    # softmax is 1 whatever it computes)
    assert not [n for n, p in model.named_parameters() if p.grad is None]

    # in eval mode a video's logits do not depend on the rest of its batch
    model.eval()
    with torch.no_grad():
        batch = root_logits(model(features, num_frames))
        for row in range(3):
            alone = root_logits(model(features[row:row + 1], num_frames[row:row + 1]))
            torch.testing.assert_close(alone[0], batch[row], rtol=1e-5, atol=1e-5)
    model.train()

    one_frame, ones = make_batch(num_frames=(1, 1), frames=1)
    assert root_logits(model(one_frame, ones)).shape == (2, 7)
    model.eval()
    with torch.no_grad():
        single, one = make_batch(num_frames=(1,), frames=1)
        assert root_logits(model(single, one)).shape == (1, 7)
        empty, zero = make_batch(num_frames=(0, 2), frames=2)  # an all-padding row
        assert torch.isfinite(root_logits(model(empty, zero))).all()


def test_dbof_moe_returns_logits_of_g_probabilities():
    torch.manual_seed(0)
    model = DBoFModel(TINY_DBOF)
    moe = model.classifier
    h = torch.randn(4, 16)
    gates = torch.softmax(moe.gates(h).reshape(4, 7, 3), dim=-1)
    experts = torch.sigmoid(moe.experts(h).reshape(4, 7, 2))
    probabilities = (gates[..., :2] * experts).sum(-1)  # G: (B·C, E+1) gates, dummy last
    torch.testing.assert_close(torch.sigmoid(moe(h)), probabilities)


@pytest.mark.parametrize("pooling", ["max", "average"])
def test_dbof_pools_valid_frames_only(pooling):
    torch.manual_seed(0)
    model = DBoFModel(dataclasses.replace(TINY_DBOF, pooling=pooling)).eval()
    randomize_batch_norms(model)
    features, num_frames = make_batch()
    x, mask = model.inputs(features, num_frames)
    changed = x.clone()
    changed[1, 3:] = torch.randn(3, 1152)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_input(changed, mask), model.forward_input(x, mask))


# --- trees ----------------------------------------------------------------------------------


def test_tree_mixes_children_logits_with_softmax_gates():
    model = tree((2, 2)).eval()
    randomize_batch_norms(model)
    features, num_frames = make_batch()
    with torch.no_grad():
        out = model(features, num_frames)
    assert set(out.logits) == {(), (0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)}
    for path, gate in out.gates.items():
        assert gate.shape == (3, 2)
        torch.testing.assert_close(gate.sum(-1), torch.ones(3))
        children = torch.stack([out.logits[c] for c in out.children(path)], dim=1)
        torch.testing.assert_close(out.logits[path], (gate[..., None] * children).sum(1))


def in_frames(features: torch.Tensor, frames: int, seed: int = 1) -> torch.Tensor:
    """``features`` cut or padded to ``frames`` frames, with random bytes past the end: a
    padded frame's bytes must not matter."""
    rng = np.random.default_rng(seed)
    batch = torch.from_numpy(rng.integers(0, 256, (len(features), frames, 1152), dtype=np.uint8))
    kept = min(frames, features.shape[1])
    batch[:, :kept] = features[:, :kept]
    return batch


def test_gates_read_the_references_300_frame_mean_whatever_the_padding():
    model = tree((2, 2)).eval()
    randomize_batch_norms(model)
    lengths = (37, 60, 12)
    features, num_frames = make_batch(num_frames=lengths, frames=60, seed=4)
    with torch.no_grad():
        # padded to 60 (the batch's longest), to 90 and to 300 frames, and each video alone
        padded = {frames: model(in_frames(features, frames), num_frames) for frames in (60, 90, 300)}
        alone = [model(features[row:row + 1, :n], num_frames[row:row + 1])
                 for row, n in enumerate(lengths)]
        x, valid = model.inputs(features, num_frames)
        gate_input = tree_gate_input(model.config, x, valid, model.inputs.padding, masked=True)
    reference = padded[300]
    for output in [*padded.values()]:
        for path in reference.logits:
            torch.testing.assert_close(output.logits[path], reference.logits[path], rtol=1e-5, atol=1e-6)
        for path in reference.gates:
            torch.testing.assert_close(output.gates[path], reference.gates[path], rtol=1e-5, atol=1e-6)
    for row, output in enumerate(alone):
        torch.testing.assert_close(output.root[0], reference.root[row], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(output.gates[()][0], reference.gates[()][row], rtol=1e-5, atol=1e-6)
    # (Σ over the real frames + (300 - n) · p) / 300, p the padding frame's model input
    p = model.inputs.padding.double()
    real = (x.double() * valid.double()[..., None]).sum(dim=1)
    expected = (real + (300 - num_frames.double())[:, None] * p) / 300
    torch.testing.assert_close(gate_input.double(), expected, rtol=1e-5, atol=1e-6)

    # the older form: a mean over every frame of the batch, equal to the reference's only at 300
    old = MODTree(dataclasses.replace(model.config, gate_input="padded_mean")).eval()
    old.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(old(in_frames(features, 300), num_frames).root, reference.root,
                                   rtol=1e-5, atol=1e-6)
        assert not torch.allclose(old(features, num_frames).root, reference.root, rtol=1e-3, atol=1e-4)


def test_a_video_longer_than_300_frames_gates_on_the_mean_of_its_frames():
    model = tree((2,)).eval()
    features, num_frames = make_batch(num_frames=(320, 5), frames=320, seed=2)
    x, valid = model.inputs(features, num_frames)
    gate_input = tree_gate_input(model.config, x, valid, model.inputs.padding, masked=True)
    torch.testing.assert_close(gate_input[0], x[0].mean(dim=0), rtol=1e-5, atol=1e-6)
    # a 5-frame window in segment mode: R = 5, the plain mean of the window
    window = tree_gate_input(model.config, x[1:, :5], valid[1:, :5], model.inputs.padding, masked=False)
    torch.testing.assert_close(window[0], x[1, :5].mean(dim=0), rtol=1e-5, atol=1e-6)


def test_checkpoints_without_a_gate_input_keep_the_older_gates(tmp_path):
    """A config.json written before ``gate_input`` existed loads as ``"padded_mean"`` and gives
    that model's outputs: a gate mean over every frame of the batch as padded."""
    from modloc.training.checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint

    model = tree((2, 2)).eval()
    randomize_batch_norms(model)
    directory = save_checkpoint(tmp_path / "old", model, class_ids=range(7))
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert config["model"]["config"]["gate_input"] == "reference"
    del config["model"]["config"]["gate_input"]
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    loaded = load_checkpoint(directory).model
    assert loaded.config.gate_input == "padded_mean"
    features, num_frames = make_batch(num_frames=(6, 3, 1), frames=6)
    with torch.no_grad():
        output = loaded(features, num_frames)
        # the older forward, spelled out: every gate reads x.mean(dim=1) over all 6 frames
        x, mask = loaded.inputs(features, num_frames)
        frame_mean = x.mean(dim=1)
        leaves = {path: loaded.node(path)(features, num_frames) for path in leaf_paths((2, 2))}
        towers = {}
        for t in range(2):
            gate = loaded.node((t,)).gate(frame_mean)
            towers[t] = (gate[:, :, None] * torch.stack([leaves[(t, 0)], leaves[(t, 1)]], 1)).sum(1)
        root_gate = loaded.root.gate(frame_mean)
        expected = (root_gate[:, :, None] * torch.stack([towers[0], towers[1]], 1)).sum(1)
    torch.testing.assert_close(output.root, expected)
    assert not torch.allclose(output.root, model(features, num_frames).root, rtol=1e-3, atol=1e-4)


def test_leaf_is_a_standalone_copy_of_the_tree_leaf():
    model = tree((2, 2)).eval()
    randomize_batch_norms(model)
    features, num_frames = make_batch()
    with torch.no_grad():
        out = model(features, num_frames)
        for index, path in enumerate(leaf_paths((2, 2))):
            leaf = model.leaf(index)
            assert isinstance(leaf, NeXtVLADModel)
            torch.testing.assert_close(leaf(features, num_frames), out.logits[path], rtol=0, atol=0)
        leaf = model.leaf(3)
        model.node((1, 1)).classifier.bias.add_(1.0)  # the copy does not follow the tree
        assert not torch.equal(leaf.classifier.bias, model.node((1, 1)).classifier.bias)
    assert set(leaf.state_dict()) == set(NeXtVLADModel(TINY).state_dict())


# --- losses ---------------------------------------------------------------------------------


def test_kl_is_nonnegative_and_zero_for_identical_logits():
    torch.manual_seed(0)
    teacher, student = torch.randn(16, 50) * 3, torch.randn(16, 50) * 3
    for temperature in (1.0, 3.0, 20.0):
        assert (distillation_kl(teacher, student, temperature) >= 0).all()
        torch.testing.assert_close(distillation_kl(teacher, teacher, temperature), torch.zeros(16))


def test_lambda_defaults_to_temperature_squared():
    config = LossConfig(temperatures=(20.0, 3.0))
    assert (config.kl_weight(0), config.kl_weight(1)) == (400.0, 9.0)
    assert LossConfig(temperatures=(20.0,)).kl_weight(2) == 400.0  # one value: every layer
    assert LossConfig(temperatures=(2.0, 3.0), lambdas=(1.0, 5.0)).kl_weight(1) == 5.0


def test_bce_forms_agree_for_moderate_logits():
    torch.manual_seed(0)
    logits = torch.rand(8, 30) * 8 - 4
    labels = (torch.rand(8, 30) < 0.3).float()
    on_probabilities = bce_on_probabilities(torch.sigmoid(logits), labels)
    torch.testing.assert_close(bce_with_logits(logits, labels), on_probabilities, rtol=1e-3, atol=0)
    manual = -(labels * torch.log(torch.sigmoid(logits) + 1e-5)
               + (1 - labels) * torch.log(1 - torch.sigmoid(logits) + 1e-5)).sum(1).mean()
    torch.testing.assert_close(bce(logits, labels, None, "probabilities"), manual)


def test_bce_on_probabilities_of_bf16_logits_is_computed_in_fp32():
    # under bf16 autocast the logits are bf16; p = sigmoid(9.25) = 0.99990 must not round to 1
    logits = torch.tensor([[9.25, -9.25, 0.5]], dtype=torch.bfloat16)
    labels = torch.tensor([[0.0, 1.0, 1.0]])
    expected = bce(logits.float(), labels, None, "probabilities")
    assert bce(logits, labels, None, "probabilities").item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("form", ["logits", "probabilities"])
def test_label_weights_mask_bce_exactly(form):
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 10), (torch.rand(4, 10) < 0.5).float()
    weights = torch.zeros(4, 10)
    weights[:, 3] = 1.0
    masked = bce(logits, labels, weights, form)
    torch.testing.assert_close(masked, bce(logits[:, 3:4], labels[:, 3:4], None, form))
    garbage = labels.clone()
    garbage[:, 5:] = 1 - garbage[:, 5:]  # labels of unrated classes do not matter
    assert torch.equal(bce(logits, garbage, weights, form), masked)


@pytest.fixture(scope="module")
def tree_4x3():
    """A tiny (4, 3) tree (λ=1 halves its size), its training-mode output and labels."""
    model = tree((4, 3), leaf=dataclasses.replace(TINY, expansion=1))
    out = model(*make_batch())
    labels = (torch.rand(3, 7) < 0.3).float()
    return model, out, labels


def test_mod_loss_names_every_term(tree_4x3):
    model, out, labels = tree_4x3
    terms = mod_loss(out, labels, None, LossConfig(temperatures=(20.0, 20.0)), tree=model).terms
    assert sum(k.startswith("bce/") for k in terms) == 1 + 4 + 12
    assert sum(k.startswith("kl/") for k in terms) == 4 + 12
    assert {k for k in terms if k.startswith("l2/")} == {"l2/0", "l2/1", "l2/2", "l2/3"}
    assert "kl/root>0" in terms and "kl/0>0.2" in terms and "bce/3.2" in terms
    no_tower_kl = mod_loss(out, labels, None, LossConfig(temperatures=(1.0, 0.0)), tree=model)
    assert sorted(k for k in no_tower_kl.terms if k.startswith("kl/")) == [
        "kl/root>0", "kl/root>1", "kl/root>2", "kl/root>3"]
    torch.testing.assert_close(no_tower_kl.total, sum(no_tower_kl.terms.values()))
    with pytest.raises(ValueError):
        mod_loss(out, labels, None, LossConfig(temperatures=(1.0, 2.0, 3.0)), tree=model)


def test_mod_loss_skips_only_the_layers_without_distillation(tree_4x3):
    model, out, labels = tree_4x3
    # T = 0 at the root, 1 in the towers: the towers' 12 terms stay
    tower_only = mod_loss(out, labels, None, LossConfig(temperatures=(0.0, 1.0)), tree=model)
    assert sorted(k for k in tower_only.terms if k.startswith("kl/")) == sorted(
        f"kl/{t}>{t}.{m}" for t in range(4) for m in range(3))
    # one temperature serves every layer of the 2-layer tree
    every_layer = mod_loss(out, labels, None, LossConfig(temperatures=(2.0,)), tree=model)
    assert sum(k.startswith("kl/") for k in every_layer.terms) == 4 + 12
    assert LossConfig().temperatures == (1.0,) and LossConfig().kl_weight(0) == 1.0


def test_mod_loss_is_the_reference_total_for_4x3(tree_4x3):
    """REFERENCE §4: T1/λ1 inside the towers, T2/λ2 across them, cumulative L2 per tower."""
    model, out, labels = tree_4x3
    t1, l1, t2, l2 = 3.0, 5.0, 7.0, 11.0
    config = LossConfig(temperatures=(t2, t1), lambdas=(l2, l1), l2_penalty=1e-3,
                        cumulative_l2=True, bce="probabilities")
    z = out.logits

    def g_bce(logits):
        return bce_on_probabilities(torch.sigmoid(logits), labels)

    def kl(teacher, student, temperature):  # the KL from its formula, not distillation_kl
        return torch.from_numpy(kl_from_formula(teacher.detach().numpy(), student.detach().numpy(),
                                                temperature)).float()

    def tower_l2(t):
        return l2_penalty([p for leaf in model.leaves((t,)) for p in leaf.l2_parameters()], 1e-3)

    expected = g_bce(z[()])
    for t in range(4):
        expected = expected + g_bce(z[(t,)]) + sum(g_bce(z[(t, m)]) for m in range(3))
        kl_t = sum(kl(z[(t,)], z[(t, m)], t1) for m in range(3)).mean()
        expected = expected + l1 * kl_t + sum(tower_l2(s) for s in range(t + 1))
    expected = expected + l2 * sum(kl(z[()], z[(t,)], t2) for t in range(4)).mean()
    torch.testing.assert_close(mod_loss(out, labels, None, config, tree=model).total, expected)


def test_cumulative_l2_counts_tower_0_four_times(tree_4x3):
    model, out, labels = tree_4x3
    model = copy.deepcopy(model)
    with torch.no_grad():  # only tower 0's classifiers non-zero
        for leaf in model.leaves()[3:]:
            for p in leaf.l2_parameters():
                p.zero_()
    tower0 = l2_penalty([p for leaf in model.leaves((0,)) for p in leaf.l2_parameters()], 1e-4)

    def l2_total(cumulative):
        config = LossConfig(l2_penalty=1e-4, cumulative_l2=cumulative)
        return sum(v for k, v in mod_loss(out, labels, None, config, tree=model).terms.items()
                   if k.startswith("l2/"))

    torch.testing.assert_close(l2_total(cumulative=True), 4 * tower0)
    torch.testing.assert_close(l2_total(cumulative=False), tower0)


def test_single_tower_ensemble_bce_doubles_a_one_tower_models_bce(tree_4x3):
    """V3 builds its ensemble over a lone tower and adds that BCE too: a one-tower model's
    objective is 2·BCE + L2 with the switch (docs/REFERENCE.md §10), and a tree of several
    towers is left as it was."""
    switched = LossConfig(single_tower_ensemble_bce=True, l2_penalty=1e-3)
    plain = LossConfig(l2_penalty=1e-3)
    mix = tree((3,))
    out, labels = mix(*make_batch()), (torch.rand(3, 7) < 0.3).float()
    with_switch = mod_loss(out, labels, None, switched, tree=mix)
    without = mod_loss(out, labels, None, plain, tree=mix)
    assert set(with_switch.terms) - set(without.terms) == {"bce/ensemble"}
    torch.testing.assert_close(with_switch.terms["bce/ensemble"], without.terms["bce/root"])
    torch.testing.assert_close(with_switch.total, without.total + without.terms["bce/root"])
    model = NeXtVLADModel(TINY)
    logits = torch.randn(3, 7)
    single = model_loss(logits, labels, None, switched, model=model)
    torch.testing.assert_close(single.total, 2 * bce_with_logits(logits, labels) + single.terms["l2"])
    model4x3, out4x3, labels4x3 = tree_4x3
    assert mod_loss(out4x3, labels4x3, None, switched, tree=model4x3).terms.keys() == \
        mod_loss(out4x3, labels4x3, None, plain, tree=model4x3).terms.keys()


def test_kl_gradient_reaches_the_teacher_gate():
    model = tree((3,))
    features, num_frames = make_batch()
    out = model(features, num_frames)
    terms = mod_loss(out, torch.zeros(3, 7), None, LossConfig(temperatures=(2.0,), l2_penalty=0.0),
                     tree=model).terms
    terms["kl/root>0"].backward()  # the KL term alone: no stop-gradient on the mixture
    assert model.root.gate.fc.weight.grad.abs().sum() > 0
    assert model.node((1,)).classifier.weight.grad.abs().sum() > 0  # reached via the teacher


def test_single_model_loss():
    torch.manual_seed(0)
    model = NeXtVLADModel(TINY)
    logits, labels = torch.randn(3, 7), (torch.rand(3, 7) < 0.5).float()
    loss = model_loss(logits, labels, None, LossConfig(l2_penalty=1e-3), model=model)
    expected_l2 = 1e-3 * (model.classifier.weight.square().sum()
                          + model.classifier.bias.square().sum()) / 2
    torch.testing.assert_close(loss.terms["l2"], expected_l2)
    torch.testing.assert_close(loss.total, bce_with_logits(logits, labels) + expected_l2)
