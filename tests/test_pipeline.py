"""Stages and pipelines in-process (LocalSession instead of Ray Train): IntraDA, FDA-MBT, self-training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_experiment
from uda_ray.build import build_experiment
from uda_ray.config import ConfigError
from uda_ray.data.loading import RANKING_FILE, build_datasets, prepare
from uda_ray.metric_names import needs_test_labels
from uda_ray.pipelines.runner import load_pipeline, run_pipeline
from uda_ray.results.tables import read_table
from uda_ray.training.loop import fit
from uda_ray.training.sessions import LocalSession


def _local_run(cfg, storage: Path, name: str) -> dict:
    return fit(cfg, LocalSession(storage / name))


def _write(tmp_path: Path, synth_root: Path, stages: list, experiments: dict[str, dict]) -> Path:
    for name, over in experiments.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root, **over)))
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump({"name": "p", "stages": stages}))
    return p


def test_intrada_pipeline_ranks_then_adapts_easy_to_hard(tmp_path, synth_root):
    path = _write(tmp_path, synth_root, [
        {"name": "inter", "experiment": "advent.yaml"},
        {"name": "rank", "intrada_rank": {"from": "inter", "lambda": 0.5}},
        {"name": "intra", "experiment": "intra.yaml", "set": {"data.ranking": "@rank"}},
    ], {"advent": {"method": "advent"},
        "intra": {"method": "advent", "data.source": "cityscapes", "data.source_root": None,
                  "data.easy_fraction": 0.5}})
    run_pipeline(load_pipeline(path), tmp_path / "store", _local_run, lambda c: c)
    pdir = tmp_path / "store" / "pipelines" / "p"
    ranking = (pdir / "rank" / RANKING_FILE).read_text().split()
    assert len(ranking) == 12 and len((pdir / "rank" / "easy_split.txt").read_text().split()) == 6
    assert (pdir / "intra" / "checkpoints" / "step_0000004").is_dir()
    cfg = yaml.safe_load((pdir / "intra" / "config.yaml").read_text())
    data = prepare(build_experiment(cfg).data)
    ds = build_datasets(data, source=True, target=True, target_labels=False)
    src = {it[0].name for it in ds["src"].items}
    tgt = {it[0].name for it in ds["tgt"].items}
    sp = {k: {Path(n).name for n in v} for k, v in json.loads((pdir / "intra" / "splits.json").read_text()).items()
          if isinstance(v, list)}
    assert not src & tgt and not (src | tgt) & sp["target_holdout"]  # held-out images are never trained on
    assert src | sp["source_val"] == {Path(n).name for n in ranking[:6]} - sp["target_holdout"]  # the easy half
    assert tgt == {Path(n).name for n in ranking[6:]} - sp["target_holdout"]  # the hard half


def test_fda_mbt_pipeline_ensembles_pseudo_labels_and_self_trains(tmp_path, synth_root):
    path = _write(tmp_path, synth_root, [
        {"name": "a", "experiment": "fda.yaml", "set": {"method_cfg.beta": 0.05}},
        {"name": "b", "experiment": "fda.yaml", "set": {"method_cfg.beta": 0.09}},
        {"name": "ens", "evaluate_ensemble": {"from": ["a", "b"]}},
        {"name": "pl", "pseudo_labels": {"from": ["a", "b"], "percentile": 0.66, "cap": 0.9}},
        {"name": "st", "experiment": "st.yaml", "set": {"data.target_label_root": "@pl",
                                                         "train.init_from": "@a:best"}},
    ], {"fda": {"method": "fda"}, "st": {"method": "self_training"}})
    summary = run_pipeline(load_pipeline(path), tmp_path / "store", _local_run, lambda c: c)
    pdir = tmp_path / "store" / "pipelines" / "p"
    (ens,) = read_table(pdir / "ens" / "results", "evals")
    assert 0 <= ens["test/miou"] <= 1 and ens["step"] == 4
    assert len(read_table(pdir / "ens" / "results", "class_iou")) == 19
    manifest = json.loads((pdir / "pl" / "manifest.json").read_text())
    assert manifest["percentile"] == 0.66 and len(manifest["model"]["checkpoints"]) == 2
    assert (pdir / "st" / "checkpoints" / "step_0000004").is_dir()
    assert [r["stage"] for r in summary] == ["a", "b", "ens", "pl", "st"]

    # running it again skips every completed stage
    calls = []
    run_pipeline(load_pipeline(path), tmp_path / "store", lambda *a: calls.append(a), lambda c: c,
                 log=lambda m: None)
    assert calls == []


@pytest.mark.parametrize("stages, match", [
    ([{"name": "a", "intrada_rank": {"from": "nope"}}], "earlier stage"),
    ([{"name": "a"}], "exactly one of"),
    ([{"name": "a", "experiment": "x.yaml", "set": {"data.ranking": "@later"}}], "not an earlier stage"),
])
def test_bad_pipelines_are_rejected(tmp_path, synth_root, stages, match):
    path = _write(tmp_path, synth_root, stages, {"x": {}})
    with pytest.raises(ConfigError, match=match):
        load_pipeline(path)


def test_shipped_pipelines_load():
    root = Path(__file__).resolve().parents[1] / "experiments" / "pipelines"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        assert load_pipeline(f).cfg.stages
        assert "select" in yaml.safe_load(f.read_text()), f"{f.name} does not name its selection metric"
        assert not needs_test_labels(load_pipeline(f).cfg.select)


def _ckpt(run: Path, step: int, metrics: dict) -> Path:
    d = run / "checkpoints" / f"step_{step:07d}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"step": step, **metrics}))
    return d


def test_stage_best_follows_the_named_selection_metric(tmp_path):
    from uda_ray.pipelines.runner import resolve_stage_refs

    a = _ckpt(tmp_path / "s", 1, {"uv/snd": 0.9, "test/miou": 0.1, "uv/entropy": 0.5})
    b = _ckpt(tmp_path / "s", 2, {"uv/snd": 0.2, "test/miou": 0.8, "uv/entropy": 0.3})
    c = _ckpt(tmp_path / "s", 3, {"uv/snd": 0.5, "test/miou": 0.4, "uv/entropy": 0.1})
    ref = {"train.init_from": "@s:best"}
    assert resolve_stage_refs(ref, tmp_path, "uv/snd") == {"train.init_from": str(a)}
    assert resolve_stage_refs(ref, tmp_path, "test/miou") == {"train.init_from": str(b)}
    assert resolve_stage_refs(ref, tmp_path, "uv/entropy") == {"train.init_from": str(c)}  # mode min


def test_run_reference_uses_the_runs_own_selection_metric(tmp_path):
    from uda_ray.driver.prepare import resolve_ref

    run = tmp_path / "runs" / "r"
    _ckpt(run, 1, {"uv/snd": 0.9, "src_val/miou": 0.1})
    b = _ckpt(run, 2, {"uv/snd": 0.1, "src_val/miou": 0.7})
    (run / "config.yaml").write_text("select: src_val/miou\n")
    assert resolve_ref("run:r", tmp_path) == str(b)


def test_a_missing_run_reference_says_to_train_it_first(tmp_path):
    from uda_ray.driver.prepare import resolve_ref
    from uda_ray.errors import UserError

    with pytest.raises(UserError, match=r"^train.init_from: run:src: no run 'src' under .*; train it first "
                                        r"\(uda-ray train EXPERIMENT.yaml --name src\)$"):
        resolve_ref("run:src", tmp_path)


def test_pipeline_seeds_plan_one_folder_per_seed_with_its_seed_set_last(tmp_path, synth_root):
    from uda_ray.driver.runs import plan_pipeline_seeds

    path = _write(tmp_path, synth_root, [{"name": "a", "experiment": "a.yaml"}], {"a": {}})
    plans = plan_pipeline_seeds(path, 3, storage=tmp_path / "store", report=None, address=None,
                                overrides=["seed=7", "train.max_steps=2"])
    base = load_pipeline(path).cfg.name
    assert [p.dir.name for p in plans] == [f"{base}_s0", f"{base}_s1", f"{base}_s2"]
    st = plans[0].pipe.cfg.stages[0]
    assert [p.pipe.overrides(st)["seed"] for p in plans] == [0, 1, 2]  # --seeds wins over a --set seed
    assert all(p.pipe.overrides(st)["train.max_steps"] == 2 for p in plans)
    named = plan_pipeline_seeds(path, 2, storage=tmp_path / "store", report=None, address=None, name="mine")
    assert [p.dir.name for p in named] == ["mine_s0", "mine_s1"]


def test_unknown_pipeline_selection_metric_is_rejected(tmp_path, synth_root):
    path = _write(tmp_path, synth_root, [{"name": "a", "experiment": "fda.yaml"}], {})
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "select": "uv/nope"}))
    with pytest.raises(ConfigError, match="unknown metric 'uv/nope'"):
        load_pipeline(path)


def test_a_pipeline_folder_is_not_continued_under_other_settings_but_another_name_runs_beside_it(
        tmp_path, synth_root, capsys):
    from uda_ray import cli

    path = _write(tmp_path, synth_root, [{"name": "a", "experiment": "a.yaml"}], {"a": {}})
    store, ran = tmp_path / "store", []

    def fake_run(cfg, pdir, name):  # records the run; the stage stays incomplete, so a rerun would train again
        ran.append((pdir.name, cfg.seed))

    run_pipeline(load_pipeline(path, {"seed": 0}), store, fake_run, lambda c: c, log=lambda m: None)
    settings = json.loads((store / "pipelines" / "p" / "settings.json").read_text())
    assert settings["set"]["seed"] == 0
    # the same settings continue it, also when the file now says what --set said; another seed is refused
    # before anything runs: its completed stages would otherwise be skipped and reported as that seed's
    run_pipeline(load_pipeline(path, {"seed": 0}), store, fake_run, lambda c: c, log=lambda m: None)
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "set": {**raw.get("set", {}), "seed": 0}}))
    run_pipeline(load_pipeline(path), store, fake_run, lambda c: c, log=lambda m: None)
    with pytest.raises(ConfigError, match=r"pipeline 'p' .* other settings \(seed\); give --name"):
        run_pipeline(load_pipeline(path, {"seed": 1}), store, fake_run, lambda c: c, log=lambda m: None)
    assert ran == [("p", 0), ("p", 0), ("p", 0)]
    # from the command line: one line, exit status 2, nothing run
    assert cli.main(["pipeline", str(path), "--storage", str(store), "--set", "seed=1"]) == 2
    err = capsys.readouterr().err
    assert "other settings (seed)" in err and len(err.strip().splitlines()) == 1
    # --name runs the same file under its own folder
    run_pipeline(load_pipeline(path, {"seed": 1}, name="p_s1"), store, fake_run, lambda c: c, log=lambda m: None)
    assert ran[-1] == ("p_s1", 1)
    with pytest.raises(Exception, match="--name"):
        load_pipeline(path, name="../up")
