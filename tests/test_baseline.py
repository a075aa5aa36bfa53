"""`baseline: true` in a search space: the base experiment's own configuration is the sweep's first trial,
once, and `uda-ray best`, the end-of-sweep summary and the HTML report state the winner's gain over it.
Ray-free but for the searcher test (Ray and Optuna imported, no cluster started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_experiment
from uda_ray.cli import main
from uda_ray.config import ConfigError
from uda_ray.search.space import load_space

PARAMS = {"optim.lr": {"loguniform": [1e-3, 1e-2]}, "train.batch_size": {"int": [1, 3]},
          "method": {"choice": ["source_only", "target_only"]}, "optim.momentum": {"uniform": [0.5, 0.95]}}


def _space(tmp_path: Path, synth_root: Path, params: dict | None = None, base_over: dict | None = None,
           **kw) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root, **(base_over or {}))))
    raw = {"base": "base.yaml", "num_samples": 3, "seed": 5, "params": PARAMS if params is None else params}
    raw.update(kw)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "s.yaml"


# ------------------------------------------------------------------------------------------------
# the space


def test_baseline_is_off_by_default(tmp_path, synth_root):
    assert load_space(_space(tmp_path, synth_root)).baseline is None


def test_baseline_takes_each_searched_parameter_from_the_base(tmp_path, synth_root):
    space = load_space(_space(tmp_path, synth_root, baseline=True))
    # lr and batch size from the base YAML, momentum from the optimizer's default
    assert space.baseline == {"optim.lr": 0.01, "train.batch_size": 2, "method": "source_only",
                              "optim.momentum": space.base.optim.momentum}
    assert isinstance(space.baseline["train.batch_size"], int)
    assert space.experiment(space.baseline) == space.base  # the base configuration itself


def test_a_null_base_value_is_a_value_when_the_choices_hold_it(tmp_path, synth_root):
    space = load_space(_space(tmp_path, synth_root, {"model.pretrained": {"choice": [None, "imagenet"]}},
                              baseline=True))
    assert space.baseline == {"model.pretrained": None}


@pytest.mark.parametrize("params, base_over, needle", [
    ({"optim.lr": {"loguniform": [1e-4, 1e-3]}}, {}, "optim.lr=0.01 is outside params.optim.lr"),
    ({"train.batch_size": {"int": [3, 4]}}, {}, "params.train.batch_size"),
    ({"method": {"choice": ["target_only"]}}, {}, "params.method"),
    ({"model.pretrained": {"choice": ["imagenet"]}}, {}, "no value for params.model.pretrained"),
    ({"model.kwargs.freeze_bn": {"choice": [True, False]}}, {}, "no value for params.model.kwargs.freeze_bn"),
])
def test_a_base_value_outside_the_space_or_missing_refuses_the_space(tmp_path, synth_root, params, base_over,
                                                                       needle):
    with pytest.raises(ConfigError, match="baseline") as e:
        load_space(_space(tmp_path, synth_root, params, base_over, baseline=True))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_refused_baseline_exits_2_with_one_line_before_writing(tmp_path, synth_root, capsys):
    space = _space(tmp_path, synth_root, {"optim.lr": {"loguniform": [1e-4, 1e-3]}}, baseline=True)
    code = main(["sweep", str(space), "--storage", str(tmp_path / "store")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "params.optim.lr" in err[0] and "baseline" in err[0]
    assert not list((tmp_path / "store").glob("*/sweep.json"))


# ------------------------------------------------------------------------------------------------
# the searcher: the baseline is the first suggestion, once


def test_the_first_suggestion_is_the_baseline_and_a_restart_does_not_enqueue_it_again(tmp_path, synth_root):
    import optuna

    from uda_ray.search.searcher import make_searcher
    from uda_ray.search.study import BASELINE_ATTR, load_study, tune_domains

    space = load_space(_space(tmp_path, synth_root, baseline=True))
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    limiter = make_searcher(space, seed=5, sweep_dir=sweep_dir)
    limiter.set_search_properties(None, None, tune_domains(space))  # what Tune does with the param space
    first = limiter.suggest("p_00000")["params"]
    assert first == space.baseline
    limiter.on_trial_complete("p_00000", {"uv/im": 0.1, "step": 4})
    second = limiter.suggest("p_00001")["params"]
    assert second != space.baseline  # TPE from here on

    # `uda-ray resume` of a sweep whose driver died before Tune saved its state: a new searcher on the same
    # journal; the baseline is not enqueued again, and the same trial id gets the same (baseline) trial back
    again = make_searcher(space, seed=5, sweep_dir=sweep_dir)
    again.set_search_properties(None, None, tune_domains(space))
    assert again.suggest("p_00000")["params"] == space.baseline
    study = load_study(sweep_dir)
    marked = [t for t in study.trials if BASELINE_ATTR in t.user_attrs]
    assert len(marked) == 1 and marked[0].user_attrs["tune_trial_id"] == "p_00000"
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]


def test_a_driver_killed_before_the_first_suggestion_still_runs_the_baseline_once(tmp_path, synth_root):
    from uda_ray.search.searcher import make_searcher
    from uda_ray.search.study import BASELINE_ATTR, load_study, tune_domains

    space = load_space(_space(tmp_path, synth_root, baseline=True))
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    make_searcher(space, seed=5, sweep_dir=sweep_dir).set_search_properties(None, None, tune_domains(space))
    again = make_searcher(space, seed=5, sweep_dir=sweep_dir)  # the sweep started again from its folder
    again.set_search_properties(None, None, tune_domains(space))
    assert again.suggest("p_00000")["params"] == space.baseline
    marked = [t for t in load_study(sweep_dir).trials if BASELINE_ATTR in t.user_attrs]
    assert len(marked) == 1 and marked[0].state.name == "RUNNING"


def test_without_baseline_nothing_is_enqueued(tmp_path, synth_root):
    from uda_ray.search.searcher import make_searcher
    from uda_ray.search.study import load_study, tune_domains

    space = load_space(_space(tmp_path, synth_root))
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    limiter = make_searcher(space, seed=5, sweep_dir=sweep_dir)
    limiter.set_search_properties(None, None, tune_domains(space))
    limiter.suggest("p_00000")
    assert len(load_study(sweep_dir).trials) == 1


# ------------------------------------------------------------------------------------------------
# the gain over the baseline: `uda-ray best`, the end-of-sweep summary, the report


def _sweep(tmp_path: Path, synth_root: Path, rows: dict, baseline: str | None = "b0", test: bool = True) -> Path:
    """A sweep folder whose tables hold `rows`: trial -> [(step, uv/im, test/miou)]."""
    from uda_ray.build import build_experiment
    from uda_ray.config import experiment_dict
    from uda_ray.results.tables import ResultsWriter

    d = tmp_path / "store" / "sw"
    w = ResultsWriter(d / "results", "sw", "uv/im", "max", 0)
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    for i, (tid, evals) in enumerate(rows.items()):
        params = {"optim.lr": 0.01 / (i + 1)}
        w.start(tid, exp, params)
        for step, im, miou in evals:
            w.result(tid, exp, params, {"step": step, "uv/im": im, **({"test/miou": miou} if test else {})})
        if evals:
            w.end(tid, exp, params, "completed")
    meta = {"name": "sw", "objective": [{"metric": "uv/im", "mode": "max"}], "seed": 0, "num_samples": len(rows),
            "status": "completed", "created": 0.0, "finished": 10.0}
    if baseline:
        meta["baseline"] = {"trial_id": baseline, "params": {"optim.lr": 0.01}}
    (d / "sweep.json").write_text(json.dumps(meta))
    (d / "space.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "params": {"optim.lr": {"loguniform":
                                                                                              [1e-3, 1e-2]}}}))
    return d


def _best(capsys, tmp_path, *extra) -> str:
    code = main(["best", "sw", "--storage", str(tmp_path / "store"), *extra])
    out = capsys.readouterr().out
    assert code == 0
    return out


GAIN = {"b0": [(2, 0.30, 0.20), (4, 0.40, 0.25)],  # baseline: selected step 4 (uv/im 0.40, test 25.0)
        "w1": [(2, 0.55, 0.31), (4, 0.50, 0.40)]}  # winner: selected step 2 (uv/im 0.55, test 31.0)


def test_best_states_the_winners_gain_over_the_baseline_at_each_selected_step(tmp_path, synth_root, capsys):
    _sweep(tmp_path, synth_root, GAIN)
    out = _best(capsys, tmp_path)
    assert "winner w1 vs baseline b0: uv/im +0.1500, test/miou +6.0 points" in out


def test_best_says_when_the_baseline_wins(tmp_path, synth_root, capsys):
    _sweep(tmp_path, synth_root, {"b0": [(2, 0.6, 0.3)], "w1": [(2, 0.5, 0.4)]})
    assert "the baseline b0 wins: uv/im=0.6000, test/miou=30.0; no trial beat the base configuration" in \
        _best(capsys, tmp_path)


def test_best_says_when_the_baseline_has_no_evaluation_yet(tmp_path, synth_root, capsys):
    _sweep(tmp_path, synth_root, {"b0": [], "w1": [(2, 0.5, 0.4)]})
    assert "baseline b0: no evaluation of uv/im yet" in _best(capsys, tmp_path)


def test_without_test_labels_the_gain_is_by_the_objective_only(tmp_path, synth_root, capsys):
    _sweep(tmp_path, synth_root, GAIN, test=False)
    out = _best(capsys, tmp_path)
    assert "winner w1 vs baseline b0: uv/im +0.1500\n" in out + "\n" and "points" not in out


def test_best_by_another_metric_states_the_gain_by_that_metric(tmp_path, synth_root, capsys):
    _sweep(tmp_path, synth_root, GAIN)
    out = _best(capsys, tmp_path, "--metric", "test/miou")
    assert "winner w1 vs baseline b0: test/miou +0.1500, test/miou +15.0 points" in out


def test_a_sweep_without_baseline_prints_no_gain_line(tmp_path, synth_root, capsys):
    _sweep(tmp_path, synth_root, GAIN, baseline=None)
    assert "baseline" not in _best(capsys, tmp_path)


def test_the_end_of_sweep_summary_states_the_gain(tmp_path, synth_root):
    from uda_ray.driver.sweeps import Sweep
    from uda_ray.results.text import sweep_ended

    d = _sweep(tmp_path, synth_root, GAIN)
    s = Sweep("sw", d, json.loads((d / "sweep.json").read_text()))
    assert "winner w1 vs baseline b0: uv/im +0.1500, test/miou +6.0 points" in sweep_ended(s)
    d2 = _sweep(tmp_path / "other", synth_root, GAIN, baseline=None)
    assert "baseline" not in sweep_ended(Sweep("sw", d2, json.loads((d2 / "sweep.json").read_text())))


def test_the_report_states_the_gain(tmp_path, synth_root):
    from uda_ray.results import report

    d = _sweep(tmp_path, synth_root, GAIN)
    page = report.render(report.load("sweep", d), predictions=False)
    assert 'id="baseline"' in page and "winner w1 vs baseline b0: uv/im +0.1500, test/miou +6.0 points" in page
    d2 = _sweep(tmp_path / "other", synth_root, GAIN, baseline=None)
    assert 'id="baseline"' not in report.render(report.load("sweep", d2), predictions=False)


# ------------------------------------------------------------------------------------------------
# a real sweep


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_with_a_baseline_runs_the_base_first_once_and_states_the_gain(tmp_path, synth_root):
    import os
    import subprocess
    import sys

    from uda_ray.results.tables import read_table
    from uda_ray.search.study import BASELINE_ATTR, load_study

    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "UDA_RAY_STORAGE": str(tmp_path / "store"),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}

    def cli(*args: str) -> str:
        p = subprocess.run([sys.executable, "-m", "uda_ray.cli", *args], env=env, capture_output=True, text=True,
                           timeout=400)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    space = _space(tmp_path, synth_root, {"optim.lr": {"loguniform": [1e-3, 1e-2]},
                                          "method": {"choice": ["source_only", "target_only"]}},
                   {"train.cpus_per_worker": 0.5}, num_samples=2, seed=3, baseline=True)
    out = cli("sweep", str(space), "--name", "bl")
    sweep_dir = tmp_path / "store" / "bl"
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    base_id = meta["baseline"]["trial_id"]
    assert base_id.endswith("_00000") and meta["baseline"]["params"] == {"optim.lr": 0.01, "method": "source_only"}
    trials = {t["trial_id"]: t for t in read_table(sweep_dir / "results", "trials")}
    assert len(trials) == 2 and min(trials) == base_id
    assert json.loads(trials[base_id]["params"]) == {"optim.lr": 0.01, "method": "source_only"}
    assert trials[base_id]["config.optim.lr"] == 0.01 and trials[base_id]["method"] == "source_only"
    assert f"vs baseline {base_id}: uv/im " in out or f"the baseline {base_id} wins" in out, out
    assert f"baseline {base_id}" in cli("best", "bl")

    # resuming the finished sweep runs nothing again: no second baseline, no new trial
    cli("resume", "bl")
    assert len(read_table(sweep_dir / "results", "trials")) == 2
    study = load_study(sweep_dir)
    assert [t.user_attrs.get("tune_trial_id") for t in study.trials if BASELINE_ATTR in t.user_attrs] == [base_id]
    assert len(study.trials) == 2
