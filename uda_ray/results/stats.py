"""The statistics the results are summarised with: finite values, Spearman's rank correlation, Pareto fronts.

Pure Python (no torch, Ray or pyarrow), and the one implementation of each: the HTML report, the queries
(`uda-ray best` on a multi-objective sweep) and the validator study (`uda-ray validators`) all call these,
so they print the same numbers for the same values. The rules, chosen once:

- finite: an int or a float (not a bool) that is neither NaN nor infinite. Anything else (None, NaN, inf,
  text) is a value the row does not have.
- ranks: 1-based; ties share the mean of the ranks they span ("average" ranks, scipy.stats.rankdata's
  default). They do not depend on the order of the input, and negating the values reverses them exactly,
  so Spearman(-x, y) == -Spearman(x, y).
- Spearman's rho: Pearson's r of the two rank vectors. Defined from MIN_POINTS = 2 points on (two distinct
  points give +1 or -1); NaN with fewer, or when either side is constant.
- Pareto: a point dominates another when it is at least as good in every objective and strictly better in
  one, each objective in its own direction ("max" or "min"). Identical points do not dominate each other:
  ties stay on the front together.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

MIN_POINTS = 2  # the fewest points Spearman's rho is computed from


def finite(v: Any) -> bool:
    """True for an int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def rankdata(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span: [10, 20, 20, 30] -> [1, 2.5, 2.5, 4]."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho of paired finite values (average ranks for ties); NaN with fewer than MIN_POINTS pairs
    or when either side is constant. ValueError when the lengths differ or a value is not finite."""
    if len(x) != len(y):
        raise ValueError("spearman: x and y differ in length")
    if not all(finite(v) for v in (*x, *y)):
        raise ValueError("spearman: every value must be a finite number (filter with stats.finite first)")
    if len(x) < MIN_POINTS:
        return math.nan
    rx, ry = rankdata(x), rankdata(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """`a` is at least as good as `b` in every objective and better in one (modes: "max" or "min" each)."""
    signs = [_sign(m) for m in modes]
    return (all(s * x >= s * y for s, x, y in zip(signs, a, b))
            and any(s * x > s * y for s, x, y in zip(signs, a, b)))


def non_dominated(points: Iterable[tuple[Hashable, Sequence[float]]], modes: Sequence[str]) -> set:
    """The keys of the (key, values) points that no other point dominates: the Pareto front."""
    points = list(points)
    return {k for k, v in points if not any(dominates(w, v, modes) for _, w in points)}


def _sign(mode: str) -> float:
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    return 1.0 if mode == "max" else -1.0
