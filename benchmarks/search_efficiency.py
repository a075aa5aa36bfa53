"""Search efficiency without re-training: replay searchers and schedulers against recorded learning curves.

    python benchmarks/search_efficiency.py --sweep DIR [DIR ...] [--metric test/miou] [--seeds 30]
    python benchmarks/search_efficiency.py --sweep DIR [DIR ...] --metric uv/im --score test/miou   # label-free
    python benchmarks/search_efficiency.py --record DIR [--grid-steps 30]     # record a small table first

A tabular benchmark in the manner of HPO research (HPOBench / NAS-Bench style): a sweep's Parquet tables
(`results/trials.parquet`, `results/evals.parquet`) hold, for every configuration trained to the end, its
learning curve (the metric at every evaluation). A replayed "trial" trains nothing: it reads its curve from the
table. Only trials whose curve reaches the table's max_steps are used, so record the table without early
stopping (a grid or a random sweep with `scheduler: null`); a table recorded with ASHA keeps only its
survivors, which biases the replay.

Strategies (one trial at a time, a budget in training steps):
- random: Optuna's RandomSampler; tpe: Optuna's TPESampler (seeded, as uda_ray's sweeps);
- asha+random, asha+tpe: the same samplers with asynchronous successive halving (Li et al., "A System for
  Massively Parallel Hyperparameter Tuning", MLSys 2020), implemented here with the stopping rule of Ray Tune's
  ASHAScheduler (rungs at grace * rf^k steps; a trial reaching a rung stops if its value is below the
  (1 - 1/rf) quantile of the values recorded at that rung so far). Stopped trials are told to Optuna as PRUNED
  with their intermediate values, as uda_ray's sweeps do.
A parameter with at most 6 distinct values in the table (a grid's axis) is searched as a categorical over them;
others as a float range. A sampled point maps to the nearest recorded configuration (numeric parameters
normalized over their range, log-scaled when all positive and spanning >= 10x; a categorical mismatch counts 1).
A trial costs the steps it trained (all of max_steps, or up to the rung where ASHA stopped it); only trials
that ran to the end count as found configurations, with their final value. With fewer trials than TPE's 10
random start-up trials, TPE is random search.

`--score` (default: the metric) is what a found configuration is worth: with `--metric uv/im --score
test/miou` the searcher and ASHA see only the label-free validator, as a label-free sweep does, and the
configuration found is the finished trial with the best validator value, worth its test mIoU.

Reports over `--seeds` seeds: how often, and after how many steps (median), each strategy has found a
configuration within `--within` points of the table's best final value; and the regret (table best - best
found) at equal budgets of 2, 4, 8 and 16 full trainings.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------------------------
# the table


def load_table(sweeps: list[Path], metric: str | None,
               score: str | None = None) -> tuple[list[dict], int, str]:
    """[{"params", "curve": {step: value}, "final", "score"}] of the complete curves (the metric's; "score" is the
    `score` metric's final value, default the metric's own), max_steps, metric."""
    from uda_ray.results.tables import read_table

    configs, max_steps = [], None
    for d in sweeps:
        res = d / "results" if (d / "results").is_dir() else d
        trials = read_table(res, "trials")
        evals = read_table(res, "evals")
        if not trials:
            raise SystemExit(f"search_efficiency: no trials table under {res}")
        metric = metric or trials[0]["objective"]
        curves: dict[str, dict[int, float]] = {}
        scores: dict[str, dict[int, float]] = {}
        for r in evals:
            for name, into in ((metric, curves), (score or metric, scores)):
                v = r.get(name)
                if v is not None and v == v:
                    into.setdefault(r["trial_id"], {})[int(r["step"])] = float(v)
        for t in trials:
            ms = int(t["max_steps"])
            if max_steps is None:
                max_steps = ms
            if ms != max_steps:
                raise SystemExit(f"search_efficiency: tables with different max_steps ({max_steps}, {ms})")
            c, sc = curves.get(t["trial_id"], {}), scores.get(t["trial_id"], {})
            if c and max(c) >= ms and sc and max(sc) == max(c):
                configs.append({"params": json.loads(t["params"]), "curve": dict(sorted(c.items())),
                                "final": c[max(c)], "score": sc[max(sc)]})
    if len(configs) < 2:
        raise SystemExit("search_efficiency: fewer than 2 configurations with a complete curve in the table")
    return configs, int(max_steps), str(metric)


def value_at(curve: dict[int, float], step: int) -> float:
    """The metric at the last evaluation at or before `step` (the rung a scheduler sees)."""
    steps = [s for s in curve if s <= step]
    return curve[max(steps)] if steps else float("nan")


GRID_MAX_VALUES = 6  # a parameter with this few distinct values (a grid axis) is searched as a categorical


class Space:
    """Optuna distributions inferred from the table, and the nearest recorded configuration of a point.

    A parameter with few distinct values (a grid's axis) becomes a categorical over them; other numeric ones
    a float range over the recorded values (log-scaled when positive and spanning >= 10x)."""

    def __init__(self, configs: list[dict]) -> None:
        import optuna

        keys = sorted({k for c in configs for k in c["params"]})
        self.keys, self.configs, self.dists, self.log, self.span = keys, configs, {}, {}, {}
        for k in keys:
            vals = [c["params"].get(k) for c in configs]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
            if numeric and len(set(vals)) > GRID_MAX_VALUES:
                lo, hi = float(min(vals)), float(max(vals))
                log = lo > 0 and hi / lo >= 10
                self.log[k] = log
                if hi > lo:
                    self.dists[k] = optuna.distributions.FloatDistribution(lo, hi, log=log)
                f = math.log if log else float
                self.span[k] = (f(lo), f(hi))
            else:
                self.dists[k] = optuna.distributions.CategoricalDistribution(sorted({json.dumps(v) for v in vals}))
        self._norm = np.array([[self._coord(k, c["params"].get(k)) for k in keys] for c in configs])

    def _coord(self, k: str, v: object) -> float:
        if k not in self.span:
            return 0.0
        lo, hi = self.span[k]
        x = math.log(v) if self.log[k] else float(v)
        return 0.0 if hi == lo else (x - lo) / (hi - lo)

    def nearest(self, point: dict) -> int:
        d = np.zeros(len(self.configs))
        for j, k in enumerate(self.keys):
            if k in self.span:
                x = self._coord(k, point[k]) if k in point else self._norm[0, j]
                d += (self._norm[:, j] - x) ** 2
            else:
                d += np.array([json.dumps(c["params"].get(k)) != point.get(k) for c in self.configs], float)
        return int(np.argmin(d))


# ------------------------------------------------------------------------------------------------
# the replay


def replay(configs: list[dict], space: Space, max_steps: int, sampler: str, asha: bool, seed: int, budget: int,
           grace: int, rf: int) -> list[tuple[int, float]]:
    """[(steps spent, the score of the best configuration found so far)] after each trial that ran to the end
    (the best by the searched metric's final value; its score is that value unless `--score` names another)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    smp = optuna.samplers.TPESampler(seed=seed) if sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction="maximize", sampler=smp)
    rungs = []
    m = grace
    while asha and m < max_steps:
        rungs.append(m)
        m *= rf
    recorded: dict[int, list[float]] = {r: [] for r in rungs}
    spent, best, trace = 0, None, []
    while spent < budget:
        trial = study.ask(space.dists)
        cfg = configs[space.nearest(trial.params)]
        stopped_at = None
        for r in rungs:
            v = value_at(cfg["curve"], r)
            trial.report(v, r)
            rec = recorded[r]
            cutoff = np.nanpercentile(rec, (1 - 1 / rf) * 100) if rec else None
            rec.append(v)
            if cutoff is not None and v < cutoff:
                stopped_at = r
                break
        cost = stopped_at or max_steps
        if spent + cost > budget:  # the budget ends inside this trial: it finds nothing
            break
        spent += cost
        if stopped_at is None:
            study.tell(trial, cfg["final"])
            best = cfg if best is None or cfg["final"] > best["final"] else best
            trace.append((spent, best["score"]))
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return trace


def steps_to(trace: list[tuple[int, float]], target: float) -> float:
    return next((s for s, b in trace if b >= target), math.inf)


def best_within(trace: list[tuple[int, float]], budget: int) -> float:
    return max((b for s, b in trace if s <= budget), default=-math.inf)


# ------------------------------------------------------------------------------------------------
# recording a small table in-process (the same Parquet schema as a sweep's)


def record(out: Path, steps: int, eval_every: int) -> None:
    """A 3 x 3 grid over MinEnt's entropy weight and the learning rate, BiSeNet-R18 on the synthetic
    benchmark v1 at 128x64, trained in this process (no Ray; checkpoints not kept) and written as a sweep's
    results tables."""
    import itertools

    import torch

    from uda_ray.build import build_experiment
    from uda_ray.config import experiment_dict
    from uda_ray.config_loader import apply_overrides
    from uda_ray.data.loading import prepare
    from uda_ray.results.tables import ResultsWriter
    from uda_ray.training.loop import fit
    from uda_ray.training.sessions import LocalSession

    base = {
        "name": "grid", "seed": 0,
        "data": {"source": "gta5", "target": "cityscapes",
                 # benchmark v1: the grid docs/configuration.md reports; v2 is the default for new runs
                 "synthetic": {"n_source": 48, "n_target": 48, "n_val": 8, "size": [256, 128], "seed": 0,
                               "version": 1},
                 "source_size": [128, 64], "target_size": [128, 64]},
        "model": {"name": "bisenet_r18", "num_classes": 19},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
        "train": {"max_steps": steps, "eval_every": eval_every, "batch_size": 4, "profile": False},
        "method": "minent",
    }
    class NoCheckpoints(LocalSession):
        def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
            super().report(metrics, None)

    torch.set_num_threads(1)  # a loaded machine: no thread oversubscription
    writer = ResultsWriter(out / "results", out.name, "test/miou", "max", None)
    grid = list(itertools.product([0.0, 1e-2, 1e-1], [2.5e-3, 1e-2, 4e-2]))
    for i, (lam, lr) in enumerate(grid):
        params = {"method_cfg.lambda_ent": lam, "optim.lr": lr}
        cfg = build_experiment(apply_overrides(base, params), "grid")
        import dataclasses

        cfg = dataclasses.replace(cfg, data=prepare(cfg.data, out / "data"))
        exp, tid = experiment_dict(cfg), f"grid_{i:02d}"
        writer.start(tid, exp, params)
        s = NoCheckpoints(out / "train" / tid)
        fit(cfg, s)
        for r in s.reports:
            writer.result(tid, exp, params, r)
        writer.end(tid, exp, params, "completed")
        print(f"  {tid} {params}: final test/miou {s.reports[-1]['test/miou']:.4f}", flush=True)


# ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", type=Path, nargs="+", help="sweep folder(s) (or their results/ folders)")
    ap.add_argument("--record", type=Path, help="record a 9-configuration grid into this folder first")
    ap.add_argument("--grid-steps", type=int, default=30)
    ap.add_argument("--grid-eval-every", type=int, default=5)
    ap.add_argument("--metric", help="what the searcher and ASHA see (default: the table's objective)")
    ap.add_argument("--score", help="what a found configuration is worth (default: the metric), e.g. --metric "
                    "uv/im --score test/miou for a label-free search scored by the test labels")
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--within", type=float, default=1.0, help="mIoU points (values in [0, 1] are x100)")
    ap.add_argument("--budget", type=float, default=16, help="in full trainings (x max_steps)")
    ap.add_argument("--grace", type=int,
                    help="ASHA grace period in steps (default: the first evaluated step >= max_steps // 9)")
    ap.add_argument("--rf", type=int, default=3, help="ASHA reduction factor")
    a = ap.parse_args()
    if a.record:
        print(f"recording a grid into {a.record}", flush=True)
        record(a.record, a.grid_steps, a.grid_eval_every)
        a.sweep = (a.sweep or []) + [a.record]
    if not a.sweep:
        ap.error("give --sweep DIR (or --record DIR)")
    configs, max_steps, metric = load_table(a.sweep, a.metric, a.score)
    score = a.score or metric
    finals = [c["score"] for c in configs]
    scale = 100.0 if max(abs(v) for v in finals) <= 1.0 else 1.0  # mIoU points
    top = max(finals)
    target = top - a.within / scale
    eval_steps = sorted({s for c in configs for s in c["curve"]})
    grace = a.grace or next((s for s in eval_steps if s >= max_steps // 9), eval_steps[0])  # an evaluated step
    budget = int(a.budget * max_steps)
    space = Space(configs)
    best_cfg = configs[finals.index(top)]["params"]
    print(f"{len(configs)} configurations with complete curves, max_steps {max_steps}, metric {metric}"
          + (f" (scored by {score})" if score != metric else "") + "; best "
          f"final {top * scale:.2f} ({best_cfg}); {sum(f >= target for f in finals)} within {a.within} point(s); "
          f"ASHA rungs from {grace} steps, reduction factor {a.rf}; budget {a.budget:g} full trainings; "
          f"{a.seeds} seeds")
    budgets = [b for b in (2, 4, 8, 16) if b <= a.budget]
    header = (f"  {'strategy':<12s} {'reached':>8s} {'median steps to reach':>22s}   "
              + "   ".join(f"regret@{b}x" for b in budgets))
    print(header)
    for name, sampler, asha in (("random", "random", False), ("tpe", "tpe", False),
                                ("asha+random", "random", True), ("asha+tpe", "tpe", True)):
        traces = [replay(configs, space, max_steps, sampler, asha, seed, budget, grace, a.rf)
                  for seed in range(a.seeds)]
        reach = [steps_to(t, target) for t in traces]
        hit = [r for r in reach if r < math.inf]
        med = statistics.median(reach)  # inf when most seeds never reach it
        med_s = f"{med:.0f} ({med / max_steps:.1f}x)" if med < math.inf else "not reached"
        regrets = []
        for b in budgets:  # a seed without a finished trial by then counts the table's worst final value
            r = [(top - max(best_within(t, b * max_steps), min(finals))) * scale for t in traces]
            regrets.append(f"{statistics.mean(r):5.2f}±{statistics.pstdev(r):4.2f}")
        print(f"  {name:<12s} {len(hit):>3d}/{len(traces):<4d} {med_s:>22s}   " + "   ".join(regrets), flush=True)
    print("regret: table best - best found, in points, mean ± std over seeds, at budgets of N full trainings "
          "(a seed that had finished no trial by then counts the table's worst final value)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
