"""Two drivers never write one folder: the lock file is atomic, a live holder is refused with one line, a
dead holder's lock is taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest
import yaml

from tests.conftest import tiny_experiment
from uda_ray.cli import main
from uda_ray.errors import UserError
from uda_ray.storage.lock import LOCK_FILE, DriverLock, _proc_start, running_driver


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "120"])
    yield p
    if p.poll() is None:
        p.kill()
    p.wait()


def _plant(d, pid, host=None, proc_start=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": time.time(),
                                           "proc_start": proc_start or _proc_start(pid)}))


def test_a_live_holder_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, sleeper):
    _plant(tmp_path, sleeper.pid)
    with pytest.raises(UserError, match=f"already running \\(driver pid {sleeper.pid} "):
        DriverLock(tmp_path, "sweep 's'").acquire()
    sleeper.kill()
    sleeper.wait()
    assert running_driver(tmp_path) is None
    with DriverLock(tmp_path, "sweep 's'") as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == lock.info["pid"]
        assert running_driver(tmp_path)["pid"] == lock.info["pid"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # released, and no stale copy left behind


def test_a_reused_pid_is_not_mistaken_for_the_driver(tmp_path, sleeper):
    _plant(tmp_path, sleeper.pid, proc_start="1")  # same pid, but a process started at another time
    DriverLock(tmp_path, "sweep 's'").acquire().release()


def test_a_lock_from_another_host_is_refused_naming_the_file_to_delete(tmp_path):
    _plant(tmp_path, 12345, host="elsewhere-" + socket.gethostname())
    with pytest.raises(UserError, match=f"if that driver is gone, delete {tmp_path / LOCK_FILE}"):
        DriverLock(tmp_path, "sweep 's'").acquire()


def test_of_drivers_starting_at_once_exactly_one_gets_the_lock(tmp_path):
    got, refused, barrier = [], [], threading.Barrier(8)

    def race():
        barrier.wait()
        try:
            got.append(DriverLock(tmp_path, "sweep 's'").acquire())
        except UserError:
            refused.append(1)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(got), len(refused)) == (1, 7)


def _sweep_folder(root, name="s"):
    d = root / name
    d.mkdir(parents=True)
    (d / "sweep.json").write_text(json.dumps({"name": name, "seed": 0, "status": "running", "num_samples": 1}))
    return d


def test_resume_of_a_running_sweep_is_refused_with_one_line(tmp_path, capsys, sleeper):
    d = _sweep_folder(tmp_path / "store")
    _plant(d, sleeper.pid)
    before = (d / LOCK_FILE).read_text()
    code = main(["resume", "s", "--storage", str(tmp_path / "store")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"sweep 's' is already running (driver pid {sleeper.pid}" in err[0]
    assert (d / LOCK_FILE).read_text() == before and sorted(p.name for p in d.iterdir()) == [LOCK_FILE, "sweep.json"]


def test_sweep_with_the_name_of_a_running_sweep_is_refused_with_one_line(tmp_path, capsys, sleeper, synth_root):
    d = _sweep_folder(tmp_path / "store")
    _plant(d, sleeper.pid)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root)))
    (tmp_path / "sp.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "num_samples": 1,
                                                      "params": {"optim.lr": {"choice": [0.01]}}}))
    code = main(["sweep", str(tmp_path / "sp.yaml"), "--name", "s", "--storage", str(tmp_path / "store")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "already running" in err[0]


def test_ls_shows_a_sweep_whose_driver_died_as_interrupted(tmp_path, capsys, sleeper):
    d = _sweep_folder(tmp_path / "store")
    _plant(d, sleeper.pid)
    main(["ls", "--storage", str(tmp_path / "store")])
    assert "running" in capsys.readouterr().out
    sleeper.kill()
    sleeper.wait()
    main(["ls", "--storage", str(tmp_path / "store")])
    assert "interrupted" in capsys.readouterr().out
