"""Faults under real Ray: a trial's training process SIGKILLed mid-trial restarts from its latest checkpoint and
the trial ends exactly as an undisturbed run of the same config; the restart is visible in the tables. With the
default launcher a single-worker trial trains in the Tune trial's own process (restarted by Tune's
FailureConfig); a 2-worker trial runs under Ray Train (its worker group restarted by Ray Train)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import tiny_experiment
from tests.test_ray_integration import _env, _write_space
from uda_ray.build import build_experiment
from uda_ray.results.tables import read_table
from uda_ray.training.loop import fit
from uda_ray.training.sessions import LocalSession

COMPARED = ("test/", "train/")  # everything but timings and the checkpoint path


def _wait_for(pred, proc, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    return None


def _sweep_killing_a_worker(tmp_path, space, name: str, rank: int, max_steps: int):
    """Run the sweep in a subprocess; once its running trial has reported an evaluation (so it has a checkpoint),
    SIGKILL the training process of rank `rank` (not the sweep driver) and wait for the sweep to end, which must
    succeed. Returns (the sweep's store, the last step evaluated before the kill, the time of the kill)."""
    store = tmp_path / "store" / name
    evals_path = store / "results" / "evals.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "uda_ray.cli", "sweep", str(space), "--name", name],
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def a_running_trial_after_a_checkpoint():
        if not evals_path.exists():
            return None
        # read_table: the writer may be replacing a segment while we read
        steps = [r["step"] for r in read_table(evals_path.parent, "evals")]
        pids = list(store.glob(f"train/train-*/worker-{rank}.pid"))
        return (max(steps), pids[0]) if steps and max(steps) < max_steps and pids else None

    try:
        got = _wait_for(a_running_trial_after_a_checkpoint, proc, 300)
        assert got, "the trial never reached its first checkpoint while running"
        killed_after, pid_file = got
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        t_kill = time.time()
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    return store, killed_after, t_kill


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_trial_process_restarts_from_its_checkpoint_and_ends_like_an_undisturbed_run(tmp_path, synth_root):
    max_steps, every = 30, 5
    space = _write_space(tmp_path, synth_root, {"train.max_steps": max_steps, "train.eval_every": every,
                                                 "train.cpus_per_worker": 0.5},
                         num_samples=1, params={"optim.lr": {"choice": [0.01]}})
    store, killed_after, t_kill = _sweep_killing_a_worker(tmp_path, space, "wk", rank=0, max_steps=max_steps)
    evals_path = store / "results" / "evals.parquet"

    (trial,) = pq.read_table(store / "results" / "trials.parquet").to_pylist()
    assert trial["status"] == "completed" and trial["restarts"] == 1
    assert killed_after <= trial["resumed_from"] < max_steps
    evals = sorted(pq.read_table(evals_path).to_pylist(), key=lambda r: r["step"])
    assert [r["step"] for r in evals] == list(range(every, max_steps + 1, every))  # none missing, none twice
    (first_after,) = [r for r in evals if r.get("resumed_from") is not None]
    assert first_after["step"] == trial["resumed_from"] + every and first_after["restarts"] == 1
    steady = sorted(b["reported_at"] - a["reported_at"] for a, b in zip(evals, evals[1:]) if b is not first_after)
    print(f"\nworker SIGKILL after step {killed_after}: restarted from step {trial['resumed_from']}; next evaluation "
          f"{first_after['reported_at'] - t_kill:.1f}s after the kill "
          f"(a normal interval: {steady[len(steady) // 2]:.1f}s)")
    run = store / "train" / f"train-{trial['trial_id']}"
    restarts = (run / "restarts.jsonl").read_text().splitlines()
    assert [json.loads(ln)["resumed_from"] for ln in restarts] == [trial["resumed_from"]]
    # the default launcher trained it in the Tune trial itself: no Ray Train run (its snapshot file) in the folder
    assert not (run / "checkpoint_manager_snapshot.json").exists()
    assert trial["last_checkpoint"] == str(run / f"checkpoint_step_{max_steps:07d}")

    # the same config, undisturbed and in-process: identical metrics at every step
    undisturbed = LocalSession(tmp_path / "undisturbed")
    fit(build_experiment(json.loads(trial["config_json"])), undisturbed)
    assert [r["step"] for r in undisturbed.reports] == [r["step"] for r in evals]
    for ref, got in zip(undisturbed.reports, evals):
        for k, v in ref.items():
            if k.startswith(COMPARED) and not k.startswith("test/iou/"):
                assert got[k] == v, (ref["step"], k, got[k], v)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.ddp
def test_a_two_worker_trial_under_ray_train_labels_once_sums_its_sharded_evaluation_and_survives_a_dead_rank(
        tmp_path, synth_root):
    from uda_ray.build import load_trained
    from uda_ray.data.loading import build_datasets, splits_of
    from uda_ray.training.checkpoint import load_state
    from uda_ray.training.evaluate import eval_loaders, evaluate_splits

    teacher = LocalSession(tmp_path / "teacher")  # the checkpoint the trial makes its pseudo-labels from
    fit(build_experiment(tiny_experiment(synth_root, **{"train.max_steps": 2})), teacher)
    max_steps, every = 15, 3
    space = _write_space(tmp_path, synth_root, {
        "method": "self_training", "data.pseudo_from": str(tmp_path / "teacher" / "checkpoints" / "step_0000002"),
        "train.num_workers": 2, "train.cpus_per_worker": 0.5, "train.max_steps": max_steps,
        "train.eval_every": every}, num_samples=1, params={"optim.lr": {"choice": [0.01]}})
    store, _, _ = _sweep_killing_a_worker(tmp_path, space, "dd", rank=1, max_steps=max_steps)
    evals_path = store / "results" / "evals.parquet"

    (trial,) = pq.read_table(store / "results" / "trials.parquet").to_pylist()
    assert trial["status"] == "completed" and trial["restarts"] == 1
    evals = sorted(pq.read_table(evals_path).to_pylist(), key=lambda r: r["step"])
    assert [r["step"] for r in evals] == list(range(every, max_steps + 1, every))
    run = store / "train" / f"train-{trial['trial_id']}"
    assert (run / "checkpoint_manager_snapshot.json").is_file()  # a Ray Train run (2 workers: the DDP path)
    # rank 0 labelled the target once (the restart reused them); rank 1 waited for them at the barrier
    manifest = json.loads((run / "pseudo_labels" / "manifest.json").read_text())
    assert manifest["num_images"] == 12
    state = load_state(trial["last_checkpoint"])
    assert state["step"] == max_steps and len(state["rng"]) == 2  # every rank's RNG state is in the checkpoint

    # the reported evaluation is the whole test split: each rank's shard, summed. One process over all of it,
    # with the final weights, finds the same numbers (up to a few pixels whose argmax flips with the batch
    # composition); rank 0's shard alone does not.
    cfg, model = load_trained(trial["last_checkpoint"])
    ds = build_datasets(cfg.data, source=True, target=True, target_labels=False, splits=splits_of(cfg.data))
    ref = evaluate_splits(model, eval_loaders(ds, cfg, 0, 1), cfg, torch.device("cpu"))
    shard = evaluate_splits(model, eval_loaders(ds, cfg, 0, 2), cfg, torch.device("cpu"))
    # (measured: 5.2e-4 apart in pixel accuracy for the whole split, 3.0e-3 for rank 0's shard, with torch 2.14's
    # CPU kernels; the model is 15 steps old, so near-tied logits are many)
    reported = evals[-1]["test/pixel_acc"]
    assert abs(ref["test/pixel_acc"] - reported) <= 1.5e-3, (ref, evals[-1])
    assert abs(ref["test/pixel_acc"] - reported) < abs(shard["test/pixel_acc"] - reported) / 2, (ref, shard)
    assert ref["test/miou"] == pytest.approx(evals[-1]["test/miou"], abs=5e-3)
