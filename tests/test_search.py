"""The Tune pieces that need no running cluster: the search space conversion and the Optuna searcher."""

from __future__ import annotations

from pathlib import Path

import optuna
import yaml

from tests.conftest import tiny_experiment
from uda_ray.search import _tune_domains, make_searcher
from uda_ray.space import load_space


def _space(tmp_path: Path, synth_root: Path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root)))  # max_steps 4
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "num_samples": 3, "seed": 5,
        "params": {"optim.lr": {"loguniform": [1e-3, 1e-2]}, "train.batch_size": {"int": [1, 2]},
                   "method": {"choice": ["source_only", "target_only"]}}}))
    return load_space(tmp_path / "s.yaml")


def test_trials_stopped_before_max_steps_are_pruned_in_optuna_not_complete(tmp_path, synth_root):
    space = _space(tmp_path, synth_root)
    limiter = make_searcher(space, seed=5)
    limiter.set_search_properties(None, None, _tune_domains(space))
    searcher = limiter.searcher
    for tid in ("early", "full", "broken"):
        cfg = limiter.suggest(tid)
        assert set(cfg["params"]) == {"optim.lr", "train.batch_size", "method"}
        assert 1e-3 <= cfg["params"]["optim.lr"] <= 1e-2 and cfg["params"]["train.batch_size"] in (1, 2)
        limiter.on_trial_result(tid, {"test/miou": 0.1, "step": 2})
        limiter.on_trial_result(tid, {"test/miou": 0.1, "step": 2})  # replayed after a resume: reported once
        last = {"test/miou": 0.2, "step": 4 if tid == "full" else 2}
        limiter.on_trial_complete(tid, last, error=tid == "broken")
    states = {t.number: t.state for t in searcher._ot_study.trials}
    assert states == {0: optuna.trial.TrialState.PRUNED, 1: optuna.trial.TrialState.COMPLETE,
                      2: optuna.trial.TrialState.FAIL}
    assert searcher._ot_study.trials[1].value == 0.2
    assert searcher._ot_study.trials[0].intermediate_values == {2: 0.1}


def test_same_seed_same_first_suggestions(tmp_path, synth_root):
    space = _space(tmp_path, synth_root)

    def first(seed):
        s = make_searcher(space, seed=seed)
        s.set_search_properties(None, None, _tune_domains(space))
        return s.suggest("a")["params"]

    assert first(5) == first(5)
    assert first(5) != first(6)
