"""Search space -> Ray Tune (OptunaSearch + ASHA) -> one TorchTrainer per trial (the Train V2 pattern).

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
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from uda_ray.errors import UserError
from uda_ray.results.tables import ResultsWriter, experiment_of
from uda_ray.search.space import SearchSpace

log = logging.getLogger(__name__)
progress = logging.getLogger("uda_ray.training.progress")  # the live view (printed by the CLI)
TUNE_DIR = "tune"
STUDY_FILE = "optuna_journal.log"


# ------------------------------------------------------------------------------------------------
# the trial: a Tune function that drives one Ray Train run


REUSE_ACTORS = os.environ.get("UDA_RAY_REUSE_ACTORS", "1") != "0"
TRAIN_FAILED_FILE = "train_failed.txt"  # a Ray Train run that used up train.max_failures (Tune must not rerun it)


def trial_driver(config: dict, sweep: dict) -> None:
    """Runs inside a Tune trial: build the trial's experiment and fit it in the run folder
    `<sweep>/train/train-<trial id>`, in this process (`train.launcher` inline: one worker) or as a TorchTrainer
    of that name (ray_train: DDP workers, each a process of its own).

    The folder is named after the trial, so a restarted or restored trial resumes from its latest checkpoint
    instead of starting over. Tune restarts a trial whose process died up to train.max_failures times (its
    FailureConfig); a Ray Train run restarts its own workers that many times, and a run that used them up is
    not started again by Tune's restart.
    """
    import ray.tune

    from uda_ray.build import build_experiment
    from uda_ray.config import apply_overrides
    from uda_ray.training.timing import mark

    trial_id = ray.tune.get_context().get_trial_id()
    mark("trial_driver_start", trial=trial_id)
    params = plain(config["params"])
    cfg = build_experiment(apply_overrides(sweep["base_raw"], params), f"trial {trial_id}")
    run_dir = Path(sweep["dir"]) / "train" / f"train-{trial_id}"
    if cfg.train.inline:
        from uda_ray.training.loop import tune_trial_fit

        mark("inline_fit_start", trial=trial_id)
        tune_trial_fit(cfg, run_dir)
        mark("trial_driver_end", trial=trial_id)
        return

    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    from uda_ray.training.loop import make_trainer

    failed = run_dir / TRAIN_FAILED_FILE
    if failed.is_file():  # Tune restarted this trial after its Ray Train run had failed for good
        raise RuntimeError(failed.read_text())
    trainer = make_trainer(cfg, run_dir.parent, run_dir.name, callbacks=[TuneReportCallback()])
    mark("trainer_fit_start", trial=trial_id)
    try:
        trainer.fit()
    except TrainingFailedError as e:  # the run's own restarts used up (not: this process or the cluster ending)
        run_dir.mkdir(parents=True, exist_ok=True)
        failed.write_text(f"the Ray Train run failed after {cfg.train.max_failures} restart(s): "
                          + ((str(e).strip().splitlines() or [type(e).__name__])[-1])[:500])
        raise
    mark("trainer_fit_end", trial=trial_id)
    mark("trial_driver_end", trial=trial_id)


def trial_resources(config: dict, sweep: dict) -> Any:
    """The resources of a trial's Tune actor: the whole worker (train.cpus_per_worker, one GPU with use_gpu)
    when `fit` runs inline in it; `driver_cpus` for the driver of a Ray Train run (whose workers ask for their
    own)."""
    from ray.tune import PlacementGroupFactory

    from uda_ray.build import build_experiment
    from uda_ray.config import apply_overrides

    try:
        tc = build_experiment(apply_overrides(sweep["base_raw"], plain(config["params"])), "<trial config>").train
    except UserError:  # a sampled config the trial itself will refuse (and end errored): the base's resources
        tc = build_experiment(sweep["base_raw"], "<base config>").train
    if tc.inline:
        return PlacementGroupFactory([{"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}])
    return PlacementGroupFactory([{"CPU": sweep["driver_cpus"]}])


def plain(d: dict) -> dict:
    """numpy scalars from samplers -> Python scalars (the strict loader wants real ints/floats)."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------------
# Tune pieces (classes are built lazily so importing this module does not import ray)


