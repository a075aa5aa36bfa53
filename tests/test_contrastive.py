"""Supervised contrastive loss and the contrastive-with-pseudo-labels method (seed 003, model 2)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import NUM_CLASSES, TinySeg, make_batch
from tests.ddp import assert_ddp_matches_one_worker
from uda_ray.config import OptimConfig
from uda_ray.config_loader import build
from uda_ray.errors import ConfigError
from uda_ray.losses import supcon_loss
from uda_ray.methods.base import UDABatch
from uda_ray.methods.contrastive import Contrastive, ContrastiveConfig

OPTIM = OptimConfig(name="sgd", lr=1e-2)


def clustered(n: int, classes: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features near one random centre per class, and their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    lbl = torch.arange(n) % classes
    return centres[lbl] + 0.1 * torch.randn(n, dim, generator=g), lbl


def test_supcon_finite_when_some_classes_have_no_positive():
    fa, la = clustered(12, 3)
    fb, lb = clustered(12, 3, seed=1)
    la[0] = 4  # an anchor whose class is absent from the candidates: skipped, not NaN
    loss = supcon_loss(fa, fb, la, lb)
    assert torch.isfinite(loss) and loss > 0


def test_supcon_zero_with_gradient_when_no_anchor_has_a_positive():
    fa = torch.randn(5, 8, requires_grad=True)
    zeros, ones = torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)
    loss = supcon_loss(fa, torch.randn(5, 8), zeros, ones)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(fa.grad, torch.zeros_like(fa))


def test_supcon_ignores_255_labels():
    fa, la = clustered(8, 2)
    ref = supcon_loss(fa[:6], fa[:6], la[:6], la[:6])
    la = la.clone()
    la[6:] = 255
    torch.testing.assert_close(supcon_loss(fa, fa, la, la), ref)


def test_supcon_lower_for_aligned_than_for_shuffled_features():
    fa, lbl = clustered(40, 4)
    fb, _ = clustered(40, 4, seed=0)
    aligned = supcon_loss(fa, fb, lbl, lbl)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    shuffled = supcon_loss(fa[perm], fb, lbl, lbl)
    assert aligned < shuffled


def make(cfg: ContrastiveConfig | None = None, seed: int = 0) -> Contrastive:
    torch.manual_seed(seed)
    return Contrastive(TinySeg(), cfg or ContrastiveConfig(), OPTIM, num_classes=NUM_CLASSES,
                       model_factory=TinySeg)


def test_step_finite_with_contrastive_term_and_head_trained():
    m = make(ContrastiveConfig(beta=0.1, pixels_per_image=32))
    head_before = [p.detach().clone() for p in m.head_raw.parameters()]
    b = make_batch(0)
    lbl = b.tgt_lbl.clone()
    lbl[:, :8] = 255  # thresholded pseudo-labels
    logs = m.train_step(UDABatch(b.src_img, b.src_lbl, b.tgt_img, lbl), 0)
    assert {"loss/seg_src", "loss/ent", "loss/con"} <= set(logs)
    assert all(torch.isfinite(v) for v in logs.values()) and logs["loss/con"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(head_before, m.head_raw.parameters()))
    assert m.opt.param_groups[-1]["initial_lr"] == 10 * OPTIM.lr


def test_sampling_prefers_valid_pixels_and_generator_state_is_checkpointed():
    m = make(ContrastiveConfig(pixels_per_image=5))
    lbl = torch.full((2, 20), 255)
    lbl[0, :7] = 1
    lbl[1, 3:6] = 2
    idx = m._sample(lbl, 5)  # (2, 5)
    assert set(idx[0].tolist()) <= set(range(7))
    assert set(range(3, 6)) <= set(idx[1].tolist())  # all 3 valid ones, then 2 ignored ones
    state = m.state_dict()["rng"]
    a = m._sample(lbl, 5)
    m.load_state_dict({**m.state_dict(), "rng": state})
    assert torch.equal(m._sample(lbl, 5), a)


def test_terms_off_means_plain_stylized_source_ce():
    m = make(ContrastiveConfig(lambda_ent=0.0, lambda_con=0.0))
    b = make_batch(0)
    logs = m.train_step(UDABatch(b.src_img, b.src_lbl, b.tgt_img, None), 0)
    assert set(logs) == {"loss/seg_src"}


def test_missing_pseudo_labels_raise_and_config_validates():
    b = make_batch(0)
    with pytest.raises(ValueError):
        make().train_step(UDABatch(b.src_img, b.src_lbl, b.tgt_img, None), 0)
    with pytest.raises(ConfigError):
        build(ContrastiveConfig, {"temperature": 0.0})
    with pytest.raises(ConfigError):
        build(ContrastiveConfig, {"beta": 0.6})


def _make_contrastive(wrap):
    torch.manual_seed(0)
    return Contrastive(TinySeg(), ContrastiveConfig(beta=0.1, pixels_per_image=16), OPTIM,
                       num_classes=NUM_CLASSES, wrap=wrap)


def _model_and_head(m) -> list[torch.Tensor]:
    return [*m.model_raw.parameters(), *m.head_raw.parameters()]


@pytest.mark.ddp
def test_two_worker_ddp_samples_and_steps_like_one_worker():
    """16 of 96 feature pixels per image: the shared DDP test (256 per image) samples them all; here the
    workers must draw the global batch's random numbers and keep their slice."""
    assert_ddp_matches_one_worker(_make_contrastive, _model_and_head, steps=2)
