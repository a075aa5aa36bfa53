"""The loop in-process (no Ray): evaluation, checkpoints, exact resume, the step-indexed sampler."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import fit_full_then_resumed, tiny_experiment
from uda_ray.build import build_experiment
from uda_ray.data.loading import StepBatches
from uda_ray.training.checkpoint import STATE_FILE
from uda_ray.training.loop import fit
from uda_ray.training.sessions import LocalSession


def test_fit_reports_evaluations_and_writes_checkpoints(tmp_path, synth_root):
    cfg = build_experiment(tiny_experiment(synth_root))
    s = LocalSession(tmp_path / "run")
    last = fit(cfg, s)
    assert [r["step"] for r in s.reports] == [2, 4]
    assert 0.0 <= last["test/miou"] <= 1.0 and "test/iou/road" in last and "train/loss/seg_src" in last
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert {"src_val/miou", "src_val/pixel_acc", "uv/entropy", "uv/im", "uv/snd", "uv/bnm", "time/eval_s"} <= set(last)
    assert "sel/miou" not in last  # no labeled selection split asked for
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert splits["counts"]["target_holdout"] == 1 and splits["counts"]["test"] == 4
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def test_resume_from_a_checkpoint_continues_exactly(tmp_path, synth_root):
    cfg = build_experiment(tiny_experiment(synth_root, **{"train.max_steps": 6, "data.hflip": True}))
    full, resumed = fit_full_then_resumed(cfg, tmp_path)  # the second run has only the step-2 checkpoint
    assert [r["step"] for r in resumed.reports] == [4, 6]
    for a, b in zip(full.reports[1:], resumed.reports):
        for k in ("test/miou", "train/loss/seg_src"):
            assert a[k] == b[k], k
    sa = torch.load(tmp_path / "full/checkpoints/step_0000006" / STATE_FILE, weights_only=False)
    sb = torch.load(tmp_path / "part/checkpoints/step_0000006" / STATE_FILE, weights_only=False)
    for k, v in sa["method"]["model"].items():
        assert torch.equal(v, sb["method"]["model"][k]), k


def test_step_batches_split_the_global_batch_across_ranks_and_replay_by_step():
    one = StepBatches(10, 4, seed=3)
    r0 = StepBatches(10, 2, rank=0, world_size=2, seed=3)
    r1 = StepBatches(10, 2, rank=1, world_size=2, seed=3)
    for step in range(6):  # crosses epoch boundaries
        assert one.batch(step) == r0.batch(step) + r1.batch(step)
    late = StepBatches(10, 4, seed=3, start_step=4)
    assert next(iter(late)) == one.batch(4)


def test_a_run_makes_its_own_pseudo_labels_from_a_checkpoint(tmp_path, synth_root):
    import json

    teacher = LocalSession(tmp_path / "teacher")
    fit(build_experiment(tiny_experiment(synth_root, **{"train.max_steps": 2})), teacher)
    ck = tmp_path / "teacher" / "checkpoints" / "step_0000002"
    cfg = build_experiment(tiny_experiment(synth_root, method="self_training", **{
        "data.pseudo_from": str(ck), "data.pseudo_percentile": 0.3, "data.pseudo_cap": 0.8,
        "train.max_steps": 2}))
    s = LocalSession(tmp_path / "student")
    fit(cfg, s)
    manifest = json.loads((tmp_path / "student" / "pseudo_labels" / "manifest.json").read_text())
    assert manifest["percentile"] == 0.3 and manifest["cap"] == 0.8 and manifest["num_images"] == 12
    assert all(t <= 0.8 + 1e-6 for t in manifest["thresholds"]) and min(manifest["thresholds"]) < 0.8
    assert [r["step"] for r in s.reports] == [2]


def test_synthia_source_trains_and_reports_16_and_13_class_miou(tmp_path):
    import dataclasses

    from uda_ray.build import load_experiment
    from uda_ray.data.loading import prepare

    root = Path(__file__).resolve().parents[1]
    cfg = load_experiment(root / "experiments/synthetic_synthia_bisenet_r18_source_only.yaml", {
        "data.synthetic": {"n_source": 6, "n_target": 4, "n_val": 2, "size": [64, 32], "seed": 0},
        "data.source_size": [64, 32], "data.target_size": [64, 32],
        "train.max_steps": 2, "train.eval_every": 2, "train.batch_size": 2, "train.profile": False})
    cfg = dataclasses.replace(cfg, data=prepare(cfg.data, tmp_path / "data"))
    assert cfg.data.source_root.endswith("synthia")
    s = LocalSession(tmp_path / "run")
    fit(cfg, s)
    (r,) = s.reports
    assert {"test/miou", "test/miou16", "test/miou13"} <= set(r)


def test_the_first_evaluation_after_a_restart_reports_where_it_resumed_and_counts_restarts(tmp_path, synth_root):
    cfg = build_experiment(tiny_experiment(synth_root, **{"train.max_steps": 6}))
    fit(cfg, LocalSession(tmp_path / "full"))
    run = tmp_path / "part"
    for n in (1, 2):  # two restarts from the step-2 checkpoint
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(tmp_path / "full" / "checkpoints" / "step_0000002", run / "checkpoints" / "step_0000002")
        s = LocalSession(run)
        fit(cfg, s)
        got = [(r["step"], r.get("resumed_from"), r.get("restarts")) for r in s.reports]
        assert got == [(4, 2, n), (6, None, None)]


def test_a_restart_that_would_repeat_a_divergence_fails_at_once(tmp_path, synth_root, monkeypatch):
    import pytest

    from uda_ray.methods import METHODS

    cls = METHODS["source_only"]
    real = cls.train_step
    monkeypatch.setattr(cls, "train_step", lambda self, batch, step: (
        {"seg_src": torch.tensor(float("nan"))} if step == 3 else real(self, batch, step)))
    cfg = build_experiment(tiny_experiment(synth_root, **{"train.max_steps": 6}))
    first = LocalSession(tmp_path / "run")
    with pytest.raises(FloatingPointError, match="at step 3"):
        fit(cfg, first)
    assert [r["step"] for r in first.reports] == [2]  # the step-2 checkpoint exists
    again = LocalSession(tmp_path / "run")  # a restart from step 2 would replay steps 2, 3 and diverge again
    with pytest.raises(FloatingPointError, match="in an earlier attempt"):
        fit(cfg, again)
    assert again.reports == []


def _unlabeled_targets(tmp_path, synth_root):
    """The tiny benchmark's target as Cityscapes images without gtFine/, and as a flat folder of frames."""
    cs = tmp_path / "cs_images_only"
    shutil.copytree(synth_root / "cityscapes" / "leftImg8bit", cs / "leftImg8bit")
    frames = tmp_path / "frames"
    frames.mkdir()
    for p in sorted((synth_root / "cityscapes" / "leftImg8bit" / "train").glob("*/*.png")):
        shutil.copy(p, frames / p.name)
    return {"cityscapes": cs, "frames": frames}


