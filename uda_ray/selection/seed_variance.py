"""Seed variance: retrain a sweep's top K configurations with N new seeds and report mean ± std.

UDA results swing by 1-3 mIoU between seeds; one sweep trial per configuration cannot tell a real gain from
noise. `uda-ray rerun SWEEP --top K --seeds N` ranks the sweep's trials by its selection metric (as
`uda-ray best` does), and trains each of the top K configurations again with the seeds
`seed + 1, ..., seed + N` (`seed` is the configuration's own; the sweep's trial is not repeated), each as
an ordinary run under `<sweep>/reruns/<trial id>-seed<S>/` with its own results tables. The names
are deterministic: the same command after an interruption skips finished runs and continues an unfinished
one from its last checkpoint.

Per run (table `<sweep>/results/reruns.parquet`, keyed by trial and seed): the selected checkpoint of the
run (best step by the selection metric), the selection metric's value there and the test metric there,
and the test metric at the run's last step. Per configuration (`rerun_summary.parquet`): the mean and the
sample standard deviation (n - 1) of those over the seeds, beside the sweep trial's own values.

Ray-free: the caller passes the function that trains a run (uda_ray.training.launchers.fit_run).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uda_ray.errors import UserError
from uda_ray.results.stats import finite
from uda_ray.storage import layout

RERUN_DIR = layout.RERUNS
TEST_METRIC = "test/miou"


@dataclass(frozen=True)
class RerunSpec:
    rank: int  # 1 = the sweep's best configuration
    trial_id: str  # the sweep trial whose configuration is retrained
    seed: int
    name: str  # the run's folder under <sweep>/reruns
    experiment: dict  # the trial's resolved experiment with the new seed
    original: dict  # the sweep trial's ranking row (best_trials)


def run_name(trial_id: str, seed: int) -> str:
    return f"{trial_id}-seed{seed}"


def plan(sweep_dir: Path, top: int, seeds: int, metric: str, mode: str) -> list[RerunSpec]:
    """The runs to train: top `top` trials by their best `metric`, `seeds` new seeds each."""
    from uda_ray.results.queries import best_trials

    if top < 1:
        raise UserError("--top must be >= 1")
    if seeds < 1:
        raise UserError("--seeds must be >= 1")
    ranked = best_trials(layout.results_dir(sweep_dir), metric=metric, mode=mode, top=top)
    if not ranked:
        raise UserError(f"sweep '{Path(sweep_dir).name}' has no trial with a value of {metric} yet")
    out = []
    for rank, row in enumerate(ranked, 1):
        exp = json.loads(row["config_json"])
        for i in range(seeds):
            seed = int(exp["seed"]) + 1 + i
            name = run_name(row["trial_id"], seed)
            out.append(RerunSpec(rank, row["trial_id"], seed, name, {**exp, "seed": seed, "name": name}, row))
    return out


def run_evals(run_dir: Path) -> list[dict]:
    from uda_ray.results.tables import read_table

    return sorted(read_table(layout.results_dir(run_dir), "evals"), key=lambda e: e["step"])


def finished(run_dir: Path, max_steps: int) -> bool:
    """The run reported its last step (its tables are written as results arrive)."""
    evals = run_evals(run_dir)
    return bool(evals) and int(evals[-1]["step"]) >= max_steps


def run_row(spec: RerunSpec, run_dir: Path, metric: str, mode: str, sweep: str) -> dict:
    """One `reruns` row: the run's selected checkpoint (best `metric`), its values, the final test value."""
    evals = run_evals(run_dir)
    scored = [e for e in evals if finite(e.get(metric))]
    row: dict[str, Any] = {
        "sweep": sweep, "trial_id": spec.trial_id, "rank": spec.rank, "seed": spec.seed, "run": spec.name,
        "run_dir": str(run_dir), "selection_metric": metric, "mode": mode, "test_metric": TEST_METRIC,
        "params": spec.original.get("params"),
        "status": "completed" if finished(run_dir, spec.experiment["train"]["max_steps"]) else "incomplete",
        "sel_step": None, "sel_value": None, "test_at_sel": None, "final_step": None, "final_test": None,
        "trial_sel_value": spec.original.get("rank_value"), "trial_sel_step": spec.original.get("rank_step"),
        "trial_test_at_sel": None,
    }
    if scored:
        best = (max if mode == "max" else min)(scored, key=lambda e: e[metric])
        row.update(sel_step=int(best["step"]), sel_value=best[metric], test_at_sel=best.get(TEST_METRIC))
    if evals:
        row.update(final_step=int(evals[-1]["step"]), final_test=evals[-1].get(TEST_METRIC))
    return row


