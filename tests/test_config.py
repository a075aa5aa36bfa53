from __future__ import annotations

import pytest

from tests.conftest import tiny_experiment
from uda_ray.build import build_experiment, load_experiment
from uda_ray.config import ConfigError, OptimConfig, experiment_dict
from uda_ray.config_loader import apply_overrides, build, flatten, parse_set, parse_yaml, unflatten


def test_unknown_key_names_key_file_and_valid_keys(synth_root):
    raw = tiny_experiment(synth_root)
    raw["optim"]["lrr"] = 0.1
    with pytest.raises(ConfigError) as e:
        build_experiment(raw, "exp.yaml")
    msg = str(e.value)
    assert "exp.yaml" in msg and "optim.lrr" in msg and "momentum" in msg


def test_wrong_type_is_an_error_but_int_to_float_coerces():
    with pytest.raises(ConfigError, match="optim.*lr|lr"):
        build(OptimConfig, {"lr": "fast"}, "x.yaml")
    assert build(OptimConfig, {"lr": 1}).lr == 1.0 and isinstance(build(OptimConfig, {"lr": 1}).lr, float)
    with pytest.raises(ConfigError):
        build(OptimConfig, {"momentum": True})


def test_exponent_floats_without_a_dot_parse_as_floats():
    assert parse_yaml("a: 1e-4")["a"] == 1e-4
    assert parse_set(["optim.lr=2.5e-3", "method=target_only"]) == {"optim.lr": 2.5e-3, "method": "target_only"}


def test_out_of_range_values_are_rejected(synth_root):
    for key, bad in [("optim.lr", -1.0), ("train.max_steps", 0), ("optim.name", "lbfgs")]:
        with pytest.raises(ConfigError):
            build_experiment(apply_overrides(tiny_experiment(synth_root), {key: bad}))


def test_unknown_method_and_model_are_rejected(synth_root):
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        build_experiment(tiny_experiment(synth_root, method="nope"))
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        build_experiment(tiny_experiment(synth_root, **{"model.name": "nope"}))


def test_overrides_and_flatten_round_trip(synth_root):
    cfg = build_experiment(tiny_experiment(synth_root, **{"optim.lr": 0.5, "train.batch_size": 3}))
    assert cfg.optim.lr == 0.5 and cfg.train.batch_size == 3
    d = experiment_dict(cfg)
    assert unflatten(flatten(d)) == d
    assert build_experiment(d) == cfg


def test_one_level_of_base_inheritance_and_no_chains(tmp_path, synth_root):
    import yaml

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root)))
    (tmp_path / "b.yaml").write_text("base: a.yaml\noptim: {lr: 0.003}\n")
    cfg = load_experiment(tmp_path / "b.yaml")
    assert cfg.optim.lr == 0.003 and cfg.optim.name == "sgd"
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="chains"):
        load_experiment(tmp_path / "c.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\noptim: {lr: 1\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(p)
    assert "bad.yaml" in str(e.value) and "line" in str(e.value)
