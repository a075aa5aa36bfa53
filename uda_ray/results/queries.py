"""Questions asked of a results folder's tables: the best trials by a metric, and the Pareto front of a
multi-objective sweep. Read-only; a value counts only when it is finite (uda_ray.results.stats.finite)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from uda_ray.metric_names import check_metric, is_pool_metric, mode_of
from uda_ray.results.reading import read_arrow, read_table, rows_of
from uda_ray.results.stats import finite, non_dominated


def best_trials(results_dir: Path, metric: str | None = None, mode: str | None = None, top: int = 5,
                method: str | None = None) -> list[dict]:
    """Trials ranked by their best value of `metric` (default: the sweep's objective) over all evals.

    Each row says whether that step's checkpoint is still on disk: Ray Train keeps only the run's
    `train.keep_checkpoints` best by the run's own selection metric (and the latest), so the best step by
    another metric may have lost its weights. `rank_checkpoint` is the checkpoint folder when it was kept,
    else None (`rank_checkpoint_kept` False); `kept_step`, `kept_value`, `kept_checkpoint` and
    `kept_test_miou` name the best step by `metric` among those whose checkpoint still exists (the same step
    when it was kept; all None when the trial has no checkpoint left)."""
    r = Ranking(results_dir, metric, mode, method)
    return r.rows(r.order[:top])


def ranked_trials(results_dir: Path, metric: str | None = None, mode: str | None = None) -> list[dict]:
    """Every trial with an evaluation of `metric`, ranked as `best_trials` ranks them (best first)."""
    return best_trials(results_dir, metric=metric, mode=mode, top=2**31)


def winner_and(results_dir: Path, trial_id: str, metric: str | None = None) -> list[dict]:
    """The rows of `ranked_trials` that `gain_over_baseline` reads: the winner, and `trial_id` where it has an
    evaluation of `metric` (one row when it is the winner), without building every trial's row."""
    r = Ranking(results_dir, metric)
    picks = r.order[:1] + [i for i in r.order[1:] if r.trial_ids[i] == trial_id]
    return r.rows(picks)


class Ranking:
    """The trials of a results folder ordered by their best value of a metric, from only the columns that
    takes (trial ids, steps, the metric, test mIoU, checkpoints); full rows are built for the trials asked for.
    `order`: positions in the `trials` table, best first (ties in table order; trials without a finite value
    of the metric left out)."""

    def __init__(self, results_dir: Path, metric: str | None = None, mode: str | None = None,
                 method: str | None = None) -> None:
        self.table = read_arrow(results_dir, "trials")
        keys = rows_of(self.table.select([c for c in ("schema_version", "trial_id", "method", "objective", "mode")
                                          if c in self.table.column_names])) if self.table is not None else []
        self.trial_ids = [t["trial_id"] for t in keys]
        self.order: list[int] = []
        pos = [i for i, t in enumerate(keys) if not method or t["method"] == method]
        if not pos:
            return
        if metric:
            metric = check_metric(metric, "metric")
            mode = mode or mode_of(metric)
        else:
            metric, mode = keys[pos[0]]["objective"], mode or keys[pos[0]]["mode"]
        self.metric, self.mode = metric, mode
        evals = read_table(results_dir, "evals", columns=["trial_id", "step", "checkpoint_path", "test/miou", metric])
        if is_pool_metric(metric):  # computed after the sweep (uda_ray.selection.ensv), joined on (trial, step)
            from uda_ray.selection.ensv import with_pool_metrics

            evals = with_pool_metrics(evals, results_dir)
        self.by_trial: dict[str, list[dict]] = {}  # grouped once (scanning every eval per trial took 3 minutes)
        for e in evals:
            if finite(e.get(metric)):
                self.by_trial.setdefault(e["trial_id"], []).append(e)
        pick = max if mode == "max" else min
        best = {t: pick(e[metric] for e in vals) for t, vals in self.by_trial.items()}  # the rank value
        self.order = [i for i in pos if self.trial_ids[i] in best]
        self.order.sort(key=lambda i: best[self.trial_ids[i]], reverse=(mode == "max"))

    def rows(self, positions: list[int]) -> list[dict]:
        """The trials at `positions` (of `order`), each its `trials` row plus its `rank_*` and `kept_*` columns."""
        return [{**t, **_ranked(self.by_trial[t["trial_id"]], self.metric, self.mode)}
                for t in rows_of(self.table, positions)] if positions else []


def gain_over_baseline(ranked: list[dict], baseline: str) -> dict[str, Any]:
    """The winner of `ranked` (rows with trial_id, rank_metric, rank_mode, rank_value and rank_test_miou at
    each trial's selected step, best first) against the `baseline` trial: `state` is "no_evaluation" (the
    baseline has no value of the metric yet), "baseline_wins" (nothing ranks above it), or "gain"; `gain` is
    the winner's value minus the baseline's (in the metric's units, signed), `test_gain` the same for test
    mIoU in points (None unless both have a finite one)."""
    base = next((r for r in ranked if r["trial_id"] == baseline), None)
    out: dict[str, Any] = {"baseline": baseline, "metric": ranked[0]["rank_metric"] if ranked else None,
                           "winner": ranked[0]["trial_id"] if ranked else None, "gain": None, "test_gain": None}
    if base is None:
        return {**out, "state": "no_evaluation"}
    win = ranked[0]
    out.update(metric=base["rank_metric"], baseline_value=base["rank_value"], winner_value=win["rank_value"],
               baseline_test=base.get("rank_test_miou"), winner_test=win.get("rank_test_miou"))
    if win["trial_id"] == baseline or win["rank_value"] == base["rank_value"]:
        return {**out, "winner": baseline, "state": "baseline_wins"}
    if finite(out["winner_test"]) and finite(out["baseline_test"]):
        out["test_gain"] = 100.0 * (out["winner_test"] - out["baseline_test"])
    return {**out, "state": "gain", "gain": win["rank_value"] - base["rank_value"]}


def _ranked(vals: list[dict], metric: str, mode: str) -> dict[str, Any]:
    """The `rank_*` and `kept_*` columns of one trial from its eval rows with a value of `metric`."""
    from uda_ray.training.checkpoint import checkpoint_kept

    pick = max if mode == "max" else min
    kept = [v for v in vals if checkpoint_kept(v.get("checkpoint_path"))]
    e = pick(kept + [v for v in vals if v not in kept], key=lambda x: x[metric])  # a tie: the kept one
    is_kept = checkpoint_kept(e.get("checkpoint_path"))
    k = e if is_kept else pick(kept, key=lambda x: x[metric]) if kept else {}
    # test/miou at the picked step, None when the target has no test labels (absent, not zero)
    return {"rank_metric": metric, "rank_mode": mode, "rank_value": e[metric], "rank_step": e["step"],
            "rank_checkpoint": e.get("checkpoint_path") if is_kept else None,
            "rank_checkpoint_kept": is_kept, "rank_test_miou": e.get("test/miou"),
            "kept_step": k.get("step"), "kept_value": k.get(metric),
            "kept_checkpoint": k.get("checkpoint_path"), "kept_test_miou": k.get("test/miou")}


def pareto_rows(trials: Iterable[dict], evals: Iterable[dict], objectives: list[dict],
                constraints: Iterable[Any] = ()) -> list[dict]:
    """The completed trials with a finite value of every objective at their last evaluation (the values the
    searcher was told), in the order of `trials`: each trial's row plus `values`, `step`, `checkpoint`,
    `feasible` (every constraint met there), `violated` (the constraints it breaks, as text) and `on_front`
    (not dominated by another feasible row, uda_ray.results.stats.non_dominated). `constraints` are
    uda_ray.search.space.Constraint or their fields as dicts."""
    from uda_ray.search.space import Constraint

    metrics = [o["metric"] for o in objectives]
    cons = [c if isinstance(c, Constraint) else Constraint(**c) for c in constraints]
    last: dict[str, dict] = {}
    for e in sorted(evals, key=lambda e: e["step"]):  # the last evaluation of each trial wins
        last[e["trial_id"]] = e
    out = []
    for t in trials:
        e = last.get(t["trial_id"])
        if t.get("status") != "completed" or e is None or not all(finite(e.get(m)) for m in metrics):
            continue
        violations = [c.violation(e.get(c.metric)) for c in cons]
        out.append({**t, "values": [e[m] for m in metrics], "step": e["step"], "checkpoint": e.get("checkpoint_path"),
                    "feasible": all(v <= 0 for v in violations),
                    "violated": [str(c) for c, v in zip(cons, violations) if v > 0]})
    front = non_dominated([(r["trial_id"], r["values"]) for r in out if r["feasible"]], [o["mode"] for o in objectives])
    for r in out:
        r["on_front"] = r["trial_id"] in front
    return out


def pareto_front(results_dir: Path, objectives: list[dict], constraints: Iterable[Any] = ()) -> list[dict]:
    """`pareto_rows` of a results folder: front first, ordered by the first objective (best first), then the
    rest."""
    out = pareto_rows(read_table(results_dir, "trials"), read_table(results_dir, "evals"), objectives, constraints)
    sign = -1.0 if objectives[0]["mode"] == "max" else 1.0
    out.sort(key=lambda r: (not r["on_front"], sign * r["values"][0]))
    return out