def _tune_domains(space: SearchSpace) -> dict:
    from ray import tune

    out = {}
    for k, p in space.params.items():
        if p.kind == "choice":
            out[k] = tune.choice(list(p.values))
        elif p.kind == "int":
            out[k] = tune.randint(p.values[0], p.values[1] + 1)  # inclusive upper bound
        elif p.kind == "loguniform":
            out[k] = tune.loguniform(*p.values)
        else:
            out[k] = tune.uniform(*p.values)
    return {"params": out}


def study_storage(sweep_dir: Path) -> Any:
    """The sweep's persisted Optuna storage: a journal file under the sweep folder (what optuna-dashboard opens)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(Path(sweep_dir).absolute() / STUDY_FILE)))


def load_study(sweep_dir: Path) -> Any:
    """The Optuna study of a sweep (named after it), read from its journal file."""
    import optuna

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / STUDY_FILE).is_file():
        raise UserError(f"sweep '{sweep_dir.name}' has no Optuna study ({sweep_dir / STUDY_FILE} is missing)")
    return optuna.load_study(study_name=sweep_dir.name, storage=study_storage(sweep_dir))


def optuna_distributions(space: SearchSpace) -> dict[str, Any]:
    """The Optuna distributions OptunaSearch derives from the space (names `params/<key>`)."""
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch.convert_search_space(_tune_domains(space))


def _fits(value: Any, dist: Any) -> bool:
    import optuna

    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(dist, optuna.distributions.IntDistribution) and value != int(value):
        return False
    return dist.low <= value <= dist.high


def warm_start_points(earlier_dir: Path, space: SearchSpace) -> tuple[list[dict], list[tuple[str, str]]]:
    """The finished trials of an earlier sweep that fit `space`, as Optuna trials to seed its study, and the
    (trial, reason) of those skipped. A completed trial brings its objective value(s) at its last evaluation
    (what the searcher is told); one stopped early by the scheduler comes as PRUNED with its intermediate
    values; errored and unfinished trials are skipped, as are trials whose parameters are not exactly the
    new space's or fall outside its ranges / choices."""
    import json

    import optuna

    from uda_ray.results.tables import read_table

    earlier_dir = Path(earlier_dir)
    dists = optuna_distributions(space)
    metrics = [o.metric for o in space.objectives]
    evals = read_table(earlier_dir / "results", "evals")
    points, skipped = [], []
    for t in read_table(earlier_dir / "results", "trials"):
        tid = t["trial_id"]
        if t["status"] not in ("completed", "stopped_early"):
            skipped.append((tid, f"status {t['status']}"))
            continue
        params = {f"params/{k}": v for k, v in json.loads(t.get("params") or "{}").items()}
        if set(params) != set(dists):
            extra = sorted(k[len("params/"):] for k in set(params) - set(dists))
            missing = sorted(k[len("params/"):] for k in set(dists) - set(params))
            skipped.append((tid, "parameters differ" + (f"; not searched now: {', '.join(extra)}" if extra else "")
                            + (f"; not searched then: {', '.join(missing)}" if missing else "")))
            continue
        bad = [f"{k[len('params/'):]}={v!r}" for k, v in params.items() if not _fits(v, dists[k])]
        if bad:
            skipped.append((tid, f"outside the new space: {', '.join(bad)}"))
            continue
        mine = sorted((e for e in evals if e["trial_id"] == tid), key=lambda e: e["step"])
        inter = {int(e["step"]): float(e[metrics[0]]) for e in mine
                 if isinstance(e.get(metrics[0]), (int, float)) and e[metrics[0]] == e[metrics[0]]}
        attrs = {"warm_start_from": earlier_dir.name, "warm_start_trial_id": tid}
        if t["status"] == "stopped_early":
            points.append(dict(params=params, distributions=dists, state=optuna.trial.TrialState.PRUNED,
                               intermediate_values=inter if len(metrics) == 1 else None, user_attrs=attrs))
            continue
        last = mine[-1] if mine else {}
        values = [last.get(m) for m in metrics]
        if not all(isinstance(v, (int, float)) and v == v for v in values):
            missing = [m for m, v in zip(metrics, values) if not (isinstance(v, (int, float)) and v == v)]
            skipped.append((tid, f"no {', '.join(missing)} at its last evaluation"))
            continue
        points.append(dict(params=params, distributions=dists, state=optuna.trial.TrialState.COMPLETE,
                           values=[float(v) for v in values],
                           intermediate_values=inter if len(metrics) == 1 else None, user_attrs=attrs))
    return points, skipped


