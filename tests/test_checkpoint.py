"""The checkpoint format: plain-data states loaded with weights_only=True, RNG state round trip, refusal of
files whose unpickling would run code."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import tiny_experiment
from uda_ray.cli import main
from uda_ray.errors import UserError
from uda_ray.training.checkpoint import (
    METRICS_FILE,
    STATE_FILE,
    best_checkpoint_in,
    load_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


class _Evil:
    """Unpickling this runs `touch <marker>` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_evil_checkpoint(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True)
    torch.save({"method": {"model": _Evil(marker)}, "step": 1}, folder / STATE_FILE)
    return folder


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_saved_state_with_rng_loads_with_weights_only_and_replays_the_same_draws(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    rng = rng_state()
    expected = _draws()
    save_checkpoint(tmp_path / "ck", method_state={"model": {"w": torch.ones(2)}}, step=7, rng=[rng],
                    config={"name": "x", "size": [64, 32]}, metrics={"step": 7, "test/miou": np.float64(0.5)})
    state = torch.load(tmp_path / "ck" / STATE_FILE, weights_only=True)  # plain data only
    assert state["step"] == 7 and state["metrics"]["test/miou"] == 0.5
    _draws()  # move every generator on
    set_rng_state(load_state(tmp_path / "ck")["rng"][0])
    assert _draws() == expected


def test_best_checkpoint_follows_the_metric_and_mode(tmp_path):
    for step, v in ((2, 0.3), (4, 0.6), (6, 0.4)):
        save_checkpoint(tmp_path / "checkpoints" / f"step_{step:07d}", method_state={}, step=step, rng=[],
                        config={}, metrics={"step": step, "uv/entropy": v, "test/miou": 1 - v})
    assert (tmp_path / "checkpoints" / "step_0000004" / METRICS_FILE).is_file()
    assert best_checkpoint_in(tmp_path, "uv/entropy", "min").name == "step_0000002"
    assert best_checkpoint_in(tmp_path, "test/miou", "min").name == "step_0000004"
    with pytest.raises(UserError, match="sel/miou"):
        best_checkpoint_in(tmp_path, "sel/miou", "max")


def test_a_checkpoint_whose_unpickling_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ck = _plant_evil_checkpoint(tmp_path / "evil", marker)
    for mmap in (False, True):
        with pytest.raises(UserError, match="refused to load"):
            load_state(ck, mmap=mmap)
    assert not marker.exists()


def test_cpsl_distill_refuses_an_unsafe_teacher_checkpoint(tmp_path):
    from uda_ray.methods.cpsl_distill import load_teacher_state

    marker = tmp_path / "pwned"
    ck = _plant_evil_checkpoint(tmp_path / "evil", marker)
    with pytest.raises(UserError, match="refused to load"):
        load_teacher_state(ck)
    assert not marker.exists()


def test_cli_train_from_an_unsafe_checkpoint_fails_in_one_line_with_exit_2(tmp_path, synth_root, capsys):
    marker = tmp_path / "pwned"
    ck = _plant_evil_checkpoint(tmp_path / "evil", marker)
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(tiny_experiment(synth_root)))
    storage = tmp_path / "store"
    code = main(["train", str(exp), "--set", f"train.init_from={ck}", "--storage", str(storage)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "refused to load" in err, err
    assert not marker.exists() and not storage.exists()
