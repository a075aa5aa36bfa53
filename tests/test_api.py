"""The Python API: plain objects back, UserError for what a user can get wrong, a tiny sweep end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import uda_ray
from tests.conftest import tiny_experiment
from uda_ray.errors import UserError


def test_queries_of_an_unknown_sweep_raise_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match="unknown sweep 'nope'"):
        uda_ray.best("nope", storage=tmp_path)
    with pytest.raises(UserError, match="unknown sweep 'nope'"):
        uda_ray.resume("nope", storage=tmp_path)
    assert uda_ray.ls(tmp_path) == []


SCRIPT = """
import json, sys
import uda_ray

space, storage = sys.argv[1], sys.argv[2]
s = uda_ray.sweep(space, storage=storage, name="api", overrides={"train.max_steps": 2})
rows = s.best(top=2)
print("RESULT " + json.dumps({
    "status": s.status, "trials": [t["status"] for t in s.trials()], "table_rows": s.table("evals").num_rows,
    "best": [(r["trial_id"], r["rank_value"]) for r in rows], "mode": rows[0]["mode"],
    "best_again": [(r["trial_id"], r["rank_value"]) for r in uda_ray.best("api", storage=storage, top=2)],
    "ls": uda_ray.ls(storage),
}))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_tiny_sweep_through_the_python_api(tmp_path, synth_root):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root, **{
        "train.cpus_per_worker": 0.5, "train.eval_every": 2})))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "num_samples": 2, "max_concurrent_trials": 1, "seed": 5,
        "params": {"optim.lr": {"loguniform": [1e-3, 1e-2]}}}))
    (tmp_path / "home").mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(Path(uda_ray.__file__).parent.parent)}
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "my_sweep.py").write_text(SCRIPT)
    p = subprocess.run([sys.executable, str(tmp_path / "my_sweep.py"), str(tmp_path / "space.yaml"),
                        str(tmp_path / "store")], env=env, capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (line,) = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    r = json.loads(line[len("RESULT "):])
    assert r["status"] == "completed" and sorted(r["trials"]) == ["completed", "completed"]
    assert r["table_rows"] == 2  # one evaluation per trial (max_steps 2, eval_every 2)
    assert len(r["best"]) == 2 and r["best"] == r["best_again"]
    first, second = r["best"][0][1], r["best"][1][1]
    assert first >= second if r["mode"] == "max" else first <= second  # best first
    (entry,) = r["ls"]
    assert entry["name"] == "api" and entry["status"] == "completed" and entry["trials"] == 2
    assert entry["completed"] == 2
