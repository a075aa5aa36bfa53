"""Search space -> Ray Tune (OptunaSearch + ASHA) -> one trial driver per trial (inline, or a TorchTrainer: the
Train V2 pattern). Importing this module does not import ray: the Tune adapters it assembles (searcher.py,
scheduler.py, callbacks.py) are imported when a tuner is built.

Layout of a sweep under the storage root:
    <root>/<sweep>/sweep.json        what was asked (space file, seed, objective), status, driver pid
    <root>/<sweep>/space.yaml        the space file as submitted
    <root>/<sweep>/tune/             Ray Tune's experiment (restored by `uda-ray resume`)
    <root>/<sweep>/train/train-<id>/ each trial's Ray Train run: checkpoints, config.yaml
    <root>/<sweep>/results/          trials / evals / class_iou Parquet tables
    <root>/<sweep>/optuna_journal.log the sweep's Optuna study (JournalStorage): `optuna-dashboard <that file>`
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from uda_ray.errors import UserError
from uda_ray.search.driver import trial_driver, trial_resources
from uda_ray.search.space import SearchSpace
from uda_ray.search.study import tune_domains
from uda_ray.storage import layout, store

TUNE_DIR = "tune"
REUSE_ACTORS = os.environ.get("UDA_RAY_REUSE_ACTORS", "1") != "0"


def trial_id_prefix(sweep_dir: Path, seed: int) -> str:
    """The prefix of a sweep's trial ids: fixed by the sweep (its folder name and seed), so that a sweep
    started again from nothing after its driver died names its trials as the first start did."""
    import hashlib

    return hashlib.sha1(f"{Path(sweep_dir).name}:{seed}".encode()).hexdigest()[:5]


def baseline_trial_id(sweep_dir: Path, seed: int) -> str:
    """The id of a sweep's baseline trial (`baseline: true`): its first suggestion takes the enqueued baseline."""
    return f"{trial_id_prefix(sweep_dir, seed)}_{0:05d}"


def make_search_alg(searcher: Any, prefix: str) -> Any:
    """Tune's SearchGenerator over `searcher`, naming the n-th suggested trial `<prefix>_<n:05d>`
    (see searcher.TrialIdsInOrder)."""
    from uda_ray.search.searcher import TrialIdsInOrder

    return TrialIdsInOrder(searcher, prefix)


def make_scheduler(space: SearchSpace) -> Any:
    """ASHA on the (first) objective by our reported step, whose rungs survive a resume; None without one."""
    if not (space.scheduler and space.scheduler.asha):
        return None
    from uda_ray.search.scheduler import ResumableASHA

    a = space.scheduler.asha
    return ResumableASHA(
        time_attr="step",  # our reported step; training_iteration restarts at 1 after a restore
        metric=space.metric, mode=space.mode, max_t=space.base.train.max_steps,
        grace_period=a.grace_period, reduction_factor=a.reduction_factor,
        stop_last_trials=False,  # trials that reach max_steps end by themselves, as completed
    )


def make_callbacks(sweep: dict, writer_args: dict, mlflow: str | None = None) -> list:
    """The sweep's Tune callbacks: the results tables, TensorBoard, MLflow and the live view."""
    from uda_ray.search.callbacks import ResultsCallback

    return [ResultsCallback(sweep, writer_args, mlflow)]


def store_of(sweep_dir: Path) -> tuple[str, str] | None:
    """(storage URI, the sweep folder's path in it) of a sweep under a URI's staging folder, else None: how a
    trial on another node finds its own staging copy (uda_ray.storage.store)."""
    remote = store.located(sweep_dir)
    return None if remote is None else (remote.uri, Path(sweep_dir).absolute().relative_to(remote.staging).as_posix())


def has_tune_state(sweep_dir: Path) -> bool:
    """Whether Ray Tune saved the sweep's experiment state (it does at its first loop step, with the first
    trial suggested): before that (a driver killed while it started) there is nothing to restore, and the
    sweep is started again from its folder."""
    return any((Path(sweep_dir) / TUNE_DIR).glob("experiment_state-*.json"))


def build_tuner(space: SearchSpace, sweep_dir: Path, seed: int, restore: bool = False,
                mlflow: str | None = None) -> Any:
    """The sweep's Tuner, new or restored from `<sweep>/tune` (`restore`: searcher and trials as saved)."""
    from ray import tune

    from uda_ray.search.searcher import make_searcher

    # what every trial driver needs
    sweep = {"base_raw": space.base_raw, "dir": str(sweep_dir), "driver_cpus": space.driver_cpus,
             "tune": str(sweep_dir / TUNE_DIR), "store": store_of(sweep_dir)}
    trainable = tune.with_resources(tune.with_parameters(trial_driver, sweep=sweep),
                                    functools.partial(trial_resources, sweep=sweep))
    tune_path = sweep_dir / TUNE_DIR
    if restore:
        return tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False)
    writer_args = dict(results_dir=layout.results_dir(sweep_dir), sweep=sweep_dir.name, metric=space.metric,
                       mode=space.mode, search_seed=seed)
    param_space = tune_domains(space)
    if "train.max_steps" in space.params:
        raise UserError("train.max_steps cannot be searched: ASHA needs one budget per sweep")
    return tune.Tuner(
        trainable,
        param_space=param_space,
        # max_concurrent_trials: the searcher's ConcurrencyLimiter (Tune ignores it beside a SearchGenerator)
        tune_config=tune.TuneConfig(search_alg=make_search_alg(make_searcher(space, seed, sweep_dir),
                                                               trial_id_prefix(sweep_dir, seed)),
                                    scheduler=make_scheduler(space),
                                    num_samples=space.num_samples,
                                    # a finished trial's process runs the next trial of the same resources
                                    # (function trainables are reset in place): no process start, no imports
                                    reuse_actors=REUSE_ACTORS),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=str(sweep_dir), callbacks=make_callbacks(sweep, writer_args, mlflow),
            # a trial whose process died (an inline fit, or a Ray Train run's driver) is restarted from its
            # run folder's latest checkpoint, as a Ray Train run restarts a dead worker
            verbose=0, failure_config=tune.FailureConfig(max_failures=space.base.train.max_failures),
        ),
    )


def run(tuner: Any) -> Any:
    """Fit, muting Tune's own console tables (the ResultsCallback prints the live view)."""
    import optuna

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # with verbose=0 the legacy reporter prints nothing
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return tuner.fit()


def sweep_status_after(grid: Any) -> str:
    errors = getattr(grid, "num_errors", 0)
    return "completed" if not errors else "completed_with_errors"
