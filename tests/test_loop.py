"""The loop's per-step pieces: losses kept on the device and read back at logging time, mixed precision."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_batch, tiny_experiment
from tests.test_methods import make_method
from uda_ray.build import build_experiment
from uda_ray.config import ConfigError
from uda_ray.loop import LossLog, NonFiniteLoss, train_step
from uda_ray.methods import METHODS
from uda_ray.train import LocalSession, fit


def _items(seed: int) -> tuple[dict, dict]:
    b = make_batch(seed)
    src = {"img": b.src_img.round().clamp(0, 255).to(torch.uint8), "lbl": b.src_lbl.to(torch.uint8)}
    tgt = {"img": b.tgt_img.round().clamp(0, 255).to(torch.uint8), "lbl": b.tgt_lbl.to(torch.uint8)}
    return src, tgt


@pytest.mark.parametrize("name", ["adversarial", "fda", "minent"])
def test_fp32_losses_read_at_logging_time_equal_the_per_step_floats(name):
    """The old loop turned each loss into a float at its step; the log reads the same floats later."""
    m = make_method(name)
    log, floats = LossLog(), []
    for step in range(4):
        losses = train_step(m, *_items(step), step, 10, torch.device("cpu"))
        floats.append((step, {k: float(v) for k, v in losses.items()}))  # what the old loop did per step
        log.add(step, losses)
        assert all(v.dtype == torch.float32 for v in losses.values())
    assert log.per_step() == floats and len(log) == 0
    for step, vals in floats:
        log.add(step, {k: torch.tensor(v, dtype=torch.float32) for k, v in vals.items()})
    sums: dict[str, float] = {}
    for _, vals in floats:  # the old loop's running sums, in step order
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + v
    assert log.averages() == {k: v / len(floats) for k, v in sums.items()}


def test_fit_logs_the_averages_of_the_per_step_floats(tmp_path, synth_root, monkeypatch):
    cls = METHODS["source_only"]
    real, seen = cls.train_step, []

    def recording(self, batch, step):
        out = real(self, batch, step)
        seen.append({k: float(v) for k, v in out.items()})
        return out

    monkeypatch.setattr(cls, "train_step", recording)
    s = LocalSession(tmp_path / "run")
    fit(build_experiment(tiny_experiment(synth_root)), s)
    for r, steps in zip(s.reports, (seen[:2], seen[2:])):
        total = 0.0
        for d in steps:
            total += d["loss/seg_src"]
        assert r["train/loss/seg_src"] == total / 2


def test_a_non_finite_loss_is_named_with_its_step_when_read():
    log = LossLog()
    log.add(5, {"a": torch.tensor(1.0)})
    log.add(6, {"a": torch.tensor(2.0), "b": torch.tensor(float("inf"))})
    log.add(7, {"a": torch.tensor(float("nan"))})
    with pytest.raises(NonFiniteLoss, match=r"b became inf at step 6 .*steps 5\.\.7") as e:
        log.averages()
    assert e.value.step == 6 and e.value.key == "b" and isinstance(e.value, FloatingPointError)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_steps_run_on_cpu_for_every_method(name):
    m = make_method(name)
    before = [p.detach().clone() for p in m.eval_model().parameters()]
    held = _items(100)[0] if METHODS[name].uses_held_out_source else None
    for step in range(2):
        losses = train_step(m, *_items(step), step, 10, torch.device("cpu"), amp="bf16", held=held)
        assert losses and all(torch.isfinite(v).all() for v in losses.values()), losses
    assert all(p.dtype == torch.float32 for p in m.eval_model().parameters())  # weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(before, m.eval_model().parameters()))


def test_bf16_autocast_really_lowers_the_precision():
    m = make_method("source_only")
    seen = []
    m.model.register_forward_hook(lambda mod, inp, out: seen.append(out["out"].dtype))
    train_step(m, *_items(0), 0, 10, torch.device("cpu"), amp="bf16")
    train_step(m, *_items(0), 1, 10, torch.device("cpu"))
    assert seen == [torch.bfloat16, torch.float32]


def test_fp16_and_unknown_amp_are_refused(synth_root):
    with pytest.raises(ConfigError, match="gradient scaler"):
        build_experiment(tiny_experiment(synth_root, **{"train.amp": "fp16"}))
    with pytest.raises(ConfigError, match="train.amp"):
        build_experiment(tiny_experiment(synth_root, **{"train.amp": "half"}))


def test_channels_last_and_bf16_fit_runs(tmp_path, synth_root):
    cfg = build_experiment(tiny_experiment(synth_root, **{"train.amp": "bf16", "train.channels_last": True,
                                                          "train.max_steps": 2}))
    s = LocalSession(tmp_path / "run")
    last = fit(cfg, s)
    assert last["step"] == 2 and all(v == v for v in (last["train/loss/seg_src"], last["test/miou"]))


@pytest.mark.slow
def test_compiled_segmenter_trains_like_the_eager_one_and_keeps_its_state_dict_keys():
    """train.compile: nn.Module.compile() in place (inductor on CPU, ~25 s of compilation)."""
    eager, compiled = make_method("source_only"), make_method("source_only")
    keys = list(compiled.model_raw.state_dict())
    compiled.model_raw.compile()
    for step in range(2):
        a = train_step(eager, *_items(step), step, 10, torch.device("cpu"))
        b = train_step(compiled, *_items(step), step, 10, torch.device("cpu"))
        torch.testing.assert_close(b["loss/seg_src"], a["loss/seg_src"], rtol=1e-4, atol=1e-5)
    assert list(compiled.model_raw.state_dict()) == keys
