"""Parquet tables: keyed upserts (no duplicates on resume), atomic files, status, best-trial queries."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tests.conftest import tiny_experiment
from uda_ray.build import build_experiment
from uda_ray.config import experiment_dict
from uda_ray.results.queries import best_trials
from uda_ray.results.tables import ResultsWriter, TableStore, read_table


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


def test_each_evaluation_keeps_its_node_and_the_trial_row_names_the_latest(tmp_path, synth_root):
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    w = _writer(tmp_path)
    w.result("a", exp, {}, {**_result(2, 0.1), "node_id": "n1", "node_ip": "10.0.0.1"})
    w.result("a", exp, {}, {**_result(4, 0.2), "node_id": "n2", "node_ip": "10.0.0.2"})  # moved after a restart
    assert [(e["step"], e["node_id"], e["node_ip"]) for e in read_table(tmp_path, "evals")] == [
        (2, "n1", "10.0.0.1"), (4, "n2", "10.0.0.2")]
    (t,) = read_table(tmp_path, "trials")
    assert (t["node_id"], t["node_ip"]) == ("n2", "10.0.0.2")


def test_tables_are_plain_parquet_without_temporary_leftovers(tmp_path, synth_root):
    import pandas as pd

    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    w = _writer(tmp_path)
    w.result("a", exp, {}, _result(2, 0.1))
    w.result("a", exp, {}, _result(4, 0.2))
    visible = sorted(p.name for p in tmp_path.iterdir())
    assert visible == ["class_iou.parquet", "evals.parquet", "trials.parquet"]
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left
    assert pq.read_table(tmp_path / "evals.parquet").column("schema_version").to_pylist() == [2, 2]
    assert len(pd.read_parquet(tmp_path / "class_iou.parquet")) == 4
    assert len(pd.read_parquet(tmp_path / "trials.parquet")) == 1


def _many(w, exp, n, trial="a", **extra):
    for step in range(1, n + 1):
        w.result(trial, exp, {}, {**_result(step, step / (n + 1)), **extra})


def test_only_the_last_segment_is_rewritten_and_segments_stay_bounded(tmp_path, synth_root, monkeypatch):
    import uda_ray.results.tables as results

    monkeypatch.setattr(results, "SEGMENT_ROWS", {"evals": 4, "class_iou": 8})
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    w = _writer(tmp_path)
    for step in range(1, 5):
        w.result("a", exp, {}, _result(step, 0.1))
    first = (tmp_path / "evals.parquet" / "part-000000.parquet").stat().st_mtime_ns
    for step in range(5, 12):
        w.result("a", exp, {}, _result(step, 0.1))
    assert (tmp_path / "evals.parquet" / "part-000000.parquet").stat().st_mtime_ns == first  # full: untouched
    sizes = [pq.read_metadata(p).num_rows for p in sorted((tmp_path / "evals.parquet").iterdir())]
    assert sizes == [4, 4, 3]
    assert [pq.read_metadata(p).num_rows for p in sorted((tmp_path / "class_iou.parquet").iterdir())] == [8, 8, 6]
    assert sorted(e["step"] for e in read_table(tmp_path, "evals")) == list(range(1, 12))
    w2 = _writer(tmp_path)  # a resumed driver continues the last segment
    w2.result("a", exp, {}, _result(12, 0.1))
    assert [pq.read_metadata(p).num_rows for p in sorted((tmp_path / "evals.parquet").iterdir())] == [4, 4, 4]


def test_a_reader_never_sees_a_duplicate_or_a_lost_row_while_results_arrive(tmp_path, synth_root, monkeypatch):
    import threading

    import uda_ray.results.tables as results

    monkeypatch.setattr(results, "SEGMENT_ROWS", {"evals": 5, "class_iou": 10})
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    w = _writer(tmp_path)
    w.result("a", exp, {}, _result(1, 0.1))
    seen, problems, done = [], [], threading.Event()

    def read():
        while not done.is_set():
            try:
                steps = pq.read_table(tmp_path / "evals.parquet", columns=["step"]).column("step").to_pylist()
            except Exception as e:  # noqa: BLE001 - any failure to read is what this test looks for
                problems.append(repr(e))
                continue
            if len(steps) != len(set(steps)):
                problems.append(f"duplicates {steps}")
            if seen and len(steps) < seen[-1]:
                problems.append(f"{len(steps)} rows after {seen[-1]}")
            seen.append(len(steps))

    t = threading.Thread(target=read)
    t.start()
    for step in range(2, 80):
        w.result("a", exp, {}, {**_result(step, 0.5), **({"uv/snd": 0.5} if step == 40 else {})})
    done.set()
    t.join()
    assert problems == [] and len(seen) > 5 and seen[-1] == 79


def test_declared_types_hold_and_a_new_metric_column_reaches_every_fragment(tmp_path, synth_root):
    import pyarrow as pa
    import pytest

    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    w = _writer(tmp_path)
    w.result("a", exp, {}, {**_result(2, 0.1), "test/miou": 1})  # an int metric is stored as float64
    w.result("a", exp, {}, {**_result(4, 0.2), "uv/snd": 0.7})  # a column the first fragment lacks
    t = pq.read_table(tmp_path / "evals.parquet")
    assert t.schema.field("step").type == pa.int64() and t.schema.field("test/miou").type == pa.float64()
    assert t.column("uv/snd").to_pylist() == [None, 0.7] and t.column("test/miou").to_pylist() == [1.0, 0.2]
    with pytest.raises(TypeError, match="'test/pixel_acc' is double, got 'high'"):
        w.result("a", exp, {}, {**_result(6, 0.2), "test/pixel_acc": "high"})
    tr = pq.read_table(tmp_path / "trials.parquet").schema
    assert tr.field("best_step").type == pa.int64() and tr.field("best_value").type == pa.float64()


def test_the_one_file_layout_of_earlier_versions_is_converted_in_place(tmp_path, synth_root):
    import pyarrow as pa

    rows = [{"schema_version": 1, "sweep": "sw", "trial_id": "a", "step": 2, "val/miou": 0.25,
             "checkpoint_path": None, "reported_at": 1.0}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "evals.parquet")
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    w = _writer(tmp_path)
    w.result("a", exp, {}, _result(2, 0.9))  # already recorded: keeps its first row
    w.result("a", exp, {}, _result(4, 0.5))
    evals = sorted(read_table(tmp_path, "evals"), key=lambda e: e["step"])
    assert [(e["step"], e["test/miou"]) for e in evals] == [(2, 0.25), (4, 0.5)]
    assert (tmp_path / "evals.parquet").is_dir() and not list(tmp_path.glob(".*"))


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


@pytest.mark.parametrize("proc_fd", [True, False], ids=["one-handle", "retried"])
def test_read_table_never_sees_a_corrupt_file_while_the_trials_file_is_replaced(tmp_path, synth_root, monkeypatch,
                                                                                 proc_fd):
    """Reading by path, pyarrow takes the size from a stat and reads another open of the file: an atomic
    replacement in between read as a corrupt table. read_table reads through one handle (Linux), or retries."""
    import threading

    from uda_ray.results import reading as results

    if proc_fd and not results.PROC_FD:
        pytest.skip("no /proc/self/fd on this system")
    monkeypatch.setattr(results, "PROC_FD", proc_fd)

    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    w = _writer(tmp_path)
    w.start("a", exp, {})
    problems, done = [], threading.Event()

    def write():
        for i in range(300):  # the trials file grows and shrinks: each rewrite has another size
            w.start(f"t{i % 7}", exp, {"x": "y" * (i % 13)})
        done.set()

    t = threading.Thread(target=write)
    t.start()
    reads = 0
    while not done.is_set():
        try:
            read_table(tmp_path, "trials")
        except Exception as e:  # noqa: BLE001 - any failure to read is what this test looks for
            problems.append(repr(e))
        reads += 1
    t.join()
    assert problems == [] and reads > 10
