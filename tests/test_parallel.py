"""Model-parallel MOD and grouped leaves, against the single-process tree.

The distributed tests spawn real gloo process groups on the loopback interface (2 and 4
ranks, and 3 ranks as a subgroup of the 4); every rank receives the single-process tree,
runs it itself and checks its own share, so nothing but the verdict crosses back. Tiny
leaves throughout.

"Several devices" here are ``["cpu", "cpu"]``: this machine has no second accelerator, so the
placement logic (which tower goes where, the gathers between devices) runs for real but the
devices are one; a cross-device copy bug that only shows between distinct devices (cuda:0 →
cuda:1) is not covered here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modloc.training.losses import LossConfig, mod_loss
from modloc.training.models import MODTree, MODTreeConfig, NeXtVLADConfig
from modloc.training.models.grouped import grouped_leaf_logits
from modloc.training.models.mod_tree import use_grouped_leaves
from modloc.training.parallel import (
    DistributedMOD,
    PlacedTree,
    init_from_env,
    tower_blocks,
    tower_devices,
)

# dropout off where two computations must draw the same masks from different RNG streams
TINY = NeXtVLADConfig(num_classes=7, cluster_size=4, groups=2, expansion=2, hidden_size=16,
                      gating_reduction=4, drop_rate=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_tree(branching, leaf=TINY) -> MODTree:
    """A fresh copy of one seeded tree per shape (initializing 27M weights takes seconds)."""
    return copy.deepcopy(_seeded_tree(tuple(branching), leaf))


@functools.lru_cache
def _seeded_tree(branching, leaf) -> MODTree:
    torch.manual_seed(0)
    return MODTree(MODTreeConfig(branching, leaf))


def make_batch(num_classes=TINY.num_classes, num_frames=(6, 3, 1, 5), frames=6, seed=0):
    """uint8 features (zero at padding), frame counts, 0/1 labels and 0/1 label weights."""
    rng = np.random.default_rng(seed)
    features = rng.integers(0, 256, (len(num_frames), frames, 1152), dtype=np.uint8)
    for row, valid in enumerate(num_frames):
        features[row, valid:] = 0
    shape = (len(num_frames), num_classes)
    return (torch.from_numpy(features), torch.tensor(num_frames, dtype=torch.int32),
            torch.from_numpy(rng.integers(0, 2, shape).astype(np.float32)),
            torch.from_numpy((rng.random(shape) < 0.7).astype(np.float32)))


def assert_close(actual, expected, what="", tolerance=1e-5):
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance,
                               msg=lambda message: f"{what}: {message}")


# --- tower assignment -------------------------------------------------------------------------


def test_tower_blocks_are_contiguous_and_cover_every_tower():
    assert tower_blocks(4, 2) == [range(0, 2), range(2, 4)]
    assert tower_blocks(4, 3) == [range(0, 2), range(2, 3), range(3, 4)]
    assert tower_blocks(4, 4) == [range(t, t + 1) for t in range(4)]
    with pytest.raises(ValueError, match="at least one tower"):
        tower_blocks(4, 5)


def test_tower_devices_layouts():
    cpu = torch.device("cpu")
    meta = torch.device("meta")
    assert tower_devices(4, ["cpu", "meta"]) == [cpu, cpu, meta, meta]
    assert tower_devices(4, ["cpu", "meta"], "round_robin") == [cpu, meta, cpu, meta]
    with pytest.raises(ValueError, match="layout"):
        tower_devices(4, ["cpu"], "diagonal")
    with pytest.raises(ValueError, match="at least one tower"):
        tower_devices(2, ["cpu"] * 3)


def test_a_one_layer_tree_has_no_towers_to_place():
    with pytest.raises(ValueError, match="no towers"):
        PlacedTree(make_tree((3,)), ["cpu", "cpu"])


# --- one process, several devices -------------------------------------------------------------


def check_placed_matches_tree(branching, devices, layout, loss_config, tolerance=1e-5):
    reference = make_tree(branching)
    tree = copy.deepcopy(reference)
    placed = PlacedTree(tree, devices, layout)
    assert list(placed.state_dict()) == list(reference.state_dict())
    features, num_frames, labels, label_weights = make_batch()

    expected_output = reference(features, num_frames)
    expected = mod_loss(expected_output, labels, label_weights, loss_config, tree=reference)
    expected.total.backward()
    output = placed(features, num_frames)
    loss = placed.loss(output, labels, label_weights, loss_config)
    loss.total.backward()

    assert output.logits.keys() == expected_output.logits.keys()
    for path, logits in expected_output.logits.items():
        assert_close(output.logits[path].cpu(), logits, f"logits {path}", tolerance)
    assert loss.terms.keys() == expected.terms.keys()
    for name, term in expected.terms.items():
        assert_close(loss.terms[name].cpu(), term, name, tolerance)
    assert_close(loss.total.cpu(), expected.total, "total", tolerance)
    expected_params = dict(reference.named_parameters())
    for name, param in placed.named_parameters():
        assert_close(param.grad.cpu(), expected_params[name].grad, f"grad {name}", tolerance)
    return tree, placed, output


@pytest.mark.parametrize("layout", ["contiguous", "round_robin"])
def test_placed_tree_equals_the_plain_tree_on_cpu(layout):
    config = LossConfig(temperatures=(2.0, 3.0), l2_penalty=1e-2, cumulative_l2=True)
    tree, placed, output = check_placed_matches_tree((4, 3), ["cpu", "cpu"], layout, config)
    # with every device the same, mod_loss takes the output (and the placed tree's modules)
    _, _, labels, label_weights = make_batch()
    expected = placed.loss(output, labels, label_weights, config)
    for name, term in mod_loss(output, labels, label_weights, config, tree=tree).terms.items():
        assert_close(term, expected.terms[name], name)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_placed_tree_on_two_gpus():
    config = LossConfig(temperatures=(2.0, 3.0), l2_penalty=1e-2)
    # the reference runs on the CPU: loose enough for GPU kernels (TF32 off by default)
    _, placed, output = check_placed_matches_tree((4, 3), ["cuda:0", "cuda:1"], "contiguous",
                                               config, tolerance=1e-4)
    assert output.root.device == torch.device("cuda:0")
    assert output.logits[(3, 2)].device == torch.device("cuda:1")
    assert {p.device for p in placed.root.branches[3].parameters()} == {torch.device("cuda:1")}


# --- several processes: gloo on the loopback --------------------------------------------------


def free_port() -> int:
    """A free loopback port below Linux's ephemeral range (32768+), so that no outgoing
    connection is handed it in the seconds before rank 0 listens on it."""
    while True:
        port = random.randrange(20000, 32768)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def run_ranks(world_size: int, cases, attempts: int = 3) -> None:
    """Spawn ``world_size`` ranks that check ``(branching, loss config, grouped, ranks)``
    cases; ``ranks`` None runs a case on the whole world, else on that subgroup.

    A port another process took before rank 0 listened on it is retried with a new one.
    """
    # every rank runs the whole reference tree: halve its largest weights (expand, N × λN)
    leaf = dataclasses.replace(TINY, expansion=1)
    cases = [(make_tree(branching, leaf), *rest) for branching, *rest in cases]
    for attempt in range(attempts):
        try:
            # fork: the ranks inherit the imports (a fresh interpreter spends seconds on torch)
            mp.start_processes(equivalence_worker, args=(world_size, free_port(), cases),
                               nprocs=world_size, start_method="fork")
            return
        except mp.ProcessRaisedException as error:
            if "EADDRINUSE" not in str(error) or attempt == attempts - 1:
                raise


def equivalence_worker(rank: int, world_size: int, port: int, cases) -> None:
    """One rank: join the group as torchrun would, then check every case against its tree."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # see one_thread
    env = init_from_env("cpu")
    assert (env.rank, env.world_size, env.device) == (rank, world_size, torch.device("cpu"))
    try:
        for reference, loss_config, grouped, ranks in cases:
            group = None if ranks is None else dist.new_group(ranks)  # every rank must call
            if ranks is None or rank in ranks:
                check_rank_matches_single_process(reference.double(), loss_config, grouped,
                                                  group)
    finally:
        dist.destroy_process_group()


