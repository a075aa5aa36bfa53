"""A full `fit` step (data loading included) vs the same plain PyTorch step on preloaded tensors.

    python benchmarks/fit_step.py [--steps 8] [--repeats 3] [--batch 2] [--workers 0]

Generates the synthetic benchmark at GTA5's frame size (1914x1052 PNGs, a few images), then runs `fit`
(source_only, BiSeNet-R18, source resized to 1280x720 as GTA5 training does, random crop `--crop`, flip) in
this process, timing each step from one step's start to the next one's (so the wait for the next batch
counts), and a plain step (same model, loss and optimizer) on preloaded tensors of the same shape, side by
side: decoding every time, and with the decoded-once cache (`data.cache_dir`, filled before timing).
Crop and batch are smaller than GTA5 training's (1024x512, batch 8) so that a run takes minutes on 2 CPUs;
per-step data costs scale with the images per step, compute with the pixels.
Prints the minimum and the median step time of each and the overhead over the plain step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import parse, parser, plain_optimizer, plain_step

import uda_ray.training.loop as train_mod
from uda_ray.build import build_experiment, build_method
from uda_ray.data.synthetic import generate
from uda_ray.training.loop import fit
from uda_ray.training.sessions import LocalSession

GTA5_SIZE = (1914, 1052)


def experiment(root: Path, a: argparse.Namespace, cache: Path | None) -> dict:
    return {
        "name": "bench", "seed": 0,
        "data": {"source": "gta5", "target": "cityscapes", "source_root": str(root / "gta5"),
                 "target_root": str(root / "cityscapes"), "source_size": [1280, 720], "target_size": [320, 176],
                 "crop_size": list(a.crop), "loader_workers": a.workers,
                 "cache_dir": str(cache) if cache else None},
        "model": {"name": "bisenet_r18", "num_classes": 19},
        "optim": {"name": "sgd", "lr": 1e-3},
        "train": {"max_steps": a.steps, "eval_every": a.steps, "batch_size": a.batch, "profile": False},
        "method": "source_only",
    }


def timed_fit(raw: dict, run_dir: Path) -> list[float]:
    """Step-to-step intervals of one fit run (the first two, warm-up and loader start, dropped)."""
    starts: list[float] = []
    real = train_mod.train_step

    def stamped(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        starts.append(time.perf_counter())
        return real(*args, **kw)

    train_mod.train_step = stamped
    try:
        fit(build_experiment(raw), LocalSession(run_dir))
    finally:
        train_mod.train_step = real
    return [b - a for a, b in zip(starts, starts[1:])][2:]


def main() -> None:
    ap = parser(__doc__, repeats=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--crop", type=int, nargs=2, default=(512, 256), metavar=("W", "H"))
    ap.add_argument("--workers", type=int, default=0, help="data.loader_workers")
    a = parse(ap)
    with tempfile.TemporaryDirectory(prefix="uda_ray_fit_bench_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        root = generate(tmp / "synth", n_source=2 * a.batch, n_target=2, n_val=1, size=GTA5_SIZE, seed=0)
        print(f"synthetic benchmark at {GTA5_SIZE[0]}x{GTA5_SIZE[1]} written in {time.perf_counter() - t0:.0f} s")
        configs = {"decoding every time": experiment(root, a, None),
                   "decoded-once cache": experiment(root, a, tmp / "cache")}
        timed_fit(configs["decoded-once cache"], tmp / "fill")  # fills the cache (and warms everything up)

        cfg = build_experiment(configs["decoding every time"])
        torch.manual_seed(0)
        method = build_method(cfg, None, "cpu")
        model = copy.deepcopy(method.model_raw)
        opt = plain_optimizer(model, cfg.optim)
        aux = tuple(model.aux_weights)
        cw, ch = a.crop
        x = torch.rand(a.batch, 3, ch, cw) * 255
        y = torch.randint(0, 19, (a.batch, ch, cw))

        def plain() -> float:
            start = time.perf_counter()
            plain_step(model, opt, x, y, aux)
            return time.perf_counter() - start

        times: dict[str, list[float]] = {"plain step, preloaded tensors": [], **{k: [] for k in configs}}
        for r in range(a.repeats):
            for i, (name, raw) in enumerate(configs.items()):
                times[name] += timed_fit(raw, tmp / f"run_{r}_{i}")  # a fresh run folder: no resume
                times["plain step, preloaded tensors"] += [plain() for _ in range(a.steps - 3)]
        base = times["plain step, preloaded tensors"]
        print(f"BiSeNet-R18 source_only, batch {a.batch}, crop {cw}x{ch} of 1280x720-resized {GTA5_SIZE[0]}x"
              f"{GTA5_SIZE[1]} PNGs, loader_workers {a.workers}, {torch.get_num_threads()} threads; "
              f"per step over {len(base)} steps each:")
        for name, t in times.items():
            print(f"  {name:<32s} min {min(t) * 1000:8.1f} ms  median {statistics.median(t) * 1000:8.1f} ms   "
                  f"over plain: min {100 * (min(t) / min(base) - 1):+6.1f}%  "
                  f"median {100 * (statistics.median(t) / statistics.median(base) - 1):+6.1f}%")


if __name__ == "__main__":
    main()
