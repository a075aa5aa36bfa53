"""Shared tests run over every entry of METHODS: a new method gets them for free."""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import NUM_CLASSES, TinySeg, make_batch
from tests.ddp import assert_ddp_matches_one_worker
from uda_ray.config import OptimConfig
from uda_ray.methods import METHODS, blocks
from uda_ray.training.step import autocast

OPTIM = OptimConfig(name="sgd", lr=1e-2, momentum=0.9, weight_decay=1e-4)


def teacher_checkpoint() -> str:
    """A checkpoint file holding a TinySeg segmenter (seeded, so the same in every process), written once."""
    import os
    import tempfile

    path = Path(tempfile.gettempdir()) / f"uda_ray_test_teacher_{os.getuid()}.pt"
    if not path.is_file():
        gen = torch.Generator().manual_seed(7)
        model = TinySeg()
        state = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in model.state_dict().items()}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"method": {"model": state}, "step": 0}, tmp)
        os.replace(tmp, path)
    return str(path)


# Configurations of a method beyond its defaults that the shared tests cover too: name -> (method, method_cfg).
VARIANTS = {
    # the real-time DA project's MPL: teacher from a checkpoint, fresh student, the student's discriminator
    "mpl_pretrained_teacher_adv": ("mpl", lambda: {"teacher_from": teacher_checkpoint(), "fresh_student": True,
                                                   "lambda_adv": 1e-2, "discriminator": "dsc"}),
}
CONFIGS = sorted(METHODS) + sorted(VARIANTS)


def method_config(name: str) -> tuple[type, object]:
    """The method class and its Config of a METHODS name (defaults) or a VARIANTS name."""
    from uda_ray.config_loader import build

    if name in VARIANTS:
        method, raw = VARIANTS[name]
        return METHODS[method], build(METHODS[method].Config, raw(), name)
    return METHODS[name], METHODS[name].Config()


def make_method(name: str, seed: int = 0, wrap=None, amp: str = "off"):
    torch.manual_seed(seed)
    cls, cfg = method_config(name)
    return cls(TinySeg(), cfg, OPTIM, num_classes=NUM_CLASSES, wrap=wrap, model_factory=TinySeg, amp=amp)