def seed_study(sweep_dir: Path, space: SearchSpace, points: list[dict]) -> Any:
    """Create the sweep's persisted study holding `points` (before the searcher loads it: same name, same
    storage, so TPE's first suggestions already see them)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line on the console
    study = optuna.create_study(storage=study_storage(sweep_dir), study_name=Path(sweep_dir).name,
                                directions=["maximize" if o.mode == "max" else "minimize" for o in space.objectives])
    for p in points:
        study.add_trial(optuna.trial.create_trial(**p))
    return study


def make_searcher(space: SearchSpace, seed: int, sweep_dir: Path | None = None) -> Any:
    """OptunaSearch (TPE, seeded) that records trials stopped early by the scheduler as PRUNED, with the study
    persisted in the sweep folder (when given) so that optuna-dashboard can open it."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.utils.util import unflatten_dict

    class PruneAwareOptunaSearch(OptunaSearch):
        # After a SIGKILLed driver, Tune restores its experiment and this searcher from their last snapshot
        # (taken together, at most every ~10 s: Tune's TUNE_GLOBAL_CHECKPOINT_S "auto"), while the study's journal
        # was written up to the kill. So the journal can hold (1) a trial suggested after the snapshot, which the
        # restored experiment does not know, and (2) a trial the snapshot has running but that was told
        # (COMPLETE / PRUNED) and given intermediate values after it. Trial ids are the suggestion's index
        # (TrialIdsInOrder) and the sampler's RNG is restored with the snapshot, so the restored experiment
        # suggests case (1) again under the same id: `suggest` then hands back that earlier trial (its
        # parameters, its Train run and its rows continue) instead of starting a second one. Case (2) is run
        # again by Tune (it replays its results from its checkpoint): `restore` marks it finished here, so
        # the study keeps what it was told once.
        def suggest(self, trial_id: str) -> dict | None:
            out = super().suggest(trial_id)
            if out is None or trial_id not in self._ot_trials:
                return out
            earlier = self._earlier_trials().pop(trial_id, None)
            if earlier is None:
                self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)  # to find it in the study
                return out
            # this suggestion is the earlier one made again (same RNG state): keep the earlier trial
            storage, again = self._ot_study._storage, self._ot_trials[trial_id]
            storage.set_trial_user_attr(again._trial_id, "uda_ray_note", "suggested again after an interruption "
                                        f"as trial {earlier.number}, which holds its results; never run")
            storage.set_trial_state_values(again._trial_id, optuna.trial.TrialState.FAIL)
            self._ot_trials[trial_id] = optuna.Trial(self._ot_study, earlier._trial_id)
            self._adopt(trial_id, earlier)
            return unflatten_dict(earlier.params)

        def _earlier_trials(self) -> dict:
            """tune trial id -> study trial, for the trials of the journal this searcher has not suggested
            (computed once per process: after a restore, or at the first suggestion of a sweep started again)."""
            if "_earlier" not in self.__dict__:
                known = {t._trial_id for t in self._ot_trials.values()}
                self._earlier = {}
                live = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
                for ft in self._ot_study.get_trials(deepcopy=False):
                    if ft._trial_id in known:
                        continue
                    if "tune_trial_id" in ft.user_attrs:
                        self._earlier[ft.user_attrs["tune_trial_id"]] = ft
                    elif ft.state in live:  # asked for, then killed before it was named: never matched again
                        self._ot_study._storage.set_trial_user_attr(
                            ft._trial_id, "uda_ray_note", "suggested just before an interruption; never run")
                        self._ot_study._storage.set_trial_state_values(ft._trial_id, optuna.trial.TrialState.FAIL)
            return self._earlier

        def _adopt(self, trial_id: str, ft: Any) -> None:
            """What the study already holds of `ft` is not told again (Tune replays it after a resume)."""
            self.__dict__.setdefault("_reported_steps", set()).update((trial_id, s) for s in ft.intermediate_values)
            if ft.state.is_finished():
                self._completed_trials.add(trial_id)

        def save(self, checkpoint_path: str) -> None:
            earlier = self.__dict__.pop("_earlier", None)  # recomputed from the journal after a restore
            try:
                super().save(checkpoint_path)
            finally:
                if earlier is not None:
                    self._earlier = earlier

        def restore(self, checkpoint_path: str) -> None:
            super().restore(checkpoint_path)
            self.__dict__.pop("_earlier", None)
            study = self.__dict__.get("_ot_study")
            if study is None:
                return
            for trial_id, ot in self._ot_trials.items():  # case (2) above
                self._adopt(trial_id, study._storage.get_trial(ot._trial_id))
            self._earlier_trials()

        # Tune tells Optuna a trial that ASHA stopped as COMPLETE with its partial value; that feeds
        # low-fidelity points to TPE and into the Pareto front. A trial that ends before max_steps
        # without an error was stopped early: tell Optuna it was pruned.
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if isinstance(self.metric, list) or trial_id in self._completed_trials:
                return
            v, step = result.get(self.metric), int(result.get("step", 0))
            reported = self.__dict__.setdefault("_reported_steps", set())
            if v is not None and v == v and (trial_id, step) not in reported:
                # by our step, not training_iteration (it restarts at 1 after a restore)
                self._ot_trials[trial_id].report(v, step)
                reported.add((trial_id, step))

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return super().on_trial_complete(trial_id, result, error)
            if result and not error:
                # Tune does not pass the result on which the scheduler stops a trial to the searcher's
                # on_trial_result, only here: record it as the trial's last intermediate value
                self.on_trial_result(trial_id, result)
            for c in constraints:  # Optuna's samplers treat a trial with any value > 0 as infeasible
                self._ot_trials[trial_id].set_constraint(str(c), c.violation((result or {}).get(c.metric)))
            step = (result or {}).get("step")
            if error:  # Tune would tell an errored trial with a partial value as COMPLETE
                state = optuna.trial.TrialState.FAIL
            elif step is not None and step < self.max_steps:
                state = optuna.trial.TrialState.PRUNED
            else:
                return super().on_trial_complete(trial_id, result, error)
            self._ot_study.tell(self._ot_trials[trial_id], state=state)
            self._completed_trials.add(trial_id)

    metrics = [o.metric for o in space.objectives]
    modes = [o.mode for o in space.objectives]
    multi = len(metrics) > 1
    constraints = space.constraints
    searcher = PruneAwareOptunaSearch(
        metric=metrics if multi else metrics[0], mode=modes if multi else modes[0],
        # TPE for one objective and for several (MOTPE: Ozaki et al., "Multiobjective Tree-Structured Parzen
        # Estimator for Computationally Expensive Optimization Problems", GECCO 2020): a sweep has tens of
        # trials, fewer than one NSGA-II generation. Constraints are set on each trial before it is told (Optuna's
        # Trial.set_constraint); Optuna's TPE treats a trial with any positive value as infeasible and models
        # feasible and infeasible trials apart (see its TPESampler documentation; background: Watanabe & Hutter,
        # "c-TPE", IJCAI 2023).
        sampler=optuna.samplers.TPESampler(seed=seed),
        storage=study_storage(sweep_dir) if sweep_dir is not None else None,
        study_name=Path(sweep_dir).name if sweep_dir is not None else None,
    )
    searcher.max_steps = space.base.train.max_steps
    return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent_trials)


