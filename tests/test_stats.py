"""uda_ray.results.stats: the one Spearman (average ranks for ties, from 2 points), Pareto front and finite
filter; and the HTML report and `uda-ray validators` printing the same correlation for the same pool."""

from __future__ import annotations

import json
import math

import pytest

from uda_ray.results.stats import MIN_POINTS, dominates, finite, non_dominated, rankdata, spearman

# ------------------------------------------------------------------------------------------------
# finite


def test_finite_accepts_real_numbers_only():
    import numpy as np

    for v in (0, 1, -3, 0.5, 1e300, np.float64(0.25)):
        assert finite(v), v
    for v in (None, math.nan, math.inf, -math.inf, True, False, "1", [1.0], np.float64("nan")):
        assert not finite(v), v


# ------------------------------------------------------------------------------------------------
# ranks and Spearman


def test_rankdata_gives_ties_the_mean_of_their_ranks():
    assert rankdata([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    assert rankdata([5, 5, 5]) == [2, 2, 2]
    assert rankdata([0.3, 0.1, 0.3, 0.2]) == [3.5, 1, 3.5, 2]
    assert rankdata([]) == []


def test_spearman_with_ties_matches_hand_computation():
    # x ranks [1.5, 1.5, 3.5, 3.5], y ranks [1, 2, 3, 4]: deviations [-1, -1, 1, 1] and [-1.5, -.5, .5, 1.5];
    # sxy = 4, sxx = 4, syy = 5 -> 4 / sqrt(20). Ordinal ranks (ties broken by position) would say 1.0.
    assert spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(2 / math.sqrt(5))
    # x ranks [1, 2.5, 2.5, 4], y ranks [1, 3, 2, 4]: sxy = 4.5, sxx = 4.5, syy = 5 -> 4.5 / sqrt(22.5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    # ties on both sides: ranks [1.5, 1.5, 3, 4] and [1, 2.5, 2.5, 4]; sxy = 3.75, sxx = 4.5, syy = 4.5
    assert spearman([0.1, 0.1, 0.2, 0.3], [5, 6, 6, 7]) == pytest.approx(3.75 / 4.5)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


def test_spearman_does_not_depend_on_the_order_of_tied_points_and_is_odd_in_each_side():
    x, y = [0.5, 0.5, 0.3, 0.2, 0.2], [0.2, 0.1, 0.3, 0.3, 0.4]
    rho = spearman(x, y)
    for perm in ([4, 3, 2, 1, 0], [1, 0, 3, 4, 2]):
        assert spearman([x[i] for i in perm], [y[i] for i in perm]) == pytest.approx(rho)
    assert spearman([-v for v in x], y) == pytest.approx(-rho)


def test_spearman_needs_two_points_and_two_values_on_each_side():
    assert MIN_POINTS == 2
    assert spearman([1, 2], [3, 4]) == pytest.approx(1.0)
    assert spearman([1, 2], [4, 3]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1], [1]))
    assert math.isnan(spearman([], []))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant side: undefined
    assert math.isnan(spearman([1, 2], [7, 7]))


