"""Live progress: the worker's heartbeat file, the driver's calm live view, `uda-ray ls` on a running sweep."""

from __future__ import annotations

import io
import json
import time

from uda_ray.training.progress import PROGRESS_FILE, Heartbeat, LiveView, describe, read_progress


def test_heartbeat_rewrites_progress_when_due_without_leftovers(tmp_path):
    beat = Heartbeat(tmp_path, max_steps=100, start_step=20, interval=0.1)
    assert read_progress(tmp_path)["step"] == 20  # written at once
    beat.step(21)
    assert read_progress(tmp_path)["step"] == 20  # not due yet: no write per step
    time.sleep(0.15)
    beat.step(30)
    p = read_progress(tmp_path)
    assert p["step"] == 30 and p["max_steps"] == 100 and p["steps_per_s"] > 0 and p["phase"] == "training"
    assert p["eta_s"] == (100 - 30) / p["steps_per_s"]
    beat.evaluating(True)
    assert read_progress(tmp_path)["phase"] == "evaluating"
    beat.step(100)  # the last step is always written
    assert read_progress(tmp_path)["step"] == 100 and read_progress(tmp_path)["eta_s"] == 0
    assert sorted(x.name for x in tmp_path.iterdir()) == [PROGRESS_FILE]


def test_the_training_loop_leaves_its_final_progress(tmp_path, synth_root):
    from tests.conftest import tiny_experiment
    from uda_ray.build import build_experiment
    from uda_ray.training.loop import fit
    from uda_ray.training.sessions import LocalSession

    fit(build_experiment(tiny_experiment(synth_root)), LocalSession(tmp_path / "run"))  # 4 steps
    p = read_progress(tmp_path / "run")
    assert (p["step"], p["max_steps"], p["eta_s"], p["phase"]) == (4, 4, 0, "training") and p["steps_per_s"] > 0


def test_describe_names_step_rate_eta_and_a_stale_heartbeat():
    p = {"step": 340, "max_steps": 2000, "steps_per_s": 4.1, "eta_s": 405.0, "updated_at": 1000.0}
    assert describe(p, now=1001.0) == "step 340/2000 (17%), 4.10 steps/s, ETA 6m45s"
    assert describe(p, now=1000.0 + 600).endswith("(heartbeat 10m00s old)")
    assert "starting" in describe({**p, "steps_per_s": None, "eta_s": None}, now=1001.0)


def test_live_view_in_a_log_prints_plain_lines_only_when_due_and_moved():
    lines: list[str] = []
    view = LiveView(lines.append, tty=None, interval=30)  # stdout is not a terminal
    p = {"t1": {"step": 10, "max_steps": 100, "steps_per_s": 1.0, "eta_s": 90.0, "updated_at": 0.0}}
    assert view.update(p, 5, now=100.0)
    assert not view.update(p, 6, now=110.0)  # not due
    assert not view.update(p, 40, now=140.0)  # due, but nothing moved
    p["t1"] = {**p["t1"], "step": 20, "updated_at": 140.0}
    assert view.update(p, 41, now=141.0)
    assert len(lines) == 2 and "t1: step 20/100" in lines[1] and not any("\r" in ln for ln in lines)


def test_live_view_on_a_terminal_rewrites_one_line():
    out, lines = io.StringIO(), []
    view = LiveView(lines.append, tty=out)
    p = {"t1": {"step": 10, "max_steps": 100, "steps_per_s": 1.0, "eta_s": 90.0, "updated_at": 0.0}}
    assert view.update(p, 1, now=10.0) and view.update(p, 4, now=13.0)
    view.before_line()
    assert out.getvalue().count("\r\x1b[K") == 2 and out.getvalue().endswith("\n") and not lines


def test_ls_shows_a_running_sweeps_progress(tmp_path, synth_root, capsys):
    import subprocess

    from tests.conftest import tiny_experiment
    from uda_ray.build import build_experiment
    from uda_ray.cli import main
    from uda_ray.config import experiment_dict
    from uda_ray.results.tables import ResultsWriter

    sweep = tmp_path / "live"
    exp = experiment_dict(build_experiment(tiny_experiment(synth_root)))
    w = ResultsWriter(sweep / "results", "live", "test/miou", "max", 0)
    w.start("abc", exp, {})
    (sweep / "train" / "train-abc").mkdir(parents=True)
    (sweep / "train" / "train-abc" / PROGRESS_FILE).write_text(json.dumps(
        {"step": 3, "max_steps": 4, "steps_per_s": 0.5, "eta_s": 2.0, "updated_at": time.time()}))
    driver = subprocess.Popen(["sleep", "60"])  # stands for the live sweep driver
    try:
        import socket

        (sweep / "sweep.json").write_text(json.dumps({"name": "live", "status": "running", "objective": []}))
        (sweep / "driver.lock").write_text(json.dumps({"pid": driver.pid, "host": socket.gethostname()}))
        assert main(["ls", "--storage", str(tmp_path)]) == 0
    finally:
        driver.kill()
        driver.wait()
    out = capsys.readouterr().out
    assert "abc: step 3/4 (75%), 0.50 steps/s, ETA 2s" in out


def test_tensorboard_runs_per_trial_keyed_by_the_training_step(tmp_path):
    from tests.tb_read import scalars
    from uda_ray.results.tensorboard import TensorBoardLog

    tb = TensorBoardLog(tmp_path)
    for step, v in ((2, 0.1), (4, 0.3)):
        tb.log("a", {"step": step, "test/miou": v, "uv/snd": 2 * v, "train/loss/seg_src": 1.0 / step,
                     "checkpoint_path": "/x", "done": False, "time/elapsed_s": float("nan")})
    tb.log("b", {"step": 2, "test/miou": 0.2})
    tb.close()
    a = scalars(tmp_path / "a")
    assert a["test/miou"] == [(2, 0.10000000149011612), (4, 0.30000001192092896)]  # float32 in the file
    assert set(a) == {"test/miou", "uv/snd", "train/loss/seg_src"}  # NaN, flags and paths are not scalars
    assert scalars(tmp_path / "b")["test/miou"] == [(2, 0.20000000298023224)]
