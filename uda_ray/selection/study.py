"""How far can a validator be trusted? Rank correlation and selection regret against test mIoU.

Pure (no Ray, no torch): it reads rows of an `evals` table — one row per (trial, step) with every metric
reported at that evaluation — and measures each validator (the label-free `uv/*` metrics, `src_val/miou`,
and `sel/miou` when a labeled selection split was used) against the target test mIoU, over every
(trial, step) that has test labels. This is the measurement of Musgrave et al., "Three New Validators and
a Large-Scale Benchmark Ranking for Unsupervised Domain Adaptation" (2022) and Saito et al., "Tune it the
Right Way: Unsupervised Validation of Domain Adaptation via Soft Neighborhood Density" (ICCV 2021), on our
own sweeps.

Definitions (the columns of the `validators` table). A *checkpoint* is one (trial, step) row whose test
metric (`test/miou`) is a finite number; its *score* under validator V is V's value there, negated when
V's mode (from uda_ray.metric_names) is "min", so that a higher score always means "V prefers it".

- `n_checkpoints`, `n_trials`: checkpoints (and their trials) where both V and the test metric are finite.
- `spearman`: Spearman's rank correlation between the score and the test metric over those checkpoints
  (uda_ray.results.stats.spearman, the one the HTML report uses too: average ranks for ties, then Pearson's
  r of the ranks). +1: V orders the checkpoints exactly as the test labels do; 0: no relation; negative: V
  prefers the worse checkpoints. NaN with fewer than 2 checkpoints or when either side is constant.
- `oracle_test`: the best test metric over ALL checkpoints (with or without a value of V) — what choosing
  with the test labels would get; `oracle_trial` / `oracle_step` where it is (the first by trial, step
  among ties).
- `pick_trial`, `pick_step`, `pick_test`: the checkpoint with the highest score, and its test metric.
  When several checkpoints tie for the highest score, `pick_test` is the mean of their test metrics (the
  expected outcome of breaking the tie at random), `n_tied` says how many tied, and the first by
  (trial, step) is named.
- `regret` = `oracle_test` - `pick_test` (>= 0; in the metric's units, fractions of 1 for mIoU).
- The *final* variant scores each trial by its LAST evaluation only (largest step with a finite test
  metric) — the protocol "choose a configuration, deploy the model it ends with": `spearman_final` over
  trials, `pick_final_trial`, `pick_final_test` (tie-averaged as above), `oracle_final_test` (best final
  test metric over all trials) and `regret_final` = `oracle_final_test` - `pick_final_test`. Trials stopped
  early by ASHA compete with their last (early) evaluation.

- The *worst-model rate* (Hu et al., NeurIPS 2024 Datasets & Benchmarks, "Towards Reliable Model Selection for
  Unsupervised Domain Adaptation": does a selector avoid the worst models of the pool?): `pick_pct` is the
  fraction of checkpoints whose test metric is strictly below `pick_test`; `worst` is 1.0 when
  `pick_pct` < 0.25 (the pick is in the bottom quarter of the pool), else 0.0; `worst_final` the same over the
  trials' final checkpoints. Averaged over several sweeps, `worst` is how often a validator picks a bottom-quarter
  model.

One reference row, validator `(random)`: the expected regret of picking a checkpoint (and a trial's final
checkpoint) uniformly at random: `oracle_test` - mean test metric; its `worst` and `worst_final` are the chances
that a random pick is in the bottom quarter. A validator whose regret is not below it
selects no better than chance.

Note: a picked checkpoint is a row of the evals table; whether its weights are still on disk depends on
`train.keep_checkpoints` (the run keeps the best ones by its selection metric).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from uda_ray.results.stats import finite, spearman
from uda_ray.results.text import points, rho

TEST_METRIC = "test/miou"
RANDOM = "(random)"
TABLE = "validators"
COLUMNS = ("validator", "mode", "n_checkpoints", "n_trials", "spearman", "pick_trial", "pick_step",
           "pick_test", "n_tied", "oracle_test", "oracle_trial", "oracle_step", "regret",
           "spearman_final", "pick_final_trial", "pick_final_test", "oracle_final_test", "regret_final",
           "pick_pct", "worst", "worst_final", "test_metric")
BOTTOM = 0.25  # the bottom quarter of the pool: the "worst models" a selector should avoid


def _pick(points: list[tuple[float, float, str, int]]) -> tuple[str, int, float, int]:
    """points: (score, test, trial, step). The highest score; test averaged over ties."""
    top = max(p[0] for p in points)
    tied = sorted((p for p in points if p[0] == top), key=lambda p: (p[2], p[3]))
    return tied[0][2], tied[0][3], sum(p[1] for p in tied) / len(tied), len(tied)


def below(test: float, pool: list[float]) -> float:
    """The fraction of `pool` strictly below `test`."""
    return sum(t < test for t in pool) / len(pool)


def measure(evals: Iterable[Mapping[str, Any]], validators: Mapping[str, str],
            test_metric: str = TEST_METRIC) -> list[dict]:
    """One row per validator (in the given order) plus the `(random)` reference row; see the module
    docstring for the columns. `validators` maps a metric name to its mode ("max" or "min"). Rows without
    a finite test metric are ignored; an empty list when no row has one."""
    pts = sorted((dict(e) for e in evals if finite(e.get(test_metric))),
                 key=lambda e: (str(e["trial_id"]), int(e["step"])))
    if not pts:
        return []
    finals: dict[str, dict] = {}
    for e in pts:  # sorted by step within a trial: the last one wins
        finals[str(e["trial_id"])] = e
    best = max(pts, key=lambda e: e[test_metric])  # max keeps the first of ties
    oracle = {"oracle_test": best[test_metric], "oracle_trial": str(best["trial_id"]),
              "oracle_step": int(best["step"]),
              "oracle_final_test": max(e[test_metric] for e in finals.values()), "test_metric": test_metric}
    rows = []
    for name, mode in validators.items():
        if mode not in ("max", "min"):
            raise ValueError(f"validator {name}: mode must be 'max' or 'min', got {mode!r}")
        sign = 1.0 if mode == "max" else -1.0
        ck = [(sign * e[name], e[test_metric], str(e["trial_id"]), int(e["step"])) for e in pts if finite(e.get(name))]
        fin = [(sign * e[name], e[test_metric], t, int(e["step"])) for t, e in finals.items() if finite(e.get(name))]
        row: dict[str, Any] = {c: None for c in COLUMNS}
        row.update(oracle, validator=name, mode=mode, n_checkpoints=len(ck), n_trials=len({p[2] for p in ck}),
                   spearman=spearman([p[0] for p in ck], [p[1] for p in ck]),
                   spearman_final=spearman([p[0] for p in fin], [p[1] for p in fin]))
        if ck:
            trial, step, test, tied = _pick(ck)
            pct = below(test, [e[test_metric] for e in pts])
            row.update(pick_trial=trial, pick_step=step, pick_test=test, n_tied=tied,
                       regret=oracle["oracle_test"] - test, pick_pct=pct, worst=float(pct < BOTTOM))
        if fin:
            trial, _, test, _ = _pick(fin)
            row.update(pick_final_trial=trial, pick_final_test=test,
                       regret_final=oracle["oracle_final_test"] - test,
                       worst_final=float(below(test, [e[test_metric] for e in finals.values()]) < BOTTOM))
        rows.append(row)
    mean_test = sum(e[test_metric] for e in pts) / len(pts)
    mean_final = sum(e[test_metric] for e in finals.values()) / len(finals)
    ref: dict[str, Any] = {c: None for c in COLUMNS}
    ref.update(oracle, validator=RANDOM, n_checkpoints=len(pts), n_trials=len(finals), spearman=math.nan,
               spearman_final=math.nan, pick_test=mean_test, regret=oracle["oracle_test"] - mean_test,
               pick_final_test=mean_final, regret_final=oracle["oracle_final_test"] - mean_final,
               worst=_random_worst([e[test_metric] for e in pts]),
               worst_final=_random_worst([e[test_metric] for e in finals.values()]))
    rows.append(ref)
    return rows


def _random_worst(pool: list[float]) -> float:
    """The chance that a uniformly random member of `pool` is in its bottom quarter."""
    return sum(below(t, pool) < BOTTOM for t in pool) / len(pool)


def validator_modes(columns: Iterable[str]) -> dict[str, str]:
    """The validators present among `columns` (every `uv/*`, `src_val/miou`, `sel/miou`), each with its
    mode from the metric registry, in a stable order: label-free first, then the labeled ones."""
    from uda_ray.metric_names import mode_of

    cols = set(columns)
    names = sorted(c for c in cols if c.startswith("uv/"))
    names += [c for c in ("src_val/miou", "sel/miou") if c in cols]
    return {n: mode_of(n) for n in names}


def validators_table(evals: list[dict], test_metric: str = TEST_METRIC) -> list[dict]:
    """`measure` over the validators present in these eval rows."""
    cols = {k for e in evals for k, v in e.items() if finite(v)}
    return measure(evals, validator_modes(cols), test_metric)


def pooled_evals(evals_by_pool: Mapping[str, list[dict]]) -> list[dict]:
    """Several pools' eval rows as one pool (e.g. one sweep per method: which checkpoint of ANY method would a
    validator pick?): trial ids prefixed `pool/`; pool-relative metrics (EnsV scores agreement with its own
    pool's ensemble) dropped, since their values are not comparable across pools."""
    from uda_ray.metric_names import is_pool_metric

    return [{**{k: v for k, v in e.items() if not is_pool_metric(k)}, "trial_id": f"{pool}/{e['trial_id']}"}
            for pool, evals in evals_by_pool.items() for e in evals]


def across(tables: Mapping[str, list[dict]]) -> list[dict]:
    """Per validator, over several pools measured apart (one `measure` table each, e.g. one sweep per method):
    the mean Spearman, the mean and the largest regret, and the worst-model rate (the fraction of pools in which
    its pick is in the bottom quarter; for the (random) row, the mean chance of that). Only validators that
    every pool measures; in the first table's order."""
    by_pool = [{r["validator"]: r for r in rows} for rows in tables.values() if rows]
    if not by_pool:
        return []

    def mean(xs: list[float]) -> float:
        xs = [x for x in xs if finite(x)]
        return sum(xs) / len(xs) if xs else math.nan

    out = []
    for name in by_pool[0]:
        rows = [t[name] for t in by_pool if name in t]
        if len(rows) < len(by_pool):
            continue
        col = {k: [r.get(k) for r in rows] for k in ("spearman", "regret", "worst", "spearman_final",
                                                      "regret_final", "worst_final")}
        regrets = [x for x in col["regret"] if finite(x)]
        out.append({"validator": name, "n_pools": len(rows), "spearman_mean": mean(col["spearman"]),
                    "regret_mean": mean(regrets), "regret_max": max(regrets) if regrets else math.nan,
                    "worst_rate": mean(col["worst"]), "spearman_final_mean": mean(col["spearman_final"]),
                    "regret_final_mean": mean(col["regret_final"]), "worst_final_rate": mean(col["worst_final"])})
    return out


def format_across(rows: list[dict]) -> str:
    """The `across` table as text: mIoU figures in points (x100)."""
    if not rows:
        return "no pool with test labels: nothing to measure the validators against"
    lines = [f"{len([r for r in rows if r['validator'] != RANDOM])} validators over {rows[0]['n_pools']} pools "
             "measured apart: mean Spearman, mean and largest regret (points), worst-model rate (picks in the "
             "bottom quarter of their pool)",
             f"{'validator':<16} {'spearman':>8} {'regret':>7} {'max':>6} {'worst':>5}  {'rho_final':>9} "
             f"{'regret_f':>8} {'worst_f':>7}"]
    for r in rows:
        lines.append(f"{r['validator']:<16} {rho(r['spearman_mean']):>8} {points(r['regret_mean']):>7} "
                     f"{points(r['regret_max']):>6} {_rate(r['worst_rate']):>5}  {rho(r['spearman_final_mean']):>9} "
                     f"{points(r['regret_final_mean']):>8} {_rate(r['worst_final_rate']):>7}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# where the evals of a name live, the table file, printing


def read_evals(results_dirs: list[Path]) -> list[dict]:
    """The eval rows of these results folders (a pipeline stage's trial_id is its stage name)."""
    from uda_ray.results.tables import read_table

    return [r for d in results_dirs for r in read_table(d, "evals")]


def write_table(results_dir: Path, rows: list[dict]) -> Path:
    """results/validators.parquet, written atomically (temporary file, fsync, rename)."""
    from uda_ray.results.tables import atomic_write, rows_to_table

    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{TABLE}.parquet"
    atomic_write(rows_to_table(rows), path)
    return path


def format_table(rows: list[dict]) -> str:
    """The validators table as text: mIoU figures in points (x100)."""
    if not rows:
        return "no evaluation with test labels: nothing to measure the validators against"
    r0 = rows[0]
    head = (f"{len([r for r in rows if r['validator'] != RANDOM])} validators vs {r0['test_metric']} over "
            f"{next(r['n_checkpoints'] for r in rows if r['validator'] == RANDOM)} checkpoints of "
            f"{next(r['n_trials'] for r in rows if r['validator'] == RANDOM)} trials; best "
            f"{points(r0['oracle_test'])} ({r0['oracle_trial']} @ {r0['oracle_step']}), best final "
            f"{points(r0['oracle_final_test'])}. mIoU in points; regret = best - picked.")
    wheres = []
    for r in rows:
        where = f"{r['pick_trial']} @ {r['pick_step']}" if r.get("pick_trial") else "-"
        wheres.append(where + (f" ({r['n_tied']} tied)" if (r.get("n_tied") or 1) > 1 else ""))
    w = max(24, *map(len, wheres))  # pooled tables name their trials `sweep/trial`
    lines = [head, f"{'validator':<16} {'mode':<4} {'n':>4} {'spearman':>8} {'picked':>7} {'regret':>7} {'worst':>5}  "
                   f"{'pick (trial @ step)':<{w}} {'rho_final':>9} {'final':>6} {'regret_f':>8} {'worst_f':>7}"]
    for r, where in zip(rows, wheres):
        lines.append(f"{r['validator']:<16} {r.get('mode') or '-':<4} {r['n_checkpoints']:>4} "
                     f"{rho(r['spearman']):>8} {points(r['pick_test']):>7} {points(r['regret']):>7} "
                     f"{_worst(r, 'worst'):>5}  {where:<{w}} {rho(r['spearman_final']):>9} "
                     f"{points(r['pick_final_test']):>6} {points(r['regret_final']):>8} {_worst(r, 'worst_final'):>7}")
    lines.append(f"worst: the pick is in the bottom quarter of the pool by {r0['test_metric']} (random: the chance)")
    return "\n".join(lines)


def _rate(v: float) -> str:
    return f"{v:.2f}" if finite(v) else "-"


def _worst(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    return f"{v:.2f}" if row["validator"] == RANDOM else ("yes" if v else "no")


def pick_vs_oracle(evals: list[dict], metric: str, mode: str, test_metric: str = TEST_METRIC) -> str | None:
    """One line: the checkpoint `metric` selects, its test value, and the test-label oracle's (None when no
    evaluation has test labels or a value of `metric`)."""
    rows = measure(evals, {metric: mode}, test_metric) if metric != test_metric else []
    if not rows or rows[0]["pick_trial"] is None:
        return None
    r = rows[0]
    tie = f", mean over {r['n_tied']} tied checkpoints" if r["n_tied"] > 1 else ""
    return (f"selected by {metric}: {r['pick_trial']} @ step {r['pick_step']} -> {test_metric} "
            f"{points(r['pick_test'])}{tie}; test-label oracle: {r['oracle_trial']} @ step {r['oracle_step']} -> "
            f"{points(r['oracle_test'])}; regret {points(r['regret'])} points (a random checkpoint: "
            f"{points(rows[-1]['regret'])}); Spearman({metric}, {test_metric}) over {r['n_checkpoints']} "
            f"checkpoints {rho(r['spearman'])}")
