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


def _sweep_with_pruned_checkpoints(root: Path) -> Path:
    """Sweep 'pruned': one trial ranked (and its checkpoints kept) by uv/im. Steps 2, 4, 6; Ray kept only the
    checkpoints of steps 4 (best uv/im) and 6 (the latest); step 2, the best by uv/entropy, lost its weights."""
    from uda_ray.results.tables import ResultsWriter
    from uda_ray.training.checkpoint import save_checkpoint

    d = root / "pruned"
    d.mkdir(parents=True)
    (d / "sweep.json").write_text(json.dumps({"name": "pruned", "status": "completed",
                                              "objective": [{"metric": "uv/im", "mode": "max"}]}))
    exp = {"name": "x", "seed": 0, "method": "source_only", "model": {"name": "bisenet_r18"},
           "data": {"source": "gta5", "target": "cityscapes"}, "train": {"max_steps": 6}}
    w = ResultsWriter(d / "results", "pruned", "uv/im", "max", 0)
    for step, im, ent, test in ((2, 0.1, 0.05, 0.20), (4, 0.5, 0.30, 0.30), (6, 0.4, 0.20, 0.25)):
        ck = d / "train" / "train-t0" / f"checkpoint_step_{step:07d}"
        if step != 2:
            save_checkpoint(ck, method_state={}, step=step, rng=[], config={}, metrics={})
        w.result("t0", exp, {"optim.lr": 0.01}, {"step": step, "uv/im": im, "uv/entropy": ent, "test/miou": test,
                                                  "checkpoint_path": str(ck)})
    w.end("t0", exp, {"optim.lr": 0.01}, "completed")
    return d


def test_best_by_another_metric_says_when_its_checkpoint_was_not_kept(tmp_path, capsys):
    from uda_ray.cli import main

    d = _sweep_with_pruned_checkpoints(tmp_path)
    (by_im,) = uda_ray.best("pruned", storage=tmp_path)
    assert (by_im["rank_step"], by_im["rank_checkpoint_kept"], by_im["kept_step"]) == (4, True, 4)
    assert by_im["rank_checkpoint"] == str(d / "train" / "train-t0" / "checkpoint_step_0000004")

    (by_ent,) = uda_ray.best("pruned", storage=tmp_path, metric="uv/entropy")
    # the best step by entropy is still reported (its value, its test mIoU) but its checkpoint is gone ...
    assert (by_ent["rank_step"], by_ent["rank_value"], by_ent["rank_test_miou"]) == (2, 0.05, 0.20)
    assert by_ent["rank_checkpoint"] is None and by_ent["rank_checkpoint_kept"] is False
    # ... and the best kept step by entropy is named instead
    assert (by_ent["kept_step"], by_ent["kept_value"], by_ent["kept_test_miou"]) == (6, 0.20, 0.25)
    assert by_ent["kept_checkpoint"] == str(d / "train" / "train-t0" / "checkpoint_step_0000006")

    assert main(["best", "pruned", "--storage", str(tmp_path), "--metric", "uv/entropy",
                 "--export", str(tmp_path / "e.yaml")]) == 0
    out = capsys.readouterr().out
    assert "checkpoint of step 2 was not kept" in out and "best kept by uv/entropy: step 6" in out
    head = (tmp_path / "e.yaml").read_text().splitlines()[:2]
    assert "step 2" in head[0] and "not kept" in head[1] and "checkpoint_step_0000006" in head[1]
    assert "checkpoint_step_0000002" not in (tmp_path / "e.yaml").read_text()
