"""What a sweep's results tables say: its best trials by any reported metric, its Pareto front, the
leaderboard `uda-ray best` prints, and a trial exported as a runnable experiment. Read-only (but for the
exported file); neither torch nor Ray is imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from uda_ray.errors import UserError
from uda_ray.storage import layout


def best(name: str, *, storage: str | os.PathLike | None = None, top: int = 5, metric: str | None = None,
         method: str | None = None) -> list[dict]:
    """The `top` trials of sweep `name`, best first, ranked by `metric` (default: the sweep's objective);
    one dict per trial (rank_metric, rank_value, rank_step, rank_checkpoint, params, config_json, ...).
    Ranked by every evaluation; `rank_checkpoint_kept` says whether the best step's checkpoint is still on
    disk, and `kept_step` / `kept_checkpoint` name the best step whose checkpoint is (results.best_trials)."""
    from uda_ray.metric_names import REPORTED_PREFIXES, check_metric, is_pool_metric
    from uda_ray.results.queries import best_trials
    from uda_ray.results.reading import read_table

    results = layout.results_dir(layout.find_sweep(layout.root(storage), name))
    if top < 1:
        raise UserError("top must be >= 1")
    if metric:
        metric = check_metric(metric, "metric")
        if is_pool_metric(metric):
            from uda_ray.selection.ensv import missing_table_error

            if err := missing_table_error(name, results):
                raise err
            return best_trials(results, metric=metric, top=top, method=method)
        evals = read_table(results, "evals", columns=["trial_id", metric])
        if evals and not any(e.get(metric) is not None for e in evals):
            evals = read_table(results, "evals")
            known = sorted({k for e in evals for k in e if k.startswith(REPORTED_PREFIXES) and e[k] is not None
                            and not k.startswith("test/iou/")})
            raise UserError(f"no evaluation of this sweep reports '{metric}' (reported: {', '.join(known)})")
    return best_trials(results, metric=metric, top=top, method=method)


def pareto(name: str, *, storage: str | os.PathLike | None = None, method: str | None = None) -> list[dict]:
    """The completed trials of a multi-objective sweep at their last evaluation, one dict each: values (per
    objective), on_front, feasible, violated (constraints), step, checkpoint, params, config_json, ..."""
    from uda_ray.results.queries import pareto_front

    d = layout.find_sweep(layout.root(storage), name)
    meta = layout.read_meta(d)
    rows = pareto_front(layout.results_dir(d), meta["objective"], meta.get("constraints") or [])
    return [r for r in rows if not method or r["method"] == method]


def leaderboard(name: str, *, storage: str | os.PathLike | None = None, top: int = 5, metric: str | None = None,
                method: str | None = None) -> dict:
    """What `uda-ray best` shows: of a multi-objective sweep ranked by no `metric`, its Pareto front (kind
    "pareto": `pareto` rows, objectives, constraints); else its `top` trials (kind "best": `best` rows)."""
    meta = layout.read_meta(layout.find_sweep(layout.root(storage), name))
    if multi_objective(meta, metric):
        return {"kind": "pareto", "rows": pareto(name, storage=storage, method=method), "method": method,
                "objectives": meta["objective"], "constraints": meta.get("constraints") or []}
    return {"kind": "best", "rows": best(name, storage=storage, top=top, metric=metric, method=method),
            "method": method, "baseline_gain": None if method else baseline_gain(name, storage=storage, metric=metric)}


def baseline_gain(name: str, *, storage: str | os.PathLike | None = None, metric: str | None = None) -> dict | None:
    """The winner of sweep `name` against its baseline trial (a space with `baseline: true`), by `metric`
    (default: the objective), test mIoU at each one's selected step (uda_ray.results.queries.gain_over_baseline);
    None for a sweep without a baseline."""
    from uda_ray.metric_names import check_metric
    from uda_ray.results.queries import gain_over_baseline, winner_and

    d = layout.find_sweep(layout.root(storage), name)
    base = (layout.read_meta(d).get("baseline") or {}).get("trial_id")
    if not base:
        return None
    return gain_over_baseline(winner_and(layout.results_dir(d), base, check_metric(metric, "metric") if metric
                                         else None), base)


def multi_objective(meta: dict, metric: str | None) -> bool:
    """A sweep of several objectives, not ranked by one named metric, is judged by its Pareto front."""
    return len(meta.get("objective") or []) > 1 and not metric


def export_best(name: str, out: str | os.PathLike, *, storage: str | os.PathLike | None = None,
                metric: str | None = None, method: str | None = None, index: int = 1) -> dict:
    """Write a trial of sweep `name` as a runnable experiment YAML at `out` (atomically): the `index`-th best
    (1 = the best; of a multi-objective sweep without `metric`: the `index`-th trial on the Pareto front).
    Returns its row."""
    from uda_ray.checks import output_file
    from uda_ray.config_loader import dump_yaml

    if index < 1:
        raise UserError("index must be >= 1")
    output_file(out, "--export")
    meta = layout.read_meta(layout.find_sweep(layout.root(storage), name))
    multi = multi_objective(meta, metric)
    rows = _front(name, storage, method, meta) if multi else \
        best(name, storage=storage, top=index, metric=metric, method=method)
    if not rows:
        raise UserError("nothing to export: no evaluated trial")
    if index > len(rows):
        raise UserError(f"index {index}: there are only {len(rows)}")
    pick = rows[index - 1]
    cfg = json.loads(pick["config_json"])
    cfg["name"] = f"{name}-{'pareto' if multi else 'best'}{index if index > 1 else ''}"
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(_export_head(name, pick, meta, multi, index) + dump_yaml(cfg))
    os.replace(tmp, out)
    return pick


def _front(name: str, storage: str | os.PathLike | None, method: str | None, meta: dict) -> list[dict]:
    """The trials on a multi-objective sweep's Pareto front, with the fields an export names."""
    rows = [r for r in pareto(name, storage=storage, method=method) if r["on_front"]]
    for r in rows:
        r.update(rank_metric=meta["objective"][0]["metric"], rank_value=r["values"][0], rank_step=r["step"],
                 rank_checkpoint=r["checkpoint"])
    return rows


def _export_head(name: str, pick: dict, meta: dict, multi: bool, index: int) -> str:
    """The comment lines above an exported experiment: which trial, its value, its checkpoint."""
    if multi:
        vals = ", ".join(f"{o['metric']}={v:.4g}" for o, v in zip(meta["objective"], pick["values"]))
        what = f"Pareto-front trial {index} ({vals})"
    else:
        what = "best trial" if index == 1 else f"trial number {index}"
    if pick.get("rank_checkpoint_kept", True):
        ck = f"# its checkpoint: {pick['rank_checkpoint']}\n"
    else:
        from uda_ray.results.text import not_kept_note

        ck = f"# {not_kept_note(pick)}\n"
    return (f"# {what} {pick['trial_id']} of sweep {name}: {pick['rank_metric']}={pick['rank_value']:.4f} "
            f"at step {pick['rank_step']}\n{ck}")
