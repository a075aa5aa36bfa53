"""The sweep's searcher: Optuna's TPE inside Ray Tune's OptunaSearch, telling Optuna what Tune leaves out, with
trial ids that come back the same after a resume. Imports Ray and Optuna: import it where they are needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from uda_ray.search.private import (
    fixed_trial_id,
    left_out_of_snapshot,
    live_trial,
    searcher_finished,
    searcher_study,
    searcher_trials,
    study_storage_of,
    trial_storage_id,
    trials_created,
    unflatten_params,
)
from uda_ray.search.space import SearchSpace
from uda_ray.search.study import BASELINE_ATTR, study_storage


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records trials stopped early by the scheduler as PRUNED, and continues its study as
    if never interrupted when Tune restores a sweep whose driver was killed.

    Early stopping: Tune tells Optuna a trial that ASHA stopped as COMPLETE with its partial value; that feeds
    low-fidelity points to TPE and into the Pareto front. A trial that ends before `max_steps` without an
    error was stopped early: it is told PRUNED (an errored one FAIL). Intermediate values are reported by our
    step (training_iteration restarts at 1 after a restore), each step once. Each trial carries its
    `constraints` (violations) before it is told.

    Resume: after a SIGKILLed driver, Tune restores its experiment and this searcher from their last snapshot
    (taken together, at most every ~10 s: Tune's TUNE_GLOBAL_CHECKPOINT_S "auto"), while the study's journal
    was written up to the kill. So the journal can hold (1) a trial suggested after the snapshot, which the
    restored experiment does not know, and (2) a trial the snapshot has running but that was told
    (COMPLETE / PRUNED) and given intermediate values after it. Trial ids are the suggestion's index
    (TrialIdsInOrder) and the sampler's RNG is restored with the snapshot, so the restored experiment
    suggests case (1) again under the same id: `suggest` then hands back that earlier trial (its
    parameters, its Train run and its rows continue) instead of starting a second one. Case (2) is run
    again by Tune (it replays its results from its checkpoint): `restore` marks it finished here, so
    the study keeps what it was told once.
    """

    def __init__(self, *, max_steps: int, constraints: tuple = (), baseline: dict | None = None,
                 **kwargs: Any) -> None:
        self.baseline = baseline  # the base's own parameter values, the first trial (`baseline: true`)
        super().__init__(**kwargs)
        self.max_steps = max_steps
        self.constraints = constraints

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        """Tune hands the space over here and the study is created (or loaded from the journal): the baseline
        is enqueued into it then (once per study, see enqueue_baseline)."""
        done = super().set_search_properties(metric, mode, config, **spec)
        if done and self.baseline is not None:
            enqueue_baseline(searcher_study(self), self.baseline)
        return done

    def suggest(self, trial_id: str) -> dict | None:
        out = super().suggest(trial_id)
        trials = searcher_trials(self)
        if out is None or trial_id not in trials:
            return out
        earlier = self._earlier_trials().pop(trial_id, None)
        if earlier is None:
            trials[trial_id].set_user_attr("tune_trial_id", trial_id)  # to find it in the study
            return out
        # this suggestion is the earlier one made again (same RNG state): keep the earlier trial
        study = searcher_study(self)
        _fail_unrun(study, trials[trial_id], f"suggested again after an interruption as trial {earlier.number}, "
                                             "which holds its results; never run")
        trials[trial_id] = live_trial(study, earlier)
        self._adopt(trial_id, earlier)
        return unflatten_params(earlier.params)

    def _earlier_trials(self) -> dict:
        """tune trial id -> study trial, for the trials of the journal this searcher has not suggested
        (computed once per process: after a restore, or at the first suggestion of a sweep started again)."""
        if "_earlier" not in self.__dict__:
            study = searcher_study(self)
            known = {trial_storage_id(t) for t in searcher_trials(self).values()}
            self._earlier = {}
            waiting = optuna.trial.TrialState.WAITING
            live = (optuna.trial.TrialState.RUNNING, waiting)
            for ft in study.get_trials(deepcopy=False):
                if trial_storage_id(ft) in known:
                    continue
                if "tune_trial_id" in ft.user_attrs:
                    self._earlier[ft.user_attrs["tune_trial_id"]] = ft
                elif ft.state in live and not (ft.state == waiting and BASELINE_ATTR in ft.user_attrs):
                    # asked for, then killed before it was named: never matched again (but an enqueued
                    # baseline not yet asked for is WAITING: the next ask takes it)
                    _fail_unrun(study, ft, "suggested just before an interruption; never run")
        return self._earlier

    def _adopt(self, trial_id: str, ft: Any) -> None:
        """What the study already holds of `ft` is not told again (Tune replays it after a resume)."""
        self.__dict__.setdefault("_reported_steps", set()).update((trial_id, s) for s in ft.intermediate_values)
        if ft.state.is_finished():
            searcher_finished(self).add(trial_id)

    def save(self, checkpoint_path: str) -> None:
        with left_out_of_snapshot(self, "_earlier"):  # recomputed from the journal after a restore
            super().save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.__dict__.pop("_earlier", None)
        study = searcher_study(self)
        if study is None:
            return
        for trial_id, ot in searcher_trials(self).items():  # case (2) of the class docstring
            self._adopt(trial_id, study_storage_of(study).get_trial(trial_storage_id(ot)))
        self._earlier_trials()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in searcher_finished(self):
            return
        v, step = result.get(self.metric), int(result.get("step", 0))
        reported = self.__dict__.setdefault("_reported_steps", set())
        if v is not None and v == v and (trial_id, step) not in reported:
            # by our step, not training_iteration (it restarts at 1 after a restore)
            searcher_trials(self)[trial_id].report(v, step)
            reported.add((trial_id, step))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trials = searcher_trials(self)
        if trial_id in searcher_finished(self) or trial_id not in trials:
            return super().on_trial_complete(trial_id, result, error)
        if result and not error:
            # Tune does not pass the result on which the scheduler stops a trial to the searcher's
            # on_trial_result, only here: record it as the trial's last intermediate value
            self.on_trial_result(trial_id, result)
        for c in self.constraints:  # Optuna's samplers treat a trial with any value > 0 as infeasible
            trials[trial_id].set_constraint(str(c), c.violation((result or {}).get(c.metric)))
        step = (result or {}).get("step")
        if error:  # Tune would tell an errored trial with a partial value as COMPLETE
            state = optuna.trial.TrialState.FAIL
        elif step is not None and step < self.max_steps:
            state = optuna.trial.TrialState.PRUNED
        else:
            return super().on_trial_complete(trial_id, result, error)
        searcher_study(self).tell(trials[trial_id], state=state)
        searcher_finished(self).add(trial_id)


