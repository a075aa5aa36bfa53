"""Against clusters started with `ray start` (not the embedded local one): a sweep script submitted with
`ray job submit` (token authentication on, the token in a private HOME), and a sweep through `--address` on a
head and a second node (own temp dir and resources) with a shared storage path, resumed from either node; and
the loss of the node running a trial's Train worker (every process of that node SIGKILLed).

Each cluster lives in its own short temp dir with a private HOME (its own auth token); it is stopped by killing
the processes that were started for it (found by their temp dir in their command lines), never `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import uda_ray
from tests.conftest import tiny_experiment
from tests.driver_kill import kill_when

REPO = Path(uda_ray.__file__).parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateCluster:
    """Ray nodes started with `ray start` under one short temp root, a private HOME and free ports."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="udr", dir="/tmp"))  # sockets need a short path
        self.home = self.root / "home"
        self.home.mkdir()
        self.port, self.dashboard = _free_port(), _free_port()
        while self.dashboard == self.port:
            self.dashboard = _free_port()
        self.taken = {self.port, self.dashboard}  # every port handed to a node of this cluster
        self.env = {**os.environ, "HOME": str(self.home), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO),
                    "RAY_AUTH_MODE": "token", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.dashboard}"}
        self.env.pop("RAY_ADDRESS", None)
        # token authentication: the cluster's token in the private HOME (~/.ray/auth_token), read by every node
        # and client started with this environment
        p = subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0 and (self.home / ".ray" / "auth_token").is_file(), p.stdout + p.stderr
        self.nodes = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ports(self, head: bool) -> list[str]:
        """Free ports for one node: a 41-port worker range first, then every other port distinct from each other,
        from the range and from the cluster's (Ray refuses a node whose components share a port; the kernel's
        ephemeral ports once put the object manager inside the worker range). Ports are unique across the cluster's
        nodes, which share this host."""
        taken = self.taken
        while not taken.isdisjoint(range(lo := _free_port(), lo + 41)):
            pass
        taken.update(range(lo, lo + 41))

        def port() -> int:
            while (p := _free_port()) in taken:
                pass
            taken.add(p)
            return p

        args = ["--node-manager-port", str(port()), "--object-manager-port", str(port()),
                "--dashboard-agent-listen-port", str(port()), "--dashboard-agent-grpc-port", str(port()),
                "--runtime-env-agent-port", str(port()), "--metrics-export-port", str(port()),
                "--min-worker-port", str(lo), "--max-worker-port", str(lo + 40)]
        return args + (["--ray-client-server-port", str(port())] if head else [])

    def start(self, num_cpus: float, head: bool, resources: dict | None = None) -> Path:
        """Start a node (the head, or one joining it) in its own temp dir; returns that dir."""
        temp = self.root / f"node{self.nodes}"
        self.nodes += 1
        args = [RAY, "start", "--num-cpus", str(num_cpus), "--temp-dir", str(temp), "--disable-usage-stats",
                "--node-ip-address", "127.0.0.1", *self._ports(head)]
        if resources:
            args += ["--resources", json.dumps(resources)]
        if head:
            args += ["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.dashboard)]
        else:
            args += ["--address", self.address]
        p = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        return temp

    def _cmdlines(self, under: Path) -> dict[int, str]:
        out = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    cmd = (d / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if f"{under}/" in cmd:
                    out[int(d.name)] = cmd
        return out

    def pids(self, node: int | None = None) -> list[int]:
        """The processes started for this cluster (or for one of its nodes): their command lines name its
        temp root (the node's temp dir)."""
        return list(self._cmdlines(self.root if node is None else self.root / f"node{node}"))

    def node_id(self, node: int) -> str:
        """The Ray node id of a node started here, from its raylet's command line."""
        for cmd in self._cmdlines(self.root / f"node{node}").values():
            if "/raylet/raylet" in cmd.split("\0")[0]:
                return next(a.split("=", 1)[1] for a in cmd.split("\0") if a.startswith("--node_id="))
        raise AssertionError(f"no raylet of node {node}")

    def kill_node(self, node: int) -> list[int]:
        """SIGKILL a node started here, as a lost machine: every process named by its temp dir (its raylet, agents,
        log monitor) and every descendant of those (the Ray workers its raylet started). Returns their pids."""
        parents = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        victims = set(self.pids(node))
        grew = True
        while grew:
            more = {pid for pid, ppid in parents.items() if ppid in victims} - victims
            victims |= more
            grew = bool(more)
        for pid in sorted(victims):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return sorted(victims)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 10
            while self.pids() and time.time() < deadline:
                time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster():
    c = PrivateCluster()
    try:
        yield c
    finally:
        c.stop()


def _space(tmp_path: Path, synth_root: Path, **kw) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root, **{
        "train.cpus_per_worker": 0.5, "train.max_steps": 4, "train.eval_every": 2, **kw.pop("base", {})})))
    raw = {"base": "base.yaml", "num_samples": 2, "max_concurrent_trials": 2, "seed": 7,
           "params": {"optim.lr": {"loguniform": [1e-3, 1e-2]}}, **kw}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "space.yaml"


