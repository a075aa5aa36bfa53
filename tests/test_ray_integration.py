"""Real Ray: a tiny sweep end to end (tables, best --export, train on the export) and a resume after
SIGKILL of the driver. Each test starts its own local cluster (address="local") in a subprocess with a
private HOME, and the cluster ends with its driver."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import tiny_experiment
from tests.driver_kill import kill_when
from uda_ray.results.tables import read_table

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # every test here starts Ray and takes more than 20 s


def _env(tmp_path: Path) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(home), "UDA_RAY_STORAGE": str(tmp_path / "store"),
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _cli(tmp_path: Path, *args: str, timeout: int = 400, env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "uda_ray.cli", *args], env={**_env(tmp_path), **(env or {})},
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _write_space(tmp_path: Path, synth_root: Path, base_over: dict, **kw) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root, **base_over)))
    raw = {"base": "base.yaml", "num_samples": 2, "max_concurrent_trials": 1, "seed": 3,
           "params": {"optim.lr": {"loguniform": [1e-3, 1e-2]}, "method": {"choice": ["source_only", "target_only"]}}}
    raw.update(kw)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "space.yaml"


def _table(tmp_path: Path, sweep: str, name: str) -> list[dict]:
    return pq.read_table(tmp_path / "store" / sweep / "results" / f"{name}.parquet").to_pylist()


def _assert_study_matches_tables(sweep_dir: Path, trials: list[dict], evals: list[dict]) -> None:
    """The persisted Optuna study (what optuna-dashboard opens), read back with Optuna's API from its file:
    one study trial per Tune trial, its state from the table's status, an intermediate value per eval."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(sweep_dir / "optuna_journal.log")))
    study = optuna.load_study(study_name=sweep_dir.name, storage=storage)
    run = [t for t in study.trials if "tune_trial_id" in t.user_attrs]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert sorted(t.user_attrs["tune_trial_id"] for t in run) == sorted(t["trial_id"] for t in trials)
    state = {"completed": "COMPLETE", "stopped_early": "PRUNED", "errored": "FAIL"}
    metric = trials[0]["objective"]
    for ot in run:
        row = next(t for t in trials if t["trial_id"] == ot.user_attrs["tune_trial_id"])
        assert ot.state.name == state[row["status"]]
        mine = {e["step"]: e[metric] for e in evals if e["trial_id"] == row["trial_id"]}
        assert ot.intermediate_values == pytest.approx(mine)
        if ot.state.name == "COMPLETE":
            assert ot.value == pytest.approx(mine[max(mine)])


def test_sweep_end_to_end_then_best_export_then_train(tmp_path, synth_root):
    space = _write_space(tmp_path, synth_root, {"train.cpus_per_worker": 0.5},
                         scheduler={"asha": {"grace_period": 2, "reduction_factor": 2}})
    out = _cli(tmp_path, "sweep", str(space), "--name", "e2e").stdout
    assert "top 2 by uv/im (max)" in out and "test/miou=" in out  # label-free default, test shown beside

    trials = _table(tmp_path, "e2e", "trials")
    assert len(trials) == 2 and {t["status"] for t in trials} <= {"completed", "stopped_early"}
    assert all(t["search_seed"] == 3 and t["best_checkpoint"] for t in trials)
    evals = _table(tmp_path, "e2e", "evals")
    keys = [(e["trial_id"], e["step"]) for e in evals]
    assert len(keys) == len(set(keys)) and all(0 <= e["test/miou"] <= 1 for e in evals)
    assert len(_table(tmp_path, "e2e", "class_iou")) == 19 * len(evals)

    _assert_study_matches_tables(tmp_path / "store" / "e2e", trials, evals)

    best = _cli(tmp_path, "best", "e2e", "--top", "1", "--export", str(tmp_path / "best.yaml")).stdout
    assert "wrote" in best
    exported = yaml.safe_load((tmp_path / "best.yaml").read_text())
    top = max(trials, key=lambda t: t["best_value"])
    assert exported["optim"]["lr"] == top["config.optim.lr"] and exported["method"] == top["method"]
    assert exported["select"] == "uv/im" and top["objective"] == "uv/im"
    ls = _cli(tmp_path, "ls").stdout
    assert "e2e" in ls and "completed" in ls

    out = _cli(tmp_path, "train", str(tmp_path / "best.yaml"), "--set", "train.max_steps=2",
               "--set", "train.eval_every=2").stdout
    assert "done: step 2" in out
    from tests.tb_read import scalars

    tb = scalars(tmp_path / "store" / "runs" / "e2e-best" / "tensorboard" / "e2e-best")
    assert [s for s, _ in tb["test/miou"]] == [2]


