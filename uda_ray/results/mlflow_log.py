"""Optional MLflow tracking: one MLflow run per trial, metrics keyed by the training step.

`uda-ray sweep SPACE --mlflow URI` (e.g. `file:///path/mlruns`, `sqlite:///mlflow.db`, `http://host:5000`)
logs into the MLflow experiment named after the sweep: each trial's parameters, every reported metric named
as in the results tables (`test/miou`, `uv/snd`, ...) at its step, and its end state (FINISHED, KILLED when
the scheduler stopped it early, FAILED when it errored). A resumed sweep continues the same runs (found by
their `uda_ray.trial_id` tag). Needs `pip install mlflow-skinny` (or mlflow). No Ray here.
"""

from __future__ import annotations

import time

from uda_ray.errors import UserError
from uda_ray.metric_names import REPORTED_PREFIXES

TAG = "uda_ray.trial_id"
END_STATE = {"completed": "FINISHED", "stopped_early": "KILLED", "errored": "FAILED"}


def check_available() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError("--mlflow needs MLflow: pip install mlflow-skinny") from None


class MLflowLog:
    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        self.runs: dict[str, str] = {}

    def run_id(self, trial_id: str, params: dict | None = None) -> str:
        if trial_id in self.runs:
            return self.runs[trial_id]
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TAG}` = '{trial_id}'")
        if found:  # a resumed sweep continues the trial's run
            rid = found[0].info.run_id
            self.client.update_run(rid, status="RUNNING")
        else:
            rid = self.client.create_run(self.experiment_id, run_name=trial_id, tags={TAG: trial_id}).info.run_id
            for k, v in (params or {}).items():
                self.client.log_param(rid, k, v)
        self.runs[trial_id] = rid
        return rid

    def log(self, trial_id: str, params: dict, result: dict) -> None:
        from mlflow.entities import Metric

        if "step" not in result:
            return
        step, ts = int(result["step"]), int(time.time() * 1000)
        metrics = [Metric(k, float(v), ts, step) for k, v in result.items()
                   if k.startswith(REPORTED_PREFIXES) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and v == v]
        if metrics:
            self.client.log_batch(self.run_id(trial_id, params), metrics=metrics)

    def end(self, trial_id: str, params: dict, status: str) -> None:
        self.client.set_terminated(self.run_id(trial_id, params), status=END_STATE.get(status, "FINISHED"))

