"""Meta Pseudo Labels: the reward's sign convention, its moving-average baseline, checkpoint and DDP."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import NUM_CLASSES, TinySeg, make_batch
from tests.ddp import assert_ddp_matches_one_worker
from uda_ray.config import OptimConfig
from uda_ray.config_loader import build
from uda_ray.errors import ConfigError
from uda_ray.methods.base import UDABatch, upsample
from uda_ray.methods.mpl import MPL, MPLConfig, mpl_teacher_term

OPTIM = OptimConfig(name="sgd", lr=1e-2, momentum=0.9, weight_decay=1e-4)


def make_mpl(cfg: MPLConfig | None = None, seed: int = 0, wrap=None) -> MPL:
    torch.manual_seed(seed)
    return MPL(TinySeg(), cfg or MPLConfig(), OPTIM, num_classes=NUM_CLASSES, wrap=wrap,
               model_factory=TinySeg)


@pytest.mark.parametrize("reward,direction", [(1.0, 1), (-1.0, -1)])
def test_teacher_term_reward_sign_moves_label_probability(reward, direction):
    """Toy teacher = free logits: one gradient step on reward * CE raises p(own labels) iff reward > 0."""
    logits = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    pseudo = logits.detach().argmax(1)
    before = F.softmax(logits.detach(), 1).gather(1, pseudo[:, None]).mean()
    mpl_teacher_term(logits, pseudo, reward).backward()
    after = F.softmax(logits.detach() - 0.5 * logits.grad, 1).gather(1, pseudo[:, None]).mean()
    assert torch.sign(after - before).item() == direction


def _teacher_logp_after_step(monkeypatch, ce_old: float, ce_new: float) -> float:
    """Mean log-prob the teacher gives, after one step, to the labels it produced before it; the student's
    source CEs before/after its step are forced to (ce_old, ce_new), i.e. raw reward = ce_old - ce_new."""
    m = make_mpl()
    batch = make_batch(0)
    size = tuple(batch.tgt_img.shape[-2:])
    with torch.no_grad():
        pseudo = upsample(m.teacher(batch.tgt_img)["out"], size).argmax(1)  # what the step will label
    monkeypatch.setattr(m, "_student_step", lambda b, p: (torch.tensor(ce_old), torch.tensor(ce_new), True, {}))
    logs = m.train_step(batch, 0)
    assert logs["mpl/reward"].item() == pytest.approx(ce_old - ce_new)  # baseline starts at 0
    with torch.no_grad():
        logp = F.log_softmax(upsample(m.teacher(batch.tgt_img)["out"], size), 1)
    return logp.gather(1, pseudo[:, None]).mean().item()


def test_positive_reward_raises_and_negative_lowers_teacher_probability_of_its_labels(monkeypatch):
    improved = _teacher_logp_after_step(monkeypatch, ce_old=2.0, ce_new=1.0)  # student got better: reward +1
    neutral = _teacher_logp_after_step(monkeypatch, ce_old=1.0, ce_new=1.0)  # reward 0: source CE only
    worse = _teacher_logp_after_step(monkeypatch, ce_old=1.0, ce_new=2.0)  # student got worse: reward -1
    assert improved > neutral > worse


def test_reward_is_old_minus_new_minus_moving_average():
    m = make_mpl(MPLConfig(ema_rate=0.9))
    first = m.train_step(make_batch(0), 0)
    raw1 = first["mpl/ce_old"] - first["mpl/ce_new"]
    torch.testing.assert_close(first["mpl/reward_raw"], raw1)
    torch.testing.assert_close(first["mpl/reward"], raw1)  # baseline 0 before the first update
    assert m.baseline.value == pytest.approx(0.1 * raw1.item())
    second = m.train_step(make_batch(1), 1)
    assert second["mpl/baseline"].item() == pytest.approx(0.1 * raw1.item())
    torch.testing.assert_close(second["mpl/reward"], second["mpl/reward_raw"] - 0.1 * raw1.item())


def test_teacher_starts_as_copy_of_student_with_its_own_lr():
    m = make_mpl(MPLConfig(teacher_lr=3e-3))
    for a, b in zip(m.model_raw.parameters(), m.teacher_raw.parameters()):
        assert torch.equal(a, b) and a is not b
    assert [g["lr"] for g in m.t_opt.param_groups] == [3e-3, 3e-2]  # TinySeg: classifier at 10x
    assert [g["lr"] for g in make_mpl().t_opt.param_groups] == [OPTIM.lr, 10 * OPTIM.lr]


def test_state_round_trip_includes_teacher_and_moving_average():
    m = make_mpl()
    for step in range(2):
        m.train_step(make_batch(step), step)
    state = copy.deepcopy(m.state_dict())
    assert {"model", "opt", "teacher", "opt_teacher", "reward_baseline"} <= set(state)
    fresh = make_mpl(seed=123)
    fresh.load_state_dict(state)
    assert fresh.baseline.value == m.baseline.value != 0.0
    for a, b in zip(m.teacher_raw.parameters(), fresh.teacher_raw.parameters()):
        assert torch.equal(a, b)
    got, expected = fresh.train_step(make_batch(2), 2), m.train_step(make_batch(2), 2)
    assert {k: v.item() for k, v in got.items()} == {k: v.item() for k, v in expected.items()}


@pytest.mark.parametrize("cfg", [MPLConfig(hard_labels="sample"), MPLConfig(student_source_weight=0.0),
                                 MPLConfig(lambda_uda=1.0, uda_beta=0.1, uda_threshold=0.0)])
def test_variants_step_with_finite_losses(cfg):
    logs = make_mpl(cfg).train_step(make_batch(0), 0)
    assert all(torch.isfinite(v) for v in logs.values())
    assert ("loss/uda" in logs) == (cfg.lambda_uda > 0)
    assert ("loss/seg_src_student" in logs) == (cfg.student_source_weight > 0)


def test_config_validation():
    with pytest.raises(ConfigError):
        build(MPLConfig, {"hard_labels": "soft"})
    with pytest.raises(ConfigError):
        build(MPLConfig, {"ema_rate": 1.0})
    assert build(MPLConfig, {"teacher_lr": 1}).teacher_lr == 1.0


def _make_mpl_wrapped(wrap):
    return make_mpl(wrap=wrap)


def _student_teacher(m) -> list[torch.Tensor]:
    return [*m.model_raw.parameters(), *m.teacher_raw.parameters()]


def _baseline(m) -> list[torch.Tensor]:
    return [torch.tensor(m.baseline.value, dtype=torch.float64)]


@pytest.mark.ddp
def test_two_worker_ddp_matches_one_worker_for_student_teacher_and_baseline():
    """The workers' source CEs differ; without the all-reduce each would reward its teacher replica with its
    own, and the averaged teacher gradient (and the baseline) would not be the 1-worker one."""
    assert_ddp_matches_one_worker(_make_mpl_wrapped, _student_teacher, steps=2)
    # 0.01 * (ce_old - ce_new): float32 cancellation, so an absolute tolerance on a ~1e-3 value
    assert_ddp_matches_one_worker(_make_mpl_wrapped, _baseline, steps=2, atol=1e-8)


class TinySegBN(TinySeg):
    """TinySeg with BatchNorm (train and eval mode differ, running statistics count updates)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__(num_classes)
        self.body[1] = torch.nn.BatchNorm2d(8)


