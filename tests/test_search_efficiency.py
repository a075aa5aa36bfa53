"""benchmarks/search_efficiency.py: the replayed table (a searched metric and a score metric) and what a replayed
search finds, on a hand-made three-configuration table whose label-free metric ranks the configurations
opposite to their test mIoU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from uda_ray.results.tables import ResultsWriter

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "search_efficiency.py"
EXP = {"name": "t", "seed": 0, "method": "source_only", "model": {"name": "enet", "num_classes": 19},
       "data": {"source": "gta5", "target": "cityscapes"}, "train": {"max_steps": 20}}
# discriminator -> (uv/im at steps 10, 20), (test/miou at steps 10, 20)
TABLE = {"a": ((0.5, 0.9), (0.1, 0.2)), "b": ((0.4, 0.5), (0.3, 0.4)), "c": ((0.3, 0.1), (0.5, 0.6))}


@pytest.fixture(scope="module")
def se():
    spec = importlib.util.spec_from_file_location("search_efficiency", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    w = ResultsWriter(tmp_path / "results", "t", "uv/im", "max", 0)
    for i, (disc, (im, test)) in enumerate(TABLE.items()):
        params = {"method_cfg.discriminator": disc}
        w.start(f"t_{i}", EXP, params)
        for step, v, t in zip((10, 20), im, test):
            w.result(f"t_{i}", {}, params, {"step": step, "uv/im": v, "test/miou": t})
        w.end(f"t_{i}", {}, params, "completed")
    return tmp_path


def test_table_keeps_the_searched_metric_and_the_score(se, sweep: Path) -> None:
    configs, max_steps, metric = se.load_table([sweep], "uv/im", "test/miou")
    assert (max_steps, metric) == (20, "uv/im")
    got = {c["params"]["method_cfg.discriminator"]: (c["curve"], c["final"], c["score"]) for c in configs}
    assert got == {"a": ({10: 0.5, 20: 0.9}, 0.9, 0.2), "b": ({10: 0.4, 20: 0.5}, 0.5, 0.4),
                   "c": ({10: 0.3, 20: 0.1}, 0.1, 0.6)}
    plain, _, _ = se.load_table([sweep], "test/miou")  # no score: a configuration is worth its metric
    assert sorted((c["final"], c["score"]) for c in plain) == [(0.2, 0.2), (0.4, 0.4), (0.6, 0.6)]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_label_free_search_finds_what_its_metric_prefers(se, sweep: Path, sampler: str) -> None:
    """Searching uv/im, the configuration found is the one with the best uv/im, worth its test mIoU (0.2), not
    the best test mIoU (0.6) that a search on the test labels finds; the trace is (steps spent, that score)."""
    for metric, score, found in (("uv/im", "test/miou", 0.2), ("test/miou", None, 0.6)):
        configs, max_steps, _ = se.load_table([sweep], metric, score)
        trace = se.replay(configs, se.Space(configs), max_steps, sampler, False, 0, 30 * max_steps, 10, 2)
        assert [s for s, _ in trace] == list(range(20, 20 * len(trace) + 1, 20))  # every trial runs to the end
        assert trace[-1][1] == pytest.approx(found)
        assert se.best_within(trace, 30 * max_steps) == pytest.approx(
            max(v for _, v in trace))  # best_within: the best score seen by then


def test_asha_stops_at_the_rung_by_the_searched_metric(se, sweep: Path) -> None:
    """With ASHA (grace 10, rf 2) a trial below the median of its rung's earlier values stops there and costs 10
    steps; rungs compare uv/im, never the score."""
    configs, max_steps, _ = se.load_table([sweep], "uv/im", "test/miou")
    trace = se.replay(configs, se.Space(configs), max_steps, "random", True, 0, 30 * max_steps, 10, 2)
    assert trace and trace[-1][1] == pytest.approx(0.2)
    spent = [0] + [s for s, _ in trace]  # a finished trial costs 20 steps, one stopped at the rung 10
    assert all((b - a - 20) % 10 == 0 for a, b in zip(spent, spent[1:]))
    assert any(b - a > 20 for a, b in zip(spent, spent[1:]))  # some trials were stopped in between
