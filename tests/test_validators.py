"""Label-free validators against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from uda_ray.selection.validators import ValidatorAccumulator, bnm, information_max, mean_entropy, pixel_sample, snd

T = torch.tensor


def test_mean_entropy_is_normalized_by_log_c():
    # rows: H = 0 and H = log 2 -> mean log2 / 2, / log 2 = 0.5
    assert mean_entropy(T([[1.0, 0.0], [0.5, 0.5]])) == pytest.approx(0.5)
    assert mean_entropy(torch.full((4, 19), 1 / 19)) == pytest.approx(1.0)


def test_information_max_rewards_confident_and_diverse():
    assert information_max(T([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)  # H(mean)=log2, mean H=0
    assert information_max(T([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.0)  # collapsed on one class
    assert information_max(T([[0.5, 0.5], [0.5, 0.5]])) == pytest.approx(0.0)  # unsure
    # [0.9, 0.1] and [0.1, 0.9]: mean uniform (1.0), each H = h(0.9)/log 2
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    assert information_max(T([[0.9, 0.1], [0.1, 0.9]])) == pytest.approx(1.0 - h)


def test_snd_on_hand_computed_neighbourhoods():
    # three orthogonal predictions: every similarity to a neighbour is 0 -> uniform over 2 neighbours
    assert snd(torch.eye(3)) == pytest.approx(math.log(2))
    # two samples: each has one neighbour -> entropy 0
    assert snd(T([[1.0, 0.0], [0.3, 0.7]])) == pytest.approx(0.0, abs=1e-9)
    # p1 = p2 = [1, 0], p3 = [0, 1] at temperature 0.05: rows 1, 2 put q = e^20 / (e^20 + 1) on each other,
    # row 3 is uniform over two neighbours at similarity 0
    q = math.exp(20) / (math.exp(20) + 1)
    h = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    assert snd(T([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])) == pytest.approx((2 * h + math.log(2)) / 3)
    # scale-free: rows are L2-normalized first
    assert snd(T([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])) == pytest.approx((2 * h + math.log(2)) / 3)


def test_bnm_is_the_nuclear_norm_over_n():
    assert bnm(torch.eye(2)) == pytest.approx(1.0)
    assert bnm(T([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(math.sqrt(2) / 2)  # rank 1, sigma = sqrt 2
    assert bnm(T([[0.6, 0.4], [0.6, 0.4]])) == pytest.approx(math.sqrt(2) * math.sqrt(0.52) / 2)


def _maps(n=5, c=4, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g).mul(3).softmax(1)


def test_accumulator_matches_the_functions_and_ignores_batching_order():
    maps = _maps()
    a = ValidatorAccumulator(4, pixels_per_image=7, seed=3)
    a.update(maps, list(range(5)))
    b = ValidatorAccumulator(4, pixels_per_image=7, seed=3)
    for i in (4, 1, 3, 0, 2):  # another order, batch 1 (another DDP shard layout)
        b.update(maps[i:i + 1], [i])
    ra, rb = a.compute(), b.compute()
    assert ra.keys() == {"uv/entropy", "uv/im", "uv/snd", "uv/bnm"}
    assert ra == pytest.approx(rb)
    pixels = maps.permute(0, 2, 3, 1).reshape(-1, 4)
    assert ra["uv/entropy"] == pytest.approx(mean_entropy(pixels))
    assert ra["uv/im"] == pytest.approx(information_max(pixels))
    sample = torch.cat([maps[i].permute(1, 2, 0).reshape(-1, 4)[pixel_sample(30, 7, 3, i)] for i in range(5)])
    assert ra["uv/snd"] == pytest.approx(snd(sample)) and ra["uv/bnm"] == pytest.approx(bnm(sample))


def test_pixel_sample_is_seeded_and_distinct():
    a = pixel_sample(100, 10, seed=1, index=7)
    assert torch.equal(a, pixel_sample(100, 10, seed=1, index=7)) and len(set(a.tolist())) == 10
    assert not torch.equal(a, pixel_sample(100, 10, seed=1, index=8))
    assert torch.equal(pixel_sample(5, 10, 0, 0), torch.arange(5))


def _shard_entry(rank: int, world: int, out: dict) -> None:
    maps = _maps()
    acc = ValidatorAccumulator(4, pixels_per_image=7, seed=3)
    idx = list(range(rank, 5, world))  # the shard val_loader gives this rank
    acc.update(maps[idx], idx)
    acc.reduce()
    out[rank] = acc.compute()


@pytest.mark.ddp
def test_two_gloo_workers_compute_what_one_process_does():
    from tests.ddp import run_gloo

    one = ValidatorAccumulator(4, pixels_per_image=7, seed=3)
    one.update(_maps(), list(range(5)))
    got = run_gloo(_shard_entry, 2)
    assert got[0] == pytest.approx(one.compute()) and got[1] == pytest.approx(one.compute())
