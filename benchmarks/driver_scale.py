"""The sweep driver at scale: N replay trials through the real driver path, its cost per trial as N grows.

    python benchmarks/driver_scale.py [--sizes 1000 10000] [--evals 4] [--concurrent 8] [--slice 1000]
                                      [--keep DIR] [--profile FILE] [--no-report]
    python benchmarks/driver_scale.py --part callback [--sizes 1000 10000]   # uda_ray's own driver work alone
    python benchmarks/driver_scale.py --part optuna [--sizes 1000 10000]     # TPE + journal at N trials
    python benchmarks/driver_scale.py --part queries --source SWEEP_DIR [--sizes 10000]  # best, report at N
    python benchmarks/driver_scale.py --part tune-state --source SWEEP_DIR   # Tune's memory per finished trial

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

The two other parts measure pieces without Ray, so that they reach 10,000 trials in minutes on a shared machine:
`--part callback` drives uda_ray's real results callback (ResultsCallback: the tables, the live line, the
heartbeat poll, the flush before Tune's snapshots) with N trials of `--evals` synthetic results each, as Tune
would call it, and prints the same per-slice lines (CPU s per trial, RSS, ms per result). `--part optuna` is
Optuna's own cost: a study journaled as a sweep's (JournalStorage, JournalFileBackend) filled with N finished
trials, then the time of one TPE ask + tell at that size, and of loading the journal (what a resume does).
`--part tune-state` restores the trials of a finished sweep's Tune experiment state (as a resume does) and
measures, with tracemalloc, the bytes each holds on the driver: the Trial objects, the JSON a snapshot caches on
each, and how much of it is `metric_n_steps`, `metric_analysis` and `last_result`.
`--part queries` copies a finished sweep (`--source`, e.g. one of this script's) with its tables replicated to N
trials (trial ids suffixed, segments of the usual size) and times `uda-ray best` and `uda-ray report` on it.
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


# ------------------------------------------------------------------------------------------------
# parts without Ray


def callback_part(n: int, a: argparse.Namespace, tmp: Path) -> None:
    """uda_ray's ResultsCallback driven as Tune drives it, N trials of `--evals` results, no Ray."""
    from types import SimpleNamespace

    import numpy as np

    from uda_ray.search.callbacks import ResultsCallback
    from uda_ray.training.replay import synthetic_curve

    space = json.loads(write_space(tmp, n, a.evals, a.concurrent).read_text())
    base = json.loads(Path(space["base"]).read_text())
    sweep_dir = tmp / f"callback{n}"
    cb = ResultsCallback({"base_raw": base, "dir": str(sweep_dir)},
                         dict(results_dir=sweep_dir / "results", sweep=sweep_dir.name, metric="uv/im", mode="max",
                              search_seed=0))
    cb.setup()
    rng = np.random.default_rng(0)
    probe, running = Probe(a.slice), []
    probe.first = probe.mark = probe.snapshot()
    print(f"== callback only: {n} trials, {a.evals} results each, {a.concurrent} running at a time", flush=True)
    last_state = time.time()
    for i in range(n):
        params = {"optim.lr": float(10 ** rng.uniform(-4, -1.3)), "optim.momentum": float(rng.uniform(0.8, 0.99)),
                  "optim.weight_decay": float(10 ** rng.uniform(-5, -3))}
        t = SimpleNamespace(trial_id=f"cb_{i:05d}", config={"params": params}, status="RUNNING", local_path=str(tmp))
        cb.on_trial_start(0, running, t)
        running = [*running[-(a.concurrent - 1):], t]
        for m in synthetic_curve(params, [100 * (k + 1) for k in range(a.evals)], 0):
            t0 = time.perf_counter()
            cb.on_trial_result(0, running, t, m)
            probe.acc["record 1 result"] += time.perf_counter() - t0
            probe.calls["record 1 result"] += 1
            cb.on_step_end(0, running)
        cb.on_trial_complete(0, running, t)
        if time.time() - last_state >= 10:  # Tune's experiment snapshot (at most every 10 s)
            cb.get_state()
            last_state = time.time()
        probe.trial_ended()
    cb.on_experiment_end(running)


