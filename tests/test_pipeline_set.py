"""`uda-ray pipeline FILE --set KEY=VALUE`: overrides of every experiment stage, applied last (they win over
the file's `set:` and the stages' own), checked at load. Through `uda_ray.cli.main`, with each stage trained
in-process (LocalSession instead of a Ray task)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_experiment
from uda_ray.cli import main
from uda_ray.config import ConfigError
from uda_ray.pipelines.runner import load_pipeline
from uda_ray.training.loop import fit
from uda_ray.training.sessions import LocalSession


def _pipeline(tmp_path: Path, synth_root: Path) -> Path:
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(tiny_experiment(Path(synth_root))))
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump({"name": "p", "set": {"train.max_steps": 6}, "stages": [
        {"name": "a", "experiment": "exp.yaml", "set": {"train.max_steps": 4, "train.eval_every": 2}}]}))
    return p


def test_set_overrides_every_experiment_stage_last(tmp_path, synth_root, monkeypatch, capsys):
    import uda_ray.api
    import uda_ray.training.launchers

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(uda_ray.api, "ray_connection", lambda address: contextlib.nullcontext())
    monkeypatch.setattr(uda_ray.training.launchers, "fit_run",
                        lambda cfg, storage, name: fit(cfg, LocalSession(storage / name)))
    path, store = _pipeline(tmp_path, synth_root), tmp_path / "store"
    code = main(["pipeline", str(path), "--set", "train.max_steps=3", "--set", "train.eval_every=1",
                 "--storage", str(store)])
    assert code == 0, capsys.readouterr().err
    stage = store / "pipelines" / "p" / "a"
    assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == [
        "step_0000001", "step_0000002", "step_0000003"]  # the command line's values, not the file's 6 or 4
    assert yaml.safe_load((stage / "config.yaml").read_text())["train"]["max_steps"] == 3
    assert "stage a: source_only/bisenet_r18, 3 steps" in capsys.readouterr().out


def test_overrides_are_validated_at_load_and_win_over_the_file(tmp_path, synth_root):
    path = _pipeline(tmp_path, synth_root)
    pipe = load_pipeline(path, {"train.max_steps": 2})
    st = pipe.cfg.stages[0]
    assert pipe.overrides(st)["train.max_steps"] == 2 and pipe.overrides(st)["train.eval_every"] == 2
    assert load_pipeline(path).overrides(st)["train.max_steps"] == 4
    with pytest.raises(ConfigError, match="train.max_stepz"):
        load_pipeline(path, {"train.max_stepz": 2})
    with pytest.raises(ConfigError, match="not an earlier stage"):
        load_pipeline(path, {"data.ranking": "@a"})  # a stage reference would name stage a in stage a itself


def test_a_bad_set_key_is_one_line_exit_2_before_anything_runs(tmp_path, synth_root, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("got as far as starting Ray"))
    path, store = _pipeline(tmp_path, synth_root), tmp_path / "store"
    code = main(["pipeline", str(path), "--set", "train.max_stepz=2", "--storage", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "train.max_stepz" in err, err
    assert not store.exists()
