"""The Tune pieces that need no running cluster: the search space conversion and the Optuna searcher."""

from __future__ import annotations

from pathlib import Path

import optuna
import yaml

from tests.conftest import tiny_experiment
from uda_ray.search.searcher import make_searcher
from uda_ray.search.space import load_space
from uda_ray.search.study import tune_domains as _tune_domains


def _space(tmp_path: Path, synth_root: Path, concurrent: int = 1):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root)))  # max_steps 4
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "num_samples": 3, "seed": 5, "max_concurrent_trials": concurrent,
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
        limiter.on_trial_result(tid, {"uv/im": 0.1, "step": 2})
        limiter.on_trial_result(tid, {"uv/im": 0.1, "step": 2})  # replayed after a resume: reported once
        last = {"uv/im": 0.2, "step": 4 if tid == "full" else 2}
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


def _drive(limiter, tid: str, steps: list[int], value: float, error: bool = False) -> None:
    limiter.suggest(tid)
    for st in steps:
        limiter.on_trial_result(tid, {"uv/im": value * st, "step": st})
    limiter.on_trial_complete(tid, {"uv/im": value * steps[-1], "step": steps[-1]}, error=error)


def test_study_is_persisted_in_the_sweep_folder_with_states_and_intermediate_values(tmp_path, synth_root):
    from uda_ray.search.study import STUDY_FILE, load_study

    space = _space(tmp_path, synth_root)
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    limiter = make_searcher(space, seed=5, sweep_dir=sweep_dir)
    limiter.set_search_properties(None, None, _tune_domains(space))
    _drive(limiter, "full", [2, 4], 0.1)
    _drive(limiter, "early", [2], 0.1)
    _drive(limiter, "broken", [2], 0.1, error=True)
    assert (sweep_dir / STUDY_FILE).is_file()
    study = load_study(sweep_dir)  # a fresh reader of the file, as optuna-dashboard would be
    by_tune = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert {k: t.state.name for k, t in by_tune.items()} == {"full": "COMPLETE", "early": "PRUNED",
                                                             "broken": "FAIL"}
    assert by_tune["full"].intermediate_values == {2: 0.2, 4: 0.4} and by_tune["full"].value == 0.4
    assert by_tune["early"].intermediate_values == {2: 0.2}

    # the result on which ASHA stops a trial reaches the searcher only through on_trial_complete
    limiter.suggest("cut")
    limiter.on_trial_result("cut", {space.metric: 0.1, "step": 2})
    limiter.on_trial_complete("cut", {space.metric: 0.3, "step": 3})
    cut = next(t for t in load_study(sweep_dir).trials if t.user_attrs["tune_trial_id"] == "cut")
    assert cut.state.name == "PRUNED" and cut.intermediate_values == {2: 0.1, 3: 0.3}
    assert set(by_tune["full"].params) == {"params/optim.lr", "params/train.batch_size", "params/method"}


def test_a_restored_searcher_continues_the_study_as_if_never_interrupted(tmp_path, synth_root):
    """Resume: the searcher's snapshot is older than the journal. A trial told after the snapshot ("b") is not
    told twice when Tune replays it; one suggested after the snapshot ("c") is suggested again with the same
    parameters and continues as the same study trial; later suggestions equal an uninterrupted searcher's."""
    from uda_ray.search.study import load_study

    space = _space(tmp_path, synth_root, concurrent=2)
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    limiter = make_searcher(space, seed=5, sweep_dir=sweep_dir)
    limiter.set_search_properties(None, None, _tune_domains(space))
    _drive(limiter, "a", [2, 4], 0.1)
    limiter.suggest("b")
    limiter.on_trial_result("b", {"uv/im": 0.05, "step": 2})
    snapshot = tmp_path / "searcher.pkl"
    limiter.save(str(snapshot))  # what Tune's experiment checkpoint holds: the searcher and its wrapper
    wrapper = limiter.get_state()
    limiter.on_trial_complete("b", {"uv/im": 0.15, "step": 4})  # after the snapshot, then the driver dies
    c_params = limiter.suggest("c")
    limiter.on_trial_result("c", {"uv/im": 0.07, "step": 2})

    again = make_searcher(space, seed=5, sweep_dir=sweep_dir)  # `uda-ray resume`
    again.set_search_properties(None, None, _tune_domains(space))
    again.set_state(wrapper)
    again.restore(str(snapshot))
    again.on_trial_result("b", {"uv/im": 0.05, "step": 2})  # replayed from its checkpoint
    again.on_trial_complete("b", {"uv/im": 0.15, "step": 4})
    assert again.suggest("c") == c_params  # the same suggestion, under the same id
    again.on_trial_result("c", {"uv/im": 0.07, "step": 2})  # replayed
    again.on_trial_complete("c", {"uv/im": 0.09, "step": 4})
    study = load_study(sweep_dir)
    by_tune = {t.user_attrs["tune_trial_id"]: t for t in study.trials if "tune_trial_id" in t.user_attrs}
    assert {k: t.state.name for k, t in by_tune.items()} == {"a": "COMPLETE", "b": "COMPLETE", "c": "COMPLETE"}
    assert by_tune["b"].intermediate_values == {2: 0.05, 4: 0.15} and by_tune["b"].value == 0.15
    assert by_tune["c"].intermediate_values == {2: 0.07, 4: 0.09} and by_tune["c"].value == 0.09
    # the second asking of "c" is kept apart, failed, so that nothing stays RUNNING
    (dup,) = [t for t in study.trials if "tune_trial_id" not in t.user_attrs]
    assert dup.state.name == "FAIL" and "suggested again" in dup.user_attrs["uda_ray_note"]

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = make_searcher(space, seed=5, sweep_dir=ref_dir)  # never interrupted
    ref.set_search_properties(None, None, _tune_domains(space))
    _drive(ref, "a", [2, 4], 0.1)
    assert ref.suggest("b") is not None
    ref.on_trial_complete("b", {"uv/im": 0.15, "step": 4})
    assert ref.suggest("c") == c_params
    ref.on_trial_complete("c", {"uv/im": 0.09, "step": 4})
    assert again.suggest("d") == ref.suggest("d")