def optuna_part(n: int, a: argparse.Namespace, tmp: Path) -> None:
    """Optuna alone: a journaled study with N finished trials; one TPE ask + tell, and loading the journal."""
    import numpy as np
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {"lr": optuna.distributions.FloatDistribution(1e-4, 5e-2, log=True),
             "momentum": optuna.distributions.FloatDistribution(0.8, 0.99),
             "wd": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}
    path = tmp / f"optuna{n}.log"
    path.unlink(missing_ok=True)
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(path))), study_name="s",
                                direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    rng = np.random.default_rng(0)
    t0 = time.time()
    for i in range(n):
        p = {"lr": float(10 ** rng.uniform(-4, -1.31)), "momentum": float(rng.uniform(0.8, 0.99)),
             "wd": float(10 ** rng.uniform(-5, -3))}
        state = optuna.trial.TrialState.COMPLETE if i % 3 == 0 else optuna.trial.TrialState.PRUNED
        study.add_trial(optuna.trial.create_trial(params=p, distributions=dists, state=state,
                                                  value=float(rng.uniform()) if i % 3 == 0 else None,
                                                  intermediate_values={100: float(rng.uniform())}))
    fill = time.time() - t0
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        trial = study.ask(dists)
        study.tell(trial, float(rng.uniform()))
        times.append(time.perf_counter() - t)
    t = time.time()
    optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    load = time.time() - t
    print("  optuna " + json.dumps({"trials": n, "tpe_ask_tell_ms_min": min(times) * 1e3,
                                    "tpe_ask_tell_ms_median": sorted(times)[len(times) // 2] * 1e3,
                                    "journal_load_s": load, "journal_mb": path.stat().st_size / 1e6,
                                    "fill_s": fill}, default=lambda v: round(v, 3)), flush=True)


def tune_state_part(n: int, a: argparse.Namespace, tmp: Path) -> None:
    """Bytes per finished trial of Ray Tune's state on the driver, from a sweep's experiment snapshot."""
    import gc
    import tracemalloc

    from ray.tune.experiment import Trial

    data = json.loads(max(Path(a.source, "tune").glob("experiment_state-*.json")).read_text())["trial_data"]

    def heap() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    m0, trials = heap(), []
    for state, meta in data:
        t = Trial.from_json_state(state, stub=True)
        t.restore_run_metadata(meta)
        trials.append(t)
    m1 = heap()
    for t in trials:
        t.get_json_state()  # what a snapshot caches on each trial
    m2, out = heap(), {"trials": len(trials), "numeric_keys_tracked": len(trials[-1].metric_analysis),
                       "snapshot_json_kb": sum(len(s) + len(m) for s, m in data) / len(data) / 1e3}
    for name in ("metric_n_steps", "metric_analysis", "last_result"):  # each freed with the JSON it invalidates
        before = heap()
        for t in trials:
            setattr(t.run_metadata, name, {})
            t.run_metadata.get_json_state()
        out[f"{name}_kb"] = (before - heap()) / len(trials) / 1e3
    tracemalloc.stop()
    print("  tune-state " + json.dumps({**out, "trial_objects_kb": (m1 - m0) / len(trials) / 1e3,
                                        "cached_json_kb": (m2 - m1) / len(trials) / 1e3},
                                       default=lambda v: round(v, 2)), flush=True)


def queries_part(n: int, a: argparse.Namespace, tmp: Path) -> None:
    """`best` and `report` on a copy of a finished sweep whose tables are replicated to N trials."""
    import shutil

    import uda_ray
    from uda_ray.results.tables import FIXED, SEGMENT_ROWS, SegmentTable, atomic_write, read_table, rows_to_table

    src, name = Path(a.source), f"queries{n}"
    dst = tmp / "runs" / name
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "results").mkdir(parents=True)
    for f in ("sweep.json", "space.yaml", "base.yaml", "optuna_journal.log"):
        shutil.copy(src / f, dst / f)
    meta = json.loads((dst / "sweep.json").read_text())
    (dst / "sweep.json").write_text(json.dumps({**meta, "name": name, "num_samples": n, "status": "completed"}))
    trials = read_table(src / "results", "trials")
    copies = -(-n // len(trials))
    ids = [(c, t["trial_id"]) for c in range(copies) for t in trials][:n]
    keep = {(c, tid) for c, tid in ids}

    def rows(table: str) -> list[dict]:
        out = [{**r, "trial_id": f"{r['trial_id']}-{c}", "sweep": name}
               for c in range(copies) for r in read_table(src / "results", table) if (c, r["trial_id"]) in keep]
        return out

    atomic_write(rows_to_table(rows("trials"), FIXED["trials"]), dst / "results" / "trials.parquet")
    for table in ("evals", "class_iou"):
        seg, all_rows = SegmentTable(dst / "results", table), rows(table)
        for i in range(0, len(all_rows), SEGMENT_ROWS[table]):
            seg.insert(all_rows[i:i + SEGMENT_ROWS[table]])
            seg.flush()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(uda_ray.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    storage = str(tmp / "runs")
    out = {"trials": n, "evals_rows": len(read_table(dst / "results", "evals")),
           "best_cmd_s": timed_cmd(["best", name, "--storage", storage], env),
           "report_cmd_s": timed_cmd(["report", name, "--storage", storage, "--out", str(tmp / f"{name}.html"),
                                      "--no-predictions"], env)}
    print("  queries " + json.dumps(out, default=lambda v: round(v, 3)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--evals", type=int, default=4, help="evaluations per trial (default 4)")
    ap.add_argument("--concurrent", type=int, default=8, help="trials at a time (default 8)")
    ap.add_argument("--slice", type=int, default=1000, help="print a line every this many finished trials")
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    ap.add_argument("--profile", help="cProfile the driver during the first size into this pstats file")
    ap.add_argument("--no-report", action="store_true", help="skip timing `uda-ray report`")
    ap.add_argument("--part", choices=["sweep", "callback", "optuna", "queries", "tune-state"], default="sweep",
                    help="sweep: the whole driver on Ray (default); callback / optuna / queries: one part, no Ray")
    ap.add_argument("--source", help="--part queries: a finished sweep folder whose tables are replicated; "
                    "--part tune-state: a finished sweep folder")
    ap.add_argument("--repeats", type=int, default=20, help="--part optuna: TPE asks timed per size")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="uda_ray_scale_") as t:
        tmp = a.keep or Path(t)
        tmp.mkdir(parents=True, exist_ok=True)
        if a.part != "sweep":
            part = {"callback": callback_part, "optuna": optuna_part, "queries": queries_part,
                    "tune-state": tune_state_part}[a.part]
            for n in a.sizes if a.part != "tune-state" else [0]:  # tune-state: the source's size
                part(n, a, tmp)
            return
        results = [run_size(n, a, tmp, a.profile if i == 0 else None) for i, n in enumerate(a.sizes)]
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        print(f"per-trial driver CPU at {hi['trials']} / at {lo['trials']}: "
              f"{hi['cpu_s_per_trial'] / lo['cpu_s_per_trial']:.2f}x (target <= 1.5x); RSS growth "
              f"{(hi['rss_end_mb'] - hi['rss_start_mb']) / hi['trials'] * 1000:.1f} MB per 1,000 trials "
              "(target <= 50)")


if __name__ == "__main__":
    main()
