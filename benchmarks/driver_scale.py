"""The sweep driver at scale: N replay trials through the real driver path, its cost per trial as N grows.

    python benchmarks/driver_scale.py [--sizes 1000 10000] [--evals 4] [--concurrent 8] [--slice 1000]
                                      [--keep DIR] [--profile FILE] [--no-report]

Each size is one sweep (`uda_ray.sweep`, in this process, on a local Ray cluster) whose trials train nothing:
`train.launcher: replay` with seeded synthetic curves (uda_ray.training.replay), `--evals` evaluations each, ASHA
(grace one evaluation, reduction factor 3), Optuna TPE over three parameters with its journal, the results
callback writing the Parquet tables and the live view: everything a real sweep's driver does per result, so the
driver is the bottleneck. This process is the driver; the trials run in Ray's worker processes.

Printed per `--slice` finished trials (as they finish, so a run stopped early still shows its growth): trials/s,
driver CPU seconds per trial (this process, all its threads), driver RSS, and the milliseconds per trial spent
in each part of the driver (wrapped methods, wall-clock):
    uda_ray callback   ResultsCallback: the tables (start, result, end), TensorBoard, the live view
    record 1 result    ResultsCallback.on_trial_result alone, per result
    Optuna suggest     the searcher's suggest: TPE sampling and the journal append
    Optuna tell        the searcher's results and completion: intermediate values and tell, journaled
    ASHA               the scheduler's decisions (and its rung rebuild on a resume)
    Tune checkpoint    Tune's experiment-state snapshot (TuneController.save_to_dir; its period adapts)
Then, on the finished sweep: `uda-ray best` and `uda-ray report` as commands (fresh processes, imports
included) and in this process, and `resume` of the finished sweep (a new local cluster, Tune's state, the
searcher, the scheduler's rungs and the tables restored; nothing left to run).
`--profile FILE`: cProfile of the driver during the first size (pstats file; `python -m pstats FILE`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PARAMS = {"optim.lr": {"loguniform": [1e-4, 5e-2]}, "optim.momentum": {"uniform": [0.8, 0.99]},
          "optim.weight_decay": {"loguniform": [1e-5, 1e-3]}}


def write_space(tmp: Path, n: int, evals: int, concurrent: int) -> Path:
    exp = {"name": "scale", "seed": 0, "select": "uv/im",
           "data": {"source": "gta5", "target": "cityscapes",
                    "synthetic": {"n_source": 4, "n_target": 4, "n_val": 2, "size": [64, 32], "seed": 0}},
           "model": {"name": "enet", "num_classes": 19}, "optim": {"name": "sgd", "lr": 0.01},
           "train": {"max_steps": 100 * evals, "eval_every": 100, "cpus_per_worker": 1.5 / concurrent,
                     "launcher": "replay", "replay": {"source": "synthetic", "seed": 0}},
           "method": "source_only"}
    (tmp / "exp.json").write_text(json.dumps(exp))  # JSON is YAML
    sp = {"base": str(tmp / "exp.json"), "objective": {"metric": "uv/im", "mode": "max"}, "num_samples": n,
          "max_concurrent_trials": concurrent, "seed": 0, "driver_cpus": 0.25,
          "scheduler": {"asha": {"grace_period": 100, "reduction_factor": 3}}, "params": PARAMS}
    (tmp / f"space{n}.yaml").write_text(json.dumps(sp))
    return tmp / f"space{n}.yaml"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Probe:
    """Wall-clock of wrapped driver methods by group, and a line per `slice` finished trials."""

    def __init__(self, slice_n: int) -> None:
        self.slice_n = slice_n
        self.acc: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.finished = 0
        self.mark: dict | None = None
        self.first: dict | None = None
        self.slices: list[dict] = []
        self.undo: list = []

    def snapshot(self) -> dict:
        return {"t": time.time(), "cpu": time.process_time(), "rss": rss_mb(), "n": self.finished,
                "acc": dict(self.acc), "calls": dict(self.calls)}

    def wrap(self, cls: type, name: str, group: str) -> None:
        orig = cls.__dict__[name]

        @functools.wraps(orig)
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                self.acc[group] += time.perf_counter() - t0
                self.calls[group] += 1
                if name in ("on_trial_complete", "on_trial_error") and group == "uda_ray callback":
                    self.trial_ended()
                elif self.first is None and name == "on_trial_start":
                    self.first = self.mark = self.snapshot()

        setattr(cls, name, timed)
        self.undo.append((cls, name, orig))

    def restore(self) -> None:
        for cls, name, orig in reversed(self.undo):
            setattr(cls, name, orig)

    def trial_ended(self) -> None:
        self.finished += 1
        if self.finished % self.slice_n == 0:
            self.close_slice()

    def close_slice(self) -> None:
        now = self.snapshot()
        m = self.mark
        if m is None or now["n"] == m["n"]:
            return
        n = now["n"] - m["n"]
        d = {g: (now["acc"].get(g, 0) - m["acc"].get(g, 0)) * 1e3 / n for g in now["acc"]}
        results = now["calls"].get("record 1 result", 0) - m["calls"].get("record 1 result", 0)
        rec = (now["acc"].get("record 1 result", 0) - m["acc"].get("record 1 result", 0)) * 1e3 / max(results, 1)
        row = {"trials": f"{m['n']}-{now['n']}", "trials_per_s": n / (now["t"] - m["t"]),
               "cpu_s_per_trial": (now["cpu"] - m["cpu"]) / n, "rss_mb": now["rss"], "record_result_ms": rec,
               **{f"{g} ms/trial": v for g, v in d.items() if g != "record 1 result"}}
        self.slices.append(row)
        print("  slice " + json.dumps(row, default=lambda v: round(v, 3)), flush=True)
        self.mark = now


def install(probe: Probe) -> None:
    from ray.tune.execution.tune_controller import TuneController

    from uda_ray.search.callbacks import ResultsCallback
    from uda_ray.search.scheduler import ResumableASHA
    from uda_ray.search.searcher import PruneAwareOptunaSearch

    for name in ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error", "on_step_end"):
        probe.wrap(ResultsCallback, name, "uda_ray callback")
    probe.wrap(PruneAwareOptunaSearch, "suggest", "Optuna suggest")
    for name in ("on_trial_result", "on_trial_complete"):
        probe.wrap(PruneAwareOptunaSearch, name, "Optuna tell")
    for name in ("on_trial_result", "on_trial_add", "on_trial_complete"):
        cls = ResumableASHA if name in ResumableASHA.__dict__ else ResumableASHA.__mro__[1]
        if name not in cls.__dict__:
            continue
        probe.wrap(cls, name, "ASHA")
    probe.wrap(TuneController, "save_to_dir", "Tune checkpoint")


def install_result_timer(probe: Probe) -> None:
    """ResultsCallback.on_trial_result timed on its own too (inside the callback group's wrapper)."""
    from uda_ray.search.callbacks import ResultsCallback

    inner = ResultsCallback.__dict__["on_trial_result"]
    probe.undo.insert(0, (ResultsCallback, "on_trial_result", inner))

    @functools.wraps(inner)
    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            probe.acc["record 1 result"] += time.perf_counter() - t0
            probe.calls["record 1 result"] += 1

    ResultsCallback.on_trial_result = timed


def timed_cmd(args: list[str], env: dict) -> float:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "uda_ray.cli", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"  {' '.join(args[:2])} failed: {r.stderr.strip().splitlines()[-1:]}", flush=True)
    return time.time() - t0


