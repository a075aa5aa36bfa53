"""Preparing an experiment checks it before anything is written: a bad model, missing weights or a missing
reference on fresh storage end in exit status 2 with one line, before the synthetic benchmark is generated
(nothing under the storage root, nothing under the working directory), and before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from uda_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "experiments" / "synthetic_bisenet_r18_source_only.yaml"  # its data: generated on first use


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A working directory with no storage root yet, default data dir (<root>/data), Ray refused."""
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UDA_RAY_DATA", raising=False)
    monkeypatch.delenv("UDA_RAY_STORAGE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def no_ray(*a, **k):
        raise RuntimeError("got as far as starting Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    return tmp_path


def _pipeline(where: Path, stage_set: dict) -> Path:
    p = where / "pipe.yaml"
    p.write_text(yaml.safe_dump({"name": "pipe", "stages": [
        {"name": "a", "experiment": str(SYNTHETIC), "set": stage_set}]}))
    return p


def _space(where: Path, **set_) -> Path:
    p = where / "space.yaml"
    p.write_text(yaml.safe_dump({"base": str(SYNTHETIC), "num_samples": 1, "set": set_,
                                 "params": {"optim.lr": {"loguniform": [1e-3, 1e-2]}}}))
    return p


CASES = [
    ("train-missing-weights", lambda d: ["train", str(SYNTHETIC), "--set", f"model.pretrained={d / 'missing.pth'}"],
     "missing.pth"),
    ("train-unknown-model-kwarg", lambda d: ["train", str(SYNTHETIC), "--set", "model.kwargs={bogus: 1}"], "bogus"),
    ("train-missing-run-reference", lambda d: ["train", str(SYNTHETIC), "--set", "train.init_from=run:nope"],
     "nope"),
    ("train-missing-init-checkpoint", lambda d: ["train", str(SYNTHETIC), "--set",
                                                 f"train.init_from={d / 'no_ckpt'}"], "no_ckpt"),
    ("sweep-missing-weights", lambda d: ["sweep", str(_space(d, **{"model.pretrained": str(d / "missing.pth")}))],
     "missing.pth"),
    ("sweep-missing-sweep-reference", lambda d: ["sweep", str(_space(d, **{"train.init_from": "sweep:nope"}))],
     "nope"),
    ("pipeline-missing-weights", lambda d: ["pipeline", str(_pipeline(d, {"model.pretrained": str(d / "w.pth")}))],
     "w.pth"),
]


@pytest.mark.parametrize("case, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_a_bad_experiment_on_fresh_storage_exits_2_before_generating_data(fresh, capsys, case, argv, needle):
    args = argv(fresh) + ["--storage", str(fresh / "store")]
    before = _snapshot(fresh)
    code = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (case, err)
    assert len(lines) == 1 and "Traceback" not in err and needle in lines[0], err
    assert not (fresh / "store").exists(), "nothing may be written under the storage root"
    assert _snapshot(fresh) == before, "nothing may be written"


def test_the_default_storage_root_is_not_made_either(fresh, capsys):
    """Without --storage: ./uda_ray_runs (and its data/) stay absent."""
    code = main(["train", str(SYNTHETIC), "--set", f"model.pretrained={fresh / 'missing.pth'}"])
    assert code == 2 and "missing.pth" in capsys.readouterr().err
    assert list(fresh.iterdir()) == []


def test_prepare_checks_before_it_resolves_data(tmp_path, monkeypatch):
    """The order inside prepare_experiment itself: the checks, then the data."""
    from uda_ray import checks
    from uda_ray.config_loader import read_yaml
    from uda_ray.driver import prepare

    calls = []
    monkeypatch.setattr(checks, "experiment", lambda cfg, source: calls.append("check"))
    monkeypatch.setattr(prepare, "resolve_data", lambda data, root, select=None: calls.append("data") or data)
    ready = prepare.prepare_experiment(read_yaml(SYNTHETIC), str(SYNTHETIC), tmp_path)
    assert calls == ["check", "data"] and ready.cfg.name == "synthetic_bisenet_r18_source_only"
    assert not list(tmp_path.iterdir())
