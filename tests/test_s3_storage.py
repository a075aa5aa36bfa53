"""Sweeps, runs and queries on cloud object storage, against a real S3 API server: moto's standalone server
(`python -m moto.server`), started here as a process on a free localhost port, with a bucket made through
pyarrow's S3 filesystem. Nothing of the filesystem layer is patched in-process: uda_ray talks HTTP to the server.

The storage is `s3://<bucket>/<prefix>?endpoint_override=http://127.0.0.1:PORT&scheme=http`, credentials from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION. Each command runs in a fresh working folder and a
fresh staging cache (UDA_RAY_CACHE): the store is the only thing they share. moto is a test requirement (the
`test` extra): without it these tests fail, they are never skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import moto  # noqa: F401  - the S3 server these tests need: missing, they fail at collection
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import tiny_experiment
from tests.driver_kill import kill_when

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "sweeps"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server on a free localhost port, and a bucket in it."""

    def __init__(self, log: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         env={**os.environ, **CREDENTIALS}, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        self.fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                                    endpoint_override=self.endpoint, scheme="http", allow_bucket_creation=True)
        self.fs.create_dir(BUCKET)

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def files(self, prefix: str) -> list[str]:
        sel = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
        return sorted(i.path[len(BUCKET) + len(prefix) + 2:] for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.File)

    def table(self, prefix: str, folder: str, name: str) -> list[dict]:
        """A results table read straight from the bucket (a file, or a folder of segments)."""
        path = f"{BUCKET}/{prefix}/{folder}/results/{name}.parquet"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        return pq.read_table(path, filesystem=self.fs).to_pylist()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


def _env(tmp_path: Path, cache: str) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, **CREDENTIALS, "HOME": str(home), "UDA_RAY_CACHE": str(tmp_path / cache),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("UDA_RAY_STORAGE", None)
    return env


def _cli(tmp_path: Path, cache: str, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """`uda-ray ARGS` in a fresh working folder with a fresh staging cache (only the URI in common)."""
    work = tmp_path / f"work-{cache}"
    work.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "uda_ray.cli", *args], env=_env(tmp_path, cache), cwd=work,
                          capture_output=True, text=True, timeout=timeout)


def _space(tmp_path: Path, synth_root: Path, base: dict | None = None, **kw) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root, **{
        "train.max_steps": 6, "train.eval_every": 2, **(base or {})})))
    raw = {"base": "base.yaml", "num_samples": 2, "max_concurrent_trials": 1, "seed": 5,
           "params": {"optim.lr": {"loguniform": [1e-3, 1e-2]}}, **kw}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "space.yaml"


# ------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("storage, says", [
    ("foo://bucket/x", "no filesystem serves this URI"),
    ("s3://no-such-bucket/x?endpoint_override={endpoint}&scheme=http", "no bucket 'no-such-bucket'"),
    ("s3://sweeps/x?endpoint_override=http://127.0.0.1:{closed}&scheme=http", "not reachable"),
])
def test_a_storage_uri_that_cannot_be_used_is_refused_with_one_line(tmp_path, s3, storage, says):
    storage = storage.format(endpoint=s3.endpoint, closed=_free_port())
    p = _cli(tmp_path, "c", "ls", "--storage", storage, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], p.stderr
    assert "?" not in lines[0]  # the query (endpoint, maybe keys) is not echoed
    assert not any((tmp_path / "work-c").iterdir())  # never taken for a folder: nothing named foo: or s3:


def test_an_unknown_scheme_is_a_user_error_in_the_api(tmp_path, monkeypatch):
    from uda_ray.errors import UserError
    from uda_ray.storage import layout

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no filesystem serves"):
        layout.root("foo://x/y")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# the mirror itself