def test_constraints_reach_the_sampler_and_survive_the_searcher_snapshot(tmp_path, synth_root):
    """Multi-objective with a constraint: each told trial carries its violations, Optuna's sampler records
    them (FrozenTrial.constraints, what its constrained TPE reads), and the snapshot Tune takes pickles."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root)))  # max_steps 4
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "num_samples": 2, "seed": 1, "max_concurrent_trials": 2,
        "objective": [{"metric": "test/miou"}, {"metric": "model/gflops"}],
        "constraints": {"model/fps": ">= 30"},
        "params": {"model.name": {"choice": ["bisenet_r18", "enet"]}}}))
    space = load_space(tmp_path / "p.yaml")
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    limiter = make_searcher(space, seed=1, sweep_dir=sweep_dir)
    limiter.set_search_properties(None, None, _tune_domains(space))
    for tid, fps in (("fast", 50.0), ("slow", 10.0)):
        limiter.suggest(tid)
        limiter.on_trial_complete(tid, {"test/miou": 0.3, "model/gflops": 1.0, "model/fps": fps, "step": 4})
    limiter.save(str(tmp_path / "snap.pkl"))
    from uda_ray.search.study import load_study

    by_tune = {t.user_attrs["tune_trial_id"]: t for t in load_study(sweep_dir).trials}
    assert by_tune["fast"].values == [0.3, 1.0] and by_tune["fast"].state.name == "COMPLETE"
    assert by_tune["fast"].constraints == {"model/fps >= 30": -20.0}
    assert by_tune["slow"].constraints == {"model/fps >= 30": 20.0}


def test_asha_restored_with_a_finished_trial_judges_the_next_one_against_its_recorded_results(tmp_path, synth_root):
    """Tune does not save its scheduler: a restored sweep's ASHA must rebuild its rungs from the results tables
    of the trials restored as finished, or the next trial is judged against no one (and never stopped)."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from uda_ray.results.tables import ResultsWriter
    from uda_ray.search.tune import make_scheduler

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root, **{"train.max_steps": 8})))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "num_samples": 2, "seed": 5, "scheduler": {"asha": {"grace_period": 2,
                                                                                   "reduction_factor": 2}},
        "params": {"optim.lr": {"loguniform": [1e-3, 1e-2]}}}))
    space = load_space(tmp_path / "s.yaml")
    sweep_dir = tmp_path / "sw"
    w = ResultsWriter(sweep_dir / "results", "sw", "uv/im", "max", 5)  # what the first run recorded
    exp = {"method": "source_only", "model": {"name": "m"}, "data": {"source": "s", "target": "t"}, "seed": 0,
           "train": {"max_steps": 8}}
    w.start("done", exp, {})
    for step, v in ((2, 0.5), (4, 0.6), (6, 0.7), (8, 0.8)):
        w.result("done", exp, {}, {"step": step, "uv/im": v})

    def trial(tid: str, status: str) -> SimpleNamespace:
        return SimpleNamespace(trial_id=tid, status=status,
                               storage=SimpleNamespace(experiment_fs_path=str(sweep_dir / "tune")))

    def decision_on_a_weaker_trial(rebuild: bool) -> str:
        asha = make_scheduler(space)
        asha.set_search_properties(space.metric, space.mode)
        if rebuild:
            asha.on_trial_add(None, trial("done", Trial.TERMINATED))  # restored as finished
        weaker = trial("next", Trial.PENDING)
        asha.on_trial_add(None, weaker)
        return asha.on_trial_result(None, weaker, {"step": 2, "uv/im": 0.4})

    assert decision_on_a_weaker_trial(rebuild=True) == TrialScheduler.STOP
    assert decision_on_a_weaker_trial(rebuild=False) == TrialScheduler.CONTINUE  # what a lost rung state did
