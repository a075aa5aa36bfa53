"""Parquet tables: keyed upserts (no duplicates on resume), atomic files, status, best-trial queries."""

from __future__ import annotations

import pyarrow.parquet as pq

from tests.conftest import tiny_experiment
from uda_ray.build import build_experiment
from uda_ray.config import experiment_dict
from uda_ray.results import ResultsWriter, TableStore, best_trials, read_table


def _writer(d):
    return ResultsWriter(d, "sw", "test/miou", "max", 7)


def _result(step, miou):
    return {"step": step, "test/miou": miou, "test/iou/road": miou, "test/iou/sky": 1 - miou,
            "train/loss/seg_src": 1.0 / step, "checkpoint_path": f"/ck/{step}", "time/elapsed_s": float(step)}


def test_results_are_keyed_so_a_replayed_step_replaces_its_row(tmp_path, synth_root):
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    w = _writer(tmp_path)
    w.start("t1", exp, {"optim.lr": 0.01})
    for step, v in [(2, 0.1), (4, 0.3), (4, 0.3), (6, 0.2)]:
        w.result("t1", exp, {"optim.lr": 0.01}, _result(step, v))
    first = {e["step"]: e["reported_at"] for e in read_table(tmp_path, "evals")}
    w2 = _writer(tmp_path)  # a resumed driver reloads the tables and reports step 6 again
    w2.result("t1", exp, {"optim.lr": 0.01}, _result(6, 0.2))
    assert {e["step"]: e["reported_at"] for e in read_table(tmp_path, "evals")} == first
    evals = read_table(tmp_path, "evals")
    assert sorted(e["step"] for e in evals) == [2, 4, 6]
    assert len(read_table(tmp_path, "class_iou")) == 6
    (t,) = read_table(tmp_path, "trials")
    assert (t["best_value"], t["best_step"], t["best_checkpoint"], t["final_step"]) == (0.3, 4, "/ck/4", 6)
    assert t["config.optim.lr"] == 0.01 and t["search_seed"] == 7 and t["torch_version"]


def test_trial_that_ends_before_max_steps_is_stopped_early(tmp_path, synth_root):
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))  # max_steps 4
    w = _writer(tmp_path)
    w.result("a", exp, {}, _result(2, 0.1))
    assert w.end("a", exp, {}, "completed")["status"] == "stopped_early"
    w.result("b", exp, {}, _result(4, 0.2))
    assert w.end("b", exp, {}, "completed")["status"] == "completed"
    assert w.end("c", exp, {}, "errored", "boom")["error"] == "boom"


def test_tables_are_plain_parquet_without_temporary_leftovers(tmp_path, synth_root):
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    w = _writer(tmp_path)
    w.result("a", exp, {}, _result(2, 0.1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["class_iou.parquet", "evals.parquet", "trials.parquet"]
    assert pq.read_table(tmp_path / "evals.parquet").column("schema_version").to_pylist() == [2]


def test_best_trials_rank_by_metric_and_filter_by_method(tmp_path, synth_root):
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    exp2 = experiment_dict(build_experiment(tiny_experiment(synth_root, method="target_only")))
    w = _writer(tmp_path)
    w.result("a", exp, {}, _result(2, 0.1))
    w.result("b", exp2, {}, _result(2, 0.5))
    w.result("c", exp, {}, _result(2, 0.3))
    assert [r["trial_id"] for r in best_trials(tmp_path, top=2)] == ["b", "c"]
    assert [r["trial_id"] for r in best_trials(tmp_path, method="source_only")] == ["c", "a"]
    assert [r["trial_id"] for r in best_trials(tmp_path, metric="train/loss/seg_src", mode="min")][0] == "a"


def test_table_store_survives_mixed_column_types(tmp_path):
    s = TableStore(tmp_path)
    s.upsert("trials", [{"trial_id": "a", "x": 1}, {"trial_id": "b", "x": "text", "y": [1, 2]}])
    s.flush(["trials"])
    rows = read_table(tmp_path, "trials")
    assert [r["x"] for r in rows] == ["1", "text"] and rows[1]["y"] == "[1, 2]"


def test_restarts_reported_by_the_worker_are_counted_per_trial(tmp_path, synth_root):
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    w = _writer(tmp_path)
    w.result("a", exp, {}, _result(2, 0.1))
    assert read_table(tmp_path, "trials")[0]["restarts"] == 0
    w.result("a", exp, {}, {**_result(4, 0.2), "resumed_from": 2, "restarts": 1})
    w.result("a", exp, {}, {**_result(6, 0.2), "resumed_from": 4, "restarts": 2})
    (t,) = read_table(tmp_path, "trials")
    assert (t["restarts"], t["resumed_from"]) == (2, 4)
    assert [e.get("resumed_from") for e in read_table(tmp_path, "evals")] == [None, 2, 4]


def test_best_trials_by_another_metric_uses_that_metrics_mode_and_reports_test_at_the_pick(tmp_path, synth_root):
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    w = _writer(tmp_path)
    for tid, ent, miou in (("a", 0.2, 0.1), ("b", 0.6, 0.9)):
        w.result(tid, exp, {}, {"step": 2, "uv/entropy": ent, "test/miou": miou, "checkpoint_path": f"/{tid}"})
    (top,) = best_trials(tmp_path, metric="uv/entropy", top=1)  # lower is better, whatever the objective
    assert (top["trial_id"], top["rank_mode"], top["rank_test_miou"]) == ("a", "min", 0.1)
