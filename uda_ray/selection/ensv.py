"""EnsV after a sweep: the pool of kept checkpoints, their mean softmax on the held-out target slice as a
pseudo-oracle, and each checkpoint's agreement with it (Hu et al., "Towards Reliable Model Selection for
Unsupervised Domain Adaptation: An Empirical Study and A Certified Baseline", NeurIPS 2024 Datasets & Benchmarks;
the formula: uda_ray.selection.estimators.ensv).

The pool is every (trial, step) of a sweep's evals table whose checkpoint is still on disk (or every kept
checkpoint of a run or pipeline stage). The members are loaded one at a time: the held-out images go through
each once; the pass keeps the running sum of the softmax maps and each member's argmax map, at the first
member's output resolution (the others' maps resized to it, bilinear). The scores go to results/ensv.parquet
(trial_id, step, checkpoint_path, uv/ensv, pool_size), which `best --metric uv/ensv`, `--export` and
`@stage:best` read. Ray-free, in-process, on the driver. Importing this module does not import torch (reading
the table, as `uda-ray validators` and `best` do, needs none).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from uda_ray.errors import UserError
from uda_ray.results.stats import finite
from uda_ray.results.tables import atomic_write, read_table, rows_to_table

METRIC = "uv/ensv"
TABLE = "ensv"
progress = logging.getLogger("uda_ray.training.progress")


def sweep_pool(results_dir: Path) -> list[dict]:
    """The pool of a results folder: one {trial_id, step, checkpoint_path} per evaluation whose checkpoint is
    kept (the last row of a (trial, step) wins), ordered by (trial, step)."""
    from uda_ray.training.checkpoint import checkpoint_kept

    pool = {(str(e["trial_id"]), int(e["step"])): e.get("checkpoint_path") for e in read_table(results_dir, "evals")}
    return [{"trial_id": t, "step": s, "checkpoint_path": str(p)} for (t, s), p in sorted(pool.items())
            if checkpoint_kept(p)]


def run_pool(run_dir: Path) -> list[dict]:
    """The pool of one run (a pipeline stage): every checkpoint of it on disk, trial_id = the run's name."""
    from uda_ray.training.checkpoint import checkpoint_kept, checkpoints_in, load_state

    return [{"trial_id": Path(run_dir).name, "step": int(load_state(c, mmap=True)["step"]), "checkpoint_path": str(c)}
            for c in checkpoints_in(run_dir) if checkpoint_kept(c)]


def check_pool(pool: list[dict], what: str) -> None:
    if len(pool) < 2:
        raise UserError(f"{METRIC} needs a pool of at least 2 kept checkpoints; {what} has {len(pool)} "
                        "(EnsV scores each checkpoint against the ensemble of the others: a single run has no pool)")


def pool_scores(checkpoints: list[str | Path], device: str = "cpu", batch_size: int = 4) -> list[float]:
    """EnsV of each checkpoint on the held-out target slice of the first one's experiment, in order."""
    import torch

    from uda_ray.build import load_trained
    from uda_ray.data.loading import build_datasets, val_loader
    from uda_ray.selection.estimators import ensv

    cfg = load_trained(checkpoints[0], "cpu")[0]
    ds = build_datasets(cfg.data, source=False, target=False, target_labels=False, evaluation=True)
    if "holdout" not in ds:
        raise UserError(f"{checkpoints[0]}: its experiment has no held-out target slice for {METRIC}")
    loader = val_loader(ds["holdout"], batch_size, rank=0, world_size=1, workers=0)
    size, total, preds = None, None, []
    for i, ck in enumerate(checkpoints):
        progress.info(f"{METRIC}: member {i + 1}/{len(checkpoints)} {ck}")
        probs = member_probs(load_trained(ck, device)[1], loader, device, size)  # (C, N, h, w)
        size = tuple(probs.shape[-2:])
        total = probs if total is None else total + probs
        preds.append(probs.argmax(0).to(torch.int16))
    return ensv(torch.stack(preds), total).tolist()


def member_probs(model: Any, loader: Any, device: Any, size: tuple[int, int] | None) -> Any:
    """One member's softmax maps of the held-out images, (C, N, h, w) float64 on the CPU, resized (bilinear) to
    `size` when given and different."""
    import torch

    maps = []
    with torch.no_grad():
        for item in loader:
            probs = model(item["img"].to(device))["out"].float().softmax(1).cpu()  # (B, C, h, w)
            if size is not None and tuple(probs.shape[-2:]) != size:
                probs = torch.nn.functional.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            maps.append(probs)
    return torch.cat(maps).movedim(1, 0).double()


def compute(pool: list[dict], results_dir: Path, device: str = "cpu") -> list[dict]:
    """Score the pool and write results/ensv.parquet atomically; returns its rows (best first)."""
    scores = pool_scores([p["checkpoint_path"] for p in pool], device)
    rows = [{**p, METRIC: s, "pool_size": len(pool)} for p, s in zip(pool, scores)]
    rows.sort(key=lambda r: -r[METRIC])
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(rows_to_table(rows), Path(results_dir) / f"{TABLE}.parquet")
    return rows


def with_pool_metrics(evals: list[dict], results_dir: Path) -> list[dict]:
    """The eval rows with `uv/ensv` added where results/ensv.parquet scored their (trial, step)."""
    scored = {(str(r["trial_id"]), int(r["step"])): r[METRIC] for r in read_table(results_dir, TABLE)
              if finite(r.get(METRIC))}
    if not scored:
        return evals
    return [{**e, METRIC: scored[k]} if (k := (str(e["trial_id"]), int(e["step"]))) in scored else e for e in evals]


def best_checkpoint(run_dir: Path, device: str = "cpu") -> Path:
    """`@stage:best` by uv/ensv: the run's kept checkpoints scored as a pool (written to its results folder)."""
    from uda_ray.storage import layout

    pool = run_pool(run_dir)
    check_pool(pool, f"run {run_dir}")
    rows = compute(pool, layout.results_dir(Path(run_dir)), device)
    return Path(rows[0]["checkpoint_path"])


def missing_table_error(name: str, results_dir: Path) -> UserError | None:
    """None when results/ensv.parquet holds scores, else the one-line error `best --metric uv/ensv` gives."""
    if any(math.isfinite(r.get(METRIC) or math.nan) for r in read_table(results_dir, TABLE)):
        return None
    return UserError(f"{name} has no {METRIC} scores: EnsV needs the pool of a sweep's kept checkpoints and is "
                     f"computed after it: run `uda-ray ensv {name}` first")
