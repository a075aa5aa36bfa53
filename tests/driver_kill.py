"""Kill a sweep driver that a test started, at the moment the test chooses (by pid, SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 300.0) -> float:
    """SIGKILL `proc` as soon as `ready()` holds; returns the time of the kill. Fails (naming `what`, the moment
    waited for) if the process ends or `timeout` seconds pass first; the process never outlives the call."""
    deadline, killed = time.time() + timeout, None
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                os.kill(proc.pid, signal.SIGKILL)
                killed = time.time()
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None and killed is None:
            proc.kill()
        proc.wait()
    assert killed is not None, f"the driver ended, or {timeout:.0f}s passed, before {what}"
    return killed
