"""A sweep measures each distinct model's profile once: the trials share a cache next to their run folders."""

from __future__ import annotations

from tests.conftest import tiny_experiment
from uda_ray.build import build_experiment
from uda_ray.models.profile import PROFILE_CACHE, measured_once
from uda_ray.training.loop import fit
from uda_ray.training.sessions import LocalSession


def test_measured_once_per_key(tmp_path):
    calls = []

    def measure(v):
        return lambda: calls.append(v) or {"x": v}

    f = tmp_path / "c" / PROFILE_CACHE
    assert measured_once(f, {"m": "a"}, measure(1)) == {"x": 1}
    assert measured_once(f, {"m": "a"}, measure(2)) == {"x": 1}  # cached: not measured again
    assert measured_once(f, {"m": "b"}, measure(3)) == {"x": 3}  # another model
    assert calls == [1, 3]
    f.write_text("{not json")
    assert measured_once(f, {"m": "a"}, measure(4)) == {"x": 4}  # a damaged cache is measured again


def test_trials_of_one_model_share_its_profile(tmp_path, synth_root, monkeypatch):
    import uda_ray.training.loop as train

    real, calls = train.model_profile, []
    monkeypatch.setattr(train, "model_profile", lambda *a: calls.append(1) or real(*a))
    cfg = build_experiment(tiny_experiment(synth_root, **{"train.profile": True, "train.max_steps": 2}))
    first, second = LocalSession(tmp_path / "train" / "t1"), LocalSession(tmp_path / "train" / "t2")
    fit(cfg, first)
    fit(cfg, second)
    assert len(calls) == 1
    keys = ("model/params", "model/gflops", "model/latency_ms", "model/fps")
    assert all(first.reports[-1][k] == second.reports[-1][k] for k in keys)
    assert first.reports[-1]["model/gflops"] > 0


def test_a_run_trains_the_same_whether_its_profile_was_measured_or_read_from_the_cache(tmp_path, synth_root):
    """The profile draws random inputs; measured under a forked RNG, it leaves the run's random stream alone, so
    a sweep trial's numbers do not depend on whether it or a concurrent trial measured the model first."""
    from tests.conftest import tiny_experiment
    from uda_ray.build import build_experiment
    from uda_ray.training.loop import fit
    from uda_ray.training.sessions import LocalSession

    cfg = build_experiment(tiny_experiment(synth_root, **{"train.profile": True}))
    cold, warm = LocalSession(tmp_path / "sweep" / "cold"), LocalSession(tmp_path / "sweep" / "warm")
    fit(cfg, cold)  # measures the model: the cache beside the runs is empty
    fit(cfg, warm)  # reads it from the cache
    keys = [k for k in cold.reports[-1] if k.startswith(("test/", "uv/", "loss/"))]
    assert keys
    def values(s):  # NaN (a class absent from labels and predictions) compared as equal
        return [[None if r[k] != r[k] else r[k] for k in keys] for r in s.reports]

    assert values(cold) == values(warm)
