"""The private Ray and Optuna APIs the package relies on (all behind uda_ray.search.private) still exist in the
installed versions, with the shape we use. One test per private attribute or function; a failure names it and
the adapter function to update. No Ray cluster is started."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import optuna
import pytest
import ray

from uda_ray.search import private

VERSIONS = f"Ray {ray.__version__} / Optuna {optuna.__version__}"


def update(what: str, fn: str) -> str:
    return f"{VERSIONS}: {what}: update uda_ray.search.private.{fn}"


@pytest.fixture
def study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize")


@pytest.fixture
def searcher():
    """Ray Tune's OptunaSearch over one parameter, with one trial suggested ("a")."""
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = OptunaSearch(space={"params/x": optuna.distributions.FloatDistribution(0.0, 1.0)}, metric="m", mode="max")
    s.suggest("a")
    return s


# ------------------------------------------------------------------------------------------------
# Optuna


def test_optuna_study_keeps_its_storage_in__storage(study):
    from optuna.storages import BaseStorage

    assert isinstance(getattr(study, "_storage", None), BaseStorage), update(
        "optuna.Study no longer has a `_storage` BaseStorage", "study_storage_of")
    storage = private.study_storage_of(study)
    for method in ("set_trial_user_attr", "set_trial_state_values", "get_trial"):
        assert callable(getattr(storage, method, None)), update(f"BaseStorage.{method} is gone", "study_storage_of")
    params = list(inspect.signature(storage.set_trial_state_values).parameters)
    assert params[:2] == ["trial_id", "state"], update(
        f"BaseStorage.set_trial_state_values takes {params}, not (trial_id, state, ...)", "study_storage_of")


def test_optuna_trials_and_frozen_trials_carry_their_storage_id_in__trial_id(study):
    trial = study.ask()
    assert isinstance(getattr(trial, "_trial_id", None), int), update(
        "optuna.Trial no longer has an int `_trial_id`", "trial_storage_id")
    frozen = study.get_trials(deepcopy=False)[0]
    assert getattr(frozen, "_trial_id", None) == trial._trial_id, update(
        "FrozenTrial no longer has the storage's `_trial_id`", "trial_storage_id")
    tid = private.trial_storage_id(frozen)
    assert private.study_storage_of(study).get_trial(tid).number == trial.number, update(
        "`_trial_id` is no longer the storage's key of a trial", "trial_storage_id")


def test_optuna_trial_can_be_built_for_a_running_trial_of_a_study(study):
    params = list(inspect.signature(optuna.Trial.__init__).parameters)
    assert params[1:3] == ["study", "trial_id"], update(
        f"optuna.Trial.__init__ takes {params[1:]}, not (study, trial_id)", "live_trial")
    asked = study.ask()
    asked.suggest_float("x", 0.0, 1.0)
    again = private.live_trial(study, study.get_trials(deepcopy=False)[0])
    again.report(0.5, 3)
    assert again.params == asked.params and study.trials[0].intermediate_values == {3: 0.5}, update(
        "a trial built again for a running study trial does not continue it", "live_trial")


# ------------------------------------------------------------------------------------------------
# Ray Tune's OptunaSearch


def test_optuna_search_keeps_its_study_in__ot_study(searcher):
    assert isinstance(getattr(searcher, "_ot_study", None), optuna.Study), update(
        "OptunaSearch no longer keeps its optuna.Study in `_ot_study`", "searcher_study")
    assert private.searcher_study(searcher).trials[0].state == optuna.trial.TrialState.RUNNING


def test_optuna_search_keeps_its_trials_in__ot_trials(searcher):
    trials = getattr(searcher, "_ot_trials", None)
    assert isinstance(trials, dict) and isinstance(trials.get("a"), optuna.Trial), update(
        "OptunaSearch no longer keeps {tune trial id: optuna.Trial} in `_ot_trials`", "searcher_trials")
    assert private.searcher_trials(searcher) is trials


def test_optuna_search_keeps_the_trials_it_told_in__completed_trials(searcher):
    assert getattr(searcher, "_completed_trials", None) == set(), update(
        "OptunaSearch no longer keeps the trial ids it told in a set `_completed_trials`", "searcher_finished")
    searcher.on_trial_complete("a", {"m": 0.5})
    assert private.searcher_finished(searcher) == {"a"}, update(
        "OptunaSearch.on_trial_complete no longer records the trial in `_completed_trials`", "searcher_finished")