def test_spearman_refuses_unequal_lengths_and_missing_values():
    with pytest.raises(ValueError, match="length"):
        spearman([1, 2], [1])
    with pytest.raises(ValueError, match="finite"):
        spearman([1, math.nan, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        spearman([1, 2, 3], [1, None, 3])


# ------------------------------------------------------------------------------------------------
# Pareto


def test_dominates_follows_each_objectives_mode_and_ties_do_not_dominate():
    assert dominates([0.6, 1.0], [0.5, 2.0], ["max", "min"])
    assert dominates([0.6, 2.0], [0.5, 2.0], ["max", "min"])  # equal in one, better in the other
    assert not dominates([0.6, 2.0], [0.5, 1.0], ["max", "min"])  # better in one, worse in the other
    assert not dominates([0.5, 1.0], [0.5, 1.0], ["max", "min"])  # identical: neither dominates
    assert dominates([0.5, 1.0], [0.6, 2.0], ["min", "min"])
    with pytest.raises(ValueError, match="mode"):
        dominates([1], [0], ["up"])


def test_non_dominated_in_max_and_min_modes_keeps_ties_together():
    pts = [("a", [0.5, 1.0]), ("b", [0.6, 2.0]), ("c", [0.4, 2.0]), ("d", [0.5, 1.0])]
    assert non_dominated(pts, ["max", "min"]) == {"a", "b", "d"}  # a and d tie: both on the front
    assert non_dominated(pts, ["min", "max"]) == {"c"}
    assert non_dominated(pts, ["max", "max"]) == {"b"}
    assert non_dominated(pts, ["min", "min"]) == {"a", "c", "d"}
    assert non_dominated([("x", [1.0]), ("y", [1.0]), ("z", [0.5])], ["max"]) == {"x", "y"}
    assert non_dominated([], ["max"]) == set()
    assert non_dominated(iter(pts), ["max", "min"]) == {"a", "b", "d"}  # any iterable, read once


# ------------------------------------------------------------------------------------------------
# the report and `uda-ray validators` agree


def _pool_sweep(root, metric: str, mode: str, sel: list[float], test: list[float]):
    """A sweep folder whose trials have one evaluation each (so the report's selected step, the validators'
    checkpoint and the final checkpoint are the same rows)."""
    from uda_ray.results.tables import ResultsWriter

    d = root / "sw"
    d.mkdir(parents=True)
    (d / "sweep.json").write_text(json.dumps({"name": "sw", "objective": [{"metric": metric, "mode": mode}]}))
    exp = {"seed": 0, "method": "m", "model": {"name": "x"}, "data": {"source": "s", "target": "t"},
           "train": {"max_steps": 2}}
    w = ResultsWriter(d / "results", "sw", metric, mode, 0)
    for i, (s, t) in enumerate(zip(sel, test)):
        w.result(f"t{i}", exp, {}, {"step": 2, metric: s, "test/miou": t})
    return d


POOLS = {
    # ties in the selection metric: ordinal ranks said +1.00 here, average ranks say +0.89
    "tied-selection": ("uv/im", "max", [0.1, 0.1, 0.2, 0.2], [0.1, 0.2, 0.3, 0.4]),
    # a "min" metric with ties on both sides
    "tied-min": ("uv/entropy", "min", [0.5, 0.5, 0.3, 0.2, 0.2], [0.2, 0.1, 0.3, 0.3, 0.4]),
    # two trials: the report once said n/a (it needed 3), the validators table +1/-1
    "two-trials": ("uv/im", "max", [0.3, 0.1], [0.2, 0.4]),
}


@pytest.mark.parametrize("pool", list(POOLS))
def test_the_report_and_the_validators_table_print_the_same_correlation(tmp_path, capsys, pool):
    import pyarrow.parquet as pq

    from uda_ray.cli import main
    from uda_ray.results.figures import fig_test_vs_selection
    from uda_ray.results.report import load
    from uda_ray.results.report_data import selection_vs_test

    metric, mode, sel, test = POOLS[pool]
    d = _pool_sweep(tmp_path, metric, mode, sel, test)
    expected = spearman([v if mode == "max" else -v for v in sel], test)

    data = load("sweep", d)
    pts, rho = selection_vs_test(data, "test/miou")
    assert len(pts) == len(sel) and rho == pytest.approx(expected)
    _, note = fig_test_vs_selection(data)
    shown = note.split("Spearman rank correlation of selection and test: ", 1)[1].split()[0]

    assert main(["validators", "sw", "--storage", str(tmp_path)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(metric + " "))
    assert line.split()[3] == shown == f"{expected:+.2f}"  # validator, mode, n, spearman
    (row,) = [r for r in pq.read_table(d / "results" / "validators.parquet").to_pylist() if r["validator"] == metric]
    assert row["spearman"] == pytest.approx(rho) and row["spearman_final"] == pytest.approx(rho)
