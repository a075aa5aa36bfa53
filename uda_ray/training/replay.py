"""The learning curves a `train.launcher: replay` trial reports instead of training (no Ray here; the trial is in
uda_ray.training.launchers).

    synthetic_curve   a seeded curve, a pure function of (seed, the trial's parameters, step): the same
                      configuration gets the same curve in every sweep, and the landscape has optima a searcher
                      can find (one smooth bump per parameter, on a log scale for positive values)
    RecordedCurves    the learning curves of a recorded sweep's `evals` table (a tabular benchmark in the manner
                      of HPOBench / NAS-Bench: Eggensperger et al., NeurIPS 2021 Datasets and Benchmarks): a trial
                      gets the recorded trial nearest to its parameters (`match: params`) or the one at its index
                      (`match: index`)
    curve_for         what one trial reports, from its ReplayConfig (recorded tables read once per process)

A replayed evaluation is a metrics dict as the training loop reports it (the step and the reported metric
names of uda_ray.metric_names), so the sweep's driver, searcher, scheduler and tables cannot tell it apart.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from uda_ray.config import ReplayConfig
from uda_ray.data.labels import CLASSES
from uda_ray.errors import UserError
from uda_ray.metric_names import REPORTED_PREFIXES

SYNTHETIC = "synthetic"


def eval_steps(max_steps: int, eval_every: int) -> list[int]:
    """The steps the training loop evaluates at: every `eval_every`, and at the last step."""
    steps = list(range(eval_every, max_steps + 1, eval_every))
    return steps if steps and steps[-1] == max_steps else [*steps, max_steps]


def trial_index(trial_id: str) -> int:
    """The index of a sweep trial from its id `<prefix>_<n:05d>` (uda_ray.search.searcher.TrialIdsInOrder); a
    stable hash of the id for any other name."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else _hash_int(trial_id)


