"""Warm start: an earlier sweep's finished trials that fit the new space seed the new sweep's Optuna study."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from tests.conftest import tiny_experiment
from tests.report_data import make_sweep
from uda_ray.build import build_experiment
from uda_ray.config import experiment_dict
from uda_ray.results.tables import ResultsWriter, read_table
from uda_ray.search.searcher import make_searcher
from uda_ray.search.space import load_space
from uda_ray.search.study import seed_study, warm_start_points
from uda_ray.search.study import tune_domains as _tune_domains


def _space(tmp_path: Path, synth_root: Path, params: dict, metric: str = "src_val/miou", name: str = "new.yaml"):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root)))  # max_steps 4
    (tmp_path / name).write_text(yaml.safe_dump({"base": "base.yaml", "num_samples": 2, "seed": 11,
                                                 "objective": {"metric": metric}, "params": params}))
    return load_space(tmp_path / name)


def _objective(sweep: Path) -> str:
    return json.loads((sweep / "sweep.json").read_text())["objective"][0]["metric"]


def _searcher(space, sweep_dir: Path):
    limiter = make_searcher(space, seed=11, sweep_dir=sweep_dir)
    limiter.set_search_properties(None, None, _tune_domains(space))
    return limiter


def test_fitting_trials_seed_the_study_and_the_rest_are_reported(tmp_path, synth_root):
    earlier = make_sweep(tmp_path / "store", synth_root, multi=False)  # lr 0.01 .. 0.09, momentum 0.82 .. 0.97
    space = _space(tmp_path, synth_root, {"optim.lr": {"loguniform": [1e-3, 4e-2]},
                                          "optim.momentum": {"uniform": [0.8, 0.99]}}, _objective(earlier))
    points, skipped = warm_start_points(earlier, space)
    why = dict(skipped)
    assert set(why) == {"t1", "t3", "t6"}
    assert why["t1"] == "outside the new space: optim.lr=0.05" and why["t6"] == "status errored"
    new = tmp_path / "store" / "new"
    new.mkdir()
    seed_study(new, space, points)
    study = _searcher(space, new).searcher._ot_study  # the sampler's study, as the sweep would build it
    by = {t.user_attrs["warm_start_trial_id"]: t for t in study.trials}
    assert {k: t.state.name for k, t in by.items()} == {"t0": "COMPLETE", "t2": "COMPLETE", "t4": "COMPLETE",
                                                       "t5": "PRUNED"}  # t5 was stopped early by ASHA
    assert all(t.user_attrs["warm_start_from"] == earlier.name for t in by.values())
    evals = read_table(earlier / "results", "evals")
    last_t2 = max((e for e in evals if e["trial_id"] == "t2"), key=lambda e: e["step"])
    assert by["t2"].value == last_t2[_objective(earlier)] and by["t2"].params["params/optim.lr"] == 0.002
    assert set(by["t5"].intermediate_values) == {2}


def test_trials_searching_other_parameters_are_all_skipped(tmp_path, synth_root):
    earlier = make_sweep(tmp_path / "store", synth_root, multi=False)
    space = _space(tmp_path, synth_root, {"optim.lr": {"loguniform": [1e-3, 1e-1]},
                                          "train.batch_size": {"int": [1, 2]}})
    points, skipped = warm_start_points(earlier, space)
    assert not points and len(skipped) == 7
    assert dict(skipped)["t0"] == ("parameters differ; not searched now: optim.momentum; "
                                   "not searched then: train.batch_size")


def test_tpe_suggests_from_the_warm_trials_at_once(tmp_path, synth_root):
    """With at least TPE's 10 start-up trials warm, the first new suggestion is modelled, not random: it
    differs from a cold start with the same seed and lies near the earlier optimum."""
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    earlier = tmp_path / "store" / "old"
    w = ResultsWriter(earlier / "results", "old", "src_val/miou", "max", 0)
    for i in range(16):
        lr = 10 ** (-3 + 2 * i / 15)  # 1e-3 .. 1e-1
        params = {"optim.lr": lr}
        w.start(f"o{i}", exp, params)
        w.result(f"o{i}", exp, params, {"step": 4, "src_val/miou": math.exp(-(math.log10(lr) + 2) ** 2 * 8)})
        w.end(f"o{i}", exp, params, "completed")
    space = _space(tmp_path, synth_root, {"optim.lr": {"loguniform": [1e-3, 1e-1]}})
    points, skipped = warm_start_points(earlier, space)
    assert len(points) == 16 and not skipped
    warm_dir, cold_dir = tmp_path / "store" / "warm", tmp_path / "store" / "cold"
    warm_dir.mkdir()
    cold_dir.mkdir()
    seed_study(warm_dir, space, points)
    warm = _searcher(space, warm_dir).suggest("w0")["params"]["optim.lr"]
    cold = _searcher(space, cold_dir).suggest("c0")["params"]["optim.lr"]
    assert warm != cold
    assert abs(math.log10(warm) + 2) < 0.5  # the earlier optimum is lr = 1e-2


def test_sweep_with_an_unknown_warm_start_writes_nothing(tmp_path, synth_root):
    from uda_ray.cli import main

    _space(tmp_path, synth_root, {"optim.lr": {"loguniform": [1e-3, 1e-1]}})
    store = tmp_path / "store"
    assert main(["sweep", str(tmp_path / "new.yaml"), "--storage", str(store), "--warm-start", "nope"]) == 2
    assert not (store / "new").exists()