def through_file(state: dict) -> dict:
    """A state as a checkpoint holds it: saved, then loaded back with torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _params(m) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.eval_model().parameters()]


@pytest.mark.parametrize("name", CONFIGS)
def test_step_changes_params_and_returns_finite_losses(name):
    m = make_method(name)
    before = _params(m)
    for step in range(2):
        losses = m.train_step(make_batch(step), step)
        assert losses, "a step must return its losses"
        for k, v in losses.items():
            assert torch.is_tensor(v) and not v.requires_grad, k
            assert torch.isfinite(v).all(), f"{k} = {v}"
    after = _params(m)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("name", CONFIGS)
def test_checkpoint_round_trip_gives_identical_next_step(name):
    m = make_method(name)
    m.train_step(make_batch(0), 0)
    state = copy.deepcopy(m.state_dict())
    rng = torch.get_rng_state()
    expected = {k: v.item() for k, v in m.train_step(make_batch(1), 1).items()}
    expected_params = _params(m)

    fresh = make_method(name, seed=123)  # different init: everything must come from the checkpoint
    fresh.load_state_dict(state)
    torch.set_rng_state(rng)
    got = {k: v.item() for k, v in fresh.train_step(make_batch(1), 1).items()}
    assert got == expected
    for a, b in zip(expected_params, _params(fresh)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", CONFIGS)
def test_fp16_step_is_finite_and_its_grad_scalers_resume_exactly(name, narrow_discriminators):
    """train.amp fp16: float16 autocast, one GradScaler per optimizer (discriminators, teacher included); their
    states go through a checkpoint file and the next step is the same, bit for bit (CPU float16 is
    deterministic)."""
    cpu = torch.device("cpu")

    def step(m, i: int) -> dict[str, float]:
        with autocast("fp16", cpu):
            losses = m.train_step(make_batch(i), i)
        assert all(torch.isfinite(v).all() for v in losses.values()), losses
        return {k: v.item() for k, v in losses.items()}

    m = make_method(name, amp="fp16")
    step(m, 0)
    state = through_file(m.state_dict())
    scalers = sorted(k for k in state if k.startswith("grad_scaler/"))
    opts = [k for k, v in m.stateful().items() if isinstance(v, torch.optim.Optimizer)]
    assert scalers == sorted(f"grad_scaler/{k}" for k in opts) and len(opts) == len(m.optimizers)
    rng = torch.get_rng_state()
    expected = step(m, 1)
    expected_params = _params(m)

    fresh = make_method(name, seed=123, amp="fp16")
    fresh.load_state_dict(state)
    torch.set_rng_state(rng)
    assert step(fresh, 1) == expected
    for a, b in zip(expected_params, _params(fresh)):
        assert torch.equal(a, b)
    after, after_fresh = m.state_dict(), fresh.state_dict()
    assert [after[k] for k in scalers] == [after_fresh[k] for k in scalers]
    unused = torch.amp.GradScaler("cpu").state_dict()
    assert all(after[k] != unused for k in scalers)  # every optimizer stepped through its scaler


def test_no_method_backpropagates_or_steps_around_the_loss_scaling():
    """A bare loss.backward() or opt.step() in a method would skip fp16 loss scaling (and its skipped steps)."""
    bare = re.compile(r"\.backward\(\)|\w*opts?(\[[^\]]*\])?\.step\(")
    found = [f"{f.name}:{i}" for f in Path(blocks.__file__).parent.glob("*.py") if f.name != "base.py"
             for i, line in enumerate(f.read_text().splitlines(), 1) if bare.search(line)]
    assert not found


def test_fp32_state_has_no_grad_scalers():
    assert not [k for k in make_method("adversarial").state_dict() if k.startswith("grad_scaler")]


@pytest.mark.ddp
@pytest.mark.parametrize("name", CONFIGS)
def test_two_worker_ddp_step_matches_one_worker_with_same_global_batch(name):
    assert_ddp_matches_one_worker(functools.partial(_make_wrapped, name), _eval_params)


def _make_wrapped(name: str, wrap):
    return make_method(name, wrap=wrap)


def _eval_params(m) -> list[torch.Tensor]:
    return list(m.eval_model().parameters())


@pytest.mark.ddp
@pytest.mark.parametrize("name", ["adversarial", "mpl", "mpl_pretrained_teacher_adv"])
def test_two_worker_ddp_fp16_step_matches_one_worker(name):
    """fp16 under DDP: the scalers unscale the all-reduced gradients, so both workers skip or step alike and
    end where one worker on the global batch does (segmenter, discriminator / teacher, and the scales)."""
    assert_ddp_matches_one_worker(functools.partial(_make_wrapped_fp16, name), _params_and_scales, steps=2,
                                  atol=FP16_DDP_ATOL)


FP16_DDP_ATOL = 1e-4  # float16 convolutions of a 2-image and a 4-image batch round differently


def _make_wrapped_fp16(name: str, wrap):
    """The method in fp16, its steps under autocast. The discriminator with SGD instead of Adam: Adam moves an
    element whose gradient is near 0 by about +-lr whatever its size, so a float16 rounding difference can
    flip a step as large as the whole update and no tolerance would separate right from wrong."""
    torch.manual_seed(0)
    cls, cfg = method_config(name)
    if hasattr(cfg, "d_optim"):
        cfg = dataclasses.replace(cfg, d_optim=OPTIM)
    m = cls(TinySeg(), cfg, OPTIM, num_classes=NUM_CLASSES, wrap=wrap, model_factory=TinySeg, amp="fp16")
    step = m.train_step

    def under_autocast(batch, i):
        with autocast("fp16", torch.device("cpu")):
            return step(batch, i)

    m.train_step = under_autocast
    return m


def _params_and_scales(m) -> list[torch.Tensor]:
    params = [p for k, v in m.stateful().items() if isinstance(v, torch.nn.Module) for p in v.parameters()]
    scales = [torch.tensor(v["scale"]) for k, v in m.state_dict().items() if k.startswith("grad_scaler/")]
    return params + scales
