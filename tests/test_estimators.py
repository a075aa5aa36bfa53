"""ATC, DEV, MixVal and EnsV (uda_ray.selection.estimators) against hand-computed values on tiny tensors, and the
worst-model rate of the validator study."""

from __future__ import annotations

import math

import pytest
import torch

from uda_ray.selection.estimators import (
    atc,
    atc_threshold,
    dev,
    dev_from_weights,
    domain_weights,
    ensv,
    mix,
    mixval_counts,
    mixval_scores,
    neg_entropy,
)

T = torch.tensor


def test_neg_entropy_is_minus_the_entropy_in_nats():
    assert neg_entropy(T([[1.0, 0.0], [0.5, 0.5]])).tolist() == pytest.approx([0.0, -math.log(2)], abs=1e-9)


def test_atc_threshold_leaves_the_source_accuracy_above_it():
    s, ok = T([0.1, 0.4, 0.3, 0.2]), T([True, True, True, False])
    assert atc_threshold(s, ok) == pytest.approx(0.1)  # accuracy 3/4: three scores above 0.1
    assert atc_threshold(s, T([True, False, False, False])) == pytest.approx(0.3)  # one above 0.3
    assert atc_threshold(s, torch.ones(4, dtype=torch.bool)) == -math.inf  # all right: every pixel above
    assert atc_threshold(s, torch.zeros(4, dtype=torch.bool)) == pytest.approx(0.4)  # none right: none above


def test_atc_predicts_the_fraction_of_target_scores_above_the_threshold():
    s, ok = T([0.1, 0.4, 0.3, 0.2]), T([True, True, True, False])  # t = 0.1
    assert atc(s, ok, T([0.05, 0.15, 0.5])) == pytest.approx(2 / 3)
    assert atc(s, ok, T([0.1, 0.1])) == 0.0  # ties at t count as below


def test_dev_with_the_control_variate_by_hand():
    # loss [1, 3], w [1, 2]: L = w*loss = [1, 6]; mean L 3.5, mean w 1.5; Cov(L, w) = 2.5, Var(w) = 0.5 (n - 1);
    # eta = -5; DEV = 3.5 + (-5)(1.5) + 5 = 1.0
    assert dev_from_weights(T([1.0, 3.0]), T([1.0, 2.0])) == pytest.approx(1.0)
    # constant weights: no control variate, the weighted mean loss
    assert dev_from_weights(T([1.0, 2.0, 3.0]), T([2.0, 2.0, 2.0])) == pytest.approx(4.0)


def test_domain_weights_are_one_when_source_and_target_are_alike():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    # the source holds each target pixel twice: p(target | x) = 1/3, w = (n_s / n_t) * (1/3) / (2/3) = 1
    w = domain_weights(torch.cat([x, x]), x)
    assert w.tolist() == pytest.approx([1.0] * 12, abs=1e-6)
    assert dev(torch.cat([x, x]), torch.arange(12.0), x) == pytest.approx(5.5, abs=1e-5)  # the mean loss


def test_domain_weights_favour_source_pixels_that_look_like_the_target():
    src = T([[-2.0], [-1.0], [0.0], [1.0]])
    tgt = T([[0.5], [1.0], [1.5], [2.0]])
    w = domain_weights(src, tgt)
    assert torch.all(w[1:] > w[:-1])  # monotone in closeness to the target
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 300, generator=g), torch.randn(5, 300, generator=g) + 0.3
    wide = domain_weights(a, b, seed=1)  # projected to 256 dims by a seeded matrix: the same weights again
    assert torch.equal(wide, domain_weights(a, b, seed=1)) and wide.shape == (8,) and torch.isfinite(wide).all()


def test_mix_keeps_lambda_of_the_dominant_image():
    assert mix(T([100.0]), T([0.0])).tolist() == pytest.approx([55.0])


def test_mixval_counts_intra_and_inter_class_pixels_by_hand():
    pred = T([[0, 1], [2, 2]])
    label = T([[0, 1], [1, 2]])  # the dominant image's pseudo-label
    partner = T([[0, 0], [1, 0]])
    # intra (labels agree): (0,0) right, (1,0) wrong; inter: (0,1) right, (1,1) right
    assert mixval_counts(pred, label, partner).tolist() == [1.0, 2.0, 2.0, 2.0]
    assert mixval_scores(T([1.0, 2.0, 2.0, 2.0], dtype=torch.float64)) == pytest.approx(
        {"uv/mixval_intra": 0.5, "uv/mixval_inter": 1.0, "uv/mixval": 0.75})
    assert mixval_scores(T([3.0, 4.0, 0.0, 0.0])) == pytest.approx({"uv/mixval_intra": 0.75, "uv/mixval": 0.75})


def test_ensv_is_each_members_agreement_with_the_mean_prediction():
    m1 = T([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    m2 = T([[0.8, 0.2], [0.3, 0.7], [0.3, 0.7], [0.4, 0.6]])
    m3 = T([[0.4, 0.6], [0.2, 0.8], [0.1, 0.9], [0.45, 0.55]])
    probs = torch.stack([m1, m2, m3])  # (M, N, C); the ensemble's argmax: [0, 1, 1, 1]
    preds = probs.argmax(-1)  # m1 [0, 0, 1, 0], m2 [0, 1, 1, 1], m3 [1, 1, 1, 1]
    assert ensv(preds, probs.sum(0).T).tolist() == pytest.approx([0.5, 1.0, 0.75])


def test_worst_model_rate_says_whether_the_pick_is_in_the_bottom_quarter():
    from uda_ray.selection.study import RANDOM, measure

    evals = [{"trial_id": f"t{i}", "step": 1, "test/miou": i / 10, "uv/a": -i, "uv/b": i} for i in range(8)]
    rows = {r["validator"]: r for r in measure(evals, {"uv/a": "max", "uv/b": "max"})}
    assert rows["uv/a"]["pick_pct"] == 0.0 and rows["uv/a"]["worst"] == 1.0  # picks the worst
    assert rows["uv/b"]["pick_pct"] == pytest.approx(7 / 8) and rows["uv/b"]["worst"] == 0.0
    assert rows["uv/a"]["worst_final"] == 1.0
    assert rows[RANDOM]["worst"] == pytest.approx(2 / 8)  # t0, t1 have fewer than a quarter below them
