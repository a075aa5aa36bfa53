"""What the benchmark scripts share: their command line, side-by-side timing, the plain PyTorch step they are
compared with, and the lines that print ratios.

Timing: the candidates run interleaved in one process, several rounds, the minimum kept. The minimum of
interleaved repetitions is the least noisy estimate of a CPU cost on a shared machine (others' jobs only ever
add time); the ratios printed by the benchmarks are ratios of these minima.

Run a script as `python benchmarks/NAME.py`: Python puts this folder first on sys.path, so the scripts'
`from _common import ...` finds this file.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any


def parser(doc: str | None, *, repeats: int | None = None, threads: int | None = None,
           image: tuple[int, int, int] | None = None) -> argparse.ArgumentParser:
    """The script's parser, described by the first line of its docstring `doc`, with the options several
    benchmarks share (each given a default here only where the script asks for it): --repeats N (timed
    rounds), --threads N (torch threads), --batch/--height/--width (the synthetic input batch `image`)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    if repeats is not None:
        ap.add_argument("--repeats", type=int, default=repeats, help=f"timed rounds, the minimum kept (default "
                        f"{repeats})")
    if threads is not None:
        ap.add_argument("--threads", type=int, default=threads,
                        help=f"torch threads (default {threads}; 1: least disturbed by other jobs)")
    if image is not None:
        for flag, default in zip(("--batch", "--height", "--width"), image):
            ap.add_argument(flag, type=int, default=default)
    return ap


def parse(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed command line; with --threads, torch's thread count is set before anything is built."""
    a = ap.parse_args()
    if getattr(a, "threads", None) is not None:
        import torch

        torch.set_num_threads(a.threads)
    return a


def best_of(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """{name: minimum seconds of one call}, the candidates called in turn `repeats` times after `warmup`.
    `clock`: wall-clock by default; `time.process_time` for this process's CPU time (robust to other jobs)."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            t0 = clock()
            fn()
            best[name] = min(best[name], clock() - t0)
    return best


def print_table(best: dict[str, float], baseline: str, unit: str = "ms") -> None:
    """One line per candidate: its time and the baseline's time divided by it (higher = faster)."""
    scale = 1000.0 if unit == "ms" else 1.0
    for name, t in best.items():
        print(f"  {name:<44s} {t * scale:10.1f} {unit}   speed-up vs {baseline}: {best[baseline] / t:6.2f}x")


def change(t: float, base: float, digits: int = 2) -> str:
    """`t` relative to `base` as a signed percentage, e.g. "+2.70%"."""
    return f"{100 * (t / base - 1):+.{digits}f}%"


def plain_optimizer(model: Any, optim: Any) -> Any:
    """The optimizer a hand-written loop would build for `model` (its parameter groups when it has them)."""
    from uda_ray.training.optim import build_optimizer

    groups = model.param_groups(optim.lr) if hasattr(model, "param_groups") else model.parameters()
    return build_optimizer(groups, optim)


def plain_step(model: Any, opt: Any, x: Any, y: Any, aux: tuple[float, ...]) -> None:
    """One hand-written PyTorch training step, the baseline of the loop benchmarks: source CE (+ the model's
    auxiliary heads, weights `aux`) on ready float images `x` (B, 3, H, W) and int64 labels `y` (B, H, W)."""
    from uda_ray.methods.base import seg_loss

    model.train()
    opt.zero_grad(set_to_none=True)
    seg_loss(model(x), y, aux).backward()
    opt.step()


def eval_setup(experiment: str, overrides: list[str]) -> tuple[Any, dict, Any]:
    """An experiment's config with its data prepared, its evaluation loaders (test, src_val, holdout, ...) and
    its splits: what the evaluation benchmarks time, without the training sets."""
    from uda_ray.build import load_experiment
    from uda_ray.config_loader import parse_set
    from uda_ray.data.loading import build_datasets, prepare, splits_of
    from uda_ray.training.evaluate import eval_loaders

    cfg = load_experiment(experiment, parse_set(overrides))
    data = prepare(cfg.data)
    cfg = type(cfg)(**{**cfg.__dict__, "data": data})
    sp = splits_of(data)
    ds = build_datasets(data, source=False, target=False, target_labels=False, splits=sp)
    return cfg, eval_loaders(ds, cfg, 0, 1), sp
