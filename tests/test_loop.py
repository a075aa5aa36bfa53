"""The loop's per-step pieces: losses kept on the device and read back at logging time, mixed precision."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from tests.conftest import fit_full_then_resumed, make_batch, tiny_experiment
from tests.test_methods import make_method
from uda_ray.build import build_experiment, build_method
from uda_ray.config import ConfigError
from uda_ray.methods import METHODS
from uda_ray.methods.base import UDABatch
from uda_ray.methods.blocks import eval_mode
from uda_ray.methods.mpl import global_ce
from uda_ray.training.checkpoint import load_state
from uda_ray.training.loop import fit
from uda_ray.training.sessions import LocalSession
from uda_ray.training.step import LossLog, NonFiniteLoss, train_step


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


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_mixed_precision_steps_run_on_cpu_for_every_method(name, amp, narrow_discriminators):
    m = make_method(name, amp=amp)
    before = [p.detach().clone() for p in m.eval_model().parameters()]
    held = _items(100)[0] if METHODS[name].uses_held_out_source else None
    for step in range(2):
        losses = train_step(m, *_items(step), step, 10, torch.device("cpu"), amp=amp, held=held)
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


def test_fp16_reaches_the_method_and_unknown_amp_is_refused(synth_root):
    cfg = build_experiment(tiny_experiment(synth_root, **{"train.amp": "fp16", "method": "adversarial"}))
    assert build_method(cfg, None, "cpu").scaling.enabled
    assert not build_method(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp="bf16")),
                            None, "cpu").scaling.enabled
    with pytest.raises(ConfigError, match="train.amp"):
        build_experiment(tiny_experiment(synth_root, **{"train.amp": "half"}))


def _inf_grads(params) -> list:
    """Hooks turning these parameters' gradients into inf (an overflow); remove() them after."""
    return [p.register_hook(lambda g: torch.full_like(g, float("inf"))) for p in params]


