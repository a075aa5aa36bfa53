"""Cost of recording one result in the Parquet tables as a sweep grows.

    python benchmarks/results_write.py [--sizes 100 100000] [--results 100] [--dir DIR]

For each size N, a results folder is filled with N `evals` rows (N/50 trials of 50 evaluations, 30 metrics
each) and 19 `class_iou` rows per eval, then `--results` more results are recorded through
`ResultsWriter.result`, as the sweep driver does (the trials file rewritten at most once a second), and the
mean wall time per result is printed; also with the trials file rewritten at every result, the time a new
driver takes to open the tables (a resume), and — for comparison — one rewrite of the whole `evals` table as
a single file, which is what every result cost before the segmented layout.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402

from uda_ray.results.rows import TrialSummary, eval_rows  # noqa: E402
from uda_ray.results.tables import SEGMENT_ROWS, ResultsWriter, TableStore, rows_to_table  # noqa: E402

CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "light", "sign", "vegetation", "terrain",
           "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
EVALS_PER_TRIAL = 50
EXPERIMENT = {"name": "bench", "seed": 0, "method": "source_only", "model": {"name": "bisenet_r18"},
              "data": {"source": "gta5", "target": "cityscapes"}, "train": {"max_steps": 5000},
              "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9}}


def result(step: int, v: float) -> dict:
    r = {"step": step, "test/miou": v, "test/miou16": v, "test/miou13": v, "test/pixel_acc": v,
         "src_val/miou": v, "src_val/pixel_acc": v, "uv/entropy": v, "uv/im": v, "uv/snd": v, "uv/bnm": v,
         "train/lr": 0.01, "time/elapsed_s": float(step), "time/step_s": 0.1, "time/eval_s": 1.0,
         "model/params": 1e7, "model/gflops": 20.0, "model/latency_ms": 5.0, "model/fps": 200.0,
         **{f"train/loss/l{i}": v for i in range(12)}, "checkpoint_path": f"/ck/{step}"}
    r.update({f"test/iou/{c}": v for c in CLASSES})
    return r


def fill(d: Path, n: int) -> None:
    """N eval rows (and their class rows, trial rows) written in segment-sized batches."""
    store = TableStore(d)
    trials = max(1, n // EVALS_PER_TRIAL)
    batch_ev, batch_iou = [], []
    for i in range(n):
        tid = f"t{i % trials:05d}"
        ev, ious = eval_rows("bench", tid, result(100 * (i // trials + 1), (i % 97) / 97))
        batch_ev.append(ev)
        batch_iou += ious
        if len(batch_ev) == SEGMENT_ROWS["evals"] or i == n - 1:
            store.upsert("evals", batch_ev)
            for k in range(0, len(batch_iou), SEGMENT_ROWS["class_iou"]):
                store.upsert("class_iou", batch_iou[k:k + SEGMENT_ROWS["class_iou"]])
                store.flush(["class_iou"])
            store.flush(["evals"])
            batch_ev, batch_iou = [], []
    rows = []
    for t in range(trials):
        s = TrialSummary("bench", f"t{t:05d}", EXPERIMENT, {"optim.lr": 0.01}, "test/miou", "max", 0)
        rows.append(s.update(store.evals_by_trial.get(f"t{t:05d}", [])))
    store.upsert("trials", rows)
    store.flush(["trials"])


def per_result(d: Path, n: int, k: int, trials_every_s: float) -> float:
    w = ResultsWriter(d, "bench", "test/miou", "max", 0, trials_every_s=trials_every_s)
    trials = max(1, n // EVALS_PER_TRIAL)
    base = 100 * (n // trials + 2) + int(trials_every_s * 7)  # steps not yet recorded
    t0 = time.perf_counter()
    for i in range(k):
        w.result(f"t{i % trials:05d}", EXPERIMENT, {}, result(base + 100 * (i // trials), 0.5))
    return (time.perf_counter() - t0) / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 100_000])
    ap.add_argument("--results", type=int, default=100, help="results timed per size")
    ap.add_argument("--dir", type=Path, help="where to build the tables (default: a temporary folder)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="uda_ray_results_bench_"))
    try:
        print(f"{'rows':>8} {'per result':>11} {'(trials each)':>14} {'open':>8} {'one-file rewrite':>17}")
        for n in args.sizes:
            d = root / f"n{n}"
            shutil.rmtree(d, ignore_errors=True)
            fill(d, n)
            t0 = time.perf_counter()
            TableStore(d)
            open_s = time.perf_counter() - t0
            throttled = per_result(d, n, args.results, 1.0)
            each = per_result(d, n, args.results, 0.0)
            rows = pq.read_table(d / "evals.parquet").to_pylist()
            t0 = time.perf_counter()
            pq.write_table(rows_to_table(rows), root / "one_file.parquet")
            one_file = time.perf_counter() - t0
            print(f"{n:>8} {1000 * throttled:>9.2f}ms {1000 * each:>12.2f}ms {open_s:>7.2f}s "
                  f"{1000 * one_file:>15.1f}ms", flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
