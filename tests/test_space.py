"""Every shipped search space and experiment loads and samples; bad spaces fail with a clear message."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import load_shipped
from uda_ray.build import load_experiment
from uda_ray.config import ConfigError
from uda_ray.search.space import Param, SearchSpace, load_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


def draw(param: Param, rng: random.Random) -> Any:
    """One random value of a search-space parameter (log-uniform for loguniform, inclusive int bounds)."""
    if param.kind == "choice":
        return rng.choice(param.values)
    lo, hi = param.values
    if param.kind == "int":
        return rng.randint(lo, hi)
    if param.kind == "loguniform":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return rng.uniform(lo, hi)


def sample(space: SearchSpace, n: int, seed: int = 0) -> list[tuple[dict[str, Any], Any]]:
    """`n` random samples of `space` with their validated experiments."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = {k: draw(p, rng) for k, p in space.params.items()}
        out.append((s, space.experiment(s)))
    return out


def test_there_are_files_to_check():
    assert SPACES and EXPERIMENTS


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_loads(path):
    cfg = load_shipped(load_experiment, path)
    assert cfg.train.max_steps >= 1


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_names_a_label_free_selection_metric(path):
    from uda_ray.config_loader import read_yaml
    from uda_ray.metric_names import needs_test_labels

    raw = read_yaml(path)
    assert "select" in raw, f"{path.name} does not name its selection metric"
    assert not needs_test_labels(load_shipped(load_experiment, path).select)


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_search_space_names_a_label_free_objective(path):
    from uda_ray.config_loader import read_yaml
    from uda_ray.metric_names import needs_test_labels

    assert "objective" in read_yaml(path), f"{path.name} does not name its objective"
    space = load_shipped(load_space, path)
    assert not needs_test_labels(space.metric) and space.base.select == space.metric  # trials keep by it


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_search_space_loads_and_samples(path):
    space = load_shipped(load_space, path)
    for params, cfg in sample(space, 8, seed=1):
        assert set(params) == set(space.params)
        assert cfg.method  # a validated experiment


def _space(tmp_path, **kw) -> Path:
    raw = {"base": str(ROOT / "experiments" / "synthetic_bisenet_r18_source_only.yaml"), "num_samples": 2,
           "params": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}
    raw.update(kw)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("kw, match", [
    ({"params": {"optim.lr": {"loguniform": [1e-2, 1e-4]}}}, "inverted"),
    ({"params": {"optim.lr": {"uniform": [0.1, 0.1]}}}, "empty or inverted"),
    ({"params": {"optim.lr": {"loguniform": [0.0, 1.0]}}}, "low > 0"),
    ({"params": {"optim.lr": {"gaussian": [0, 1]}}}, "unknown kind"),
    ({"params": {"optim.lrr": {"uniform": [0.1, 0.2]}}}, "unknown key 'optim.lrr'"),
    ({"params": {"optim.lr": {"uniform": [-1.0, 0.1]}}}, "lr must be > 0"),
    ({"params": {"method": {"choice": ["source_only", "nope"]}}}, "unknown method 'nope'"),
    ({"num_samples": 0}, "num_samples must be >= 1"),
    ({"objective": {"metric": "test/miou", "mode": "up"}}, "mode"),
    ({"bogus": 1}, "unknown key 'bogus'"),
])
def test_bad_spaces_are_rejected_with_the_reason(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        load_space(_space(tmp_path, **kw))


def test_int_params_sample_integers_within_inclusive_bounds(tmp_path):
    space = load_space(_space(tmp_path, params={"train.batch_size": {"int": [1, 3]}}))
    vals = {p["train.batch_size"] for p, _ in sample(space, 40)}
    assert vals == {1, 2, 3}


def test_constraints_parse_and_measure_their_violation(tmp_path):
    space = load_space(_space(tmp_path, constraints={"model/fps": ">= 30", "model/gflops": "<=2.5"}))
    fps, gflops = space.constraints
    assert (fps.metric, fps.op, fps.bound) == ("model/fps", ">=", 30.0) and str(gflops) == "model/gflops <= 2.5"
    assert fps.violation(45.0) < 0 < fps.violation(20.0) and gflops.violation(3.0) == pytest.approx(0.5)
    assert fps.violation(None) > 0 and fps.violation(float("nan")) > 0  # never reported: infeasible


@pytest.mark.parametrize("bad, match", [({"model/fps": "> 30"}, "expected '>= NUMBER'"),
                                        ({"model/fps": ">= fast"}, "expected '>= NUMBER'"),
                                        ({"model/speed": ">= 30"}, "unknown metric 'model/speed'"),
                                        (["model/fps >= 30"], "'constraints' must be a mapping")])
def test_bad_constraints_are_config_errors(tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        load_space(_space(tmp_path, constraints=bad))