@pytest.mark.ray
def test_label_free_sweep_on_a_folder_of_frames_then_export_then_train(tmp_path, synth_root):
    frames = tmp_path / "frames"
    frames.mkdir()
    for p in sorted((synth_root / "cityscapes" / "leftImg8bit" / "train").glob("*/*.png")):
        shutil.copy(p, frames / p.name)
    space = _write_space(tmp_path, synth_root, {"data.target": "frames", "data.target_root": str(frames),
                                                "method": "minent", "train.max_steps": 2,
                                                "train.cpus_per_worker": 0.5},
                         params={"optim.lr": {"loguniform": [1e-3, 1e-2]}}, objective={"metric": "uv/entropy"})
    out = _cli(tmp_path, "sweep", str(space), "--name", "frames").stdout
    assert "no labeled test split: test metrics are absent" in out and "top 2 by uv/entropy (min)" in out
    assert "test/miou: absent" in out
    evals = _table(tmp_path, "frames", "evals")
    assert len(evals) == 2 and not [k for e in evals for k in e if k.startswith("test/")]
    _cli(tmp_path, "best", "frames", "--export", str(tmp_path / "best.yaml"))
    out = _cli(tmp_path, "train", str(tmp_path / "best.yaml"), "--set", "train.max_steps=1").stdout
    assert "done: step 1 uv/entropy=" in out and "test/miou: absent" in out


