"""Every use of a private Ray or Optuna API, each behind one small function: the rest of the package calls
only these. Each says what public API is missing and what breaks if the private one goes; a test per use
(tests/test_private_apis.py) checks that the installed Ray / Optuna still has it, naming the function here
to update. Ray and Optuna are imported inside the functions, so importing this module imports neither.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

# ------------------------------------------------------------------------------------------------
# Optuna: a study's storage and its trials' storage ids


def study_storage_of(study: Any) -> Any:
    """`study._storage`: the storage of a live study.

    Why: the searcher fails trials of the study that are no live `optuna.Trial` of ours (one suggested again
    after an interruption, one asked for just before it), and reads a trial by its storage id. Optuna's study
    offers `tell` (which runs the sampler's after-trial hook and checks values) but no way to set the state
    or a user attribute of such a trial as it stands. If it goes, resuming an interrupted sweep fails."""
    return study._storage


def trial_storage_id(trial: Any) -> int:
    """`trial._trial_id` of an `optuna.Trial` or a `FrozenTrial`: the id the storage knows the trial by
    (`number` is its index in the study, not the storage's key).

    Why: the storage calls above take it, and the searcher tells its own trials from the earlier ones of the
    journal by it. No public accessor. If it goes, resuming an interrupted sweep fails."""
    return trial._trial_id


def live_trial(study: Any, frozen: Any) -> Any:
    """`optuna.Trial(study, trial_id)`: a live trial for an existing, still running trial of the study.

    Why: after an interruption the searcher continues an earlier suggestion (same parameters, same study
    trial) instead of asking for a new one; Optuna creates live trials only through `study.ask()` (new
    trials), and its documentation says not to call the constructor. If it goes, a trial suggested again
    after a resume cannot report into its earlier study trial."""
    import optuna

    return optuna.Trial(study, trial_storage_id(frozen))


# ------------------------------------------------------------------------------------------------
# Ray Tune's OptunaSearch: its study, its trials, its finished trials, its snapshot


def searcher_study(searcher: Any) -> Any:
    """`OptunaSearch._ot_study`: the study the searcher asks and tells (None before its search space is set).

    Why: the searcher fails stale trials of the study, reads the journal's earlier trials and tells a trial
    PRUNED or FAIL; OptunaSearch exposes no accessor. If it goes, early-stopped trials reach Optuna as COMPLETE
    and resuming an interrupted sweep fails."""
    return getattr(searcher, "_ot_study", None)


def searcher_trials(searcher: Any) -> dict:
    """`OptunaSearch._ot_trials`: Tune trial id -> the live `optuna.Trial` of its suggestion (mutable).

    Why: the searcher reports intermediate values by our step (OptunaSearch reports by training_iteration,
    which restarts at 1 after a restore), sets constraints before telling, tags each study trial with its Tune
    trial id, and swaps in the earlier study trial of a suggestion made again. No public accessor. If it goes,
    those all fail."""
    return searcher._ot_trials


def searcher_finished(searcher: Any) -> set:
    """`OptunaSearch._completed_trials`: the Tune trial ids already told to Optuna (mutable).

    Why: a trial told PRUNED / FAIL by us, or restored as finished, must not be told again (Optuna refuses to
    tell a finished trial; OptunaSearch only logs it). No public accessor. If it goes, telling fails."""
    return searcher._completed_trials


@contextlib.contextmanager
def left_out_of_snapshot(searcher: Any, name: str) -> Iterator[None]:
    """Leave the attribute `name` out of the searcher's snapshot while it is taken (`OptunaSearch.save`).

    Why: `OptunaSearch.save` pickles the instance's `__dict__` and `restore` updates it with what it reads, so
    our own state (the steps reported, max_steps, constraints) rides along with Tune's experiment snapshot;
    a cache of study trials must not (it is recomputed from the journal). Searcher has no hook for extra
    state. If the snapshot format changes, a restored searcher forgets which steps it reported and reports
    them again, and the cache may be pickled with the study."""
    value = searcher.__dict__.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            setattr(searcher, name, value)


def unflatten_params(flat: dict) -> dict:
    """`ray.tune.utils.util.unflatten_dict` (from `ray._private.dict`): {"params/x": v} -> {"params": {"x": v}}.

    Why: a suggestion made again must come back in the nested form `OptunaSearch.suggest` returns, and
    OptunaSearch uses this very function for it. Not a public Tune API. If it goes, a resumed sweep cannot
    hand back an earlier suggestion."""
    from ray.tune.utils.util import unflatten_dict

    return unflatten_dict(flat)


# ------------------------------------------------------------------------------------------------
# Ray Tune: trial ids, the search generator's count, ASHA's rungs, a trial's experiment folder


@contextlib.contextmanager
def fixed_trial_id(trial_id: str) -> Iterator[None]:
    """Make `Trial.generate_id` return `trial_id` for the duration (a monkeypatch of the classmethod).

    Why: Tune names trials with random ids, and `SearchGenerator.create_trial_if_possible` takes the id from
    `Trial.generate_id()` before it asks the searcher; there is no way to pass one. Deterministic ids let a
    restored experiment suggest a trial again under the same id, so that it continues its Train run, rows and
    study trial. The Tune loop is single-threaded on the driver. If it goes, a sweep resumed after its driver
    was killed runs such a trial a second time, beside the first."""
    from ray.tune.experiment import Trial

    generate_id = Trial.__dict__["generate_id"]
    Trial.generate_id = classmethod(lambda cls: trial_id)
    try:
        yield
    finally:
        Trial.generate_id = generate_id


def trials_created(search_generator: Any) -> int:
    """`SearchGenerator._counter`: how many trials the generator has created (saved and restored with Tune's
    experiment snapshot: `get_state()["counter"]`).

    Why: the n-th suggested trial is named after n, which must come back the same after a restore. No
    public accessor. If it goes, trial ids are not deterministic (see `fixed_trial_id`)."""
    return search_generator._counter


def asha_replay(asha: Any, trial: Any, rows: Iterable[dict]) -> None:
    """Record a trial's earlier results (`rows`, in step order) in the ASHA rungs of its bracket, as if they
    had just been reported: `asha._trial_info[trial_id].on_result(trial, time, sign * metric)`, with the
    scheduler's `_time_attr`, `_metric` and `_metric_op`; rows without the metric are skipped.

    Why: Tune does not save its scheduler with the experiment, and ASHAScheduler has no way to load rungs. If
    it goes, a restored sweep's ASHA judges the next trials against no one (and never stops them)."""
    bracket = asha._trial_info[trial.trial_id]
    for r in rows:
        if r.get(asha._metric) is not None:
            bracket.on_result(trial, r[asha._time_attr], asha._metric_op * r[asha._metric])


def experiment_path_of(trial: Any) -> str:
    """`trial.storage.experiment_fs_path`: the folder of the trial's Tune experiment (`<sweep>/tune`).

    Why: a scheduler sees Tune trials, not our sweep; this is where it finds the sweep's results tables.
    `Trial.storage` is a `StorageContext` of `ray.train._internal`. If it goes, restoring a sweep with ASHA
    fails."""
    return trial.storage.experiment_fs_path


def forget_metric_history(trial: Any, keep: Iterable[str]) -> None:
    """Drop a finished Tune trial's running statistics of its metrics but those of `keep`:
    `trial.run_metadata.metric_n_steps` emptied (the last 5 and last 10 values of every numeric key, two deques
    each) and `trial.run_metadata.metric_analysis` (max, min, avg, last, last-5-avg, last-10-avg of every numeric
    key) cut to `keep`. Setting them invalidates the trial's cached JSON, so Tune's next experiment snapshot
    writes the smaller state (and a resume restores it).

    Why: Tune keeps both for every numeric key of every result of every trial, for the life of the driver and in
    every snapshot of the experiment: a replay trial reports 41 numeric keys (19 of them per-class IoUs), about
    75 KB of deques, 18 KB of statistics and 35 KB of cached JSON per trial, the most of the driver's growth per
    trial. Tune's only reader of them is ExperimentAnalysis.get_best_trial (ResultGrid.get_best_result), by one
    metric: `keep` the objective and that still works. Tune offers no setting for which metrics it tracks (nor
    a public way to forget a finished trial's); uda_ray ranks from its own tables. If it goes (the attributes
    renamed), nothing breaks: the driver only grows as it did (tests/test_private_apis.py says so first)."""
    meta = getattr(trial, "run_metadata", None)
    if meta is None or not isinstance(getattr(meta, "metric_analysis", None), dict):
        return
    keep = set(keep)
    meta.metric_analysis = {k: v for k, v in meta.metric_analysis.items() if k in keep}
    meta.metric_n_steps = {}


# ------------------------------------------------------------------------------------------------
# Ray core and Train: token authentication, Train's internal settings


def refresh_token_auth_mode() -> None:
    """`ray._private.authentication.authentication_token_setup._enable_token_auth()`: make this process see
    RAY_AUTH_MODE=token although Ray already read its config (RayConfig is cached at import).

    Why: no public setter; the environment variable alone is not seen by a process that imported ray. If it
    goes (an ImportError: another Ray version), the environment variable alone is set, and connecting with a
    token may fail in a process that imported ray before."""
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth as enable

        enable()
    except ImportError:
        pass


# Per-trial start-up and teardown on the local cluster (benchmarks/trial_overhead.py measures them): the Train
# controller polls its worker group every 0.5 s instead of 2 s (a finished run is noticed sooner), and runs no
# preemption-watcher actor (one more process per run, polling for node drains a single machine never has).
# Read by Ray Train V2's internal constants (ray.train.v2._internal.constants); not documented. If Ray renames
# them, nothing fails: trials only start and end slower.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