def run_size(n: int, a: argparse.Namespace, tmp: Path, profile: str | None) -> dict:
    import uda_ray
    from uda_ray import api

    storage, name = tmp / "runs", f"scale{n}"
    space = write_space(tmp, n, a.evals, a.concurrent)
    probe = Probe(a.slice)
    install(probe)
    install_result_timer(probe)
    print(f"== {n} trials ({a.evals} evaluations each, {a.concurrent} at a time), storage {storage}", flush=True)
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0, cpu0 = time.time(), time.process_time()
    try:
        uda_ray.sweep(space, storage=storage, name=name)
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
        probe.restore()
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    if probe.finished % a.slice:
        probe.close_slice()
    first, last = probe.first or {}, probe.snapshot()
    span = last["t"] - first.get("t", t0)
    out = {"trials": n, "finished": probe.finished, "wall_s": wall, "trials_per_s": probe.finished / span,
           "cpu_s_per_trial": (last["cpu"] - first.get("cpu", cpu0)) / max(probe.finished, 1),
           "cpu_s_total": cpu, "rss_start_mb": first.get("rss"), "rss_end_mb": last["rss"],
           "record_result_ms_first_slice": probe.slices[0]["record_result_ms"] if probe.slices else None,
           "record_result_ms_last_slice": probe.slices[-1]["record_result_ms"] if probe.slices else None}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(uda_ray.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out["best_cmd_s"] = timed_cmd(["best", name, "--storage", str(storage)], env)
    t = time.time()
    api.leaderboard(name, storage=storage)
    out["best_inprocess_s"] = time.time() - t
    if not a.no_report:
        out["report_cmd_s"] = timed_cmd(["report", name, "--storage", str(storage), "--out",
                                         str(tmp / f"{name}.html"), "--no-predictions"], env)
    t = time.time()
    uda_ray.resume(name, storage=storage)
    out["resume_s"] = time.time() - t
    print("  result " + json.dumps(out, default=lambda v: round(v, 3)), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--evals", type=int, default=4, help="evaluations per trial (default 4)")
    ap.add_argument("--concurrent", type=int, default=8, help="trials at a time (default 8)")
    ap.add_argument("--slice", type=int, default=1000, help="print a line every this many finished trials")
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    ap.add_argument("--profile", help="cProfile the driver during the first size into this pstats file")
    ap.add_argument("--no-report", action="store_true", help="skip timing `uda-ray report`")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="uda_ray_scale_") as t:
        tmp = a.keep or Path(t)
        tmp.mkdir(parents=True, exist_ok=True)
        results = [run_size(n, a, tmp, a.profile if i == 0 else None) for i, n in enumerate(a.sizes)]
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        print(f"per-trial driver CPU at {hi['trials']} / at {lo['trials']}: "
              f"{hi['cpu_s_per_trial'] / lo['cpu_s_per_trial']:.2f}x (target <= 1.5x); RSS growth "
              f"{(hi['rss_end_mb'] - hi['rss_start_mb']) / hi['trials'] * 1000:.1f} MB per 1,000 trials "
              "(target <= 50)")


if __name__ == "__main__":
    main()