def check_rank_matches_single_process(reference, loss_config, grouped, group):
    """Loss terms, gradients, one Adam step and the assembled state dict of this rank.

    In float64: Adam's first step is ≈ lr·sign(g), and some gradients are zero in exact
    arithmetic (``vlad_bn.bias``: BN bias → bias-free hidden FC → BN), so in float32 their
    sign, hence a ±lr step, is decided by float summation order in *any* two computations.
    """
    model = DistributedMOD(reference.config, seed=1, group=group).double()
    model.load_full_state_dict(reference.state_dict())
    if grouped:
        use_grouped_leaves(model)
    features, num_frames, labels, label_weights = make_batch()
    labels, label_weights = labels.double(), label_weights.double()

    expected_output = reference(features, num_frames)
    expected = mod_loss(expected_output, labels, label_weights, loss_config, tree=reference)
    expected.total.backward()
    output = model(features, num_frames)
    loss = model.loss(output, labels, label_weights, loss_config)
    loss.objective.backward()
    model.sync_gradients()

    assert_close(output.root, expected_output.root, "root logits")
    for t, logits in enumerate(output.tower_logits):
        assert_close(logits, expected_output.logits[(t,)], f"tower {t} logits")
    gathered = loss.gather()
    assert gathered.terms.keys() == expected.terms.keys()
    for name, term in expected.terms.items():
        assert_close(gathered.terms[name], term, name)
    assert_close(gathered.total, expected.total, "total")

    expected_params = dict(reference.named_parameters())
    own = dict(model.named_parameters())
    assert own.keys() <= expected_params.keys()
    for name, param in own.items():
        assert_close(param.grad, expected_params[name].grad, f"grad {name}")

    for params in (reference.parameters(), model.parameters()):
        torch.optim.Adam(params, lr=1e-3).step()
    for name, param in own.items():
        assert_close(param, expected_params[name], f"after one step: {name}")

    full = model.full_state_dict()
    if dist.get_rank(group) == 0:
        expected_state = reference.state_dict()
        assert list(full) == list(expected_state)
        for name, value in expected_state.items():
            assert_close(full[name], value, f"state {name}")
    else:
        assert full is None


