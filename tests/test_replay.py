"""`train.launcher: replay`: its validation, its curve sources (seeded synthetic curves, a recorded sweep's
tables matched by parameters or by index), and a replay sweep through the real driver path (Tune, OptunaSearch,
ASHA, the results callback and tables, the Optuna journal)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import tiny_experiment
from uda_ray.build import build_experiment
from uda_ray.config import ReplayConfig
from uda_ray.errors import ConfigError, UserError
from uda_ray.metric_names import check_metric
from uda_ray.results.tables import ResultsWriter, read_table
from uda_ray.training.replay import (
    RecordedCurves,
    curve_for,
    eval_steps,
    recorded_results_dir,
    synthetic_curve,
    trial_index,
)

EXP = {"name": "r", "seed": 0, "method": "source_only", "model": {"name": "enet", "num_classes": 19}}


def _record(results: Path, curves: dict[str, tuple[dict, list[float]]]) -> None:
    """A results folder whose trials have `params` and a curve of uv/im values at steps 10, 20, ..."""
    w = ResultsWriter(results, "rec", "uv/im", "max", 0)
    for tid, (params, values) in curves.items():
        w.start(tid, EXP | {"data": {"source": "gta5", "target": "cityscapes"}, "train": {"max_steps": 30}}, params)
        for i, v in enumerate(values):
            w.result(tid, {}, params, {"step": 10 * (i + 1), "uv/im": v, "test/miou": v / 2})
        w.end(tid, {}, params, "completed")


def test_eval_steps_are_the_loops_evaluation_steps():
    assert eval_steps(300, 100) == [100, 200, 300]
    assert eval_steps(250, 100) == [100, 200, 250]
    assert eval_steps(50, 100) == [50]


def test_trial_index_reads_the_suggestion_number_of_a_sweep_trial_id():
    assert trial_index("1a2b3_00042") == 42
    assert trial_index("other") == trial_index("other") != trial_index("another")


def test_a_synthetic_curve_is_a_function_of_seed_params_and_step():
    p = {"optim.lr": 1e-3, "method_cfg.discriminator": "fc"}
    a, b = synthetic_curve(p, [100, 200, 300], 0), synthetic_curve(p, [100, 200, 300], 0)
    assert a == b
    assert a != synthetic_curve(p, [100, 200, 300], 1)
    assert a != synthetic_curve({**p, "optim.lr": 2e-2}, [100, 200, 300], 0)
    assert [m["step"] for m in a] == [100, 200, 300]


def test_a_synthetic_curve_reports_known_metric_names_with_finite_values():
    for m in synthetic_curve({"optim.lr": 0.01}, [50, 100], 3):
        for k, v in m.items():
            if k != "step" and not k.startswith(("test/iou/", "train/loss/")):
                check_metric(k, selectable=False)
            assert math.isfinite(v)
        assert 0.0 <= m["test/miou"] <= 1.0


def test_a_synthetic_curve_rises_towards_its_final_value():
    curve = synthetic_curve({"optim.lr": 0.01}, list(range(100, 2001, 100)), 0)
    assert curve[-1]["test/miou"] > curve[0]["test/miou"] + 0.05


def test_a_recorded_source_is_found_from_the_sweep_its_results_or_the_table(tmp_path):
    _record(tmp_path / "sw" / "results", {"t0": ({"optim.lr": 0.01}, [0.1, 0.2])})
    want = (tmp_path / "sw" / "results").absolute()
    for given in (tmp_path / "sw", tmp_path / "sw" / "results", tmp_path / "sw" / "results" / "evals.parquet"):
        assert recorded_results_dir(given) == want
    with pytest.raises(UserError, match="no recorded sweep there"):
        recorded_results_dir(tmp_path / "nothing")


def test_a_recorded_trial_is_matched_by_nearest_parameters_or_by_index(tmp_path):
    _record(tmp_path, {"a": ({"optim.lr": 1e-4, "d": "fc"}, [0.1, 0.2, 0.3]),
                       "b": ({"optim.lr": 1e-2, "d": "fc"}, [0.4, 0.5, 0.6]),
                       "c": ({"optim.lr": 1e-2, "d": "dsc"}, [0.7, 0.8, 0.9])})
    rec = RecordedCurves(tmp_path)
    assert rec.nearest({"optim.lr": 2e-4, "d": "fc"}) == "a"  # on a log scale, 2e-4 is near 1e-4
    assert rec.nearest({"optim.lr": 5e-3, "d": "dsc"}) == "c"
    curve = rec.curve({"optim.lr": 8e-3, "d": "fc"}, 0, "params")
    assert [(m["step"], m["uv/im"], m["test/miou"]) for m in curve] == [(10, 0.4, 0.2), (20, 0.5, 0.25),
                                                                        (30, 0.6, 0.3)]
    assert [m["uv/im"] for m in rec.curve({}, 4, "index")] == [0.4, 0.5, 0.6]  # 4 % 3 -> the second, "b"


def test_curve_for_reads_the_configured_source(tmp_path):
    _record(tmp_path, {"a": ({"optim.lr": 1e-3}, [0.25, 0.5])})
    rec = curve_for(ReplayConfig(source=str(tmp_path)), {"optim.lr": 1e-3}, 0, 20, 10)
    assert [m["uv/im"] for m in rec] == [0.25, 0.5]
    syn = curve_for(ReplayConfig(seed=5), {"optim.lr": 1e-3}, 0, 30, 10)
    assert syn == synthetic_curve({"optim.lr": 1e-3}, [10, 20, 30], 5)


@pytest.mark.parametrize("train, message", [
    ({"launcher": "replay", "num_workers": 2}, "replay runs one process per trial"),
    ({"launcher": "inline", "replay": {"source": "synthetic"}}, "read by launcher: replay only"),
    ({"launcher": "replay", "replay": {"match": "closest"}}, "train.replay.match must be one of params, index"),
    ({"launcher": "replay", "replay": {"sauce": "x"}}, "sauce"),
    ({"launcher": "replay", "replay": {"seconds_per_eval": -1.0}}, "seconds_per_eval must be >= 0"),
])
def test_replay_settings_that_cannot_run_are_refused(synth_root, train, message):
    raw = tiny_experiment(synth_root, **{f"train.{k}": v for k, v in train.items()})
    with pytest.raises(ConfigError, match=message):
        build_experiment(raw)


def test_a_replay_trial_runs_in_its_own_process_and_defaults_to_synthetic_curves(synth_root):
    tc = build_experiment(tiny_experiment(synth_root, **{"train.launcher": "replay"})).train
    assert tc.inline and tc.replay_source == ReplayConfig()


def test_only_a_sweep_may_replay(synth_root, tmp_path):
    from uda_ray.driver.prepare import prepare_experiment

    raw = tiny_experiment(synth_root, **{"train.launcher": "replay"})
    with pytest.raises(UserError, match="replays learning curves in sweeps only"):
        prepare_experiment(raw, "exp.yaml", tmp_path)
    ready = prepare_experiment(raw, "exp.yaml", tmp_path, replay=True)
    assert ready.cfg.train.launcher == "replay"
    missing = tiny_experiment(synth_root, **{"train.launcher": "replay", "train.replay.source": str(tmp_path / "x")})
    with pytest.raises(UserError, match="no recorded sweep there"):
        prepare_experiment(missing, "exp.yaml", tmp_path, replay=True)


def _space(tmp: Path, n: int, replay: dict) -> Path:
    exp = {**EXP, "select": "uv/im",
           "data": {"source": "gta5", "target": "cityscapes",
                    "synthetic": {"n_source": 2, "n_target": 2, "n_val": 1, "size": [32, 16], "seed": 0}},
           "train": {"max_steps": 40, "eval_every": 10, "cpus_per_worker": 0.5, "launcher": "replay",
                     "replay": replay}}
    (tmp / "exp.json").write_text(json.dumps(exp))
    sp = {"base": str(tmp / "exp.json"), "objective": {"metric": "uv/im", "mode": "max"}, "num_samples": n,
          "max_concurrent_trials": 2, "seed": 0, "scheduler": {"asha": {"grace_period": 10, "reduction_factor": 2}},
          "params": {"optim.lr": {"loguniform": [1e-4, 1e-1]}}}
    path = tmp / f"space{len(list(tmp.glob('space*')))}.yaml"
    path.write_text(json.dumps(sp))
    return path


@pytest.mark.ray
@pytest.mark.slow
def test_a_replay_sweep_goes_through_the_real_driver_and_writes_the_tables(tmp_path):
    import optuna

    import uda_ray
    from uda_ray.search.study import load_study

    storage = tmp_path / "runs"
    s = uda_ray.sweep(_space(tmp_path, 6, {"source": "synthetic", "seed": 1}), storage=storage, name="syn")
    assert s.status == "completed"
    trials = read_table(storage / "syn" / "results", "trials")
    assert len(trials) == 6 and {t["status"] for t in trials} <= {"completed", "stopped_early"}
    assert any(t["status"] == "completed" for t in trials)  # ASHA stops some, the best run to the end
    evals = read_table(storage / "syn" / "results", "evals")
    assert len({e["trial_id"] for e in evals}) == 6
    assert len(read_table(storage / "syn" / "results", "class_iou")) == 19 * len(evals)
    lr = {t["trial_id"]: json.loads(t["params"])["optim.lr"] for t in trials}
    for e in evals:  # each row is the trial's synthetic curve at that step
        want = synthetic_curve({"optim.lr": lr[e["trial_id"]]}, [10, 20, 30, 40], 1)[e["step"] // 10 - 1]
        assert e["uv/im"] == pytest.approx(want["uv/im"])
    study = load_study(storage / "syn")
    assert len(study.trials) == 6
    assert {t.state for t in study.trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    # a second sweep replays the first one's recorded table, trial by index
    again = uda_ray.sweep(_space(tmp_path, 3, {"source": str(storage / "syn"), "match": "index"}),
                          storage=storage, name="rec")
    assert again.status == "completed"
    ids = sorted({e["trial_id"] for e in evals})
    first = sorted((e for e in evals if e["trial_id"] == ids[0]), key=lambda e: e["step"])
    mine = sorted((e for e in read_table(storage / "rec" / "results", "evals") if e["trial_id"].endswith("_00000")),
                  key=lambda e: e["step"])
    assert [e["uv/im"] for e in mine] == [e["uv/im"] for e in first[:len(mine)]]


def test_the_report_draws_the_curves_of_many_trials_as_one_collection_per_panel(tmp_path):
    """Past figures.BULK trials a panel's curves are one artist; the figure still shows every curve."""
    from uda_ray.results import figures
    from uda_ray.results.report_data import ReportData

    n = figures.BULK + 10
    evals = [{"trial_id": f"t{i:03d}", "step": s, "uv/im": m["uv/im"], "test/miou": m["test/miou"]}
             for i in range(n) for s, m in zip((10, 20), synthetic_curve({"optim.lr": 1e-3 * (i + 1)}, [10, 20], 0))]
    trials = [{"trial_id": f"t{i:03d}", "status": "stopped_early" if i % 2 else "completed"} for i in range(n)]
    data = ReportData("sweep", "s", tmp_path, trials, evals, [], [{"metric": "uv/im", "mode": "max"}])
    drawn = []
    real = figures._curves_bulk

    def spy(ax, by, status, m, cmap):
        real(ax, by, status, m, cmap)
        drawn.append((m, len(ax.collections[0].get_segments()), len(ax.lines)))

    figures._curves_bulk = spy
    try:
        png = figures.fig_curves(data)
    finally:
        figures._curves_bulk = real
    assert png and png.startswith("data:image/png;base64,")
    assert ("uv/im", n, 0) in drawn  # every trial's curve, in one collection, no line per trial