JOB = """
import json, sys
import uda_ray

s = uda_ray.sweep(sys.argv[1], storage=sys.argv[2], name="job")
print("RESULT " + json.dumps({"status": s.status, "trials": [t["status"] for t in s.trials()]}))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_runs_a_sweep_script_on_a_started_cluster(tmp_path, synth_root, cluster):
    cluster.start(num_cpus=2, head=True)
    space = _space(tmp_path, synth_root, max_concurrent_trials=1)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "my_sweep.py").write_text(JOB)
    p = subprocess.run([RAY, "job", "submit", "--address", f"http://127.0.0.1:{cluster.dashboard}",
                        "--working-dir", str(job_dir), "--runtime-env-json",
                        json.dumps({"env_vars": {"PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}}),
                        "--", sys.executable, "my_sweep.py", str(space), str(tmp_path / "store")],
                       env=cluster.env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    (line,) = [x for x in out.splitlines() if x.startswith("RESULT ")]
    r = json.loads(line[len("RESULT "):])
    assert r == {"status": "completed", "trials": ["completed", "completed"]}
    assert "succeeded" in out


# A driver joining a chosen node of a multi-node cluster on one host: Ray attaches a driver to a raylet on its
# own host and prefers the head when there are several; `_temp_dir` picks the node started in that temp dir
# (on a real cluster, a driver on the other machine attaches to that machine's node).
DRIVER_ON = """
import sys
import ray
import uda_ray

