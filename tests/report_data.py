"""A tiny sweep folder made in-process, Ray-free, for the report tests.

Two trials really train (LocalSession, bisenet_r18 on the tiny synthetic benchmark, 4 steps) and leave
checkpoints; four more are table-only (values written with the ResultsWriter) so that the sweep has an
early-stopped trial, an errored one, enough completed trials for PED-ANOVA, and a Pareto front over
(selection metric, model/gflops).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import tiny_experiment
from uda_ray.build import build_experiment
from uda_ray.config import experiment_dict
from uda_ray.results.tables import ResultsWriter
from uda_ray.training.loop import fit
from uda_ray.training.sessions import LocalSession

SPACE = {"optim.lr": {"loguniform": [1.0e-3, 1.0e-1]}, "optim.momentum": {"uniform": [0.8, 0.99]}}


def _test_key(report: dict) -> str:
    return "test/miou" if "test/miou" in report else "val/miou"


def selection_metric(report: dict) -> str:
    """A selection metric that is not the test metric. src_val/miou first: after 4 steps it is far below
    the table-only trials' values, which the Pareto test relies on (uv/im of an untrained model is not)."""
    for k in ("src_val/miou", "uv/im", "sel/miou"):
        if k in report:
            return k
    return "sel/miou"


def make_sweep(root: Path, synth_root: Path, multi: bool = True, constraints: list[dict] | None = None) -> Path:
    d = Path(root) / "tinysweep"
    res = d / "results"
    sessions = []
    for i, lr in enumerate((0.01, 0.05)):
        params = {"optim.lr": lr, "optim.momentum": 0.9}
        cfg = build_experiment(tiny_experiment(synth_root, **params, **{"train.profile": True}))
        s = LocalSession(d / "train" / f"t{i}")
        fit(cfg, s)
        sessions.append((f"t{i}", cfg, params, s))
    first = sessions[0][3].reports[0]
    test_key, sel = _test_key(first), selection_metric(first)
    objectives = [{"metric": sel, "mode": "max"}] + ([{"metric": "model/gflops", "mode": "min"}] if multi else [])
    w = ResultsWriter(res, d.name, sel, "max", 0)
    for tid, cfg, params, s in sessions:
        exp = experiment_dict(cfg)
        w.start(tid, exp, params)
        for r in s.reports:
            r = dict(r)
            if sel == "sel/miou":  # the loop reports no separate selection metric: derive one for the plots
                r["sel/miou"] = 0.9 * r[test_key] + 0.01
            r["checkpoint_path"] = str(s.run_dir / "checkpoints" / f"step_{int(r['step']):07d}")
            w.result(tid, exp, params, r)
        w.end(tid, exp, params, "completed")
    # table-only trials: a cheaper model on the front, an early stop, an error, more completed points
    template = dict(sessions[0][3].reports[-1])
    exp = experiment_dict(sessions[0][1])
    fake = [("t2", 0.002, 0.95, [2, 4], 0.30, 5.0, "completed"), ("t3", 0.08, 0.85, [2, 4], 0.05, 1.0, "completed"),
            ("t4", 0.004, 0.82, [2, 4], 0.22, 9.0, "completed"), ("t5", 0.03, 0.97, [2], 0.01, 2.0, "completed"),
            ("t6", 0.09, 0.88, [2], 0.02, 2.0, "errored")]
    for tid, lr, mom, steps, v, gflops, status in fake:
        params = {"optim.lr": lr, "optim.momentum": mom}
        w.start(tid, exp, params)
        for st in steps:
            r = {**template, "step": st, test_key: v * st / 4, sel: 0.9 * v * st / 4 + 0.01, "model/gflops": gflops,
                 "checkpoint_path": None}
            w.result(tid, exp, params, r)
        w.end(tid, exp, params, status, "boom" if status == "errored" else None)
    meta = {"name": d.name, "objective": objectives, "seed": 0, "num_samples": 7, "status": "completed",
            "constraints": constraints or []}
    (d / "sweep.json").write_text(json.dumps(meta))
    (d / "space.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "params": SPACE}))
    return d