CUMULATIVE = LossConfig(temperatures=(2.0, 3.0), l2_penalty=1e-2, cumulative_l2=True)


def test_two_ranks_equal_the_single_process_tree():
    run_ranks(2, [((4, 3), CUMULATIVE, False, None), ((2, 3), LossConfig(), True, None)])


def test_four_ranks_and_three_with_uneven_blocks_equal_the_single_process_tree():
    # 3 ranks of 4 towers own blocks of 2, 1, 1: the all-gather pads the short ones
    run_ranks(4, [((4, 3), CUMULATIVE, False, None),
                  ((4, 3), dataclasses.replace(CUMULATIVE, bce="probabilities"), False,
                   [1, 2, 3])])


def test_init_from_env_needs_torchrun(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_from_env()


# --- grouped leaves ---------------------------------------------------------------------------


@pytest.mark.parametrize(("branching", "mode"), [((2, 3), "video"), ((2, 2, 3), "segment")])
def test_grouped_leaves_equal_the_loop(branching, mode):
    # dropout on: the heads draw their masks in the loop's order
    leaf = dataclasses.replace(TINY, drop_rate=0.3, mode=mode)
    loop = make_tree(branching, leaf)
    grouped = copy.deepcopy(loop)
    assert use_grouped_leaves(grouped) == len(loop.leaves()) // branching[-1]
    features, num_frames, labels, label_weights = make_batch()
    config = LossConfig(temperatures=(2.0,), l2_penalty=1e-2)

    outputs = []
    for model in (loop, grouped):
        torch.manual_seed(1)
        output = model(features, num_frames)
        mod_loss(output, labels, label_weights, config, tree=model).total.backward()
        outputs.append(output)
    for path, logits in outputs[0].logits.items():
        assert_close(outputs[1].logits[path], logits, f"logits {path}")
    for (name, a), b in zip(loop.named_parameters(), grouped.parameters(), strict=True):
        assert_close(b.grad, a.grad, f"grad {name}")
    for (name, a), b in zip(loop.named_buffers(), grouped.buffers(), strict=True):
        assert_close(b, a, f"buffer {name}")

    loop.eval()
    grouped.eval()
    with torch.no_grad():
        assert_close(grouped(features, num_frames).root, loop(features, num_frames).root, "eval")
    use_grouped_leaves(grouped, enabled=False)
    assert "leaf_logits" not in vars(grouped.node((0,) * (len(branching) - 1)))


def test_grouped_leaves_need_one_config():
    leaves = [make_tree((2,)).leaf(0),
              make_tree((2,), dataclasses.replace(TINY, hidden_size=8)).leaf(0)]
    x = torch.zeros(2, 3, 1152)
    with pytest.raises(ValueError, match="one config"):
        grouped_leaf_logits(leaves, x, None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_leaves_on_cuda():
    loop = make_tree((2, 3)).cuda()
    grouped = copy.deepcopy(loop)
    use_grouped_leaves(grouped)
    features, num_frames, _, _ = make_batch()
    features, num_frames = features.cuda(), num_frames.cuda()
    torch.testing.assert_close(grouped(features, num_frames).root, loop(features, num_frames).root,
                               rtol=1e-4, atol=1e-4)
