"""No run trains on target labels unless it says so (uda_ray.target_labels): methods that read target labels
are refused without pseudo-labels; `data.target_labels: ground_truth` runs and is marked in every output;
runs started from a ground-truth-trained model inherit the mark; pseudo-labels, IntraDA rankings and the
labeled selection split never feed target ground truth into training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_experiment
from uda_ray.build import build_experiment
from uda_ray.cli import main
from uda_ray.config import experiment_dict
from uda_ray.errors import ConfigError
from uda_ray.target_labels import MARK, SHORT_MARK, row_marked, trains_on_target_gt
from uda_ray.training.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
READERS = ("self_training", "contrastive", "cpsl_distill")


def _write(tmp_path: Path, raw: dict, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def _assert_refused(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for way_out in ("data.pseudo_from", "data.target_label_root", "data.target_labels: ground_truth"):
        assert way_out in err, err
    return err


@pytest.mark.parametrize("method", READERS)
def test_a_method_reading_target_labels_without_pseudo_labels_exits_2_before_any_compute(
        tmp_path, capsys, synth_root, method):
    store = tmp_path / "store"
    exp = _write(tmp_path, tiny_experiment(synth_root, method=method))
    rc = main(["train", str(exp), "--storage", str(store)])
    err = _assert_refused(capsys, rc)
    assert method in err
    assert not store.exists()  # nothing written: no run folder, no generated data


@pytest.mark.parametrize("path", ["experiments/synthetic_bisenet_r18_self_training.yaml",
                                  "experiments/synthetic_bisenet_r18_contrastive.yaml",
                                  "experiments/synthetic_bisenet_r18_cpsl_distill.yaml",
                                  "experiments/gta5_to_cityscapes_bisenet_r18_self_training.yaml",
                                  "experiments/gta5_to_cityscapes_enet_contrastive.yaml"])
def test_the_shipped_pseudo_label_experiments_run_alone_are_refused(tmp_path, capsys, path):
    store = tmp_path / "store"
    rc = main(["train", str(ROOT / path), "--set", "train.max_steps=2", "--storage", str(store)])
    _assert_refused(capsys, rc)
    assert not store.exists()


def test_the_intrada_stage_run_alone_is_refused_not_trained_on_target_ground_truth(tmp_path, capsys):
    """Its source is the target's easy split with the ranking's pseudo-labels; without the ranking the
    source labels would be the target's ground truth."""
    store = tmp_path / "store"
    rc = main(["train", str(ROOT / "experiments/gta5_to_cityscapes_deeplabv2_intrada.yaml"), "--storage", str(store)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "data.ranking" in err and "ground truth" in err
    assert not store.exists()


@pytest.mark.parametrize("over, needle", [
    ({"method": "source_only", "data.target_labels": "ground_truth"}, "reads no target labels"),
    ({"method": "self_training", "data.target_labels": "ground_truth", "data.target_label_root": "/x"},
     "contradicts"),
    ({"method": "self_training", "data.target_labels": "oracle"}, "data.target_labels must be"),
])
def test_contradictory_target_label_settings_are_refused(synth_root, over, needle):
    with pytest.raises(ConfigError, match=needle):
        build_experiment(tiny_experiment(synth_root, **over))


def test_training_on_the_source_copy_of_the_target_is_refused(synth_root):
    raw = tiny_experiment(synth_root, **{"data.source": "cityscapes",
                                         "data.source_root": str(Path(synth_root) / "cityscapes")})
    with pytest.raises(ConfigError, match="target's ground truth"):
        build_experiment(raw)


@pytest.mark.parametrize("over, marked", [
    ({"method": "target_only"}, True),  # the oracle, implicitly
    ({"method": "target_only", "data.target_label_root": "/pl"}, False),  # target-only on pseudo-labels
    ({"method": "self_training", "data.target_labels": "ground_truth"}, True),
    ({"method": "self_training", "data.target_label_root": "/pl"}, False),
    ({"method": "self_training", "data.pseudo_from": "/ck"}, False),
    ({"method": "adversarial"}, False),
    ({"method": "source_only"}, False),
])
def test_which_runs_count_as_trained_on_target_ground_truth(synth_root, over, marked):
    cfg = build_experiment(tiny_experiment(synth_root, **over))
    assert trains_on_target_gt(experiment_dict(cfg)) is marked


def _gt_run_rows(tmp_path: Path, synth_root) -> tuple[Path, dict]:
    """Really train a self-training run on target ground truth for 2 steps (in-process) and record its results
    the way a run records them."""
    from uda_ray.results.tables import ResultsWriter
    from uda_ray.training.loop import fit
    from uda_ray.training.sessions import LocalSession

    cfg = build_experiment(tiny_experiment(synth_root, method="self_training",
                                           **{"data.target_labels": "ground_truth", "train.max_steps": 2}))
    s = LocalSession(tmp_path / "gt")
    fit(cfg, s)
    exp, res = experiment_dict(cfg), tmp_path / "gt" / "results"
    w = ResultsWriter(res, "gt", cfg.select, "max", None)
    w.start("gt", exp, {})
    for r in s.reports:
        w.result("gt", exp, {}, {**r, "checkpoint_path": str(s.run_dir / "checkpoints" / f"step_{r['step']:07d}")})
    w.end("gt", exp, {}, "completed")
    return res, exp


def test_the_ground_truth_setting_runs_and_every_output_marks_it(tmp_path, synth_root):
    from uda_ray.results.markdown import markdown_report
    from uda_ray.results.queries import best_trials
    from uda_ray.results.report import load, render
    from uda_ray.results.tables import read_table
    from uda_ray.results.text import best_table, pipeline_ended, run_ended

    res, exp = _gt_run_rows(tmp_path, synth_root)
    (row,) = read_table(res, "trials")
    assert row["target_ground_truth"] is True and row["config.data.target_labels"] == "ground_truth"
    best = best_trials(res, metric="test/miou")
    assert best and row_marked(best[0]) and MARK in best_table(best)
    md = markdown_report("p", [("st", tmp_path / "gt")])
    assert f"st ({SHORT_MARK})" in md and MARK in md
    html = render(load("run", tmp_path / "gt"), predictions=False)
    assert 'id="target-gt"' in html and MARK in html
    assert MARK in run_ended({"step": 2, "select_metric": "test/miou", "test/miou": 0.1, "checkpoint_path": "c",
                              "run_dir": "r", "target_ground_truth": True})
    summary = [{"stage": "st", "kind": "train", "target_ground_truth": True}]
    assert MARK in pipeline_ended(summary, 1.0)


def test_a_uda_run_is_not_marked(tmp_path, synth_root):
    from uda_ray.results.markdown import markdown_report
    from uda_ray.results.queries import best_trials
    from uda_ray.results.report import load, render
    from uda_ray.results.tables import ResultsWriter
    from uda_ray.results.text import best_table

    cfg = build_experiment(tiny_experiment(synth_root, method="adversarial"))
    exp, res = experiment_dict(cfg), tmp_path / "uda" / "results"
    w = ResultsWriter(res, "uda", "test/miou", "max", None)
    w.result("uda", exp, {}, {"step": 2, "test/miou": 0.2, "test/pixel_acc": 0.5, "checkpoint_path": None})
    w.end("uda", exp, {}, "completed")
    best = best_trials(res)
    assert best[0]["target_ground_truth"] is False and MARK not in best_table(best)
    assert MARK not in markdown_report("p", [("uda", tmp_path / "uda")])
    assert 'id="target-gt"' not in render(load("run", tmp_path / "uda"), predictions=False)


def test_tables_written_before_the_column_are_judged_from_their_config(synth_root):
    gt = experiment_dict(build_experiment(tiny_experiment(synth_root, method="target_only")))
    uda = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    assert row_marked({"config_json": json.dumps(gt)}) and not row_marked({"config_json": json.dumps(uda)})


# ------------------------------------------------------------------------------------------------
# lineage


def _checkpoint(path: Path, synth_root, **over) -> Path:
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root, **over)))
    save_checkpoint(path, method_state={}, step=1, rng=[], config=exp, metrics={})
    return path