def _fail_unrun(study: Any, trial: Any, note: str) -> None:
    """Mark a study trial that will never run FAIL, with a note saying why."""
    storage = study_storage_of(study)
    storage.set_trial_user_attr(trial_storage_id(trial), "uda_ray_note", note)
    storage.set_trial_state_values(trial_storage_id(trial), optuna.trial.TrialState.FAIL)


def make_searcher(space: SearchSpace, seed: int, sweep_dir: Path | None = None) -> Any:
    """PruneAwareOptunaSearch (TPE, seeded) behind Tune's ConcurrencyLimiter (max_concurrent_trials), with the
    study persisted in the sweep folder (when given) so that optuna-dashboard can open it."""
    metrics = [o.metric for o in space.objectives]
    modes = [o.mode for o in space.objectives]
    multi = len(metrics) > 1
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
        max_steps=space.base.train.max_steps, constraints=space.constraints, baseline=space.baseline,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent_trials)


def enqueue_baseline(study: Any, point: dict) -> bool:
    """Enqueue the base experiment's own parameter values (`point`) as the study's next trial, once per study:
    not when the study already holds it (a sweep started again from its folder). The next `ask` (the sweep's
    first suggestion, trial <prefix>_00000) takes it; the study is journaled, so after a restore it is a
    trial like any other and is never enqueued again. Returns whether it was enqueued."""
    if any(BASELINE_ATTR in t.user_attrs for t in study.get_trials(deepcopy=False)):
        return False
    study.enqueue_trial({f"params/{k}": v for k, v in point.items()}, user_attrs={BASELINE_ATTR: True})
    return True


class TrialIdsInOrder(SearchGenerator):
    """Tune's SearchGenerator over a searcher, naming the n-th suggested trial `<prefix>_<n:05d>`.

    Tune names trials with random ids (Trial.generate_id, a uuid). After a SIGKILLed driver, the restored
    experiment suggests again every trial suggested after its last snapshot; a random id would make that
    trial a new one, beside the Train run, results rows and study trial of the first suggestion. Its index
    is restored with the snapshot (SearchGenerator's counter), so the same id comes back and the trial
    continues where it was."""

    def __init__(self, searcher: Any, prefix: str) -> None:
        super().__init__(searcher)
        self.prefix = prefix

    def create_trial_if_possible(self, experiment_spec: dict) -> Any:
        with fixed_trial_id(f"{self.prefix}_{trials_created(self):05d}"):
            return super().create_trial_if_possible(experiment_spec)