def test_a_root_pulls_what_another_staging_pushed_but_checkpoints_and_removals_reach_the_store(
        tmp_path, s3, monkeypatch):
    from uda_ray.storage import layout, store

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("UDA_RAY_CACHE", str(tmp_path / "cache"))
    uri = s3.uri("mirror")
    a = layout.root(uri)
    (a / "sw" / "results").mkdir(parents=True)
    (a / "sw" / "sweep.json").write_text('{"name": "sw"}')
    layout.write_meta(a / "sw", {"name": "sw", "status": "running"})  # pushed by the writer
    ck = a / "sw" / "train" / "train-t" / "checkpoint_step_0000002"
    ck.mkdir(parents=True)
    (ck / "state.pt").write_bytes(b"weights")
    store.push(ck)
    assert s3.files("mirror") == ["sw/sweep.json", "sw/train/train-t/checkpoint_step_0000002/state.pt"]
    # another staging folder of the same store (the same URI with one more setting: another cache entry)
    b = layout.root(uri + "&region=us-east-1")
    assert b != a and layout.read_meta(b / "sw")["status"] == "running"
    assert not (b / "sw" / "train").exists()  # a command's pull leaves checkpoints in the store
    from uda_ray.training.checkpoint import checkpoints_in

    (got,) = checkpoints_in(b / "sw" / "train" / "train-t")  # ... until a reader of the run asks for them
    assert (got / "state.pt").read_bytes() == b"weights"
    assert store.here(ck) == ck and store.in_store(ck / "state.pt")
    store.remove(ck)
    assert s3.files("mirror") == ["sw/sweep.json"]
    assert not store.in_store(ck / "state.pt")