def test_optuna_search_snapshot_is_its_instance_dict(searcher, tmp_path):
    """OptunaSearch.save pickles __dict__ and restore updates it: our attributes ride along, unless left out."""
    from ray.tune.search.optuna import OptunaSearch

    searcher.ours = {("a", 2)}
    searcher.cache = "recomputed"
    with private.left_out_of_snapshot(searcher, "cache"):
        searcher.save(str(tmp_path / "snap.pkl"))
    assert searcher.cache == "recomputed"
    restored = OptunaSearch()
    restored.restore(str(tmp_path / "snap.pkl"))
    assert getattr(restored, "ours", None) == {("a", 2)}, update(
        "OptunaSearch.save / restore no longer carry the instance's __dict__", "left_out_of_snapshot")
    assert "cache" not in restored.__dict__


def test_tune_unflatten_dict_nests_flat_parameter_names():
    from ray.tune.utils import util

    assert callable(getattr(util, "unflatten_dict", None)), update(
        "ray.tune.utils.util.unflatten_dict is gone", "unflatten_params")
    assert private.unflatten_params({"params/x": 1, "params/y": "b"}) == {"params": {"x": 1, "y": "b"}}, update(
        "unflatten_dict no longer nests 'a/b' keys", "unflatten_params")


# ------------------------------------------------------------------------------------------------
# Ray Tune: trial ids, SearchGenerator's count, ASHA's rungs, a trial's experiment folder


def _generated_trials(tmp_path, n: int) -> list:
    """`n` trials made by the package's TrialIdsInOrder over a searcher that suggests {"x": 1}."""
    from ray.tune.experiment import Experiment
    from ray.tune.search import Searcher

    from uda_ray.search.searcher import TrialIdsInOrder

    class One(Searcher):
        def suggest(self, trial_id: str) -> dict:
            return {"x": 1}

    gen = TrialIdsInOrder(One(metric="m", mode="max"), "abcde")
    gen.add_configurations(Experiment("exp", lambda config: None, storage_path=str(tmp_path), num_samples=n))
    return [gen.next_trial() for _ in range(n)]


def test_tune_trial_ids_come_from_the_trial_generate_id_classmethod(tmp_path):
    from ray.tune.experiment import Trial
    from ray.tune.search import SearchGenerator

    assert isinstance(Trial.__dict__.get("generate_id"), classmethod), update(
        "Trial.generate_id is no longer a classmethod of Trial", "fixed_trial_id")
    assert "Trial.generate_id()" in inspect.getsource(SearchGenerator.create_trial_if_possible), update(
        "SearchGenerator.create_trial_if_possible no longer takes the id from Trial.generate_id()", "fixed_trial_id")
    with private.fixed_trial_id("mine"):
        assert Trial.generate_id() == "mine"
    assert Trial.generate_id() != "mine"
    assert [t.trial_id for t in _generated_trials(tmp_path, 2)] == ["abcde_00000", "abcde_00001"], update(
        "trials are not named by the patched Trial.generate_id", "fixed_trial_id")


def test_tune_search_generator_counts_the_trials_it_created_in__counter():
    from ray.tune.search import Searcher, SearchGenerator

    gen = SearchGenerator(Searcher(metric="m", mode="max"))
    assert getattr(gen, "_counter", None) == 0, update("SearchGenerator no longer has `_counter`", "trials_created")
    gen.set_state({**gen.get_state(), "counter": 7})
    assert private.trials_created(gen) == 7, update(
        "SearchGenerator's `_counter` is no longer restored from its state's 'counter'", "trials_created")