def trial_id_prefix(sweep_dir: Path, seed: int) -> str:
    """The prefix of a sweep's trial ids: fixed by the sweep (its folder name and seed), so that a sweep
    started again from nothing after its driver died names its trials as the first start did."""
    import hashlib

    return hashlib.sha1(f"{Path(sweep_dir).name}:{seed}".encode()).hexdigest()[:5]


def make_search_alg(searcher: Any, prefix: str) -> Any:
    """Tune's SearchGenerator over `searcher`, naming the n-th suggested trial `<prefix>_<n:05d>`.

    Tune names trials with random ids (Trial.generate_id, a uuid). After a SIGKILLed driver, the restored
    experiment suggests again every trial suggested after its last snapshot; a random id would make that
    trial a new one, beside the Train run, results rows and study trial of the first suggestion. Its index
    is restored with the snapshot (SearchGenerator's counter), so the same id comes back and the trial
    continues where it was."""
    from ray.tune.experiment import Trial
    from ray.tune.search import SearchGenerator

    class TrialIdsInOrder(SearchGenerator):
        def __init__(self, searcher: Any, prefix: str) -> None:
            super().__init__(searcher)
            self.prefix = prefix

        def create_trial_if_possible(self, experiment_spec: dict) -> Any:
            # SearchGenerator takes the id from Trial.generate_id before it asks the searcher; give it ours
            # for this call (the Tune loop is single-threaded on the driver)
            trial_id = f"{self.prefix}_{self._counter:05d}"
            generate_id = Trial.__dict__["generate_id"]
            Trial.generate_id = classmethod(lambda cls: trial_id)
            try:
                return super().create_trial_if_possible(experiment_spec)
            finally:
                Trial.generate_id = generate_id

    return TrialIdsInOrder(searcher, prefix)


