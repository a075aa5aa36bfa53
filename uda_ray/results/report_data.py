"""What the HTML report (uda_ray.results.report) shows, before any drawing: the tables of a sweep, run or
pipeline (`ReportData`) and the questions its sections ask of them: each trial's selected step, the searched
parameters, the Pareto front, how the selection metric ranks the trials against the test metric."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from uda_ray.results.stats import finite, spearman
from uda_ray.storage import store

TEST_METRICS = ("test/miou",)  # the test-split metrics the report compares the selection metric with


@dataclass
class ReportData:
    kind: str  # sweep | run | pipeline
    name: str
    folder: Path
    trials: list[dict]
    evals: list[dict]
    class_iou: list[dict]
    objectives: list[dict]  # [{"metric", "mode"}]
    meta: dict = field(default_factory=dict)
    space: dict = field(default_factory=dict)  # raw `params:` of the search space, when there is one

    @property
    def metric(self) -> str:
        return self.objectives[0]["metric"]

    @property
    def mode(self) -> str:
        return self.objectives[0]["mode"]


def evals_by_trial(data: ReportData) -> dict[str, list[dict]]:
    """Each trial's eval rows by step, trials in the order of their first evaluation."""
    out: dict[str, list[dict]] = {}
    for e in sorted(data.evals, key=lambda e: e["step"]):
        out.setdefault(e["trial_id"], []).append(e)
    return out


def selected_rows(data: ReportData) -> dict[str, dict]:
    """Each trial's eval row at its best value of the (first) objective."""
    out = {}
    pick = max if data.mode == "max" else min
    for tid, rows in evals_by_trial(data).items():
        scored = [r for r in rows if finite(r.get(data.metric))]
        if scored:
            out[tid] = pick(scored, key=lambda r: r[data.metric])
    return out


def baseline_gain(data: ReportData) -> dict | None:
    """The winner against the sweep's baseline trial (sweep.json `baseline`), each at its selected step
    (uda_ray.results.queries.gain_over_baseline); None for a sweep without a baseline."""
    from uda_ray.results.queries import gain_over_baseline

    base = (data.meta.get("baseline") or {}).get("trial_id")
    if not base:
        return None
    ranked = sorted(({"trial_id": tid, "rank_metric": data.metric, "rank_mode": data.mode,
                      "rank_value": r[data.metric], "rank_test_miou": r.get("test/miou")}
                     for tid, r in selected_rows(data).items()),
                    key=lambda r: r["rank_value"], reverse=data.mode == "max")
    return gain_over_baseline(ranked, base)


def test_metric(data: ReportData) -> str | None:
    """The first of TEST_METRICS some evaluation reported, else None (a target without test labels)."""
    for m in TEST_METRICS:
        if any(finite(e.get(m)) for e in data.evals):
            return m
    return None


def trial_params(t: dict) -> dict:
    """A trials row's searched parameters ({} when it has none or they do not parse)."""
    try:
        return json.loads(t.get("params") or "{}")
    except (TypeError, ValueError):
        return {}


def param_kinds(data: ReportData) -> dict[str, str]:
    """Each searched parameter -> its kind in the space (uniform, loguniform, int, choice); parameters the
    space does not name are guessed from the trials' values (text or bool: choice, else uniform)."""
    kinds = {}
    for k, spec in data.space.items():
        if isinstance(spec, dict) and len(spec) == 1:
            kinds[k] = next(iter(spec))
    for t in data.trials:
        for k, v in trial_params(t).items():
            kinds.setdefault(k, "choice" if isinstance(v, (str, bool)) else "uniform")
    return kinds


def pareto_points(data: ReportData) -> list[tuple[str, list[float], bool, bool]]:
    """(trial, objective values at its last evaluation, on the front?, feasible?) of the completed trials
    (uda_ray.results.queries.pareto_rows, the rows of `uda-ray best` on a multi-objective sweep), in the order
    of their first evaluation; the front is taken among the trials that meet the sweep's constraints."""
    from uda_ray.results.queries import pareto_rows

    rows = pareto_rows(data.trials, data.evals, data.objectives, data.meta.get("constraints") or [])
    order = {tid: i for i, tid in enumerate(evals_by_trial(data))}
    rows.sort(key=lambda r: order[r["trial_id"]])
    return [(r["trial_id"], r["values"], r["on_front"], r["feasible"]) for r in rows]


def selection_vs_test(data: ReportData, test: str) -> tuple[list[tuple[float, float, str]], float]:
    """Each trial's (selection value, `test` value, trial) at its selected step, and the Spearman correlation
    of the two over the trials, sign-adjusted (+1: the selection metric ranks the trials as the test metric
    does; NaN when undefined). The same number `uda-ray validators` prints (uda_ray.selection.study) for
    the selection metric over the same checkpoints: both score a "min" metric by its negation and use
    uda_ray.results.stats.spearman."""
    pts = [(r[data.metric], r[test], tid) for tid, r in selected_rows(data).items() if finite(r.get(test))]
    sign = 1.0 if data.mode == "max" else -1.0
    return pts, spearman([sign * p[0] for p in pts], [p[1] for p in pts])


def best_checkpoint(data: ReportData) -> tuple[str, Path] | None:
    """(trial, checkpoint folder) of the best trial by the objective whose selected step's checkpoint is
    still on disk; None when none is."""
    from uda_ray.training.checkpoint import STATE_FILE

    sel = selected_rows(data)
    ranked = sorted(sel.items(), key=lambda kv: kv[1][data.metric], reverse=data.mode == "max")
    for tid, row in ranked:
        ck = row.get("checkpoint_path") and store.here(row["checkpoint_path"])  # under a URI: this machine's copy
        if ck and (Path(ck) / STATE_FILE).is_file():
            return tid, Path(ck)
    return None