def test_tune_asha_keeps_brackets_in__trial_info_and_its_metric_in__metric_op_and__time_attr():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    asha = ASHAScheduler(time_attr="step", metric="m", mode="max", max_t=8, grace_period=2, reduction_factor=2)
    for name, value in (("_metric", "m"), ("_time_attr", "step"), ("_metric_op", 1.0)):
        assert getattr(asha, name, None) == value, update(f"ASHAScheduler no longer has `{name}`", "asha_replay")
    done, weaker = SimpleNamespace(trial_id="done"), SimpleNamespace(trial_id="weaker")
    asha.on_trial_add(None, done)
    bracket = getattr(asha, "_trial_info", {}).get("done")
    assert bracket is not None, update("ASHAScheduler no longer keeps {trial id: bracket} in `_trial_info`",
                                       "asha_replay")
    params = list(inspect.signature(bracket.on_result).parameters)
    assert params == ["trial", "cur_iter", "cur_rew"], update(
        f"ASHA's bracket.on_result takes {params}, not (trial, cur_iter, cur_rew)", "asha_replay")
    private.asha_replay(asha, done, [{"step": 2, "m": 0.5}, {"step": 4}, {"step": 4, "m": 0.6}])
    asha.on_trial_add(None, weaker)
    assert asha.on_trial_result(None, weaker, {"step": 2, "m": 0.4}) == TrialScheduler.STOP, update(
        "results replayed into ASHA's bracket no longer set its rungs", "asha_replay")


def test_tune_trial_storage_has_the_experiment_path(tmp_path):
    from ray.tune.experiment import trial as trial_module

    storage_cls = getattr(trial_module, "StorageContext", None)
    assert storage_cls is not None and isinstance(
        inspect.getattr_static(storage_cls, "experiment_fs_path", None), property), update(
        "Trial.storage (StorageContext) no longer has the property experiment_fs_path", "experiment_path_of")
    (trial,) = _generated_trials(tmp_path, 1)
    assert private.experiment_path_of(trial) == str(tmp_path / "exp"), update(
        "trial.storage.experiment_fs_path is no longer the experiment's folder", "experiment_path_of")


def test_tune_trials_keep_metric_statistics_in_run_metadata_and_forgetting_them_shrinks_the_snapshot(tmp_path):
    (trial,) = _generated_trials(tmp_path, 1)
    for step in (1, 2):
        trial.update_last_result({"training_iteration": step, "step": 100 * step, "m": 0.1 * step,
                                  **{f"test/iou/c{i}": 0.01 * i for i in range(19)}})
    meta = getattr(trial, "run_metadata", None)
    assert isinstance(getattr(meta, "metric_analysis", None), dict) and "test/iou/c3" in meta.metric_analysis, \
        update("Tune trials no longer keep run_metadata.metric_analysis per numeric key", "forget_metric_history")
    assert isinstance(getattr(meta, "metric_n_steps", None), dict) and "test/iou/c3" in meta.metric_n_steps, \
        update("Tune trials no longer keep run_metadata.metric_n_steps per numeric key", "forget_metric_history")
    before = len(trial.get_json_state()[1])  # cached, as after a snapshot
    private.forget_metric_history(trial, keep=("m", "step"))
    after = trial.get_json_state()[1]
    assert len(after) * 4 < before, update("forgetting the statistics does not shrink the trial's snapshot",
                                           "forget_metric_history")
    assert set(trial.metric_analysis) == {"m", "step"} and trial.metric_analysis["m"]["max"] == 0.2
    assert trial.metric_n_steps == {}
    restored = type(meta).from_json_state(after)  # what a resume reads (Trial.restore_run_metadata)
    assert restored.metric_analysis == trial.metric_analysis and restored.last_result["m"] == 0.2, update(
        "a trial whose statistics were forgotten no longer restores from its snapshot", "forget_metric_history")


# ------------------------------------------------------------------------------------------------
# Ray core and Train


def test_ray_has_its_token_auth_setter():
    from ray._private.authentication import authentication_token_setup as setup

    enable = getattr(setup, "_enable_token_auth", None)
    assert callable(enable), update(
        "ray._private.authentication.authentication_token_setup._enable_token_auth is gone "
        "(the fallback sets RAY_AUTH_MODE only)", "refresh_token_auth_mode")
    assert not [p for p in inspect.signature(enable).parameters.values() if p.default is p.empty], update(
        "_enable_token_auth now takes arguments", "refresh_token_auth_mode")


def test_ray_train_reads_the_settings_the_local_cluster_sets():
    from ray.train.v2._internal import constants

    read = {v for v in vars(constants).values() if isinstance(v, str)}
    for name in private.LOCAL_TRAIN_ENV:
        assert name in read, update(f"Ray Train no longer reads {name} (ray.train.v2._internal.constants)",
                                    "LOCAL_TRAIN_ENV")
