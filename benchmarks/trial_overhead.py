"""Per-trial fixed overhead of a sweep: sweep wall time minus the time spent training, per trial, by phase.

    python benchmarks/trial_overhead.py [--trials 4] [--steps 4] [--launcher auto|inline|ray_train] [--keep DIR]

Runs a small sweep (`uda-ray sweep`, a local Ray cluster, one trial at a time, a tiny BiSeNet-R18 source_only
experiment on the synthetic benchmark, `train.launcher` from --launcher) with UDA_RAY_TIMING_LOG set, so every
process appends wall-clock marks of its phases (`uda_ray.training.timing`). Prints, per trial on average, the time from
the trial's start to its training loop, split by phase, the loop itself, and the teardown; and the overhead per
trial:
(the span from the first trial's start to the last trial's end - the sum of the loops' times) / trials.
The loop (`fit`'s steps, evaluations and checkpoint reports) is the "fit time"; everything else is overhead.
The command's own wall time (Ray start and shutdown included) is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PHASES = [  # (label, from mark, to mark); a phase is shown when the trials have both marks
    ("Tune trial: config built (inline)", "trial_driver_start", "inline_fit_start"),
    ("Tune trial: TorchTrainer built (ray_train)", "trial_driver_start", "trainer_fit_start"),
    ("Train controller + worker group start (ray_train)", "trainer_fit_start", "train_worker_start"),
    ("worker: threads, pid file (inline)", "inline_fit_start", "train_worker_start"),
    ("worker: config, seeds", "train_worker_start", "fit_start"),
    ("fit: model + method built", "fit_start", "model_built"),
    ("fit: datasets + loaders", "model_built", "data_ready"),
    ("fit: model profile (params, GFLOPs, latency)", "data_ready", "profiled"),
    ("fit: to the first step", "profiled", "loop_start"),
    ("LOOP (steps, evaluations, reports)", "loop_start", "fit_end"),
    ("teardown (worker group, controller)", "fit_end", "trainer_fit_end"),
    ("fit returned -> trial function returns", "fit_end", "trial_driver_end"),
]


def space(tmp: Path, trials: int, steps: int, launcher: str) -> Path:
    exp = {
        "name": "overhead", "seed": 0,
        "data": {"source": "gta5", "target": "cityscapes",
                 "synthetic": {"n_source": 16, "n_target": 16, "n_val": 4, "size": [128, 64], "seed": 0},
                 "source_size": [128, 64], "target_size": [128, 64]},
        "model": {"name": "bisenet_r18", "num_classes": 19},
        "optim": {"name": "sgd", "lr": 0.01},
        "train": {"max_steps": steps, "eval_every": max(1, steps // 2), "batch_size": 2, "cpus_per_worker": 1.0,
                  "launcher": launcher},
        "method": "source_only",
    }
    (tmp / "exp.json").write_text(json.dumps(exp))  # JSON is YAML
    sp = {"base": str(tmp / "exp.json"), "objective": {"metric": "test/miou", "mode": "max"},
          "num_samples": trials, "max_concurrent_trials": 1, "seed": 0, "scheduler": None,
          "params": {"optim.lr": {"loguniform": [1e-3, 1e-1]}}}
    (tmp / "space.yaml").write_text(json.dumps(sp))
    return tmp / "space.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--launcher", default="auto", choices=["auto", "inline", "ray_train"],
                    help="train.launcher of the trials (auto: inline, as they have one worker)")
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="uda_ray_overhead_") as t:
        tmp = a.keep or Path(t)
        tmp.mkdir(parents=True, exist_ok=True)
        log = tmp / "timing.jsonl"
        log.unlink(missing_ok=True)
        env = {**os.environ, "UDA_RAY_TIMING_LOG": str(log), "UDA_RAY_DATA": str(tmp / "data")}
        cmd = [sys.executable, "-m", "uda_ray.cli", "sweep", str(space(tmp, a.trials, a.steps, a.launcher)),
               "--name", "overhead", "--storage", str(tmp / "runs")]
        t0 = time.time()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.time() - t0
        marks = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    # group the marks of one trial: the trial function's by its trial id, the worker's by the run folder name
    by_trial: dict[str, dict[str, float]] = defaultdict(dict)
    for m in marks:
        key = m.get("trial") or (Path(m["run"]).name.removeprefix("train-") if "run" in m else f"pid{m['pid']}")
        by_trial[key][m["event"]] = m["t"]
    trials = {k: v for k, v in by_trial.items() if "trial_driver_end" in v and "loop_start" in v}
    n = len(trials)
    span = max(v["trial_driver_end"] for v in trials.values()) - min(v["trial_driver_start"] for v in trials.values())
    loops = sum(v["fit_end"] - v["loop_start"] for v in trials.values())
    print(f"{n} trials of {a.steps} steps (BiSeNet-R18, batch 2, 128x64), one at a time, local Ray cluster, "
          f"launcher {a.launcher}:")
    for label, a_, b_ in PHASES:
        d = [v[b_] - v[a_] for v in trials.values() if a_ in v and b_ in v]
        if d:
            print(f"  {label:<50s} mean {statistics.mean(d):6.2f} s   (min {min(d):6.2f}, max {max(d):6.2f})")
    inside = sum(v["trial_driver_end"] - v["trial_driver_start"] for v in trials.values())
    print(f"  between trials (Tune scheduling, next trial's start) mean {(span - inside) / max(n - 1, 1):.2f} s")
    print(f"overhead per trial: (span {span:.1f} s - loops {loops:.1f} s) / {n} = {(span - loops) / n:.1f} s; "
          f"command wall time {wall:.1f} s (Ray start/stop included)")


if __name__ == "__main__":
    main()
