"""Side-by-side timing: the candidates run interleaved in one process, several rounds, the minimum kept.

The minimum of interleaved repetitions is the least noisy estimate of a CPU cost on a shared machine (others'
jobs only ever add time); the ratios printed by the benchmarks are ratios of these minima.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """{name: minimum seconds of one call}, the candidates called in turn `repeats` times after `warmup`."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def print_table(best: dict[str, float], baseline: str, unit: str = "ms") -> None:
    """One line per candidate: its time and the baseline's time divided by it (higher = faster)."""
    scale = 1000.0 if unit == "ms" else 1.0
    for name, t in best.items():
        print(f"  {name:<44s} {t * scale:10.1f} {unit}   speed-up vs {baseline}: {best[baseline] / t:6.2f}x")