def _hash_int(*parts: Any) -> int:
    text = json.dumps(parts, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


# ------------------------------------------------------------------------------------------------
# synthetic


def _quality(params: dict, seed: int) -> float:
    """In [0, 1]: the mean over the parameters of a bump centred on a seeded optimum per parameter (numbers on a
    log10 scale when positive; a choice gets a seeded score per value). 0.5 without parameters."""
    terms = []
    for k in sorted(params):
        v = params[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            terms.append(np.random.default_rng(_hash_int(seed, k, v)).uniform())
            continue
        x = math.log10(v) if v > 0 else float(v)
        centre = np.random.default_rng(_hash_int(seed, k)).uniform(-3.0, 0.0)
        terms.append(math.exp(-0.5 * (x - centre) ** 2))
    return float(np.mean(terms)) if terms else 0.5


def synthetic_curve(params: dict, steps: list[int], seed: int) -> list[dict[str, float]]:
    """One metrics dict per step in `steps` (the last is the run's end): a saturating test mIoU whose final value
    grows with the configuration's quality, per-class IoUs around it, and the label-free validators, source
    validation, training and model metrics a run reports, all deterministic in (seed, params, step)."""
    rng = np.random.default_rng(_hash_int(seed, params))
    final = float(np.clip(0.15 + 0.45 * _quality(params, seed) + 0.03 * rng.standard_normal(), 0.01, 0.95))
    class_factor = np.random.default_rng(_hash_int(seed, "classes")).uniform(0.3, 1.7, len(CLASSES))
    lr = float(params.get("optim.lr", 0.01)) if isinstance(params.get("optim.lr"), (int, float)) else 0.01
    last = steps[-1]
    out = []
    for s in steps:
        frac = s / last
        v = final * (1 - math.exp(-4 * frac)) / (1 - math.exp(-4)) + 0.01 * rng.standard_normal()
        ious = np.clip(v * class_factor + 0.02 * rng.standard_normal(len(CLASSES)), 0.0, 1.0)
        miou = float(ious.mean())
        m = {"step": s, "test/miou": miou, "test/pixel_acc": min(0.99, 0.5 + 0.45 * miou),
             **{f"test/iou/{c}": float(i) for c, i in zip(CLASSES, ious)},
             "src_val/miou": min(0.99, miou + 0.2), "src_val/pixel_acc": min(0.99, 0.7 + 0.3 * miou),
             "uv/entropy": max(0.01, 0.6 - 0.5 * miou), "uv/im": 0.1 + 0.5 * miou + 0.01 * rng.standard_normal(),
             "uv/snd": 0.2 + 0.3 * miou, "uv/bnm": 0.1 + 0.4 * miou,
             "train/lr": lr * (1 - min(frac, 0.999)) ** 0.9, "train/loss/ce": 2.5 * (1 - miou),
             "model/params": 13.3e6, "model/gflops": 26.0, "model/latency_ms": 11.0, "model/fps": 90.9}
        out.append(m)
    return out


# ------------------------------------------------------------------------------------------------
# recorded


def recorded_results_dir(source: str | Path) -> Path:
    """The results folder of a recorded source: a sweep (or run) folder, its results/ folder, or the evals table
    itself; UserError when there is no evals table there."""
    p = Path(source).expanduser()
    for cand in (p / "results", p, p.parent):
        if (cand / "evals.parquet").exists():
            return cand.absolute()
    raise UserError(f"train.replay.source: {source}: no recorded sweep there (no evals.parquet in it, "
                    "nor in its results/ folder); give 'synthetic' or a sweep's folder")


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


class RecordedCurves:
    """The learning curves of a recorded results folder: {trial_id: [metrics per evaluation, by step]} and each
    trial's parameters (from its `trials` row)."""

    def __init__(self, results_dir: Path) -> None:
        from uda_ray.results.tables import read_table

        self.dir = Path(results_dir)
        curves: dict[str, list[dict]] = {}
        for r in read_table(self.dir, "evals"):
            m = {k: float(v) for k, v in r.items()
                 if k.startswith(REPORTED_PREFIXES) and isinstance(v, (int, float)) and v == v}
            curves.setdefault(r["trial_id"], []).append({"step": int(r["step"]), **m})
        if not curves:
            raise UserError(f"train.replay.source: {self.dir}: the recorded evals table has no evaluation")
        self.curves = {t: sorted(c, key=lambda m: m["step"]) for t, c in sorted(curves.items())}
        self.ids = list(self.curves)
        params = {r["trial_id"]: json.loads(r.get("params") or "{}") for r in read_table(self.dir, "trials")}
        self.params = {t: params.get(t, {}) for t in self.ids}
        self._scales = self._param_scales()

    def _param_scales(self) -> dict[str, tuple[bool, float, float]]:
        """Per numeric parameter: (log scale?, low, high) over the recorded values (log when all positive and
        spanning 10x or more)."""
        out = {}
        keys = {k for p in self.params.values() for k in p}
        for k in sorted(keys):
            vals = [p[k] for p in self.params.values() if k in p]
            if not vals or not _numeric(vals):
                continue
            log = min(vals) > 0 and max(vals) >= 10 * min(vals)
            xs = [math.log10(v) if log else float(v) for v in vals]
            out[k] = (log, min(xs), max(xs))
        return out

    def _distance(self, a: dict, b: dict) -> float:
        d = 0.0
        for k in set(a) | set(b):
            if k not in a or k not in b:
                d += 1.0
            elif k in self._scales and _numeric([a[k], b[k]]):
                log, lo, hi = self._scales[k]
                xa, xb = ((math.log10(v) if log and v > 0 else float(v)) for v in (a[k], b[k]))
                d += ((xa - xb) / (hi - lo)) ** 2 if hi > lo else float(xa != xb)
            else:
                d += float(a[k] != b[k])
        return d

    def nearest(self, params: dict) -> str:
        """The recorded trial whose parameters are nearest to `params` (the first by trial id on a tie)."""
        return min(self.ids, key=lambda t: self._distance(params, self.params[t]))

    def curve(self, params: dict, index: int, match: str) -> list[dict[str, float]]:
        tid = self.nearest(params) if match == "params" else self.ids[index % len(self.ids)]
        return [dict(m) for m in self.curves[tid]]


_RECORDED: dict[str, RecordedCurves] = {}  # per process: a reused trial process reads a table once


def recorded(source: str | Path) -> RecordedCurves:
    d = recorded_results_dir(source)
    if str(d) not in _RECORDED:
        _RECORDED[str(d)] = RecordedCurves(d)
    return _RECORDED[str(d)]


def check_source(replay: ReplayConfig) -> None:
    """On the driver, before a sweep starts: a recorded source exists and holds evaluations (UserError if not)."""
    if replay.source != SYNTHETIC:
        recorded(replay.source)


def curve_for(replay: ReplayConfig, params: dict, index: int, max_steps: int, eval_every: int) -> list[dict]:
    """What trial number `index` with sampled `params` reports, evaluation by evaluation."""
    if replay.source == SYNTHETIC:
        return synthetic_curve(params, eval_steps(max_steps, eval_every), replay.seed)
    return recorded(replay.source).curve(params, index, replay.match)