def test_reward_is_measured_on_the_held_out_source_batch_in_eval_mode():
    from uda_ray.methods.mpl import global_ce

    torch.manual_seed(0)
    m = MPL(TinySegBN(), MPLConfig(), OPTIM, num_classes=NUM_CLASSES, model_factory=TinySegBN)
    batch = make_batch(0)
    before = copy.deepcopy(m.model_raw).eval()
    bn = m.model_raw.body[1]
    tracked = int(bn.num_batches_tracked)
    logs = m.train_step(batch, 0)
    with torch.no_grad():
        ce_old = global_ce(before(batch.src_img_held)["out"], batch.src_lbl_held)
        ce_new = global_ce(copy.deepcopy(m.model_raw).eval()(batch.src_img_held)["out"], batch.src_lbl_held)
        on_train_batch = global_ce(before(batch.src_img)["out"], batch.src_lbl)
    torch.testing.assert_close(logs["mpl/ce_old"], ce_old)
    torch.testing.assert_close(logs["mpl/ce_new"], ce_new)
    assert abs(logs["mpl/ce_old"].item() - on_train_batch.item()) > 1e-4  # not the batch it trained on
    # BatchNorm saw exactly the two training forwards (target, source): the measuring forwards left it alone
    assert int(bn.num_batches_tracked) == tracked + 2
    assert m.model_raw.training


def test_mpl_without_a_held_out_batch_is_an_error():
    b = make_batch(0)
    with pytest.raises(ValueError, match="held-out"):
        make_mpl().train_step(UDABatch(b.src_img, b.src_lbl, b.tgt_img), 0)