def _copy(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_fp16_overflow_skips_the_segmenter_and_discriminator_steps_and_halves_their_scales(
        narrow_discriminators):
    m = make_method("adversarial", amp="fp16")
    seg, d = list(m.model_raw.parameters()), list(m.discs["main"].parameters())
    seg0, d0 = _copy(seg), _copy(d)
    hooks = _inf_grads(seg[:1] + d[:1])
    losses = train_step(m, *_items(0), 0, 10, torch.device("cpu"), amp="fp16")
    assert all(torch.isfinite(v) for v in losses.values())  # the forward was fine; the gradients overflowed
    assert _same(seg, seg0) and _same(d, d0)  # both updates skipped, not applied with inf
    assert not m.opt.state and not m.d_opts["main"].state  # SGD momentum / Adam moments never started
    state = m.state_dict()
    assert state["grad_scaler/opt"]["scale"] == state["grad_scaler/opt_d_main"]["scale"] == 2.0 ** 15
    for h in hooks:
        h.remove()
    train_step(m, *_items(1), 1, 10, torch.device("cpu"), amp="fp16")
    assert not _same(seg, seg0) and not _same(d, d0)
    state = m.state_dict()
    assert state["grad_scaler/opt"]["scale"] == state["grad_scaler/opt_d_main"]["scale"] == 2.0 ** 15
    assert state["grad_scaler/opt"]["_growth_tracker"] == 1


def test_fp16_discriminator_overflow_skips_only_the_discriminator_step(narrow_discriminators):
    """One scaler per optimizer: D's overflow leaves the segmenter's step and scale alone."""
    m = make_method("adversarial", amp="fp16")
    seg, d = list(m.model_raw.parameters()), list(m.discs["main"].parameters())
    seg0, d0 = _copy(seg), _copy(d)
    _inf_grads(d[-1:])
    train_step(m, *_items(0), 0, 10, torch.device("cpu"), amp="fp16")
    assert not _same(seg, seg0) and _same(d, d0)
    state = m.state_dict()
    assert state["grad_scaler/opt"]["scale"] == 2.0 ** 16 and state["grad_scaler/opt_d_main"]["scale"] == 2.0 ** 15


def test_fp16_skipped_student_step_gives_the_teacher_no_reward_and_keeps_the_baseline():
    m = make_method("mpl", amp="fp16")
    m.baseline.value = 0.25
    student, teacher = list(m.model_raw.parameters()), list(m.teacher_raw.parameters())
    s0, t0 = _copy(student), _copy(teacher)
    _inf_grads(student[:1])
    logs = train_step(m, *_items(0), 0, 10, torch.device("cpu"), amp="fp16", held=_items(100)[0])
    assert _same(student, s0) and not _same(teacher, t0)  # the teacher still learns from its source CE
    assert logs["mpl/student_skipped"] == 1.0 and logs["mpl/reward"] == 0.0
    assert logs["mpl/ce_old"] == logs["mpl/ce_new"]
    assert m.baseline.value == 0.25
    state = m.state_dict()
    assert state["grad_scaler/opt"]["scale"] == 2.0 ** 15 and state["grad_scaler/opt_teacher"]["scale"] == 2.0 ** 16


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mpl_reward_sees_the_student_after_its_step_under_autocast(amp):
    """ce_new is the updated student's float32 held-out CE. Inside one autocast region a forward reuses the
    low-precision weight copies cast before the optimizer step (autocast caches them): measured there, ce_new
    was the old student's CE and the reward was about 0 (the step's effect lost)."""
    m = make_method("mpl", amp=amp)
    held = _items(100)[0]
    logs = train_step(m, *_items(0), 0, 10, torch.device("cpu"), amp=amp, held=held)
    batch = UDABatch(src_img_held=held["img"].float(), src_lbl_held=held["lbl"].long())
    with torch.no_grad(), eval_mode(m.model_raw):
        after = global_ce(m.model_raw(batch.src_img_held)["out"], batch.src_lbl_held)
    assert logs["mpl/ce_new"] == after
    assert abs(logs["mpl/reward_raw"]) > 1e-3


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


@pytest.mark.slow
def test_fp16_fit_resumes_exactly_with_its_grad_scalers(tmp_path, synth_root, narrow_discriminators):
    """The loop's checkpoint files (torch.load weights_only) carry the scalers: a run resumed from its step-2
    checkpoint lands on the same numbers and scales (BiSeNet-R18 in float16 on CPU: about a minute)."""
    cfg = build_experiment(tiny_experiment(synth_root, **{"train.amp": "fp16", "method": "adversarial"}))
    full, resumed = fit_full_then_resumed(cfg, tmp_path)  # the second run has only the step-2 checkpoint
    assert [r["step"] for r in resumed.reports] == [4]
    for k in ("test/miou", "train/loss/seg_src", "train/loss/d_src"):
        assert full.reports[-1][k] == resumed.reports[-1][k], k
    sa, sb = (load_state(tmp_path / run / "checkpoints" / "step_0000004")["method"] for run in ("full", "part"))
    assert {k for k in sa if k.startswith("grad_scaler/")} == {"grad_scaler/opt", "grad_scaler/opt_d_main"}
    for k, v in sa.items():
        if k.startswith("grad_scaler/"):
            assert v == sb[k], k
        else:
            for name, t in v.items():
                if torch.is_tensor(t):
                    assert torch.equal(t, sb[k][name]), (k, name)


def test_checkpoint_folders_left_by_killed_writers_are_removed_when_a_run_starts(tmp_path, synth_root, monkeypatch):
    """A writer SIGKILLed mid-checkpoint leaves its uda_ray_ckpt_<pid>_* folder in the temp dir; the next run
    removes the folders of pids that no longer run, and nothing else."""
    import subprocess
    import sys
    import tempfile

    from uda_ray.training.checkpoint import CKPT_TMP_PREFIX

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp / f"{CKPT_TMP_PREFIX}{dead.pid}_abc"
    live = tmp / f"{CKPT_TMP_PREFIX}{os.getpid()}_def"  # a writer still running (this process)
    other = tmp / f"{CKPT_TMP_PREFIX}x1"  # not named by a pid: left alone
    for d in (orphan, live, other):
        (d / "model").mkdir(parents=True)
        (d / "model" / "state.pt").write_bytes(b"0" * 100)
    fit(build_experiment(tiny_experiment(synth_root)), LocalSession(tmp_path / "run"))
    assert not orphan.exists() and live.is_dir() and other.is_dir()
    assert sorted(p.name for p in tmp.iterdir()) == sorted([live.name, other.name])  # its own were removed too
