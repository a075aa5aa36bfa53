"""The inline launcher's pieces without a cluster: `train.launcher` validation, the TuneSession's checkpoints
(persisted in the run folder, ranked by the selection metric as Ray Train keeps them), its reports (with the
checkpoint path, through ray.tune.report) and its resume after a dead process; one listing per dataset folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_experiment
from uda_ray.build import build_experiment
from uda_ray.errors import ConfigError
from uda_ray.training.checkpoint import prune_checkpoints, run_checkpoints
from uda_ray.training.loop import fit
from uda_ray.training.sessions import LocalSession, TuneSession


@pytest.mark.parametrize("train, inline", [({}, True), ({"num_workers": 2}, False),
                                           ({"launcher": "ray_train"}, False), ({"launcher": "inline"}, True)])
def test_the_launcher_runs_single_worker_trials_inline_unless_told_otherwise(synth_root, train, inline):
    raw = tiny_experiment(synth_root, **{f"train.{k}": v for k, v in train.items()})
    assert build_experiment(raw).train.inline is inline


@pytest.mark.parametrize("train, message", [({"launcher": "inline", "num_workers": 2}, "inline runs one process"),
                                            ({"launcher": "torch"}, "must be one of auto, ray_train, inline")])
def test_a_launcher_that_cannot_run_the_config_is_refused(synth_root, train, message):
    raw = tiny_experiment(synth_root, **{f"train.{k}": v for k, v in train.items()})
    with pytest.raises(ConfigError, match=message):
        build_experiment(raw)


def _fake_checkpoint(run: Path, step: int, value: float | None) -> None:
    d = run / f"checkpoint_step_{step:07d}"
    d.mkdir(parents=True)
    (d / "state.pt").write_bytes(b"x")
    (d / "metrics.json").write_text(json.dumps({} if value is None else {"uv/entropy": value}))


def test_pruning_keeps_the_best_by_the_selection_metric_in_its_mode_and_the_latest(tmp_path):
    for step, v in [(1, 0.5), (2, 0.2), (3, None), (4, 0.3), (5, 0.9)]:
        _fake_checkpoint(tmp_path, step, v)
    (tmp_path / ".checkpoint_step_0000006.123.tmp").mkdir()  # a copy cut short by a crash: not a checkpoint
    gone = prune_checkpoints(tmp_path, 2, "uv/entropy", "min")
    assert sorted(p.name[-1] for p in gone) == ["1", "3"]
    assert [p.name[-1] for p in run_checkpoints(tmp_path)] == ["2", "4", "5"]  # 2 best (min) + the latest


class _Died(Exception):
    pass


def test_an_inline_trial_reports_its_checkpoints_and_a_restart_resumes_and_ends_like_an_undisturbed_run(
        tmp_path, synth_root, monkeypatch):
    import ray.tune

    cfg = build_experiment(tiny_experiment(synth_root, **{"train.max_steps": 6, "train.eval_every": 2,
                                                          "train.keep_checkpoints": 1}))
    reported: list[dict] = []
    died: list[int] = []

    def report(metrics, *, checkpoint=None):
        assert checkpoint is None  # the run folder holds the checkpoints, Tune gets their path
        if metrics["step"] == 4 and not died:
            died.append(4)
            raise _Died  # the process dies after persisting step 4's checkpoint, before Tune has its result
        reported.append(metrics)

    monkeypatch.setattr(ray.tune, "report", report)
    run = tmp_path / "train-t1"
    with pytest.raises(_Died):
        fit(cfg, TuneSession(run, cfg))
    assert [r["step"] for r in reported] == [2]
    assert reported[0]["checkpoint_path"] == str(run / "checkpoint_step_0000002")

    (run / ".checkpoint_step_0000006.999.tmp").mkdir()  # a copy the dead attempt left unfinished
    fit(cfg, TuneSession(run, cfg))  # what Tune's restart of the trial runs
    assert not list(run.glob(".checkpoint_step_*"))
    assert [r["step"] for r in reported] == [2, 2, 4, 6]  # the logged evaluations replayed, then the rest
    after = reported[3]
    assert (after["resumed_from"], after["restarts"]) == (4, 1)
    ref = LocalSession(tmp_path / "undisturbed")
    fit(cfg, ref)
    assert [r["train/loss/seg_src"] for r in reported[1:]] == [r["train/loss/seg_src"] for r in ref.reports]
    assert [r["test/miou"] for r in reported[1:]] == [r["test/miou"] for r in ref.reports]
    # keep_checkpoints 1: the best by the selection metric (uv/im, max) and the latest stay
    best = max(reported[1:], key=lambda r: (r["uv/im"], r["step"]))
    assert {p.name for p in run_checkpoints(run)} == {Path(best["checkpoint_path"]).name, "checkpoint_step_0000006"}
    assert reported[-1]["checkpoint_path"] == str(run / "checkpoint_step_0000006")


def test_a_run_lists_each_dataset_folder_once(synth_root, monkeypatch):
    from uda_ray.data import datasets
    from uda_ray.data.datasets import scans_once
    from uda_ray.data.loading import build_datasets, splits_of

    calls: list[tuple] = []
    flat, cs = datasets._scan_flat, datasets.Cityscapes._scan
    monkeypatch.setattr(datasets, "_scan_flat", lambda *a: calls.append(("flat", a[0])) or flat(*a))
    monkeypatch.setattr(datasets.Cityscapes, "_scan",
                        staticmethod(lambda *a: calls.append(("cs", a[0], a[1], a[3])) or cs(*a)))
    cfg = build_experiment(tiny_experiment(synth_root)).data
    with scans_once():  # as fit builds its data: the splits, then every dataset
        sp = splits_of(cfg)
        ds = build_datasets(cfg, source=True, target=True, target_labels=False, splits=sp)
    assert set(ds) == {"src", "tgt", "test", "src_val", "holdout"}
    assert len(calls) == len(set(calls)) == 3  # source train, target train (images only), target val
    calls.clear()
    build_datasets(cfg, source=True, target=True, target_labels=False)  # alone: its own splits, one listing each
    assert len(calls) == len(set(calls)) == 3


@pytest.mark.parametrize("train, bundle", [({"cpus_per_worker": 0.5}, {"CPU": 0.5}),
                                           ({"cpus_per_worker": 2.0, "use_gpu": True}, {"CPU": 2.0, "GPU": 1}),
                                           ({"num_workers": 2}, {"CPU": 0.25}),
                                           ({"launcher": "ray_train"}, {"CPU": 0.25})])
def test_an_inline_trial_asks_for_its_worker_resources_a_ray_train_driver_for_its_own(synth_root, train, bundle):
    from uda_ray.search.driver import trial_resources

    raw = tiny_experiment(synth_root, **{f"train.{k}": v for k, v in train.items()})
    sweep = {"base_raw": raw, "driver_cpus": 0.25}
    assert trial_resources({"params": {}}, sweep).bundles == [bundle]


def test_a_searched_worker_count_picks_each_trials_launcher_and_resources(synth_root):
    from uda_ray.search.driver import trial_resources

    sweep = {"base_raw": tiny_experiment(synth_root, **{"train.cpus_per_worker": 0.5}), "driver_cpus": 0.25}
    assert trial_resources({"params": {"train.num_workers": 1}}, sweep).bundles == [{"CPU": 0.5}]
    assert trial_resources({"params": {"train.num_workers": 2}}, sweep).bundles == [{"CPU": 0.25}]


def test_tunes_restart_of_a_ray_train_trial_that_used_up_its_restarts_fails_at_once(tmp_path, synth_root,
                                                                                    monkeypatch):
    import ray.train
    import ray.tune
    import ray.tune.integration.ray_train

    import uda_ray.training.launchers
    from uda_ray.search.driver import trial_driver

    class Ctx:
        def get_trial_id(self) -> str:
            return "t1"

    started: list[int] = []

    class Trainer:
        def fit(self):
            started.append(1)
            raise ray.train.TrainingFailedError("worker group failed 3 times")

    monkeypatch.setattr(ray.tune, "get_context", lambda: Ctx())
    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback", lambda: None)  # no Tune session here
    monkeypatch.setattr(uda_ray.training.launchers, "make_trainer", lambda *a, **k: Trainer())
    sweep = {"base_raw": tiny_experiment(synth_root, **{"train.launcher": "ray_train"}), "dir": str(tmp_path)}
    with pytest.raises(ray.train.TrainingFailedError):
        trial_driver({"params": {}}, sweep)
    with pytest.raises(RuntimeError, match="the Ray Train run failed after 2 restart"):
        trial_driver({"params": {}}, sweep)  # what Tune's FailureConfig restart runs: no second Ray Train run
    assert started == [1]


def test_an_inline_run_writes_its_tables_and_checkpoints_as_a_ray_train_run_does(tmp_path, synth_root):
    from tests.tb_read import scalars
    from uda_ray.results.tables import read_table
    from uda_ray.training.sessions import RunSession

    cfg = build_experiment(tiny_experiment(synth_root))
    run = tmp_path / "runs" / "r1"
    s = RunSession(run, cfg, run / "results", "r1")
    fit(cfg, s)
    s.close()
    evals = read_table(run / "results", "evals")
    assert [(e["trial_id"], e["step"]) for e in evals] == [("r1", 2), ("r1", 4)]
    assert evals[-1]["checkpoint_path"] == s.last["checkpoint_path"] == str(run / "checkpoint_step_0000004")
    (row,) = read_table(run / "results", "trials")
    assert row["status"] == "running" and row["last_checkpoint"] == str(run / "checkpoint_step_0000004")
    assert [st for st, _ in scalars(run / "tensorboard" / "r1")["test/miou"]] == [2, 4]