def test_the_loop_gives_mpl_a_held_out_batch_of_other_source_images(tmp_path, synth_root, monkeypatch):
    from tests.conftest import tiny_experiment
    from uda_ray.build import build_experiment
    from uda_ray.training.loop import fit
    from uda_ray.training.sessions import LocalSession

    seen = []
    original = MPL.train_step

    def spy(self, batch, step):
        seen.append((batch.src_img.clone(), batch.src_img_held.clone(), batch.src_lbl_held.clone()))
        return original(self, batch, step)

    monkeypatch.setattr(MPL, "train_step", spy)
    cfg = build_experiment(tiny_experiment(synth_root, method="mpl", **{"train.max_steps": 2}))
    fit(cfg, LocalSession(tmp_path / "run"))
    assert len(seen) == 2
    for src, held, lbl in seen:
        assert held.shape == src.shape and lbl.shape == held.shape[:1] + held.shape[2:]
        assert not torch.equal(src, held)


# -- the real-time DA project's MPL: pretrained teacher, fresh student, the student's discriminator ----------


def _teacher_state() -> dict:
    from tests.test_methods import teacher_checkpoint

    return torch.load(teacher_checkpoint(), weights_only=True)["method"]["model"]


def test_teacher_from_a_checkpoint_and_a_fresh_student():
    from tests.test_methods import teacher_checkpoint

    torch.manual_seed(0)
    init = TinySeg().state_dict()  # what make_mpl's student is initialized to (same seed)
    m = make_mpl(MPLConfig(teacher_from=teacher_checkpoint(), fresh_student=True))
    for k, v in _teacher_state().items():
        assert torch.equal(m.teacher_raw.state_dict()[k], v)
        assert torch.equal(m.model_raw.state_dict()[k], init[k]) and not torch.equal(init[k], v)
    same = make_mpl(MPLConfig(teacher_from=teacher_checkpoint()))  # not fresh: the student starts as the teacher
    for k, v in _teacher_state().items():
        assert torch.equal(same.model_raw.state_dict()[k], v)


def test_fresh_student_needs_a_teacher_checkpoint():
    with pytest.raises(ConfigError, match="fresh_student needs method_cfg.teacher_from"):
        build(MPLConfig, {"fresh_student": True})
    with pytest.raises(ConfigError, match="discriminator: unknown 'big'"):
        build(MPLConfig, {"lambda_adv": 1e-3, "discriminator": "big"})
    with pytest.raises(ConfigError, match="lambda_adv must be a finite number >= 0"):
        build(MPLConfig, {"lambda_adv": -1.0})


def test_teacher_from_a_missing_checkpoint_is_one_line(tmp_path):
    from uda_ray.errors import UserError

    with pytest.raises(UserError, match="no checkpoint there"):
        make_mpl(MPLConfig(teacher_from=str(tmp_path / "nope")))


@pytest.mark.parametrize("disc", ["fc", "dsc"])
def test_discriminator_term_trains_the_students_discriminator(disc, narrow_discriminators):
    m = make_mpl(MPLConfig(lambda_adv=1e-2, discriminator=disc))
    assert m.adversary is not None and len(m.optimizers) == 3  # student, teacher, discriminator
    d = m.adversary.discs["main"]
    before = [p.detach().clone() for p in d.parameters()]
    logs = m.train_step(make_batch(0), 0)
    assert {"loss/adv", "loss/d_src", "loss/d_tgt"} <= set(logs)
    assert all(torch.isfinite(v).all() for v in logs.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, d.parameters()))
    assert {"d_main", "opt_d_main"} <= set(m.state_dict())  # the checkpoint holds D and its optimizer


def test_the_adversarial_term_changes_the_students_update():
    """With the same batch, the student's update differs between lambda_adv 0 and > 0 (and 0 logs no D)."""
    a, b = make_mpl(), make_mpl(MPLConfig(lambda_adv=1.0))
    batch = make_batch(0)
    a.train_step(batch, 0)
    b.train_step(batch, 0)
    assert any(not torch.equal(x, y) for x, y in zip(a.model_raw.parameters(), b.model_raw.parameters()))
    assert "loss/adv" not in make_mpl().train_step(batch, 0)


def test_init_from_reaches_the_teacher_that_copies_the_student():
    """A fresh run with train.init_from: the loop loads the weights after building the method, and MPL's
    teacher (a copy of the student, no teacher_from) takes them too."""
    from types import SimpleNamespace

    from tests.test_methods import teacher_checkpoint
    from uda_ray.training.loop import _resume_or_init

    m = make_mpl()
    no_checkpoint = SimpleNamespace(latest_checkpoint=lambda: None)
    cfg = SimpleNamespace(train=SimpleNamespace(init_from=str(teacher_checkpoint())))
    assert _resume_or_init(cfg, no_checkpoint, m, "") == (0, {})
    for k, v in _teacher_state().items():
        assert torch.equal(m.model_raw.state_dict()[k], v) and torch.equal(m.teacher_raw.state_dict()[k], v)