# ------------------------------------------------------------------------------------------------
# a sweep on S3: killed, resumed elsewhere, queried, exported, trained


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_on_s3_survives_a_driver_kill_and_is_resumed_queried_and_exported_from_only_the_uri(
        tmp_path, synth_root, s3):
    uri = s3.uri("team/a")
    space = _space(tmp_path, synth_root)
    # (a) the sweep, its driver SIGKILLed once the store holds an evaluation (and its checkpoint)
    work = tmp_path / "work-first"
    work.mkdir()
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "uda_ray.cli", "sweep", str(space), "--storage", uri,
                                  "--name", "s3sweep"], env=_env(tmp_path, "first"), cwd=work, stdout=log,
                                 stderr=subprocess.STDOUT)
    kill_when(first, lambda: s3.table("team/a", "s3sweep", "evals"), "an evaluation in the store", timeout=300)
    assert any(f.endswith("state.pt") for f in s3.files("team/a/s3sweep/train"))  # its checkpoint too
    # (b) resumed on "another machine": a fresh working folder and staging cache, only the URI
    p = _cli(tmp_path, "second", "resume", "s3sweep", "--storage", uri)
    assert p.returncode == 0, (tmp_path / "first.log").read_text()[-2000:] + p.stdout[-3000:] + p.stderr[-3000:]
    trials, evals = s3.table("team/a", "s3sweep", "trials"), s3.table("team/a", "s3sweep", "evals")
    assert sorted(t["status"] for t in trials) == ["completed", "completed"]
    keys = sorted((e["trial_id"], e["step"]) for e in evals)
    assert keys == sorted((t["trial_id"], s) for t in trials for s in (2, 4, 6))  # each evaluation once
    assert any(t["resumed_from"] is not None for t in trials)  # the killed trial went on from its checkpoint
    files = s3.files("team/a/s3sweep")
    assert {"sweep.json", "space.yaml", "base.yaml", "optuna_journal.log"} <= set(files)
    assert any(f.startswith("tune/experiment_state") for f in files)
    # the Optuna study in the store: one finished trial per Tune trial
    _assert_store_study(s3, tmp_path, "team/a/s3sweep", {t["trial_id"] for t in trials})
    # (c) queried from a third place, exported, and the export trained into the same store
    p = _cli(tmp_path, "third", "best", "s3sweep", "--storage", uri, "--export", str(tmp_path / "best.yaml"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert all(t["trial_id"] in p.stdout for t in trials) and (tmp_path / "best.yaml").is_file()
    p = _cli(tmp_path, "third", "ls", "--storage", uri)
    assert p.returncode == 0 and "s3sweep" in p.stdout and "completed" in p.stdout, p.stdout + p.stderr
    p = _cli(tmp_path, "third", "validators", "s3sweep", "--storage", uri)
    assert p.returncode == 0, p.stdout + p.stderr
    p = _cli(tmp_path, "third", "report", "s3sweep", "--storage", uri)
    assert p.returncode == 0, p.stdout + p.stderr
    with s3.fs.open_input_stream(f"{BUCKET}/team/a/s3sweep/report.html") as f:
        page = f.read().decode()
    assert "no checkpoint of the best trials is on disk" not in page  # the best checkpoint came from the store
    assert any(f.startswith("results/validators.parquet") for f in s3.files("team/a/s3sweep"))
    p = _cli(tmp_path, "fourth", "train", str(tmp_path / "best.yaml"), "--storage", uri, "--name", "again")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [e["step"] for e in sorted(s3.table("team/a/runs", "again", "evals"), key=lambda e: e["step"])] == \
        [2, 4, 6]
    assert any(f.endswith("state.pt") for f in s3.files("team/a/runs/again"))
    # nothing was taken for a local folder
    for w in tmp_path.glob("work-*"):
        assert not any(p.name.startswith("s3:") for p in w.rglob("*")), list(w.rglob("*"))


def _assert_store_study(s3: S3Server, tmp_path: Path, prefix: str, trial_ids: set[str]) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    local = tmp_path / "journal.log"
    with s3.fs.open_input_stream(f"{BUCKET}/{prefix}/optuna_journal.log") as f:
        local.write_bytes(f.read())
    study = optuna.load_study(study_name=Path(prefix).name, storage=JournalStorage(JournalFileBackend(str(local))))
    run = {t.user_attrs["tune_trial_id"]: t for t in study.trials if "tune_trial_id" in t.user_attrs}
    assert set(run) == trial_ids
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in run.values())


# ------------------------------------------------------------------------------------------------
# two Ray nodes whose staging folders share nothing: the store is the only shared storage


@pytest.mark.ray
@pytest.mark.slow
def test_two_nodes_with_separate_staging_share_only_the_store(tmp_path, synth_root, s3):
    from tests.test_ray_cluster import PrivateCluster

    cluster = PrivateCluster()
    try:
        # each node has 2 CPUs and a trial needs 1.5 (inline): two concurrent trials train on different nodes
        cluster.env.update(CREDENTIALS)
        cluster.env["UDA_RAY_CACHE"] = str(tmp_path / "cache-head")
        cluster.start(num_cpus=2, head=True)
        cluster.env["UDA_RAY_CACHE"] = str(tmp_path / "cache-b")
        cluster.start(num_cpus=2, head=False)
        head_id, b_id = cluster.node_id(0), cluster.node_id(1)
        space = _space(tmp_path, synth_root, base={"train.cpus_per_worker": 1.5}, max_concurrent_trials=2,
                       driver_cpus=0.25)
        uri = s3.uri("two")
        env = {**cluster.env, "UDA_RAY_CACHE": str(tmp_path / "cache-driver"), "PYTHONUNBUFFERED": "1"}
        p = subprocess.run([sys.executable, "-m", "uda_ray.cli", "sweep", str(space), "--address", cluster.address,
                            "--storage", uri, "--name", "two"], env=env, capture_output=True, text=True,
                           timeout=500)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    finally:
        cluster.stop()
    trials, evals = s3.table("two", "two", "trials"), s3.table("two", "two", "evals")
    assert sorted(t["status"] for t in trials) == ["completed", "completed"]
    assert {e["node_id"] for e in evals} == {head_id, b_id}
    # each trial's checkpoints: in the store, and in the staging folder of the node that trained it only
    for t in trials:
        node = "head" if t["node_id"] == head_id else "b"
        other = "b" if node == "head" else "head"
        assert any(f.startswith(f"train/train-{t['trial_id']}/checkpoint_step_") for f in s3.files("two/two"))
        assert list((tmp_path / f"cache-{node}").rglob(f"train-{t['trial_id']}/checkpoint_step_*/state.pt"))
        assert not list((tmp_path / f"cache-{other}").rglob(f"train-{t['trial_id']}/checkpoint_step_*"))


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_train_sweep_on_s3_writes_its_checkpoints_into_the_store_through_ray(tmp_path, synth_root, s3):
    space = _space(tmp_path, synth_root, base={"train.launcher": "ray_train", "train.max_steps": 4,
                                               "train.cpus_per_worker": 0.5}, num_samples=1, driver_cpus=0.5)
    uri = s3.uri("rt")
    p = _cli(tmp_path, "driver", "sweep", str(space), "--storage", uri, "--name", "rt")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (trial,) = s3.table("rt", "rt", "trials")
    assert trial["status"] == "completed"
    tid = trial["trial_id"]
    assert f"train/train-{tid}/checkpoint_step_0000004/state.pt" in s3.files("rt/rt")
    # the tables name the checkpoint by its staging path, as on every other path, and a reader elsewhere finds it
    stage = tmp_path / "driver"  # the driver's UDA_RAY_CACHE
    assert trial["last_checkpoint"].startswith(str(stage)) and trial["last_checkpoint"].endswith(
        f"train-{tid}/checkpoint_step_0000004")
    p = _cli(tmp_path, "other", "best", "rt", "--storage", uri)
    assert p.returncode == 0 and tid in p.stdout, p.stdout + p.stderr