@pytest.mark.ray
def test_resume_after_sigkill_runs_every_trial_and_every_eval_exactly_once(tmp_path, synth_root):
    max_steps = 40
    space = _write_space(tmp_path, synth_root, {"train.max_steps": max_steps, "train.eval_every": 5,
                                                 "train.cpus_per_worker": 0.5}, num_samples=3)
    proc = subprocess.Popen([sys.executable, "-m", "uda_ray.cli", "sweep", str(space), "--name", "rs"],
                            env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    evals_path = tmp_path / "store" / "rs" / "results" / "evals.parquet"
    victim = None

    def second_trial_mid_way() -> bool:
        nonlocal victim
        if not evals_path.exists():
            return False
        rows = read_table(evals_path.parent, "evals")  # (not pq.read_table: the writer may be replacing a segment)
        trials = sorted({r["trial_id"] for r in rows}, key=lambda t: min(r["reported_at"] for r in rows
                                                                          if r["trial_id"] == t))
        if len(trials) >= 2 and 10 <= max(r["step"] for r in rows if r["trial_id"] == trials[1]) < max_steps:
            victim = trials[1]
            return True
        return False

    killed_at = kill_when(proc, second_trial_mid_way, "a trial was mid-way to interrupt")
    before = {(r["trial_id"], r["step"]): r["reported_at"] for r in pq.read_table(evals_path).to_pylist()}
    time.sleep(2)

    out = _cli(tmp_path, "resume", "rs").stdout
    assert "resuming sweep 'rs'" in out
    trials = _table(tmp_path, "rs", "trials")
    assert len(trials) == 3 and all(t["status"] == "completed" for t in trials)
    evals = _table(tmp_path, "rs", "evals")
    _assert_study_matches_tables(tmp_path / "store" / "rs", trials, evals)
    keys = sorted((e["trial_id"], e["step"]) for e in evals)
    assert keys == sorted((t["trial_id"], s) for t in trials for s in range(5, max_steps + 1, 5))
    # the interrupted trial continued from its latest checkpoint, not from step 0: its first evaluation after
    # the resume says where it resumed, and the other trials never restarted
    last_before = max(s for (t2, s) in before if t2 == victim)
    (row,) = [t for t in trials if t["trial_id"] == victim]
    assert row["restarts"] == 1 and max(5, last_before - 5) <= row["resumed_from"] < max_steps, row
    first_after = [e["step"] for e in evals if e["trial_id"] == victim and e.get("resumed_from") is not None]
    assert first_after == [row["resumed_from"] + 5]
    assert all(t["restarts"] == 0 for t in trials if t["trial_id"] != victim)
    print(f"\ndriver SIGKILL mid-trial: resume ran the rest in {time.time() - killed_at:.0f}s (incl. 2s wait); "
          f"trial {victim} resumed from step {row['resumed_from']} (last step in the tables: {last_before})")


@pytest.mark.ray
@pytest.mark.slow
def test_pareto_sweep_over_networks_completes_and_best_prints_its_front(tmp_path, synth_root, monkeypatch):
    space = _write_space(
        tmp_path, synth_root, {"train.cpus_per_worker": 0.5, "train.max_steps": 40, "train.eval_every": 40,
                               "train.profile": True},
        objective=[{"metric": "test/miou", "mode": "max"}, {"metric": "model/gflops", "mode": "min"}],
        constraints={"model/gflops": "<= 100"},
        params={"model.name": {"choice": ["bisenet_r18", "enet"]}, "optim.lr": {"loguniform": [1e-3, 1e-2]}})
    # the live view, made frequent: heartbeats from the workers, plain lines (stdout is a pipe, not a TTY)
    # (40 steps: a trial of 2 or 8 could end before the live view showed a step line on an idle machine)
    mlruns = (tmp_path / "mlruns").as_uri()
    out = _cli(tmp_path, "sweep", str(space), "--name", "pf", "--mlflow", mlruns,
               env={"UDA_RAY_HEARTBEAT_S": "0", "UDA_RAY_LIVE_S": "0.2"}).stdout
    assert re.search(r"\] \w+: step \d+/40 \(\d+%\)", out) and "\r" not in out
    assert len(list((tmp_path / "store" / "pf" / "train").glob("train-*/progress.json"))) == 2
    trials = _table(tmp_path, "pf", "trials")
    assert len(trials) == 2 and all(t["status"] == "completed" for t in trials)
    from tests.tb_read import scalars  # what `tensorboard --logdir <sweep>/tensorboard` shows: a run per trial

    for t in trials:
        assert [s for s, _ in scalars(tmp_path / "store" / "pf" / "tensorboard" / t["trial_id"])["test/miou"]] == [40]
    from mlflow.tracking import MlflowClient  # the --mlflow callback: one finished run per trial

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    c = MlflowClient(tracking_uri=mlruns)
    runs = c.search_runs([c.get_experiment_by_name("pf").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(t["trial_id"] for t in trials)
    assert all(r.info.status == "FINISHED" and [m.step for m in c.get_metric_history(r.info.run_id, "test/miou")]
               == [40] for r in runs)
    out = _cli(tmp_path, "best", "pf").stdout
    assert "Pareto front:" in out and "of 2 completed trials over test/miou (max), model/gflops (min)" in out
    assert "constraints model/gflops <= 100" in out

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = tmp_path / "store" / "pf" / "optuna_journal.log"
    study = optuna.load_study(study_name="pf", storage=JournalStorage(JournalFileBackend(str(path))))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and all(len(t.values) == 2 and t.constraints["model/gflops <= 100"] < 0 for t in done)
    evals = _table(tmp_path, "pf", "evals")
    for t in done:  # the study holds the final values the tables hold
        e = next(e for e in evals if e["trial_id"] == t.user_attrs["tune_trial_id"] and e["step"] == 40)
        assert t.values == pytest.approx([e["test/miou"], e["model/gflops"]])
