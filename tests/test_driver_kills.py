"""Driver faults are survived exactly: one sweep's driver is SIGKILLed at several moments (while it starts,
at a trial's start-up, mid-trial, between trials, while a checkpoint is being written), `resume`d after each
kill, and its final tables equal those of an uninterrupted sweep with the same seed.

With `max_concurrent_trials: 1` the searcher's and the scheduler's decisions depend only on the values of the
results, which are deterministic (same seed, one CPU thread per worker), so the whole tables must be equal:
the same trial configs in the same order, the same status, the same value at every (trial, step), each row
once. Each driver is started in its own session (start_new_session) and only ever killed by its pid; the
local Ray cluster it started must die with it (checked: no process of that session may survive)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_ray_integration import _assert_study_matches_tables, _env, _write_space
from uda_ray.results.tables import read_table

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_STEPS, EVERY = 12, 3
# Columns that may differ between two runs of the same sweep, and why:
#   trial_id, sweep          identities: each sweep has its own name and trial ids
#   started_at, updated_at, reported_at, wall_time_s, time/...   wall-clock readings
#   restarts, resumed_from   restart bookkeeping: the killed sweep restarted trials by design
#   node_id, node_ip         where a trial last ran: each driver starts its own local Ray cluster (a new node id)
#   *checkpoint*             paths hold the sweep name and trial id (their last component is compared instead)
NOT_COMPARED = {"trial_id", "sweep", "started_at", "updated_at", "reported_at", "wall_time_s", "restarts",
                "resumed_from", "node_id", "node_ip", "checkpoint_path", "best_checkpoint", "last_checkpoint"}
CHECKPOINTS = ("checkpoint_path", "best_checkpoint", "last_checkpoint")
HOOKS = Path(__file__).parent / "hooks"  # its sitecustomize.py: the pause hook, see there


def _paused_at(step: int, marker: Path) -> dict:
    """The environment of a driver whose processes (its Ray workers too) load the pause hook of tests/hooks: rank
    0 of a run creates `marker` and sleeps at `step` (0: before the first step of a run that starts from nothing;
    else: while the checkpoint of that step is being written), once."""
    path = os.pathsep.join([str(HOOKS), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"PYTHONPATH": path, "UDA_RAY_TEST_PAUSE": f"{step}:{marker}"}


def _comparable(row: dict) -> dict:
    """The row without NOT_COMPARED columns; NaN (the IoU of a class absent from the images) as "nan", so that
    equal rows compare equal."""
    out = {k: "nan" if isinstance(v, float) and v != v else v for k, v in row.items()
           if k not in NOT_COMPARED and not k.startswith("time/")}
    for k in CHECKPOINTS:
        if row.get(k) is not None:
            out[k] = Path(row[k]).name
    return out


def _session_pids(sid: int) -> list[int]:
    """The live processes of the session `sid` (the driver's, created with start_new_session)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(p.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


class ProcessWatch(threading.Thread):
    """Notes when each process of a killed driver's session ends. Ray's dashboard and runtime-env agents outlive
    their raylet by about a minute: they first try for 60 s to report its death to the GCS, which died too."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pids: dict[int, tuple[float, str]] = {}  # pid -> (kill time, command line)
        self.ended: dict[int, float] = {}
        self.lock = threading.Lock()
        self.start()

    def add(self, sid: int, killed_at: float) -> None:
        with self.lock:
            for pid in _session_pids(sid):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()[:100]
                except OSError:
                    continue
                self.pids[pid] = (killed_at, cmd)

    def run(self) -> None:
        while True:
            with self.lock:
                for pid in self.pids:
                    if pid not in self.ended and not _alive(pid):
                        self.ended[pid] = time.time()
            time.sleep(0.25)

    def wait_all(self, timeout: float) -> tuple[float, list[str]]:
        """Wait until every watched process ended; (the longest any outlived its kill, those left, killed)."""
        deadline = time.time() + timeout
        while time.time() < deadline and len(self.ended) < len(self.pids):
            time.sleep(0.5)
        with self.lock:
            left = [f"{pid}: {cmd}" for pid, (_, cmd) in self.pids.items() if pid not in self.ended]
            for pid in self.pids:
                if pid not in self.ended:  # clean up what we started
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            longest = max((self.ended[p] - t for p, (t, _) in self.pids.items() if p in self.ended), default=0.0)
        return longest, left


class Driver:
    """One `uda-ray sweep`/`resume` process in its own session."""

    def __init__(self, tmp_path: Path, *args: str, env: dict | None = None) -> None:
        self.log = tmp_path / f"driver-{time.time():.3f}.log"
        self.t0 = time.time()
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "uda_ray.cli", *args],
                                         env={**_env(tmp_path), **(env or {})}, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_for(self, what: str, pred, timeout: float = 300) -> object:
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = pred()
            if got:
                return got
            assert self.proc.poll() is None, f"the driver ended before {what}:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log.read_text()[-3000:]}")

    def sigkill(self, watch: ProcessWatch) -> None:
        """SIGKILL the driver (by pid); its session's processes (its Ray cluster) are watched until they end."""
        os.kill(self.proc.pid, signal.SIGKILL)
        t = time.time()
        self.proc.wait()
        watch.add(self.proc.pid, t)

    def finish(self, timeout: float = 400) -> float:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        assert self.proc.returncode == 0, self.log.read_text()[-3000:]
        return time.time() - self.t0


def _tables(store: Path) -> tuple[list[dict], list[dict], list[dict]]:
    res = store / "results"
    return read_table(res, "trials"), read_table(res, "evals"), read_table(res, "class_iou")


def _in_order(store: Path) -> list[dict]:
    """The trials in the order the searcher suggested them."""
    return sorted(read_table(store / "results", "trials"), key=lambda t: t["started_at"])


def _assert_same_sweep(store_ref: Path, store: Path) -> None:
    """The tables of sweep `store` equal those of `store_ref` (the uninterrupted one), but for NOT_COMPARED."""
    ref_trials, got_trials = _in_order(store_ref), _in_order(store)
    assert len(ref_trials) == len(got_trials) == 3
    assert [json.loads(t["params"]) for t in got_trials] == [json.loads(t["params"]) for t in ref_trials]
    assert [t["status"] for t in got_trials] == [t["status"] for t in ref_trials]
    for ref, got in zip(ref_trials, got_trials):
        assert _comparable(got) == _comparable(ref)
    for name, key in (("evals", ("trial_id", "step")), ("class_iou", ("trial_id", "step", "class_name"))):
        got_rows, ref_rows = read_table(store / "results", name), read_table(store_ref / "results", name)
        keys = [tuple(r[k] for k in key) for r in got_rows]
        assert len(keys) == len(set(keys)), f"a row of {name} is there twice"
        for ref, got in zip(ref_trials, got_trials):
            mine = sorted((r for r in got_rows if r["trial_id"] == got["trial_id"]),
                          key=lambda r: tuple(r[k] for k in key[1:]))
            theirs = sorted((r for r in ref_rows if r["trial_id"] == ref["trial_id"]),
                            key=lambda r: tuple(r[k] for k in key[1:]))
            assert [_comparable(r) for r in mine] == [_comparable(r) for r in theirs], (name, got["trial_id"])
    # the Optuna study: the same trials (parameters, state, values) in the same order; a trial asked for again
    # after a resume left only a FAIL entry without a tune_trial_id
    assert _study_trials(store) == _study_trials(store_ref)


def _study_trials(store: Path) -> list[tuple]:
    from uda_ray.search.study import load_study

    return [(t.state.name, t.params, t.values, t.intermediate_values) for t in load_study(store).trials
            if "tune_trial_id" in t.user_attrs]


def test_a_sweep_whose_driver_is_killed_at_every_kind_of_moment_ends_exactly_as_an_uninterrupted_one(
        tmp_path, synth_root):
    space = _write_space(tmp_path, synth_root, {"train.max_steps": MAX_STEPS, "train.eval_every": EVERY,
                                                 "train.cpus_per_worker": 0.5},
                         num_samples=3, params={"optim.lr": {"loguniform": [1e-3, 1e-1]}},
                         scheduler={"asha": {"grace_period": EVERY, "reduction_factor": 2}})
    store_ref, store = tmp_path / "store" / "ref", tmp_path / "store" / "dk"
    timings: dict[str, float] = {}

    t = time.time()
    Driver(tmp_path, "sweep", str(space), "--name", "ref").finish()
    timings["uninterrupted sweep"] = time.time() - t

    def evals_of(n: int) -> list[dict]:
        """The rows of the n-th trial (in suggestion order) in the killed sweep's tables now."""
        trials = _in_order(store) if (store / "results" / "trials.parquet").exists() else []
        if len(trials) <= n:
            return []
        return [e for e in read_table(store / "results", "evals") if e["trial_id"] == trials[n]["trial_id"]]

    def status_of(n: int) -> str | None:
        trials = _in_order(store) if (store / "results" / "trials.parquet").exists() else []
        return trials[n]["status"] if len(trials) > n else None

    kills, resumes, watch = [], [], ProcessWatch()

    def kill(d: Driver, what: str) -> None:
        kills.append(what)
        d.sigkill(watch)

    def resume(env: dict | None = None) -> Driver:
        d = Driver(tmp_path, "resume", "dk", env=env)
        resumes.append(d)
        return d

    # (1) while the driver starts: its sweep folder exists, Ray and Tune are still starting
    d = Driver(tmp_path, "sweep", str(space), "--name", "dk")
    d.wait_for("the sweep folder", lambda: (store / "sweep.json").exists())
    kill(d, "driver start-up")

    # (2) at the first trial's start-up: its Ray Train worker runs, nothing reported yet
    d = resume()
    d.wait_for("a trial's worker", lambda: list(store.glob("train/train-*/worker-0.pid")) and not evals_of(0))
    kill(d, "trial start-up")

    # (3) mid-trial: the first trial has reported and checkpointed, and is not finished
    d = resume()
    d.wait_for("the first trial mid-way", lambda: any(EVERY <= e["step"] < MAX_STEPS for e in evals_of(0)))
    kill(d, "mid-trial")

    # (4) between trials: the first trial has ended, the next one starts; the pause hook (tests/hooks; once)
    # holds it before its first step, as an inline trial reports within a second
    marker = tmp_path / "paused_at_start"
    d = resume(_paused_at(0, marker))
    d.wait_for("the second trial's start", marker.exists)
    d.wait_for("the first trial's end in the tables", lambda: status_of(0) in ("completed", "stopped_early"), 30)
    assert not evals_of(1)
    kill(d, "between trials")

    # (5) while a checkpoint is being written: the hook holds the second trial in the middle of writing its
    # first checkpoint, and the driver dies there
    marker = tmp_path / "paused_in_checkpoint"
    d = resume(_paused_at(EVERY, marker))
    d.wait_for("a checkpoint write", marker.exists)
    assert not evals_of(1), "the paused step was reported"
    kill(d, "checkpoint write")

    d = resume()
    t = time.time()
    d.finish()
    timings["last resume to the end"] = time.time() - t
    assert "resuming sweep 'dk'" in d.log.read_text()

    at = sorted(e["reported_at"] for e in read_table(store / "results", "evals"))
    for i, r in enumerate(resumes, 1):  # how long each resume took to get back to training
        first = next((x for x in at if x > r.t0), None)
        if first is not None and (i == len(resumes) or first < resumes[i].t0):
            timings[f"resume {i}: its first new evaluation after"] = first - r.t0
    longest, left = watch.wait_all(150)
    timings[f"the last of {len(watch.pids)} processes left by the killed drivers' Ray clusters ended after"] = longest
    print("\n" + "\n".join(f"{k}: {v:.1f}s" for k, v in timings.items()))
    assert not left, "processes of a killed driver's Ray cluster outlived it by minutes:\n" + "\n".join(left)

    _assert_same_sweep(store_ref, store)
    # the interruptions happened as planned and the restarts are recorded
    assert kills == ["driver start-up", "trial start-up", "mid-trial", "between trials", "checkpoint write"]
    assert _in_order(store)[0]["restarts"] >= 1 and all(t["restarts"] == 0 for t in _in_order(store_ref))
    trials, evals, _ = _tables(store)
    _assert_study_matches_tables(store, trials, evals)
