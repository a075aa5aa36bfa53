"""Evaluation cost of the splits and validators: test-split evaluation alone (the evaluation before them)
vs every evaluation a run now makes (test + source val + label-free validators on the target holdout).

    python benchmarks/eval_validators.py [--experiment experiments/synthetic_bisenet_r18_source_only.yaml]
                                         [--repeats 3] [--set data.validator_pixels=64 ...]

Builds the experiment's datasets (the synthetic benchmark is generated under $UDA_RAY_DATA or ./uda_ray_data
when needed), an untrained model, and times both evaluations interleaved in one process (minimum of
`--repeats`), wall-clock and CPU time of this process (the latter robust to other jobs on a shared
machine). Prints both times, their ratios, and the split sizes, then where the extra CPU time goes: each
held-out split's evaluation, its data loading alone, and the validators' arithmetic alone (entropy / IM
sums, SND, BNM on the held-out softmax, without the forward pass), each as a percentage of the test-only
evaluation.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _common import best_of, eval_setup, parse, parser

from uda_ray.build import build_model
from uda_ray.selection.validators import ValidatorAccumulator, bnm, snd
from uda_ray.training.evaluate import evaluate, evaluate_splits, evaluate_unlabeled, name_key

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = parser(__doc__, repeats=3, threads=1)
    ap.add_argument("--experiment", default=str(ROOT / "experiments" / "synthetic_bisenet_r18_source_only.yaml"))
    ap.add_argument("--set", action="append", default=[])
    args = parse(ap)
    cfg, loaders, sp = eval_setup(args.experiment, args.set)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.normalize).eval()
    dev = torch.device("cpu")
    fns = {
        "test split only (before)": lambda: evaluate(model, loaders["test"], cfg.model.num_classes, dev),
        "test + src_val + validators (now)": lambda: evaluate_splits(model, loaders, cfg, dev),
    }
    best = best_of(fns, repeats=args.repeats)
    # CPU time of this process (one thread): what the evaluation costs, whatever else runs on the machine
    cpu = best_of(fns, repeats=args.repeats, warmup=0, clock=time.process_time)
    print(f"splits: {sp.counts()}")
    for k in fns:
        print(f"  {k:<36s} wall {best[k]:8.2f} s   cpu {cpu[k]:8.2f} s")
    (a, b), (ca, cb) = best.values(), cpu.values()
    print(f"ratio now / before: wall {b / a:.3f}, cpu {cb / ca:.3f}")
    breakdown(model, loaders, cfg, dev, ca, args.repeats)


@torch.no_grad()
def breakdown(model, loaders: dict, cfg, dev: torch.device, test_cpu: float, repeats: int) -> None:
    """CPU time of each part of the extra evaluation, as a percentage of the test-only evaluation."""
    c, k, seed = cfg.model.num_classes, cfg.data.validator_pixels, cfg.data.split_seed
    items = list(loaders["holdout"])
    probs = [model(it["img"].to(dev))["out"].float().softmax(1) for it in items]
    keys = [[name_key(n) for n in it["name"]] for it in items]

    def math_only() -> dict:
        acc = ValidatorAccumulator(c, pixels_per_image=k, seed=seed)
        for p, idx in zip(probs, keys):
            acc.update(p, idx)
        return acc.compute()

    acc = ValidatorAccumulator(c, pixels_per_image=k, seed=seed)
    for p, idx in zip(probs, keys):
        acc.update(p, idx)
    sample = torch.cat([s for _, s in sorted(acc.samples, key=lambda s: s[0])])
    parts = [
        ("src_val: evaluation (load + forward + confusion)", lambda: evaluate(model, loaders["src_val"], c, dev)),
        ("  of which loading the images alone", lambda: list(loaders["src_val"])),
        ("holdout: evaluation (load + forward + validators)",
         lambda: evaluate_unlabeled(model, loaders["holdout"], c, dev, k, seed)),
        ("  of which loading the images alone", lambda: list(loaders["holdout"])),
        ("  of which the validators' arithmetic alone", math_only),
        (f"    of which SND on the {sample.shape[0]}-pixel sample", lambda: snd(sample)),
        (f"    of which BNM on the {sample.shape[0]}-pixel sample", lambda: bnm(sample)),
    ]
    print(f"where the extra CPU time goes (% of the test-only evaluation, {test_cpu:.3f} s):")
    for name, fn in parts:
        t = best_of({name: fn}, repeats, clock=time.process_time)[name]  # one warm-up call, then the minimum
        print(f"  {name:<52s} {t:8.4f} s  {100 * t / test_cpu:6.1f} %")


if __name__ == "__main__":
    main()
