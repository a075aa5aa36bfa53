"""Bad input from a user: one line on stderr, exit status 2, nothing written into the sweep's folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_experiment
from uda_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _space(tmp_path, base: dict, **kw) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    raw = {"base": "base.yaml", "num_samples": 1, "params": {"optim.lr": {"loguniform": [1e-3, 1e-2]}}}
    raw.update(kw)
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _assert_user_error(code, err, storage: Path, needle: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert not list(storage.glob("*/sweep.json")), "nothing may be written for a rejected sweep"


@pytest.mark.parametrize("mutate, needle", [
    (lambda b, s: s.write_text("base: base.yaml\nparams: {optim.lr: {loguniform: [1e-3, 1e-2]\n"), "malformed YAML"),
    (lambda b, s: s.write_text(s.read_text() + "bogus: 1\n"), "unknown key 'bogus'"),
    (lambda b, s: s.write_text(s.read_text().replace("optim.lr", "optim.lrr")), "unknown key 'optim.lrr'"),
    (lambda b, s: s.write_text(s.read_text().replace("0.001", "0.1")), "inverted"),
    (lambda b, s: s.write_text(s.read_text().replace("num_samples: 1", "num_samples: 0")), "num_samples"),
    (lambda b, s: b.write_text(b.read_text().replace("source_only", "nope")), "unknown method 'nope'"),
    (lambda b, s: b.write_text(b.read_text().replace("bisenet_r18", "nope")), "unknown model 'nope'"),
])
def test_bad_space_or_experiment_exits_2_with_one_line(tmp_path, capsys, synth_root, mutate, needle):
    space = _space(tmp_path, tiny_experiment(synth_root))
    mutate(tmp_path / "base.yaml", space)
    code, _, err = _run(capsys, "sweep", str(space), "--storage", str(tmp_path / "store"))
    _assert_user_error(code, err, tmp_path / "store", needle)


def test_missing_dataset_exits_2_naming_the_path(tmp_path, capsys, synth_root):
    base = tiny_experiment(synth_root, **{"data.source_root": str(tmp_path / "no_gta5")})
    code, _, err = _run(capsys, "sweep", str(_space(tmp_path, base)), "--storage", str(tmp_path / "store"))
    _assert_user_error(code, err, tmp_path / "store", str(tmp_path / "no_gta5"))


def test_malformed_dataset_folder_exits_2(tmp_path, capsys, synth_root):
    bad = tmp_path / "bad_cs"
    (bad / "leftImg8bit" / "train").mkdir(parents=True)
    base = tiny_experiment(synth_root, **{"data.target_root": str(bad)})
    code, _, err = _run(capsys, "sweep", str(_space(tmp_path, base)), "--storage", str(tmp_path / "store"))
    _assert_user_error(code, err, tmp_path / "store", str(bad))


def test_unreachable_address_exits_2(tmp_path, capsys, synth_root):
    space = _space(tmp_path, tiny_experiment(synth_root))
    code, _, err = _run(capsys, "sweep", str(space), "--storage", str(tmp_path / "store"),
                        "--address", "127.0.0.1:9")
    _assert_user_error(code, err, tmp_path / "store", "cannot reach the Ray cluster at 127.0.0.1:9")


def test_unknown_sweep_exits_2_for_best_resume(tmp_path, capsys):
    for cmd in ("best", "resume"):
        code, _, err = _run(capsys, cmd, "nope", "--storage", str(tmp_path))
        assert code == 2 and "unknown sweep 'nope'" in err and len(err.strip().splitlines()) == 1


def test_bad_set_override_exits_2(tmp_path, capsys, synth_root):
    space = _space(tmp_path, tiny_experiment(synth_root))
    code, _, err = _run(capsys, "sweep", str(space), "--storage", str(tmp_path / "s"), "--set", "optim.lr")
    _assert_user_error(code, err, tmp_path / "s", "KEY=VALUE")


def test_train_with_unknown_key_exits_2(tmp_path, capsys, synth_root):
    p = tmp_path / "e.yaml"
    p.write_text(yaml.safe_dump(tiny_experiment(synth_root, **{"train.epochz": 3})))
    code, _, err = _run(capsys, "train", str(p), "--storage", str(tmp_path / "s"))
    assert code == 2 and "unknown key 'train.epochz'" in err


def test_ls_on_empty_storage(tmp_path, capsys):
    code, out, _ = _run(capsys, "ls", "--storage", str(tmp_path))
    assert code == 0 and "no sweeps" in out


def test_data_synth_writes_both_layouts(tmp_path, capsys):
    code, out, _ = _run(capsys, "data", "synth", "--out", str(tmp_path / "d"), "--n-source", "3", "--n-target",
                        "3", "--n-val", "2", "--size", "32x64")
    assert code == 0 and (tmp_path / "d" / "gta5" / "images").is_dir()
    assert (tmp_path / "d" / "cityscapes" / "gtFine" / "val").is_dir()
    code, _, err = _run(capsys, "data", "synth", "--out", str(tmp_path / "e"), "--size", "big")
    assert code == 2 and "HxW" in err


@pytest.mark.ray
def test_a_trial_that_cannot_fit_the_local_cluster_exits_2_before_writing(tmp_path, capsys, synth_root):
    base = tiny_experiment(synth_root, **{"train.cpus_per_worker": 64.0})
    code, _, err = _run(capsys, "sweep", str(_space(tmp_path, base)), "--storage", str(tmp_path / "store"))
    # a single-worker trial trains in its Tune trial's process: no trial driver's CPUs on top
    _assert_user_error(code, err, tmp_path / "store", "a trial needs 64 CPUs (1 worker(s) x 64) but the cluster")


def test_unknown_objective_metric_exits_2_before_any_compute(tmp_path, capsys, synth_root):
    space = _space(tmp_path, tiny_experiment(synth_root), objective={"metric": "uv/bogus"})
    code, _, err = _run(capsys, "sweep", str(space), "--storage", str(tmp_path / "store"))
    _assert_user_error(code, err, tmp_path / "store", "unknown metric 'uv/bogus'")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("over, needle", [
    ({"data.target_holdout_fraction": 1.0}, "data.target_holdout_fraction must be in (0, 1)"),
    ({"data.source_val_fraction": 0.0}, "data.source_val_fraction must be in (0, 1)"),
    ({"data.selection_labeled": 11}, "data.selection_labeled=11"),  # 12 target train images, 1 held out
    ({"select": "uv/bogus"}, "unknown metric 'uv/bogus'"),
    ({"select": "sel/miou"}, "sel/miou needs a labeled selection split"),
])
def test_bad_splits_or_selection_exit_2_before_any_compute(tmp_path, capsys, synth_root, over, needle):
    for cmd, path in (("sweep", _space(tmp_path, tiny_experiment(synth_root, **over))),
                      ("train", tmp_path / "base.yaml")):
        code, _, err = _run(capsys, cmd, str(path), "--storage", str(tmp_path / "store"))
        _assert_user_error(code, err, tmp_path / "store", needle)
        assert not (tmp_path / "store" / "runs").exists()


def test_test_metric_selection_on_an_unlabeled_target_exits_2(tmp_path, capsys, synth_root):
    import shutil

    tgt = tmp_path / "cs_nolabels"
    shutil.copytree(synth_root / "cityscapes" / "leftImg8bit", tgt / "leftImg8bit")
    base = tiny_experiment(synth_root, **{"data.target_root": str(tgt)})
    space = _space(tmp_path, base, objective={"metric": "test/miou"})
    code, _, err = _run(capsys, "sweep", str(space), "--storage", str(tmp_path / "store"))
    _assert_user_error(code, err, tmp_path / "store", "test/miou needs target test labels")


def _tiny_sweep(tmp_path, synth_root) -> Path:
    import json

    from uda_ray.build import build_experiment
    from uda_ray.config import experiment_dict
    from uda_ray.results.tables import ResultsWriter

    d = tmp_path / "store" / "sw"
    w = ResultsWriter(d / "results", "sw", "uv/snd", "max", 0)
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    for tid, snd, ent, miou in (("a", 0.9, 0.5, 0.1), ("b", 0.2, 0.1, 0.6)):
        w.start(tid, exp, {"optim.lr": 0.01})
        w.result(tid, exp, {"optim.lr": 0.01}, {"step": 2, "uv/snd": snd, "uv/entropy": ent, "test/miou": miou})
    (d / "sweep.json").write_text(json.dumps({"name": "sw", "objective": [{"metric": "uv/snd", "mode": "max"}]}))
    return d


def test_best_ranks_by_the_named_metric_in_its_mode_and_shows_test_beside(tmp_path, capsys, synth_root):
    _tiny_sweep(tmp_path, synth_root)
    code, out, _ = _run(capsys, "best", "sw", "--top", "1", "--storage", str(tmp_path / "store"))
    assert code == 0 and "top 1 by uv/snd (max)" in out and " a " in out and "test/miou=0.1000" in out
    code, out, _ = _run(capsys, "best", "sw", "--top", "1", "--metric", "uv/entropy", "--storage",
                        str(tmp_path / "store"))
    assert code == 0 and "top 1 by uv/entropy (min)" in out and " b " in out and "test/miou=0.6000" in out


def test_best_with_an_unknown_metric_exits_2(tmp_path, capsys, synth_root):
    _tiny_sweep(tmp_path, synth_root)
    code, _, err = _run(capsys, "best", "sw", "--metric", "uv/nope", "--storage", str(tmp_path / "store"))
    assert code == 2 and "unknown metric 'uv/nope'" in err and len(err.strip().splitlines()) == 1


def test_reading_a_sweep_loads_neither_torch_nor_ray(tmp_path, synth_root):
    """`best`, `ls` and `validators` read tables: they start in a fraction of a second, without torch (whose import
    alone takes 1-2 s here) or Ray; `best` and `ls` without pandas either (pyarrow.dataset, which
    pyarrow.parquet.read_table uses, imports it: 0.6 s of `best`'s 0.8 s at 10,000 trials)."""
    import ast
    import subprocess
    import sys

    _tiny_sweep(tmp_path, synth_root)
    store = str(tmp_path / "store")
    code = ("import sys; from uda_ray.cli import main; rc = main(sys.argv[1:]); "
            "print(sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules)); sys.exit(rc)")
    for argv, unwanted in ((["best", "sw"], {"torch", "ray", "pandas"}), (["ls"], {"torch", "ray", "pandas"}),
                           (["validators", "sw"], {"torch", "ray"})):
        p = subprocess.run([sys.executable, "-c", code, *argv, "--storage", store], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, (argv, p.stdout, p.stderr)
        assert not unwanted & set(ast.literal_eval(p.stdout.strip().splitlines()[-1])), (argv, p.stdout)
