"""`uda-ray evaluate` in-process (no Ray): a run's checkpoint evaluated under its own experiment gives the
metrics the run reported at that step; a weights file under an experiment file; the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_experiment
from uda_ray.build import build_experiment
from uda_ray.cli import main
from uda_ray.training.checkpoint import STATE_FILE, load_state
from uda_ray.training.loop import fit
from uda_ray.training.sessions import LocalSession


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_root) -> tuple[Path, dict, Path]:
    """A 2-step run: (its checkpoint folder, the metrics it reported at step 2, a folder for outputs)."""
    root = tmp_path_factory.mktemp("evaluate")
    s = LocalSession(root / "run")
    fit(build_experiment(tiny_experiment(Path(synth_root), **{"train.max_steps": 2})), s)
    return root / "run" / "checkpoints" / "step_0000002", s.reports[-1], root


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_checkpoint_evaluates_to_the_metrics_its_run_reported(trained, capsys, tmp_path):
    ckpt, reported, _ = trained
    out_json = tmp_path / "m.json"
    code, out, err = _run(capsys, ["evaluate", str(ckpt), "--out", str(out_json), "--storage", str(tmp_path / "s")])
    assert code == 0, err
    assert f"test mIoU {100 * reported['test/miou']:.2f}" in out
    assert "per-class IoU (test, %):" in out and "road" in out and "uv/snd" in out
    m = json.loads(out_json.read_text())
    assert m["step"] == 2
    for k in ("test/miou", "test/pixel_acc", "test/iou/road", "src_val/miou", "uv/entropy", "uv/im", "uv/snd"):
        assert m["metrics"][k] == pytest.approx(reported[k], abs=1e-6), k
    # the state.pt file itself, and a data override of the protocol (a smaller evaluation input)
    code, out, err = _run(capsys, ["evaluate", str(ckpt / STATE_FILE), "--set", "data.eval_size=[32,16]",
                                   "--storage", str(tmp_path / "s")])
    assert code == 0, err
    assert "test mIoU" in out


def test_a_weights_file_evaluates_under_an_experiment(trained, capsys, tmp_path, synth_root):
    ckpt, reported, _ = trained
    weights = tmp_path / "segmenter.pth"
    torch.save({"state_dict": load_state(ckpt)["method"]["model"]}, weights)  # as published models are wrapped
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(tiny_experiment(Path(synth_root))))
    out_json = tmp_path / "m.json"
    code, out, err = _run(capsys, ["evaluate", str(weights), "--experiment", str(exp), "--out", str(out_json),
                                   "--storage", str(tmp_path / "s")])
    assert code == 0, err
    m = json.loads(out_json.read_text())
    assert m["step"] is None
    assert m["metrics"]["test/miou"] == pytest.approx(reported["test/miou"], abs=1e-6)


@pytest.mark.parametrize("case", ["missing", "folder-without-state", "not-a-checkpoint", "unknown-key",
                                  "model-key-on-a-checkpoint", "no-teacher", "weights-wrong-keys",
                                  "weights-backbone-only", "experiment-missing", "out-missing-folder",
                                  "target-root-missing"])
def test_bad_inputs_are_one_line_exit_2_nothing_written(trained, capsys, tmp_path, synth_root, case):
    ckpt, _, _ = trained
    (tmp_path / "empty").mkdir()
    torch.save([1, 2, 3], tmp_path / "a_list.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "backbone.pth")
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(tiny_experiment(Path(synth_root))))
    argv, needle = {
        "missing": (["evaluate", str(tmp_path / "nope")], "no such file"),
        "folder-without-state": (["evaluate", str(tmp_path / "empty")], "no checkpoint there"),
        "not-a-checkpoint": (["evaluate", str(tmp_path / "a_list.pt")], "a_list.pt"),
        "unknown-key": (["evaluate", str(ckpt), "--set", "data.eval_sise=[32,16]"], "data.eval_sise"),
        "model-key-on-a-checkpoint": (["evaluate", str(ckpt), "--set", "model.name=enet"], "model.name"),
        "no-teacher": (["evaluate", str(ckpt), "--weights", "teacher"], "no 'teacher' weights"),
        "weights-wrong-keys": (["evaluate", str(tmp_path / "wrong.pth"), "--experiment", str(exp)], "wrong.pth"),
        "weights-backbone-only": (["evaluate", str(tmp_path / "backbone.pth"), "--experiment", str(exp)],
                                  "backbone weights only"),
        "experiment-missing": (["evaluate", str(tmp_path / "wrong.pth"), "--experiment", str(tmp_path / "no.yaml")],
                               "no.yaml"),
        "out-missing-folder": (["evaluate", str(ckpt), "--out", str(tmp_path / "no_dir" / "m.json")], "no_dir"),
        "target-root-missing": (["evaluate", str(ckpt), "--set", f"data.target_root={tmp_path / 'no_cs'}"], "no_cs"),
    }[case]
    before = sorted(tmp_path.rglob("*"))
    code, _, err = _run(capsys, argv + ["--storage", str(tmp_path / "s")])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], (needle, lines[0])
    assert sorted(tmp_path.rglob("*")) == before


def test_the_evaluate_driver_imports_no_ray():
    import ast

    import uda_ray.driver.evaluate as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(n == "ray" or n.startswith("ray.") for n in names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here")
def test_cuda_without_a_device_is_one_line(trained, capsys, tmp_path):
    ckpt, _, _ = trained
    code, _, err = _run(capsys, ["evaluate", str(ckpt), "--device", "cuda", "--storage", str(tmp_path / "s")])
    assert code == 2 and err.strip().splitlines() == ["uda-ray: error: --device cuda: no CUDA device is available here"]
