"""Multi-objective sweeps: the Pareto front from the results tables, `best` printing it, `--export --index`."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.report_data import make_sweep
from uda_ray.cli import main
from uda_ray.results.queries import pareto_front
from uda_ray.results.stats import non_dominated

CONS = [{"metric": "model/gflops", "op": "<=", "bound": 4.0}]


def test_non_dominated_respects_each_objectives_direction():
    pts = [("a", [0.5, 1.0]), ("b", [0.6, 2.0]), ("c", [0.4, 2.0]), ("d", [0.5, 1.0])]
    assert non_dominated(pts, ["max", "min"]) == {"a", "b", "d"}  # c: worse than a in both; ties stay
    assert non_dominated(pts, ["min", "max"]) == {"c"}  # c: lower first, equal or higher second than all


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, synth_root):
    return make_sweep(tmp_path_factory.mktemp("pareto"), synth_root, constraints=CONS)


def test_front_excludes_infeasible_and_unfinished_trials(sweep):
    objectives = json.loads((sweep / "sweep.json").read_text())["objective"]  # [selection (max), model/gflops]
    rows = pareto_front(sweep / "results", objectives, CONS)
    by = {r["trial_id"]: r for r in rows}
    assert set(by) == {"t0", "t1", "t2", "t3", "t4"}  # t5 stopped early, t6 errored
    assert not by["t2"]["feasible"] and by["t2"]["violated"] == ["model/gflops <= 4"]
    assert not by["t2"]["on_front"]  # best selection value of all, but 5 GFLOPs breaks the budget
    front = [r for r in rows if r["on_front"]]
    assert front and all(r["feasible"] for r in front)
    assert [r["values"][0] for r in front] == sorted((r["values"][0] for r in front), reverse=True)
    # nothing feasible off the front beats a front member in both objectives
    for r in rows:
        if r["feasible"] and not r["on_front"]:
            assert any(f["values"][0] >= r["values"][0] and f["values"][1] <= r["values"][1] for f in front)


def test_best_prints_the_front_and_exports_the_chosen_entry(sweep, tmp_path, capsys):
    root = str(sweep.parent)
    assert main(["best", sweep.name, "--storage", root]) == 0
    out = capsys.readouterr().out
    front = [r for r in pareto_front(sweep / "results", yaml.safe_load((sweep / "sweep.json").read_text())
                                     ["objective"], CONS) if r["on_front"]]
    assert f"Pareto front: {len(front)} of 5 completed trials" in out
    assert "infeasible: t2 (model/gflops <= 4)" in out
    listed = [ln.split()[1] for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert listed == [r["trial_id"] for r in front]

    pick = len(front)
    assert main(["best", sweep.name, "--storage", root, "--export", str(tmp_path / "e.yaml"),
                 "--index", str(pick)]) == 0
    text = (tmp_path / "e.yaml").read_text()
    assert f"Pareto-front trial {pick}" in text and front[pick - 1]["trial_id"] in text.splitlines()[0]
    assert yaml.safe_load(text)["optim"]["lr"] == yaml.safe_load(front[pick - 1]["config_json"])["optim"]["lr"]
    assert main(["best", sweep.name, "--storage", root, "--export", str(tmp_path / "x.yaml"),
                 "--index", str(len(front) + 1)]) == 2
    assert not (tmp_path / "x.yaml").exists()
