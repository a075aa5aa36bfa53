"""The optional MLflow callback, against a file store (no server)."""

from __future__ import annotations

import pytest

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed: pip install mlflow-skinny (or -e '.[test]')")


def test_one_run_per_trial_with_step_keyed_metrics_and_end_states(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from uda_ray.results.mlflow_log import MLflowLog

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    uri = (tmp_path / "mlruns").as_uri()
    log = MLflowLog(uri, "sw")
    for step, v in ((2, 0.1), (4, 0.3)):
        log.log("a", {"optim.lr": 0.01}, {"step": step, "test/miou": v, "uv/snd": 2 * v, "checkpoint_path": "/x"})
    log.end("a", {"optim.lr": 0.01}, "completed")
    log.log("b", {"optim.lr": 0.02}, {"step": 2, "test/miou": 0.2})
    log.end("b", {"optim.lr": 0.02}, "stopped_early")

    again = MLflowLog(uri, "sw")  # a resumed sweep: the same experiment, the trial's run continued
    again.log("b", {"optim.lr": 0.02}, {"step": 4, "test/miou": 0.25})
    again.end("b", {"optim.lr": 0.02}, "completed")
    again.log("c", {"optim.lr": 0.03}, {"step": 2, "test/miou": 0.0})
    again.end("c", {"optim.lr": 0.03}, "errored")

    c = MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in c.search_runs([c.get_experiment_by_name("sw").experiment_id])}
    assert set(runs) == {"a", "b", "c"} and runs["c"].info.status == "FAILED"
    assert runs["a"].data.params == {"optim.lr": "0.01"} and runs["a"].info.status == "FINISHED"
    assert [(m.step, m.value) for m in c.get_metric_history(runs["a"].info.run_id, "test/miou")] == [(2, 0.1), (4, 0.3)]
    assert set(runs["a"].data.metrics) == {"test/miou", "uv/snd"}
    assert [m.step for m in c.get_metric_history(runs["b"].info.run_id, "test/miou")] == [2, 4]
    assert runs["b"].info.status == "FINISHED"
