"""The loss terms against values computed from their formulas (REFERENCE §4), not against the
functions under test: a swapped KL direction, a dropped 1/T, a lost ε or a wrong axis fails."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modloc.training.losses import (
    BCE_EPSILON,
    KL_EPSILON,
    LossConfig,
    bce,
    bce_on_probabilities,
    bce_with_logits,
    distillation_kl,
    l2_penalty,
)


def kl_from_formula(teacher_logits, student_logits, temperature: float) -> np.ndarray:
    """``(B, C)`` × 2 → ``(B,)``: Σ_c q_t·(log(q_t + 1e-8) − log(q_s + 1e-8)), q = softmax(z/T)
    over the classes, in float64 numpy (REFERENCE §4)."""
    def softmax(z):
        z = np.asarray(z, np.float64) / temperature
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    q_t, q_s = softmax(teacher_logits), softmax(student_logits)
    return (q_t * (np.log(q_t + 1e-8) - np.log(q_s + 1e-8))).sum(axis=-1)


def kl(teacher, student, temperature):
    return distillation_kl(torch.tensor(teacher, dtype=torch.float64),
                           torch.tensor(student, dtype=torch.float64), temperature).numpy()


def test_kl_by_hand_and_its_direction():
    # teacher softmax (1/4, 3/4), student (1/2, 1/2):
    # KL(t‖s) = ¼·ln(½) + ¾·ln(3/2) = 0.1308120…, KL(s‖t) = ½·ln 2 + ½·ln(2/3) = 0.1438410…
    teacher, student = [[0.0, math.log(3)]], [[0.0, 0.0]]
    forward = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    backward = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert forward == pytest.approx(0.1308120, abs=1e-7)
    assert kl(teacher, student, 1.0) == pytest.approx([forward], rel=1e-6)
    assert kl(student, teacher, 1.0) == pytest.approx([backward], rel=1e-6)


def test_kl_divides_the_logits_by_the_temperature():
    # logits (0, 2·ln 3) at T = 2 are (0, ln 3) at T = 1
    assert kl([[0.0, 2 * math.log(3)]], [[0.0, 0.0]], 2.0) == pytest.approx(
        kl([[0.0, math.log(3)]], [[0.0, 0.0]], 1.0), rel=1e-9)
    assert kl([[0.0, 2 * math.log(3)]], [[0.0, 0.0]], 1.0) != pytest.approx(
        kl([[0.0, 2 * math.log(3)]], [[0.0, 0.0]], 2.0), rel=1e-3)


def test_kl_keeps_the_1e_8_inside_both_logs():
    # teacher (1, e^-40), student (e^-40, 1): log(q_s + 1e-8) = log(1e-8) bounds the term at
    # ≈ 18.42, where the exact KL would be ≈ 40
    assert KL_EPSILON == 1e-8
    teacher, student = [[0.0, -40.0]], [[-40.0, 0.0]]
    expected = kl_from_formula(teacher, student, 1.0)
    assert expected[0] == pytest.approx(-math.log(1e-8), rel=1e-6)
    np.testing.assert_allclose(kl(teacher, student, 1.0), expected, rtol=1e-9)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, 20.0])
def test_kl_of_random_batches_is_the_formula_over_the_class_axis(temperature):
    rng = np.random.default_rng(int(temperature * 10))
    teacher, student = rng.normal(0, 4, (5, 11)), rng.normal(0, 4, (5, 11))
    got = kl(teacher, student, temperature)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, kl_from_formula(teacher, student, temperature), rtol=1e-9)


def test_kl_weights_default_to_t_squared_per_layer():
    assert LossConfig(temperatures=(3.0,)).kl_weight(0) == 9.0
    config = LossConfig(temperatures=(20.0, 2.0))
    assert (config.kl_weight(0), config.kl_weight(1)) == (400.0, 4.0)
    assert (config.temperature(0), config.temperature(1)) == (20.0, 2.0)
    assert LossConfig(temperatures=(20.0, 2.0), lambdas=(5.0, 7.0)).kl_weight(1) == 7.0
    assert LossConfig(temperatures=(3.0,)).temperature(4) == 3.0  # one value: every layer
    with pytest.raises(ValueError, match="same length"):
        LossConfig(temperatures=(1.0, 2.0), lambdas=(1.0,))
    with pytest.raises(ValueError, match="'logits' or 'probabilities'"):
        LossConfig(bce="sigmoid")


def test_bce_on_probabilities_by_hand():
    # −[y·log(p+ε) + (1−y)·log(1−p+ε)], ε = 1e-5, summed over classes, mean over the batch
    assert BCE_EPSILON == 1e-5
    p = torch.tensor([[0.8, 0.1], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    row0 = -math.log(0.8 + 1e-5) - math.log(0.9 + 1e-5)
    row1 = -math.log(1e-5) - math.log(1e-5)  # both wrong with certainty: ε bounds them
    assert bce_on_probabilities(p, y).item() == pytest.approx((row0 + row1) / 2, rel=1e-12)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert bce_on_probabilities(p, y, weights).item() == pytest.approx(
        (-math.log(0.8 + 1e-5) - math.log(1e-5)) / 2, rel=1e-12)


def test_bce_with_logits_by_hand():
    # logit 0 → p = ½: ln 2 per class; logit ln 3 → p = ¾
    logits = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    expected = ((math.log(2) - math.log(0.25)) + 2 * math.log(2)) / 2
    assert bce_with_logits(logits, labels).item() == pytest.approx(expected, rel=1e-12)
    assert bce(logits, labels, None, "logits").item() == pytest.approx(expected, rel=1e-12)
    assert bce(logits, labels, None, "probabilities").item() == pytest.approx(expected, rel=1e-4)


def test_l2_penalty_is_half_the_scaled_sum_of_squares():
    weights = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([3.0]))]
    assert l2_penalty(weights, 1e-3).item() == pytest.approx(1e-3 * 14 / 2, rel=1e-6)
