"""A test hook for the processes a test starts: put this folder on their PYTHONPATH (Python imports
`sitecustomize` at start-up, and every process of a local Ray cluster inherits the variable), with

    UDA_RAY_TEST_PAUSE="STEP:MARKER"

and rank 0 of a run creates the file MARKER and sleeps (600 s) at the chosen moment, so that the test can kill
the sweep driver there:

    STEP 0      at the start of a run that starts from nothing, before its first training step
                (the `loop_start` mark of start 0, rank 0)
    STEP > 0    in the middle of writing the checkpoint of that step: its files written, not yet persisted in
                the run folder nor reported (the `checkpoint_written` mark of that step)

Only once per MARKER (the first process to create it pauses): a resumed run does not stop again. The hook
wraps uda_ray.training.timing.mark, the seam that names those moments; production code holds nothing of it.
Without the variable nothing is wrapped. A `sitecustomize` further down sys.path is still run (chained).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import time

PAUSE_ENV = "UDA_RAY_TEST_PAUSE"
PAUSE_S = 600  # the test kills the driver (and with it the paused worker) meanwhile


def _is_the_moment(event: str, fields: dict, step: int) -> bool:
    if step == 0:
        return event == "loop_start" and fields.get("start") == 0 and fields.get("rank") == 0
    return event == "checkpoint_written" and fields.get("step") == step


def _pause_once(marker: str) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # once: the first writer of MARKER pauses
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(PAUSE_S)


def _install(spec: str) -> None:
    at, _, marker = spec.partition(":")
    step = int(at)
    if not marker:
        return
    from uda_ray.training import timing  # light: no torch, no ray

    real = timing.mark

    def mark(event: str, **fields: object) -> None:
        real(event, **fields)
        if _is_the_moment(event, fields, step):
            _pause_once(marker)

    timing.mark = mark


def _chain() -> None:
    """Run the `sitecustomize` this one hides, if there is one further down sys.path."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if os.environ.get(PAUSE_ENV):
    _install(os.environ[PAUSE_ENV])
_chain()
