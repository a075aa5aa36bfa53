"""Seed-variance reruns without Ray: the plan, deterministic run names, mean ± std, continuation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from uda_ray.errors import UserError
from uda_ray.results.tables import ResultsWriter, read_table
from uda_ray.selection import seed_variance as rr

SEL = "uv/snd"


def _exp(lr: float, seed: int = 7) -> dict:
    return {"name": "x", "seed": seed, "method": "adversarial", "model": {"name": "bisenet_r18"},
            "data": {"source": "gta5", "target": "cityscapes"}, "optim": {"lr": lr},
            "train": {"max_steps": 4, "eval_every": 2}}


def _sweep(tmp_path: Path) -> Path:
    """Three trials whose best uv/snd ranks them b > a > c."""
    d = tmp_path / "sw"
    w = ResultsWriter(d / "results", "sw", SEL, "max", 0)
    for tid, lr, snd in (("a", 0.01, [0.5, 0.6]), ("b", 0.02, [0.7, 0.65]), ("c", 0.03, [0.1, 0.2])):
        for step, v in zip((2, 4), snd):
            w.result(tid, _exp(lr), {"optim.lr": lr}, {"step": step, SEL: v, "test/miou": v / 2})
    return d


def test_plan_takes_the_top_k_by_the_selection_metric_with_new_seeds(tmp_path):
    specs = rr.plan(_sweep(tmp_path), top=2, seeds=2, metric=SEL, mode="max")
    assert [(s.rank, s.trial_id, s.seed, s.name) for s in specs] == [
        (1, "b", 8, "b-seed8"), (1, "b", 9, "b-seed9"), (2, "a", 8, "a-seed8"), (2, "a", 9, "a-seed9")]
    assert specs[0].experiment["optim"]["lr"] == 0.02 and specs[0].experiment["seed"] == 8
    # a min-mode metric reverses the order
    assert rr.plan(_sweep(tmp_path / "m"), top=1, seeds=1, metric=SEL, mode="min")[0].trial_id == "c"


@pytest.mark.parametrize("top, seeds, needle", [(0, 1, "--top"), (1, 0, "--seeds")])
def test_plan_rejects_non_positive_counts(tmp_path, top, seeds, needle):
    with pytest.raises(UserError, match=needle):
        rr.plan(_sweep(tmp_path), top=top, seeds=seeds, metric=SEL, mode="max")


def _fake_train(values: dict[int, list[tuple[float, float]]], calls: list):
    """A 'run' that reports (uv/snd, test/miou) at steps 2 and 4, per seed."""
    def train(spec: rr.RerunSpec, storage: Path) -> None:
        calls.append(spec.name)
        w = ResultsWriter(storage / spec.name / "results", spec.name, SEL, "max", None)
        for step, (snd, test) in zip((2, 4), values[spec.seed]):
            w.result(spec.name, spec.experiment, {}, {"step": step, SEL: snd, "test/miou": test})
    return train


def test_rerun_reports_mean_and_sample_std_then_skips_finished_runs(tmp_path):
    d = _sweep(tmp_path)
    specs = rr.plan(d, top=1, seeds=3, metric=SEL, mode="max")
    # seed 8 selects step 4 (test .40), seed 9 step 2 (test .30), seed 10 step 4 (test .35)
    values = {8: [(0.1, 0.2), (0.9, 0.40)], 9: [(0.8, 0.30), (0.2, 0.5)], 10: [(0.3, 0.1), (0.6, 0.35)]}
    calls: list = []
    summary = rr.rerun(d, specs, _fake_train(values, calls), SEL, "max", log=lambda m: None)
    assert calls == ["b-seed8", "b-seed9", "b-seed10"]
    (s,) = summary
    assert s["trial_id"] == "b" and s["n_runs"] == 3 and json.loads(s["seeds"]) == [8, 9, 10]
    assert s["test_at_sel_mean"] == pytest.approx(0.35)
    assert s["test_at_sel_std"] == pytest.approx(0.05)  # sqrt((.05^2 + .05^2 + 0) / 2)
    assert s["sel_value_mean"] == pytest.approx((0.9 + 0.8 + 0.6) / 3)
    assert s["final_test_mean"] == pytest.approx((0.40 + 0.5 + 0.35) / 3)
    assert s["trial_sel_value"] == pytest.approx(0.7) and s["trial_test_at_sel"] == pytest.approx(0.35)
    rows = read_table(d / "results", "reruns")
    assert sorted((r["seed"], r["sel_step"]) for r in rows) == [(8, 4), (9, 2), (10, 4)]
    assert read_table(d / "results", "rerun_summary")[0]["n_runs"] == 3

    again: list = []  # the same command again: everything finished, nothing retrained, same table
    rr.rerun(d, specs, _fake_train(values, again), SEL, "max", log=lambda m: None)
    assert again == [] and len(read_table(d / "results", "reruns")) == 3


def test_unfinished_run_is_trained_again_and_one_seed_has_no_std(tmp_path):
    d = _sweep(tmp_path)
    (spec,) = rr.plan(d, top=1, seeds=1, metric=SEL, mode="max")
    w = ResultsWriter(d / rr.RERUN_DIR / spec.name / "results", spec.name, SEL, "max", None)
    w.result(spec.name, spec.experiment, {}, {"step": 2, SEL: 0.1, "test/miou": 0.1})  # interrupted at step 2
    calls: list = []
    (s,) = rr.rerun(d, [spec], _fake_train({8: [(0.1, 0.1), (0.5, 0.25)]}, calls), SEL, "max", log=lambda m: None)
    assert calls == ["b-seed8"]
    assert s["test_at_sel_mean"] == pytest.approx(0.25) and math.isnan(s["test_at_sel_std"])
    assert "1 seed" in rr.format_summary([s])


@pytest.mark.ray
@pytest.mark.slow
def test_rerun_command_trains_new_seeded_ray_train_runs_and_continues(tmp_path, synth_root):
    """`uda-ray rerun` on a sweep's tables: real Ray Train runs, tables, and a second call that retrains
    nothing. Ranked by a metric named on the command line (test/miou: b is the better trial)."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import tiny_experiment
    from uda_ray.build import build_experiment
    from uda_ray.config import experiment_dict

    store = tmp_path / "store"
    d = store / "sw"
    d.mkdir(parents=True)
    (d / "sweep.json").write_text(json.dumps({"name": "sw", "objective": [{"metric": SEL, "mode": "max"}]}))
    w = ResultsWriter(d / "results", "sw", SEL, "max", 0)
    for tid, lr, snd in (("a", 0.01, 0.2), ("b", 0.02, 0.4)):
        exp = experiment_dict(build_experiment(tiny_experiment(synth_root, **{
            "optim.lr": lr, "train.cpus_per_worker": 0.5}), "t"))
        w.result(tid, exp, {"optim.lr": lr}, {"step": 4, SEL: snd, "test/miou": snd})
    env = {**os.environ, "HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}

    def cli() -> str:
        argv = ["rerun", "sw", "--top", "1", "--seeds", "2", "--metric", "test/miou", "--storage", str(store)]
        p = subprocess.run([sys.executable, "-m", "uda_ray.cli", *argv], env=env, capture_output=True, text=True,
                           timeout=400)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    out = cli()
    assert "b-seed1" in out and "b-seed2" in out and "a-seed" not in out
    rows = read_table(d / "results", "reruns")
    assert sorted(r["seed"] for r in rows) == [1, 2] and {r["status"] for r in rows} == {"completed"}
    assert all(0 <= r["test_at_sel"] <= 1 and r["sel_step"] in (2, 4) for r in rows)
    assert {r["selection_metric"] for r in rows} == {"test/miou"}
    cfg = yaml.safe_load((d / rr.RERUN_DIR / "b-seed2" / "config.yaml").read_text())
    assert cfg["seed"] == 2 and cfg["optim"]["lr"] == 0.02  # the configuration of b, a new seed
    stamps = [e["reported_at"] for e in read_table(d / rr.RERUN_DIR / "b-seed1" / "results", "evals")]
    out = cli()
    assert out.count("already complete, skipped") == 2
    assert [e["reported_at"] for e in read_table(d / rr.RERUN_DIR / "b-seed1" / "results", "evals")] == stamps
    (s,) = read_table(d / "results", "rerun_summary")
    assert s["n_runs"] == 2 and s["test_at_sel_std"] >= 0


def test_rerun_command_rejects_bad_counts_and_unknown_sweeps_with_one_line(tmp_path, capsys):
    from uda_ray.cli import main

    d = _sweep(tmp_path)
    (d / "sweep.json").write_text(json.dumps({"name": "sw", "objective": [{"metric": SEL, "mode": "max"}]}))
    for argv, needle in ((["sw", "--top", "0"], "--top must be >= 1"), (["sw", "--seeds", "0"], "--seeds must be"),
                         (["nope"], "unknown sweep 'nope'")):
        assert main(["rerun", *argv, "--storage", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (d / rr.RERUN_DIR).exists() and not (d / "results" / "reruns.parquet").exists()
