"""Evaluation cost of ATC, DEV, MixVal and EnsV: the held-out passes as they were (source val: confusion matrix;
holdout: entropy, IM, SND, BNM) against the same passes with each new validator, and EnsV's cost per pool member.

    python benchmarks/eval_pool_validators.py [--experiment experiments/synthetic_bisenet_r18_source_only.yaml]
                                              [--repeats 3] [--device cpu|cuda] [--set data.held_out_max=40 ...]

An untrained model of the experiment on its data (the synthetic benchmark is generated under $UDA_RAY_DATA or
./uda_ray_data when needed). Candidates run interleaved in one process, the minimum of `--repeats` kept, in CPU
seconds of this process on a CPU, wall-clock seconds (synchronized) on a GPU. Prints each candidate's time and its
extra seconds over the old pass: ATC + DEV (both from the same samples: source-val pixel samples with features
and losses, the target features at the SND / BNM pixels, one Newton-fitted logistic regression), MixVal (one
more forward pass per held-out image, over its mix, and loading its partner), everything together; and EnsV per
pool member (its held-out forward pass and resize, what `uda-ray ensv` repeats for every kept checkpoint, plus
loading it). The test split alone is timed for scale.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _common import best_of, eval_setup, parse, parser

from uda_ray.build import build_model
from uda_ray.selection.ensv import member_probs
from uda_ray.training.evaluate import evaluate, evaluate_source, evaluate_unlabeled

ROOT = Path(__file__).resolve().parents[1]
ENSV = "EnsV, one pool member's held-out pass"
TEST = "the test split alone (for scale: the rest of an evaluation)"


def main() -> None:
    ap = parser(__doc__, repeats=3, threads=1)
    ap.add_argument("--experiment", default=str(ROOT / "experiments" / "synthetic_bisenet_r18_source_only.yaml"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--set", action="append", default=[])
    args = parse(ap)
    cfg, loaders, sp = eval_setup(args.experiment, args.set)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = build_model(cfg.model).to(dev).eval()
    c, k, seed = cfg.model.num_classes, cfg.data.validator_pixels, cfg.data.split_seed
    src, hold = loaders["src_val"], loaders["holdout"]

    def sync(fn):
        def run():
            out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return out
        return run

    fns = {
        "old: src_val confusion + holdout (entropy, IM, SND, BNM)":
            lambda: (evaluate(model, src, c, dev), evaluate_unlabeled(model, hold, c, dev, k, seed, mixval=False)),
        "+ ATC + DEV":
            lambda: evaluate_unlabeled(model, hold, c, dev, k, seed, evaluate_source(model, src, c, dev, k, seed)[1],
                                       mixval=False),
        "+ MixVal": lambda: (evaluate(model, src, c, dev), evaluate_unlabeled(model, hold, c, dev, k, seed)),
        "+ ATC + DEV + MixVal (what a run now computes)":
            lambda: evaluate_unlabeled(model, hold, c, dev, k, seed, evaluate_source(model, src, c, dev, k, seed)[1]),
        TEST: lambda: evaluate(model, loaders["test"], c, dev),
        ENSV: lambda: member_probs(model, hold, dev, None),
    }
    fns = {n: sync(f) for n, f in fns.items()}
    # CPU time of this process on a CPU (robust to other jobs on a shared machine), wall-clock on a GPU
    clock = time.process_time if dev.type == "cpu" else time.perf_counter
    best = best_of(fns, repeats=args.repeats, clock=clock)
    print(f"splits: {sp.counts()}; device {args.device}; {torch.get_num_threads()} thread(s); "
          f"{'CPU' if dev.type == 'cpu' else 'wall-clock'} seconds, minimum of {args.repeats}")
    base = best[next(iter(best))]
    for name, t in best.items():
        extra = "" if t is base else f"   extra {t - base:+7.3f} s ({100 * (t / base - 1):+6.1f} %)"
        print(f"  {name:<56s} {t:8.3f} s{extra if name not in (ENSV, TEST) else ''}")
    print(f"EnsV over a pool of M kept checkpoints: M x {best[ENSV]:.3f} s plus loading each checkpoint, once "
          "after the sweep (not per evaluation)")


if __name__ == "__main__":
    main()
