"""CPSL (Li et al., CVPR 2022): its pure pieces, stage 1 state, stage 2/3 distillation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import NUM_CLASSES, TinySeg, make_batch
from tests.ddp import assert_ddp_matches_one_worker
from uda_ray.config import OptimConfig
from uda_ray.errors import ConfigError
from uda_ray.losses import kl_distill
from uda_ray.methods.cpsl import (
    CPSL,
    CPSLConfig,
    FeatureQueue,
    cutmix_box,
    ema_update,
    hard_labels,
    paste_box,
    photometric,
    queue_contrastive_loss,
    rectify,
    sinkhorn,
)
from uda_ray.methods.cpsl_distill import CPSLDistill, CPSLDistillConfig
from uda_ray.training.step import autocast

OPTIM = OptimConfig(name="sgd", lr=1e-2)
MARGINAL = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])


def make(cls, cfg=None, seed: int = 0):
    torch.manual_seed(seed)
    return cls(TinySeg(), cfg or cls.Config(), OPTIM, num_classes=NUM_CLASSES, model_factory=TinySeg)


def cosine_scores(n: int = 400, c: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    feats, protos = torch.randn(n, 8, generator=g), torch.randn(c, 8, generator=g)
    return F.normalize(feats, dim=1) @ F.normalize(protos, dim=1).t()  # (N, C) cosines


# -- Sinkhorn --------------------------------------------------------------------------------------
def test_sinkhorn_columns_match_the_class_marginal_and_rows_are_uniform():
    scores = cosine_scores()
    q = sinkhorn(scores, eps=0.05, iters=200, class_marginal=MARGINAL)
    n = scores.shape[0]
    torch.testing.assert_close(q.sum(1), torch.ones(n), atol=1e-5, rtol=0)  # every pixel: total 1 (= N / N)
    torch.testing.assert_close(q.sum(0) / n, MARGINAL, atol=2e-3, rtol=0)  # class totals: the marginal
    assert (q >= 0).all()


def test_sinkhorn_of_float16_scores_is_computed_in_float32():
    """fp16 autocast hands Sinkhorn float16 scores; with N * C above 65504 a float16 total overflowed (NaN)."""
    scores = cosine_scores(n=20000).half()  # (20000, 5): 100000 terms
    q = sinkhorn(scores, eps=0.05, iters=3, class_marginal=MARGINAL)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q.sum(1), torch.ones(scores.shape[0]), atol=1e-4, rtol=0)


def test_class_statistics_stay_exact_under_fp16_autocast():
    """One class covering more pixels than float16 can count (65504): its count exact, its prototype finite."""
    m = make(CPSL)
    c, d = m.proto_raw.weight.shape
    soft = torch.zeros(1, c, 250, 280)  # 70000 pixels, all class 2
    soft[:, 2] = 1.0
    z = F.normalize(torch.randn(1, d, 250, 280), dim=1)
    with autocast("fp16", torch.device("cpu")):
        m._update_stats(soft, z)
    assert m.proto_raw.class_counts[2].item() == 70000.0 and m.proto_raw.class_counts.sum().item() == 70000.0
    assert m.proto_raw.seen[2] and torch.isfinite(m.proto_raw.weight).all()
    torch.testing.assert_close(m.proto_raw.weight[2], F.normalize(z.mean((0, 2, 3)), dim=0), atol=1e-5, rtol=0)


def test_sinkhorn_with_the_originals_three_iterations_moves_toward_the_marginal():
    scores = cosine_scores(seed=1)
    plain = F.softmax(scores / 0.05, dim=1).mean(0)  # no balancing
    q = sinkhorn(scores, eps=0.05, iters=3, class_marginal=MARGINAL)
    torch.testing.assert_close(q.sum(1), torch.ones(scores.shape[0]), atol=1e-5, rtol=0)
    # three iterations on peaked (eps 0.05) scores only partly align the classes: closer, not equal
    assert (q.mean(0) - MARGINAL).abs().sum() < 0.7 * (plain - MARGINAL).abs().sum()


def test_sinkhorn_gives_nothing_to_a_class_with_zero_marginal():
    marginal = torch.tensor([0.6, 0.4, 0.0, 0.0, 0.0])
    q = sinkhorn(cosine_scores(), eps=0.05, iters=50, class_marginal=marginal)
    assert torch.isfinite(q).all() and q[:, 2:].abs().max() < 1e-6


# -- rectification ---------------------------------------------------------------------------------
def _clustered(b: int = 2, h: int = 4, w: int = 5, c: int = NUM_CLASSES, d: int = 8):
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(c, d, generator=g), dim=1)  # (C, D)
    lbl = torch.randint(0, c, (b, h, w), generator=g)  # (B, h, w)
    z = F.normalize(protos[lbl] + 0.05 * torch.randn(b, h, w, d, generator=g), dim=-1).permute(0, 3, 1, 2)
    return protos, lbl, z  # z (B, D, h, w) near its class's prototype


def test_rectification_keeps_the_argmax_when_prototypes_agree():
    protos, lbl, z = _clustered()
    soft = F.softmax(F.one_hot(lbl, NUM_CLASSES).permute(0, 3, 1, 2).float() * 1.5, dim=1)  # argmax = lbl
    rect = rectify(soft, z, protos, temperature=0.08)
    assert torch.equal(rect.argmax(1), lbl)
    torch.testing.assert_close(rect.sum(1), torch.ones_like(lbl, dtype=torch.float))
    assert (rect.max(1).values > soft.max(1).values).all()  # agreement sharpens the label


def test_rectification_overrides_an_uncertain_label_that_prototypes_contradict():
    protos, lbl, z = _clustered()
    wrong = (lbl + 1) % NUM_CLASSES
    soft = F.softmax(F.one_hot(wrong, NUM_CLASSES).permute(0, 3, 1, 2).float() * 0.3, dim=1)  # weak, wrong
    assert torch.equal(rectify(soft, z, protos, temperature=0.08).argmax(1), lbl)


def test_hard_labels_ignore_pixels_below_the_threshold():
    probs = torch.tensor([[0.9, 0.1], [0.55, 0.45]]).t()[None, :, :, None]  # (1, 2, 2, 1)
    assert hard_labels(probs, 0.6).flatten().tolist() == [0, 255]
    assert hard_labels(probs, 0.0).flatten().tolist() == [0, 0]


# -- losses ----------------------------------------------------------------------------------------
def test_distillation_is_nonnegative_and_zero_for_identical_distributions():
    logits = torch.randn(2, NUM_CLASSES, 3, 4)
    torch.testing.assert_close(kl_distill(logits, F.softmax(logits, 1)), torch.tensor(0.0), atol=1e-6, rtol=0)
    other = F.softmax(torch.randn(2, NUM_CLASSES, 3, 4), 1)
    assert kl_distill(logits, other) > 0


def _queue_with(n: int, size: int = 64, d: int = 8) -> FeatureQueue:
    q = FeatureQueue(size, d, NUM_CLASSES)
    g = torch.Generator().manual_seed(1)
    q.push(F.normalize(torch.randn(n, d, generator=g), dim=1), torch.randn(n, NUM_CLASSES, generator=g),
           torch.arange(n) % 3)  # classes 0, 1, 2 only
    return q


def test_contrastive_loss_is_finite_with_a_partial_queue_and_classes_without_positives():
    queue = _queue_with(20)  # 20 of 64 slots filled
    qf, _, ql = queue.filled()
    anchors = F.normalize(torch.randn(10, 8), dim=1).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3, 4, 4, 255, 0, 1, 3])  # classes 3 and 4 have no positive
    loss = queue_contrastive_loss(anchors, labels, qf, ql, 0.08)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert torch.isfinite(anchors.grad).all() and anchors.grad[3].abs().sum() == 0  # skipped anchor


def test_contrastive_loss_is_zero_with_a_gradient_when_no_anchor_has_a_positive():
    qf, _, ql = _queue_with(6).filled()
    anchors = torch.randn(4, 8, requires_grad=True)
    loss = queue_contrastive_loss(anchors, torch.full((4,), 4), qf, ql, 0.08)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(anchors.grad, torch.zeros_like(anchors))


def test_contrastive_loss_is_lower_for_anchors_at_their_class_features():
    qf, _, ql = _queue_with(30).filled()
    near = queue_contrastive_loss(qf[:9], ql[:9], qf, ql, 0.08)
    shuffled = queue_contrastive_loss(qf[:9], ql[:9].roll(1), qf, ql, 0.08)
    assert near < shuffled


# -- augmentation, EMA -----------------------------------------------------------------------------
def test_cutmix_pastes_exactly_the_box_into_image_and_label():
    b = make_batch(0)
    h, w = b.tgt_img.shape[-2:]
    y0, y1, x0, x1 = box = cutmix_box(h, w, torch.Generator().manual_seed(3))
    assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
    assert abs((y1 - y0) * (x1 - x0) - 0.5 * h * w) <= h + w  # half the area, up to rounding
    img, lbl = paste_box(b.tgt_img, b.src_img, box), paste_box(b.tgt_lbl, b.src_lbl, box)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert torch.equal(img[..., inside], b.src_img[..., inside])
    assert torch.equal(lbl[:, inside], b.src_lbl[:, inside])
    assert torch.equal(img[..., ~inside], b.tgt_img[..., ~inside])
    assert torch.equal(lbl[:, ~inside], b.tgt_lbl[:, ~inside])


def test_photometric_view_is_identity_when_not_drawn_and_stays_in_range():
    img = make_batch(0).tgt_img
    off = torch.tensor([[0.9, 0.9, 0.1, 0.9, 0.5]] * 2)  # flags >= 0.5: neither jitter nor blur
    assert torch.equal(photometric(img, off), img)
    on = photometric(img, torch.tensor([[0.1, 0.1, 0.9, 0.1, 0.0]] * 2))
    assert not torch.allclose(on, img) and on.min() >= 0 and on.max() <= 255 and on.shape == img.shape


def test_ema_update_formula():
    t, s = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in t.parameters()]
    ema_update(t, s, 0.9)
    for a, p0, ps in zip(t.parameters(), t0, s.parameters()):
        torch.testing.assert_close(a, 0.9 * p0 + 0.1 * ps)


def test_teacher_is_the_students_ema_and_not_in_the_optimizer():
    m = make(CPSL)
    student0 = copy.deepcopy(m.model_raw.state_dict())  # the teacher is copied from it at the first step
    m.train_step(make_batch(0), 0)
    ema = m.cfg.ema
    for name, p in m.teacher_raw.named_parameters():
        torch.testing.assert_close(p, ema * student0[name] + (1 - ema) * m.model_raw.state_dict()[name])
    opt_params = {id(p) for g in m.opt.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in m.teacher_raw.parameters())
    assert id(m.proto_raw.weight) in opt_params and all(id(p) in opt_params for p in m.head_raw.parameters())


# -- state ----------------------------------------------------------------------------------------
def test_queue_is_a_fifo_ring():
    q = _queue_with(0, size=5)
    q.push(torch.ones(3, 8), torch.zeros(3, NUM_CLASSES), torch.tensor([0, 1, 2]))
    q.push(2 * torch.ones(4, 8), torch.zeros(4, NUM_CLASSES), torch.tensor([3, 4, 0, 1]))
    feat, _, lbl = q.filled()
    assert int(q.count) == 5 and int(q.ptr) == 2
    # slots 0, 1 (the oldest two) overwritten by the wrap-around; the next push starts at slot 2
    assert lbl.tolist() == [0, 1, 2, 3, 4]
    assert feat[[0, 1, 3, 4]].eq(2).all() and feat[2].eq(1).all()


def test_prototypes_and_queue_round_trip_through_the_method_state_dict():
    m = make(CPSL)
    for step in range(2):
        m.train_step(make_batch(step), step)
    state = copy.deepcopy(m.state_dict())
    want = {"model", "opt", "teacher", "head", "head_ema", "prototypes", "queue", "rng", "warmup"}
    assert want <= set(state)
    fresh = make(CPSL, seed=5)
    fresh.load_state_dict(state)
    for a, b in ((m.proto_raw, fresh.proto_raw), (m.queue, fresh.queue)):
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), k
    assert int(fresh.queue.count) == 2 * 2 * min(m.cfg.pixels_per_image, 8 * 12)  # 2 steps, 2 images
    assert bool(fresh.proto_raw.started)
    assert fresh.proto_raw.class_counts.sum() > 0


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError):
        CPSLConfig(ema=1.0)
    with pytest.raises(ConfigError):
        CPSLConfig(soft_labels="oracle")
    with pytest.raises(ConfigError):
        CPSLDistillConfig(lambda_kd=-1.0)


# -- stages 2 and 3 --------------------------------------------------------------------------------
def test_distill_teacher_loads_the_ema_teacher_else_the_model(tmp_path):
    a, b = TinySeg().state_dict(), TinySeg().state_dict()
    torch.save({"method": {"model": a, "teacher": b}, "step": 3}, tmp_path / "state.pt")
    for key, want in (("teacher", b), ("model", a)):
        m = make(CPSLDistill, CPSLDistillConfig(teacher_checkpoint=str(tmp_path), teacher_key=key))
        for k, v in m.teacher_raw.state_dict().items():
            assert torch.equal(v, want[k])
    with pytest.raises(ConfigError):
        make(CPSLDistill, CPSLDistillConfig(teacher_checkpoint=str(tmp_path / "missing")))


def test_distill_teacher_defaults_to_the_checkpoints_student_as_the_original(tmp_path):
    """CPSL's stage 2 builds its teacher from the stage-1 checkpoint's 'ResNet101' state, which holds the student
    (the EMA model is never saved): the default teacher_key is "model"."""
    a, b = TinySeg().state_dict(), TinySeg().state_dict()
    torch.save({"method": {"model": a, "teacher": b}, "step": 3}, tmp_path / "state.pt")
    m = make(CPSLDistill, CPSLDistillConfig(teacher_checkpoint=str(tmp_path)))
    assert CPSLDistillConfig().teacher_key == "model"
    got = m.teacher_raw.state_dict()
    assert all(torch.equal(v, a[k]) for k, v in got.items())
    assert not all(torch.equal(v, b[k]) for k, v in got.items())


def test_distill_teacher_is_frozen_and_kd_starts_at_zero_as_a_copy():
    m = make(CPSLDistill)
    logs = m.train_step(make_batch(0), 0)
    assert logs["loss/kd"].item() == pytest.approx(0.0, abs=1e-6)  # teacher == student on the same view
    teacher = copy.deepcopy(m.teacher_raw.state_dict())
    m.train_step(make_batch(1), 1)
    assert all(torch.equal(v, teacher[k]) for k, v in m.teacher_raw.state_dict().items())
    assert not any(p.requires_grad for p in m.teacher_raw.parameters())
    assert "teacher" in m.state_dict() and "started" in m.state_dict()


# -- DDP: global statistics --------------------------------------------------------------------------
def _make_cpsl(wrap):
    torch.manual_seed(0)
    return CPSL(TinySeg(), CPSLConfig(pixels_per_image=16), OPTIM, num_classes=NUM_CLASSES, wrap=wrap)


def _global_state(m) -> list[torch.Tensor]:
    return [*m.model_raw.parameters(), *m.head_raw.parameters(), *m.proto_raw.state_dict().values(),
            *m.queue.state_dict().values()]


@pytest.mark.ddp
def test_two_workers_sample_and_share_queue_prototypes_and_class_counts_like_one_worker():
    """16 of 96 feature pixels per image (the shared DDP test samples them all): the workers draw the
    global batch's random numbers and keep their slice; the queue, the prototypes and the class histogram
    hold the global batch's pixels."""
    assert_ddp_matches_one_worker(_make_cpsl, _global_state, steps=2)