def test_fit_on_an_unlabeled_target_reports_validators_and_no_test_metrics(tmp_path, synth_root):
    for kind, root in _unlabeled_targets(tmp_path, synth_root).items():
        raw = tiny_experiment(synth_root, **{"data.target": kind, "data.target_root": str(root),
                                             "method": "minent", "train.max_steps": 2})
        s = LocalSession(tmp_path / kind)
        last = fit(build_experiment(raw), s)
        assert not [k for k in last if k.startswith("test/")], kind  # absent, not zero or NaN
        assert {"uv/snd", "uv/entropy", "src_val/miou"} <= set(last)
        assert json.loads((tmp_path / kind / "splits.json").read_text())["counts"]["test"] == 0


def test_test_selection_on_an_unlabeled_target_is_refused_before_training(tmp_path, synth_root):
    from uda_ray.errors import ConfigError

    root = _unlabeled_targets(tmp_path, synth_root)["frames"]
    raw = tiny_experiment(synth_root, **{"data.target": "frames", "data.target_root": str(root),
                                         "select": "test/miou"})
    s = LocalSession(tmp_path / "r")
    with pytest.raises(ConfigError, match="test/miou needs target test labels"):
        fit(build_experiment(raw), s)
    assert s.reports == [] and not (tmp_path / "r").exists()


class _ReplayingSession(LocalSession):
    """A LocalSession that, like a Ray Train worker, reports logged evaluations again when it resumes."""

    replay_on_resume = True


def test_a_resume_reports_every_evaluation_up_to_its_checkpoint_again_in_order(tmp_path, synth_root):
    # Ray Train may persist several checkpoints while their results still wait in Tune's queues when the
    # driver dies: the resumed run must re-report all of them, not only the latest checkpoint's
    raw = tiny_experiment(synth_root, **{"train.max_steps": 3, "train.eval_every": 1})
    first = _ReplayingSession(tmp_path / "run")
    fit(build_experiment(raw), first)
    assert [r["step"] for r in first.reports] == [1, 2, 3]
    again = _ReplayingSession(tmp_path / "run")
    fit(build_experiment({**raw, "train": {**raw["train"], "max_steps": 5}}), again)
    steps = [r["step"] for r in again.reports]
    assert steps == [1, 2, 3, 4, 5]
    assert [again.reports[i]["test/miou"] for i in range(3)] == [r["test/miou"] for r in first.reports]
