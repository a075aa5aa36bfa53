"""Against a cluster started with `ray start --head` (not the embedded local one): a sweep script submitted
with `ray job submit` (token authentication on, the token in a private HOME).

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

    def _ports(self) -> list[str]:
        lo = _free_port()
        return ["--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port()),
                "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
                "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
                "--min-worker-port", str(lo), "--max-worker-port", str(lo + 40)]

    def start(self, num_cpus: float, head: bool) -> None:
        temp = self.root / f"node{self.nodes}"
        self.nodes += 1
        args = [RAY, "start", "--num-cpus", str(num_cpus), "--temp-dir", str(temp), "--disable-usage-stats",
                "--node-ip-address", "127.0.0.1", *self._ports()]
        if head:
            args += ["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.dashboard), "--ray-client-server-port", str(_free_port())]
        else:
            args += ["--address", self.address]
        p = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]

    def pids(self) -> list[int]:
        """The processes started for this cluster: their command lines name its temp root."""
        mine = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    cmd = (d / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if str(self.root) in cmd:
                    mine.append(int(d.name))
        return mine

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
                        "--", "python", "my_sweep.py", str(space), str(tmp_path / "store")],
                       env=cluster.env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    (line,) = [x for x in out.splitlines() if x.startswith("RESULT ")]
    r = json.loads(line[len("RESULT "):])
    assert r == {"status": "completed", "trials": ["completed", "completed"]}
    assert "succeeded" in out
