"""The storage plan (uda_ray.storage.layout): where things live, what a name refers to, sweep.json."""

from __future__ import annotations

import json

import pytest

from uda_ray.errors import UserError
from uda_ray.storage import layout


def _evals(folder):
    d = layout.results_dir(folder)
    d.mkdir(parents=True)
    (d / "evals.parquet").write_bytes(b"")
    return folder


def test_the_plan_under_a_root(tmp_path, monkeypatch):
    r = tmp_path
    assert layout.sweep_dir(r, "s") == r / "s"
    assert layout.results_dir(layout.sweep_dir(r, "s")) == r / "s" / "results"
    assert layout.trial_dir(r / "s", "ab_00001") == r / "s" / "train" / "train-ab_00001"
    assert layout.rerun_dir(r / "s", "t-seed1") == r / "s" / "reruns" / "t-seed1"
    assert layout.run_dir(r, "x") == layout.runs_dir(r) / "x" == r / "runs" / "x"
    assert layout.stage_dir(layout.pipeline_dir(r, "p"), "st") == r / "pipelines" / "p" / "st"
    assert layout.report_file(r / "s") == r / "s" / "report.html"
    monkeypatch.delenv("UDA_RAY_DATA", raising=False)
    assert layout.data_dir(r) == r / "data"
    monkeypatch.setenv("UDA_RAY_DATA", str(tmp_path / "elsewhere"))
    assert layout.data_dir(r) == tmp_path / "elsewhere"


def test_the_root_is_checked_and_never_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UDA_RAY_STORAGE", raising=False)
    assert layout.root() == tmp_path / "uda_ray_runs" and not (tmp_path / "uda_ray_runs").exists()
    monkeypatch.setenv("UDA_RAY_STORAGE", str(tmp_path / "env"))
    assert layout.root() == tmp_path / "env"
    assert layout.root(tmp_path / "given" / "deeper") == tmp_path / "given" / "deeper"
    (tmp_path / "f").write_text("")
    for bad in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(UserError, match="storage"):
            layout.root(bad)


def test_sweep_json_round_trips_and_bad_records_are_one_line(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    layout.write_meta(d, {"name": "s", "seed": 3})
    assert layout.is_sweep(d) and layout.read_meta(d) == {"name": "s", "seed": 3}
    assert [p.name for p in d.iterdir()] == ["sweep.json"]  # the temporary file is gone
    (d / "sweep.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        layout.read_meta(d)
    (d / "sweep.json").write_text(json.dumps({"seed": 3}))
    with pytest.raises(UserError, match="not a sweep record"):
        layout.read_meta(d)


def test_names_resolve_to_sweeps_runs_and_pipelines(tmp_path):
    r = tmp_path
    for name in ("b", "a"):
        layout.sweep_dir(r, name).mkdir()
        layout.write_meta(layout.sweep_dir(r, name), {"name": name})
    _evals(layout.run_dir(r, "r"))
    pdir = layout.pipeline_dir(r, "p")
    for st in ("s2", "s1"):
        _evals(layout.stage_dir(pdir, st))
    assert layout.sweep_folders(r) == [r / "a", r / "b"]
    assert layout.find_sweep(r, "a") == r / "a"
    with pytest.raises(UserError, match=r"unknown sweep 'nope' .*\(known: a, b\)"):
        layout.find_sweep(r, "nope")
    # `uda-ray report`
    assert layout.find(r, "a") == ("sweep", r / "a")
    assert layout.find(r, "r") == ("run", r / "runs" / "r")
    assert layout.find(r, "p") == ("pipeline", pdir)
    assert layout.find(r, str(pdir / "s1")) == ("run", pdir / "s1")  # a folder given by path
    with pytest.raises(UserError, match="nothing called 'nope'"):
        layout.find(r, "nope")
    # `uda-ray validators`
    assert layout.find_evals(r, "a") == ("sweep", r / "a" / "results", [r / "a" / "results"])
    assert layout.find_evals(r, "r") == ("run", r / "runs" / "r" / "results", [r / "runs" / "r" / "results"])
    assert layout.find_evals(r, "p") == ("pipeline", pdir / "results",
                                         [pdir / "s1" / "results", pdir / "s2" / "results"])
    with pytest.raises(UserError, match=r"unknown sweep or pipeline 'nope' .*\(known: a, b, p\)"):
        layout.find_evals(r, "nope")


def test_references_name_a_run_or_a_sweep_folder(tmp_path):
    assert layout.is_reference("run:x") and layout.is_reference("sweep:y")
    assert not layout.is_reference("runs/x") and not layout.is_reference(None) and not layout.is_reference("@st")
    assert layout.reference(tmp_path, "run:x") == ("run", "x", tmp_path / "runs" / "x")
    assert layout.reference(tmp_path, "sweep:y") == ("sweep", "y", tmp_path / "y")
    with pytest.raises(ValueError):
        layout.reference(tmp_path, "pipeline:z")


def test_results_is_spelled_only_by_the_layout_in_the_driver_side():
    """The folders of the storage plan come from uda_ray.storage.layout in the modules that orchestrate calls."""
    from pathlib import Path

    import uda_ray

    pkg = Path(uda_ray.__file__).parent
    files = [pkg / "api.py", pkg / "cli.py", *sorted((pkg / "driver").glob("*.py")),
             *sorted((pkg / "pipelines").glob("*.py"))]
    for needle in ('"results"', '"sweep.json"', '"runs"', '"pipelines"', '"reruns"'):
        hits = [p.name for p in files if needle in p.read_text()]
        assert not hits, f"{needle} spelled in {hits}: use uda_ray.storage.layout"