def make_scheduler(space: SearchSpace) -> Any:
    if not (space.scheduler and space.scheduler.asha):
        return None
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler

    from uda_ray.results.tables import read_table

    class ResumableASHA(ASHAScheduler):
        """ASHA whose rungs survive a resume. Tune does not save its scheduler with the experiment (it
        drops `_scheduler_alg` from the controller's state), so a restored ASHA starts with empty rungs and
        the next trials would be judged against no one. Each trial restored as finished is recorded again
        from its rows in the results tables (what the scheduler saw: one row per result, in step order);
        a trial restored as unfinished replays its results from its checkpoint and is judged as before."""

        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            super().on_trial_add(tune_controller, trial)
            if trial.status not in (Trial.TERMINATED, Trial.ERROR):
                return
            if "_restored_evals" not in self.__dict__:
                results = Path(trial.storage.experiment_fs_path).parent / "results"
                self._restored_evals = read_table(results, "evals")
            bracket = self._trial_info[trial.trial_id]
            for r in sorted((r for r in self._restored_evals if r["trial_id"] == trial.trial_id),
                            key=lambda r: r["step"]):
                if r.get(self._metric) is not None:
                    bracket.on_result(trial, r[self._time_attr], self._metric_op * r[self._metric])

    a = space.scheduler.asha
    return ResumableASHA(
        time_attr="step",  # our reported step; training_iteration restarts at 1 after a restore
        metric=space.metric, mode=space.mode, max_t=space.base.train.max_steps,
        grace_period=a.grace_period, reduction_factor=a.reduction_factor,
        stop_last_trials=False,  # trials that reach max_steps end by themselves, as completed
    )