@pytest.mark.parametrize("how", ["init_from", "pseudo_from", "teacher_checkpoint", "pseudo_label_folder",
                                 "ranking_folder"])
def test_a_run_that_starts_from_a_ground_truth_trained_model_is_marked(tmp_path, synth_root, how):
    from uda_ray.driver.prepare import resolve_refs

    oracle = _checkpoint(tmp_path / "oracle", synth_root, method="target_only")
    uda = _checkpoint(tmp_path / "uda", synth_root, method="source_only")
    folder = tmp_path / "folder"
    folder.mkdir()

    def raw_for(ck: Path) -> dict:
        if how == "init_from":
            return tiny_experiment(synth_root, **{"train.init_from": str(ck)})
        if how == "pseudo_from":
            return tiny_experiment(synth_root, method="self_training", **{"data.pseudo_from": str(ck)})
        if how == "teacher_checkpoint":
            return tiny_experiment(synth_root, method="cpsl_distill", **{
                "data.target_label_root": str(folder), "method_cfg.teacher_checkpoint": str(ck)})
        if how == "pseudo_label_folder":
            (folder / "manifest.json").write_text(json.dumps({"model": {"checkpoints": [str(ck)]}}))
            return tiny_experiment(synth_root, method="self_training", **{"data.target_label_root": str(folder)})
        (folder / "manifest.json").write_text(json.dumps({"checkpoint": str(ck)}))
        return tiny_experiment(synth_root, method="adversarial", **{"data.ranking": str(folder),
                                                                    "data.source": "cityscapes"})

    marked = resolve_refs(raw_for(oracle), tmp_path)
    assert marked["data"]["target_gt_via"] == str(oracle)
    assert trains_on_target_gt(experiment_dict(build_experiment(marked)))
    clean = resolve_refs(raw_for(uda), tmp_path)
    assert not clean["data"].get("target_gt_via")
    assert not trains_on_target_gt(experiment_dict(build_experiment(clean)))


