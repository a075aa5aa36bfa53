"""The sweep's Tune callback: the results tables, TensorBoard and MLflow written on the driver as results arrive,
and the live view. Imports Ray: import it where Ray is needed."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ray import tune

from uda_ray.results.tables import ResultsWriter
from uda_ray.results.tensorboard import TB_DIR, TensorBoardLog
from uda_ray.search.driver import plain
from uda_ray.search.experiments import experiment_of
from uda_ray.search.private import forget_metric_history
from uda_ray.storage import layout, store
from uda_ray.training.progress import LiveView, read_progress

progress = logging.getLogger("uda_ray.training.progress")  # the live view (printed by the CLI)


class ResultsCallback(tune.Callback):
    """Writes the Parquet tables on the driver as results arrive, and prints a concise live view.

    `sweep`: what every trial driver gets (the sweep folder under "dir", "base_raw"); `writer_args`: the
    ResultsWriter's arguments (results_dir, sweep, metric, mode, search_seed); `mlflow`: a tracking URI to log
    to, or None."""

    def __init__(self, sweep: dict, writer_args: dict, mlflow: str | None = None) -> None:
        self.sweep, self.writer_args, self.mlflow = sweep, writer_args, mlflow
        self.writer: ResultsWriter | None = None
        self.t0 = time.time()
        tty = sys.stdout if sys.stdout.isatty() and progress.handlers else None  # the CLI on a terminal
        self.view = LiveView(progress.info, tty)
        self.polled = 0.0
        self._experiments: dict[str, tuple[dict, dict]] = {}  # trial id -> (experiment, params)
        self._tune_seen: dict[str, tuple[int, int]] = {}  # Tune's state files as last pushed to a store

    def setup(self, **info: Any) -> None:
        if self.sweep.get("store"):  # restored from Tune's state on another machine: this one's staging copy
            here = store.local_path(*self.sweep["store"])
            self.sweep = {**self.sweep, "dir": str(here), "tune": str(here / Path(self.sweep["tune"]).name)}
            self.writer_args = {**self.writer_args, "results_dir": layout.results_dir(here)}
        # reloads existing tables on resume; the trials file is rewritten at most once a second by results
        # (at every start and end), so a sweep of thousands of trials stays cheap to record
        self.writer = ResultsWriter(**self.writer_args, trials_every_s=1.0)
        self.tally = Tally(self.writer_args["mode"], self.writer.store.rows["trials"].values())
        self.tb = TensorBoardLog(Path(self.sweep["dir"]) / TB_DIR)
        self.ml = None
        if self.mlflow:
            from uda_ray.results.mlflow_log import MLflowLog

            self.ml = MLflowLog(self.mlflow, Path(self.sweep["dir"]).name)

    def get_state(self) -> dict | None:
        """Called by Tune as it snapshots the experiment: the pending trials rows are written first, so a trial the
        snapshot holds as finished has its final row on disk (a driver killed later restores both together)."""
        if self.writer is not None:
            self.writer.store.flush(["trials"])
        return None

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.writer.store.flush(["trials"])

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.sweep.get("store"):  # Tune's experiment state, into the store as soon as Tune saves it
            store.push_changed(self.sweep["tune"], self._tune_seen)
        # between evaluations: the running trials' heartbeats (step, steps/s, ETA), calmly
        now = time.time()
        if now - self.polled < 1.0:
            return
        self.polled = now
        self.writer.store.flush(["trials"], force=False)  # rows changed since the last write, at most once a second
        beats = {}
        for t in trials:
            if t.status == "RUNNING":
                p = read_progress(layout.trial_dir(Path(self.sweep["dir"]), t.trial_id))
                if p:
                    beats[t.trial_id] = p
        self.view.update(beats, now - self.t0, now)

    def _exp(self, trial: Any) -> tuple[dict, dict]:
        """The trial's resolved experiment and its params, built once per trial (not on every result)."""
        cached = self._experiments.get(trial.trial_id)
        if cached is None:
            params = plain(trial.config["params"])
            cached = self._experiments[trial.trial_id] = (experiment_of(self.sweep["base_raw"], params), params)
        return cached

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.writer.start(trial.trial_id, *self._exp(trial))
        self.tally.add(self.writer.store.rows["trials"][(trial.trial_id,)])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "step" not in result:
            return
        self.tally.add(self.writer.result(trial.trial_id, *self._exp(trial), result))
        self.tb.log(trial.trial_id, result)
        if self.ml is not None:
            self.ml.log(trial.trial_id, plain(trial.config["params"]), result)
        metric = self.writer_args["metric"]
        self._line(trials, f"{trial.trial_id} step {int(result['step'])}: "
                           f"{metric}={result.get(metric, float('nan')):.4f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.tb.close(trial.trial_id)
        row = self.writer.end(trial.trial_id, *self._exp(trial), "completed")
        self.tally.add(row)
        if self.ml is not None:
            self.ml.end(trial.trial_id, plain(trial.config["params"]), row["status"])
        self._line(trials, f"{trial.trial_id} {row['status'].replace('_', ' ')}")
        self._forget(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.tb.close(trial.trial_id)
        if self.ml is not None:
            self.ml.end(trial.trial_id, plain(trial.config["params"]), "errored")
        self.tally.add(self.writer.end(trial.trial_id, *self._exp(trial), "errored", _error_text(trial)))
        self._line(trials, f"{trial.trial_id} errored: {_error_text(trial)}")
        self._forget(trial)

    def _forget(self, trial: Any) -> None:
        """A finished trial's metric statistics in Tune, but the objective's, dropped (Tune is told last, after the
        searcher and the scheduler): most of the driver's memory per trial (uda_ray.search.private)."""
        forget_metric_history(trial, keep=(self.writer_args["metric"], "step"))
        self._experiments.pop(trial.trial_id, None)

    def _line(self, trials: list, what: str) -> None:
        n, b = self.tally.count, self.tally.best
        best = f" | best {b['best_value']:.4f} ({b['trial_id']}: {_short_params(b['params'])})" if b else ""
        self.view.before_line()
        progress.info(f"[{time.time() - self.t0:6.0f}s] {n['completed']} done, {n['running']} running, "
                      f"{n['stopped_early']} stopped early, {n['errored']} errored{best} | {what}")


class Tally:
    """The trials by status and the best row so far, kept up to date row by row (the live line is printed at
    every result: counting all the trials' rows each time made its cost grow with the sweep)."""

    def __init__(self, mode: str, rows: Any) -> None:
        self.better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
        self.status: dict[str, str] = {}
        self.count: dict[str, int] = {s: 0 for s in ("running", "completed", "stopped_early", "errored")}
        self.best: dict | None = None
        for r in rows:
            self.add(r)

    def add(self, row: dict) -> None:
        tid, old = row["trial_id"], self.status.get(row["trial_id"])
        if old in self.count:
            self.count[old] -= 1
        self.status[tid] = row["status"]
        if row["status"] in self.count:
            self.count[row["status"]] += 1
        v = row.get("best_value")
        if v is not None and (self.best is None or self.better(v, self.best["best_value"])):
            self.best = row


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