def _mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if finite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan)


def summarize(rows: list[dict]) -> list[dict]:
    """Per configuration: mean and sample std (n - 1; NaN for one seed) of the selected value, the test
    metric at the selected checkpoint and the final test metric, over its completed runs."""
    out = []
    for tid in sorted({r["trial_id"] for r in rows}, key=lambda t: min(r["rank"] for r in rows if r["trial_id"] == t)):
        mine = [r for r in rows if r["trial_id"] == tid]
        done = [r for r in mine if r["status"] == "completed"]
        s = {"trial_id": tid, "rank": mine[0]["rank"], "params": mine[0]["params"],
             "selection_metric": mine[0]["selection_metric"], "test_metric": mine[0]["test_metric"],
             "n_runs": len(done), "seeds": json.dumps(sorted(r["seed"] for r in done)),
             "trial_sel_value": mine[0]["trial_sel_value"], "trial_test_at_sel": mine[0]["trial_test_at_sel"]}
        for key in ("sel_value", "test_at_sel", "final_test"):
            s[f"{key}_mean"], s[f"{key}_std"] = _mean_std([r[key] for r in done])
        out.append(s)
    return out


def write_tables(results_dir: Path, rows: list[dict]) -> list[dict]:
    """Upsert `rows` into reruns.parquet (keyed by trial and seed; earlier reruns of other configurations
    stay), rewrite rerun_summary.parquet from all of them; atomic writes. Returns the summary."""
    from uda_ray.results.tables import atomic_write, read_table, rows_to_table

    results_dir = Path(results_dir)
    keyed = {(r["trial_id"], r["seed"]): r for r in read_table(results_dir, "reruns")}
    keyed.update({(r["trial_id"], r["seed"]): r for r in rows})
    all_rows = sorted(keyed.values(), key=lambda r: (r["rank"], r["trial_id"], r["seed"]))
    summary = summarize(all_rows)
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(rows_to_table(all_rows), results_dir / "reruns.parquet")
    atomic_write(rows_to_table(summary), results_dir / "rerun_summary.parquet")
    return summary


def rerun(sweep_dir: Path, specs: list[RerunSpec], train: Callable[[RerunSpec, Path], Any], metric: str, mode: str,
          log: Callable[[str], None] = print) -> list[dict]:
    """Train every spec not finished yet (`train(spec, storage)` runs one run named spec.name
    under storage), then record and summarize all of them."""
    sweep_dir = Path(sweep_dir)
    storage = layout.reruns_dir(sweep_dir)
    rows = []
    for i, spec in enumerate(specs, 1):
        run_dir = storage / spec.name
        if finished(run_dir, spec.experiment["train"]["max_steps"]):
            log(f"[{i}/{len(specs)}] {spec.name}: already complete, skipped")
        else:
            log(f"[{i}/{len(specs)}] {spec.name}: configuration #{spec.rank} ({spec.trial_id}) with seed {spec.seed}")
            train(spec, storage)
        row = run_row(spec, run_dir, metric, mode, sweep_dir.name)
        row["trial_test_at_sel"] = _trial_test_at(sweep_dir, spec)
        rows.append(row)
    return write_tables(layout.results_dir(sweep_dir), rows)


def _trial_test_at(sweep_dir: Path, spec: RerunSpec) -> float | None:
    from uda_ray.results.tables import read_table

    for e in read_table(layout.results_dir(sweep_dir), "evals"):
        if e["trial_id"] == spec.trial_id and e["step"] == spec.original.get("rank_step"):
            return e.get(TEST_METRIC)
    return None


def format_summary(summary: list[dict]) -> str:
    """mean ± std per configuration as text (uda_ray.results.text.rerun_table, what `uda-ray rerun` prints)."""
    from uda_ray.results.text import rerun_table

    return rerun_table(summary)