def make_callbacks(sweep: dict, writer_args: dict, mlflow: str | None = None) -> list:
    import sys

    from ray import tune

    from uda_ray.results.tensorboard import TB_DIR, TensorBoardLog
    from uda_ray.training.progress import LiveView, read_progress

    class ResultsCallback(tune.Callback):
        """Writes the Parquet tables on the driver as results arrive, and prints a concise live view."""

        def __init__(self) -> None:
            self.writer: ResultsWriter | None = None
            self.t0 = time.time()
            tty = sys.stdout if sys.stdout.isatty() and progress.handlers else None  # the CLI on a terminal
            self.view = LiveView(progress.info, tty)
            self.polled = 0.0

        def setup(self, **info: Any) -> None:
            # reloads existing tables on resume; the trials file is rewritten at most once a second by results
            # (at every start and end), so a sweep of thousands of trials stays cheap to record
            self.writer = ResultsWriter(**writer_args, trials_every_s=1.0)
            self.tb = TensorBoardLog(Path(sweep["dir"]) / TB_DIR)
            self.ml = None
            if mlflow:
                from uda_ray.results.mlflow_log import MLflowLog

                self.ml = MLflowLog(mlflow, Path(sweep["dir"]).name)

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            # between evaluations: the running trials' heartbeats (step, steps/s, ETA), calmly
            now = time.time()
            if now - self.polled < 1.0:
                return
            self.polled = now
            beats = {}
            for t in trials:
                if t.status == "RUNNING":
                    p = read_progress(Path(sweep["dir"]) / "train" / f"train-{t.trial_id}")
                    if p:
                        beats[t.trial_id] = p
            self.view.update(beats, now - self.t0, now)

        def _exp(self, trial: Any) -> tuple[dict, dict]:
            params = plain(trial.config["params"])
            return experiment_of(sweep["base_raw"], params), params

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.writer.start(trial.trial_id, *self._exp(trial))

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if "step" not in result:
                return
            self.writer.result(trial.trial_id, *self._exp(trial), result)
            self.tb.log(trial.trial_id, result)
            if self.ml is not None:
                self.ml.log(trial.trial_id, plain(trial.config["params"]), result)
            self._line(trials, f"{trial.trial_id} step {int(result['step'])}: "
                               f"{writer_args['metric']}={result.get(writer_args['metric'], float('nan')):.4f}")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.tb.close(trial.trial_id)
            row = self.writer.end(trial.trial_id, *self._exp(trial), "completed")
            if self.ml is not None:
                self.ml.end(trial.trial_id, plain(trial.config["params"]), row["status"])
            self._line(trials, f"{trial.trial_id} {row['status'].replace('_', ' ')}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.tb.close(trial.trial_id)
            if self.ml is not None:
                self.ml.end(trial.trial_id, plain(trial.config["params"]), "errored")
            self.writer.end(trial.trial_id, *self._exp(trial), "errored", _error_text(trial))
            self._line(trials, f"{trial.trial_id} errored: {_error_text(trial)}")

        def _line(self, trials: list, what: str) -> None:
            rows = self.writer.store.rows["trials"].values()
            n = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped_early", "errored")}
            running = sum(r["status"] == "running" for r in rows)
            scored = [r for r in rows if r.get("best_value") is not None]
            best = ""
            if scored:
                b = (max if writer_args["mode"] == "max" else min)(scored, key=lambda r: r["best_value"])
                best = f" | best {b['best_value']:.4f} ({b['trial_id']}: {_short_params(b['params'])})"
            self.view.before_line()
            progress.info(f"[{time.time() - self.t0:6.0f}s] {n['completed']} done, {running} running, "
                          f"{n['stopped_early']} stopped early, {n['errored']} errored{best} | {what}")

    return [ResultsCallback()]


def _short_params(params_json: str) -> str:
    p = json.loads(params_json)
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


def _error_text(trial: Any) -> str:
    try:
        path = Path(trial.local_path) / "error.txt"
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "unknown error"
    except Exception:  # noqa: BLE001 - best effort: the full error is in the trial's folder
        return "see the trial's error.txt"


# ------------------------------------------------------------------------------------------------
# cluster


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast with one line when a cluster address cannot be reached (ray.init would retry long)."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected HOST:PORT (or ray://HOST:PORT)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


AUTH_HINT = ("if the cluster uses token authentication, put its token in ~/.ray/auth_token (or RAY_AUTH_TOKEN) "
             "and set RAY_AUTH_MODE=token")


# Per-trial start-up and teardown on the local cluster (benchmarks/trial_overhead.py measures them): the Train
# controller polls its worker group every 0.5 s instead of 2 s (a finished run is noticed sooner), and runs no
# preemption-watcher actor (one more process per run, polling for node drains a single machine never has).
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def init_ray(address: str | None, num_cpus: int | None = None, timeout_s: float | None = None) -> None:
    """A new local cluster when no address is given (the embedded default), else the user's cluster.

    Connecting to a cluster is bounded: ray.init retries forever on a cluster that rejects our token."""
    import threading

    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    check_address(address)
    logging.getLogger("ray").setLevel(logging.ERROR)  # full logs stay in Ray's session folder
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.ERROR)
    if not address:
        for k, v in LOCAL_TRAIN_ENV.items():  # inherited by the local cluster's processes; the user's values win
            os.environ.setdefault(k, v)
        # The Train cleaner asks the State API of "the" cluster; with several Ray instances on one host it
        # must be pointed at ours, so pick the dashboard port first and export it before the start.
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, **kwargs)
        return
    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        _enable_token_auth()  # a token is at hand: present it
    timeout_s = timeout_s or float(os.environ.get("UDA_RAY_CONNECT_TIMEOUT_S", "60"))
    outcome: list = []

    def connect() -> None:
        try:
            ray.init(address=address, **kwargs)
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - reported below as one line
            outcome.append(e)

    # Ray's C++ client logs every failed retry to fd 2: keep those in a file while we wait
    log_path = Path(tempfile.gettempdir()) / f"uda_ray_connect_{os.getpid()}.log"
    saved = os.dup(2)
    with open(log_path, "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            t = threading.Thread(target=connect, daemon=True)
            t.start()
            t.join(timeout_s)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    if not outcome:
        raise ClusterUnreachable(f"no answer from the Ray cluster at {address} within {timeout_s:.0f}s: {AUTH_HINT} "
                                 f"(client log: {log_path})")
    if outcome[0] is not None:
        raise UserError(f"cannot connect to the Ray cluster at {address}: "
                        f"{str(outcome[0]).splitlines()[0]} ({AUTH_HINT})")


def _enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process and its children; Ray caches its config, so use its own setter."""
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth as enable

        enable()
    except ImportError:  # another Ray version: the environment variable alone
        pass


class ClusterUnreachable(UserError):
    """ray.init is still retrying in a thread: the process must end without waiting for it."""


def check_resources(train: Any, driver_cpus: float, concurrent: int, local: bool) -> None:
    """A trial that can never fit the cluster would wait for workers forever: say so up front (an error
    on the local cluster; a warning on a remote one, which may autoscale)."""
    import ray

    have = ray.cluster_resources()
    driver_cpus = 0.0 if train.inline else driver_cpus  # an inline trial's process is its one worker
    need_cpu = driver_cpus + train.num_workers * train.cpus_per_worker
    need_gpu = train.num_workers if train.use_gpu else 0
    problems = []
    if need_cpu > have.get("CPU", 0) + 1e-9:
        driver = f" + {driver_cpus:g} for the trial driver" if driver_cpus else ""
        problems.append(f"{need_cpu:g} CPUs ({train.num_workers} worker(s) x {train.cpus_per_worker:g}{driver})"
                        f" but the cluster has {have.get('CPU', 0):g}")
    if need_gpu > have.get("GPU", 0):
        problems.append(f"{need_gpu} GPU(s) but the cluster has {have.get('GPU', 0):g}")
    if problems:
        msg = "a trial needs " + " and ".join(problems) + " (lower train.num_workers / train.cpus_per_worker)"
        if local:
            raise UserError(msg)
        log.warning("%s; waiting for the cluster to grow", msg)
    if concurrent * need_cpu > have.get("CPU", 0) + 1e-9 and not problems:
        log.info("only %d trial(s) fit side by side", int(have.get("CPU", 0) // need_cpu))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# sweeps


def has_tune_state(sweep_dir: Path) -> bool:
    """Whether Ray Tune saved the sweep's experiment state (it does at its first loop step, with the first
    trial suggested): before that (a driver killed while it started) there is nothing to restore, and the
    sweep is started again from its folder."""
    return any((Path(sweep_dir) / TUNE_DIR).glob("experiment_state-*.json"))


def build_tuner(space: SearchSpace, sweep_dir: Path, seed: int, restore: bool = False,
                mlflow: str | None = None) -> Any:
    from ray import tune

    # what every trial driver needs
    sweep = {"base_raw": space.base_raw, "dir": str(sweep_dir), "driver_cpus": space.driver_cpus}
    trainable = tune.with_resources(tune.with_parameters(trial_driver, sweep=sweep),
                                    functools.partial(trial_resources, sweep=sweep))
    tune_path = sweep_dir / TUNE_DIR
    if restore:
        return tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False)
    writer_args = dict(results_dir=sweep_dir / "results", sweep=sweep_dir.name, metric=space.metric,
                       mode=space.mode, search_seed=seed)
    param_space = _tune_domains(space)
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


def write_meta(sweep_dir: Path, meta: dict) -> None:
    tmp = sweep_dir / ".sweep.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, sweep_dir / "sweep.json")


def read_meta(sweep_dir: Path) -> dict:
    from uda_ray.checks import read_json

    meta = read_json(sweep_dir / "sweep.json")
    if not isinstance(meta, dict) or "name" not in meta:
        raise UserError(f"{sweep_dir / 'sweep.json'}: not a sweep record (no 'name')")
    return meta


def sweep_status_after(grid: Any) -> str:
    errors = getattr(grid, "num_errors", 0)
    return "completed" if not errors else "completed_with_errors"