def test_the_mark_is_inherited_through_generations(tmp_path, synth_root):
    from uda_ray.driver.prepare import resolve_refs

    oracle = _checkpoint(tmp_path / "oracle", synth_root, method="target_only")
    child = resolve_refs(tiny_experiment(synth_root, **{"train.init_from": str(oracle)}), tmp_path)
    child_ck = tmp_path / "child"
    save_checkpoint(child_ck, method_state={}, step=1, rng=[],
                    config=experiment_dict(build_experiment(child)), metrics={})
    grandchild = resolve_refs(tiny_experiment(synth_root, **{"train.init_from": str(child_ck)}), tmp_path)
    assert grandchild["data"]["target_gt_via"] == str(child_ck)


def test_reruns_of_a_ground_truth_sweep_stay_marked(tmp_path, synth_root):
    from uda_ray.selection import seed_variance

    res, exp = _gt_run_rows(tmp_path, synth_root)
    specs = seed_variance.plan(res.parent, top=1, seeds=2, metric="test/miou", mode="max")
    assert len(specs) == 2
    assert all(trains_on_target_gt(experiment_dict(build_experiment(s.experiment))) for s in specs)


# ------------------------------------------------------------------------------------------------
# the paths that make labels never read the target's ground truth


def _without_target_train_labels(synth_root, tmp_path: Path) -> Path:
    """A copy of the benchmark whose Cityscapes train split has no ground truth at all."""
    root = tmp_path / "bench"
    shutil.copytree(synth_root, root)
    gt = root / "cityscapes" / "gtFine" / "train"
    assert gt.is_dir()
    shutil.rmtree(gt)
    return root


def test_pseudo_labels_and_the_intrada_ranking_never_read_target_ground_truth(tmp_path, synth_root):
    from uda_ray.pipelines.actions import intrada_rank
    from uda_ray.pipelines.pseudo_labels import from_checkpoints
    from uda_ray.training.loop import fit
    from uda_ray.training.sessions import LocalSession

    root = _without_target_train_labels(synth_root, tmp_path)
    cfg = build_experiment(tiny_experiment(root, **{"train.max_steps": 1, "train.eval_every": 1,
                                                    "data.val_split": None}))
    s = LocalSession(tmp_path / "src")
    fit(cfg, s)
    ck = s.run_dir / "checkpoints" / "step_0000001"
    man = from_checkpoints([ck], tmp_path / "pl")
    assert man["num_images"] > 0 and (tmp_path / "pl" / "manifest.json").is_file()
    rank = intrada_rank([ck], tmp_path / "rank", lambda_=0.5)
    assert rank["n_easy"] + rank["n_hard"] > 0


def test_the_labeled_selection_split_never_enters_the_training_stream(synth_root):
    from uda_ray.data.loading import build_datasets, names_of

    cfg = build_experiment(tiny_experiment(synth_root, method="target_only",
                                           **{"data.selection_labeled": 2, "select": "sel/miou"}))
    ds = build_datasets(cfg.data, source=False, target=True, target_labels=True)
    sel, tgt = set(names_of(ds["sel"])), set(names_of(ds["tgt"]))
    assert len(sel) == 2 and tgt and not sel & tgt


def test_a_warm_start_never_seeds_a_uda_search_with_runs_trained_on_target_ground_truth(tmp_path, synth_root):
    """`--warm-start` carries only parameters and objective values, but values learnt by an oracle would steer a
    UDA search with what the target labels taught: such trials are skipped, with the reason."""
    from uda_ray.results.tables import ResultsWriter
    from uda_ray.search.space import load_space
    from uda_ray.search.study import warm_start_points

    earlier = tmp_path / "earlier"
    w = ResultsWriter(earlier / "results", "earlier", "src_val/miou", "max", 0)
    for tid, over in (("oracle", {"method": "self_training", "data.target_labels": "ground_truth"}),
                      ("uda", {"method": "adversarial"})):
        exp = experiment_dict(build_experiment(tiny_experiment(synth_root, **over, **{"optim.lr": 0.01})))
        w.result(tid, exp, {"optim.lr": 0.01}, {"step": 4, "src_val/miou": 0.3, "checkpoint_path": None})
        w.end(tid, exp, {"optim.lr": 0.01}, "completed")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root, method="adversarial")))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "num_samples": 2, "objective": {"metric": "src_val/miou"},
        "params": {"optim.lr": {"loguniform": [1e-3, 1e-1]}}}))
    points, skipped = warm_start_points(earlier, load_space(tmp_path / "space.yaml"))
    assert [p["user_attrs"]["warm_start_trial_id"] for p in points] == ["uda"]
    assert dict(skipped)["oracle"].startswith("trained on target ground truth")