ray.init(address=sys.argv[1], _temp_dir=sys.argv[2], log_to_driver=False)
print("DRIVER_NODE " + ray.get_runtime_context().get_node_id(), flush=True)
print("RESULT " + uda_ray.resume(sys.argv[3], storage=sys.argv[4]).status, flush=True)
"""


def _evals(store: Path, sweep: str) -> list[dict]:
    import pyarrow.parquet as pq

    path = store / sweep / "results" / "evals.parquet"
    return pq.read_table(path).to_pylist() if path.exists() else []


@pytest.mark.ray
@pytest.mark.slow
def test_two_nodes_trials_spread_and_resume_from_either_node(tmp_path, synth_root, cluster):
    # Each node has 2 CPUs; a trial's one worker needs 1.5 (its Tune process trains inline; under Ray Train a
    # 0.25-CPU driver besides): two workers never fit one node, and a node without a worker always has room for
    # one, so two concurrent trials train on different nodes (forced by resources, nothing else).
    cluster.start(num_cpus=2, head=True)
    node_b = cluster.start(num_cpus=2, head=False, resources={"node_b": 1})
    head_id, b_id = cluster.node_id(0), cluster.node_id(1)
    max_steps, every = 30, 5
    space = _space(tmp_path, synth_root, driver_cpus=0.25, base={
        "train.cpus_per_worker": 1.5, "train.max_steps": max_steps, "train.eval_every": every})
    store = tmp_path / "shared"  # one path every node writes (here: the same host)
    cli = [sys.executable, "-m", "uda_ray.cli"]
    env = {**cluster.env, "PYTHONUNBUFFERED": "1"}

    def popen(args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as f:
            return subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT)

    # 1. the sweep from a driver on the head (`--address`; Ray attaches it to the head)
    t0 = time.time()
    first = popen([*cli, "sweep", str(space), "--address", cluster.address, "--storage", str(store), "--name", "two"],
                  tmp_path / "first.log")
    kill1 = kill_when(first, lambda: len({r["trial_id"] for r in _evals(store, "two")}) == 2,
                      "both trials had an evaluation", timeout=240)
    rows1 = _evals(store, "two")
    # 2. resumed by a driver on the second node; killed again once it has recorded a new evaluation
    second = popen([sys.executable, "-c", DRIVER_ON, cluster.address, str(node_b), "two", str(store)],
                   tmp_path / "second.log")
    kill2 = kill_when(second, lambda: any(r["reported_at"] > kill1 for r in _evals(store, "two")),
                      "the second driver recorded an evaluation", timeout=240)
    out2 = (tmp_path / "second.log").read_text()
    rows2 = _evals(store, "two")
    # 3. resumed from the head by the CLI, to the end
    t3 = time.time()
    p = subprocess.run([*cli, "resume", "two", "--address", cluster.address, "--storage", str(store)],
                       env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    done = time.time()

    import pyarrow.parquet as pq

    trials = pq.read_table(store / "two" / "results" / "trials.parquet").to_pylist()
    evals = _evals(store, "two")
    assert [t["status"] for t in trials] == ["completed", "completed"]
    keys = sorted((e["trial_id"], e["step"]) for e in evals)
    assert keys == sorted((t["trial_id"], s) for t in trials for s in range(every, max_steps + 1, every))
    # the trials trained on both nodes, and each trial's row names the node of its latest evaluation
    assert {e["node_id"] for e in evals} == {head_id, b_id}
    for t in trials:
        last = max((e for e in evals if e["trial_id"] == t["trial_id"]), key=lambda e: e["step"])
        assert t["node_id"] == last["node_id"] and t["node_ip"] == last["node_ip"]
    # the second driver ran on the second node and moved the sweep on; both resumes continued from checkpoints
    assert f"DRIVER_NODE {b_id}" in out2, out2[-3000:]
    assert any(r["reported_at"] > kill1 for r in rows2) and len(rows2) > len(rows1)
    assert all(t["restarts"] >= 1 for t in trials)
    print(f"\ntwo nodes: sweep {kill1 - t0:.0f}s to the first kill, resume on node b {kill2 - kill1:.0f}s to the "
          f"second, resume on the head {done - t3:.0f}s to the end; evaluations by node: "
          f"head {sum(e['node_id'] == head_id for e in evals)}, b {sum(e['node_id'] == b_id for e in evals)}; "
          f"restarts {[t['restarts'] for t in trials]}")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["inline", "ray_train"])
def test_a_lost_node_is_survived_by_its_trial_restarting_on_another_node(tmp_path, synth_root, cluster, launcher):
    # The head has 1 CPU and the trial's worker needs 1.5, so it trains on a second node, which is SIGKILLed (all
    # its processes) mid-training; a third node then joins, as a replacement machine would. Inline (the default
    # for one worker) the trial's Tune process is that worker, and Tune restarts the trial. Under Ray Train the
    # trial's driver (0.25 CPU) starts on the head, the only node then, and Ray Train restarts its worker group.
    cluster.env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "180"  # room for `ray start` on a loaded 2-core host
    cluster.start(num_cpus=1, head=True)
    max_steps, every = 40, 5
    space = _space(tmp_path, synth_root, driver_cpus=0.25, num_samples=1, max_concurrent_trials=1, base={
        "train.cpus_per_worker": 1.5, "train.max_steps": max_steps, "train.eval_every": every,
        "train.launcher": launcher})
    store = tmp_path / "shared"
    results = store / "loss" / "results"
    with open(tmp_path / "sweep.log", "w") as log:
        sweep = subprocess.Popen([sys.executable, "-m", "uda_ray.cli", "sweep", str(space), "--address",
                                  cluster.address, "--storage", str(store), "--name", "loss"],
                                 env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        if launcher == "ray_train":  # its driver started (on the head) before another node exists
            _wait(sweep, lambda: (results / "trials.parquet").exists(), "the trial started")
        cluster.start(num_cpus=2, head=False)
        b_id = cluster.node_id(1)
        _wait(sweep, lambda: any(e["node_id"] == b_id for e in _evals(store, "loss")), "an evaluation on node b")
        killed_at = time.time()
        victims = cluster.kill_node(1)
        before = {e["step"] for e in _evals(store, "loss")}
        cluster.start(num_cpus=2, head=False)
        joined_at = time.time()
        c_id = cluster.node_id(2)
        rc = sweep.wait(timeout=400)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    out = (tmp_path / "sweep.log").read_text()
    assert rc == 0, out[-3000:]

    import pyarrow.parquet as pq

    (trial,) = pq.read_table(results / "trials.parquet").to_pylist()
    evals = sorted(_evals(store, "loss"), key=lambda e: e["step"])
    assert trial["status"] == "completed" and trial["restarts"] == 1, trial
    assert [e["step"] for e in evals] == list(range(every, max_steps + 1, every))  # each step exactly once
    # trained on node b up to the loss, then from its latest checkpoint on the replacement node
    resumed = trial["resumed_from"]
    assert resumed in before and resumed >= max(before) - every
    assert {e["node_id"] for e in evals if e["step"] <= resumed} == {b_id}
    assert {e["node_id"] for e in evals if e["step"] > resumed} == {c_id}
    (first_after,) = [e for e in evals if e.get("resumed_from") is not None]
    assert first_after["step"] == resumed + every
    print(f"\nnode loss ({launcher}): SIGKILL of {len(victims)} processes of node b at step {max(before)}; the "
          f"replacement node joined {joined_at - killed_at:.0f}s later; first evaluation after the restart (step "
          f"{first_after['step']}, resumed from {resumed}) {first_after['reported_at'] - killed_at:.0f}s after the "
          f"kill, {first_after['reported_at'] - joined_at:.0f}s after the join")


def _wait(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the sweep ended before {what}"
        assert time.time() < deadline, f"{timeout:.0f}s passed before {what}"
        time.sleep(0.2)
