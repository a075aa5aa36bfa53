"""The pause hook of tests/hooks (used by test_driver_kills to kill a sweep driver at chosen moments) holds a run
exactly where that test needs it: before the first step of a run that starts from nothing, and while the
checkpoint of a given step is written but not yet reported. Checked on a plain in-process run, no Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_experiment
from uda_ray.training.checkpoint import CKPT_TMP_PREFIX, STATE_FILE

HOOKS = Path(__file__).parent / "hooks"
RUN = ("import json, sys\n"
       "from uda_ray.build import build_experiment\n"
       "from uda_ray.training.loop import fit\n"
       "from uda_ray.training.sessions import LocalSession\n"
       "fit(build_experiment(json.load(open(sys.argv[1]))), LocalSession(sys.argv[2]))\n")


def _paused_run(tmp_path: Path, raw: dict, step: int) -> tuple[subprocess.Popen, Path, Path]:
    (tmp_path / "exp.json").write_text(json.dumps(raw))
    marker, run = tmp_path / "paused", tmp_path / "run"
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HOOKS), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "UDA_RAY_TEST_PAUSE": f"{step}:{marker}", "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(tmp_path / "exp.json"), str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return proc, marker, run


@pytest.mark.parametrize("step", [0, 2])
def test_the_pause_hook_holds_a_run_at_its_start_or_in_its_checkpoint_write(tmp_path, synth_root, step):
    proc, marker, run = _paused_run(tmp_path, tiny_experiment(synth_root, **{"train.max_steps": 4}), step)
    try:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert marker.read_text() == str(proc.pid)
        time.sleep(0.5)
        assert proc.poll() is None  # still held
        assert (run / "config.yaml").is_file()  # the run had started
        assert not (run / "checkpoints").exists()  # nothing reported yet: the first checkpoint is of step 2
        writing = [d for d in (tmp_path / "tmp").glob(f"{CKPT_TMP_PREFIX}{proc.pid}_*") if (d / STATE_FILE).is_file()]
        assert len(writing) == (step == 2)  # at step 2: its checkpoint written, in the writer's temporary folder
    finally:
        proc.kill()
        proc.wait()
