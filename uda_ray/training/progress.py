"""Live progress between evaluations: a heartbeat file per run, and the calm view that reads it.

The training loop (rank 0) keeps a `Heartbeat`: at most every few seconds it rewrites `<run>/progress.json`
atomically with the latest step, the steps per second since the process started, an ETA and whether it is
evaluating. Readers (the sweep driver's live view, `uda-ray ls`) never need the training process or Ray.
No Ray here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

PROGRESS_FILE = "progress.json"
HEARTBEAT_S = float(os.environ.get("UDA_RAY_HEARTBEAT_S", "10"))  # how often the worker rewrites the file
LIVE_S = float(os.environ.get("UDA_RAY_LIVE_S", "30"))  # how often the driver prints progress (non-TTY)


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class Heartbeat:
    """Called by the training loop at every step (`step(done)`: a clock read) and around evaluations; rewrites
    the file when `interval` seconds have passed. No thread: nothing outlives the loop when it fails."""

    def __init__(self, run_dir: Path, max_steps: int, start_step: int, interval: float = HEARTBEAT_S) -> None:
        self.path = Path(run_dir) / PROGRESS_FILE
        self.max_steps, self.start_step, self.interval = max_steps, start_step, interval
        self.done = start_step
        self.phase = "training"
        self.t0 = self.last = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def step(self, done: int) -> None:
        self.done = done
        if time.time() - self.last >= self.interval or done >= self.max_steps:
            self.write()

    def evaluating(self, on: bool) -> None:
        """Around an evaluation (it can take minutes): say so in the file at once."""
        self.phase = "evaluating" if on else "training"
        self.write()

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        ran = self.done - self.start_step
        rate = ran / (now - self.t0) if ran > 0 and now > self.t0 else None
        left = self.max_steps - self.done
        return {"step": self.done, "max_steps": self.max_steps, "steps_per_s": rate,
                "eta_s": left / rate if rate else (0.0 if left <= 0 else None), "phase": self.phase,
                "updated_at": now, "pid": os.getpid()}

    def write(self) -> None:
        self.last = time.time()
        try:
            write_json_atomic(self.path, self.snapshot())
        except OSError:  # progress is best effort: never fail training for it
            pass


def read_progress(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _dur(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def describe(p: dict, now: float | None = None) -> str:
    """`step 340/2000 (17%), 4.10 steps/s, ETA 6m45s` (+ how old the heartbeat is when it is stale)."""
    now = time.time() if now is None else now
    pct = 100 * p["step"] / p["max_steps"] if p.get("max_steps") else 0
    rate = p.get("steps_per_s")
    text = (f"step {p['step']}/{p['max_steps']} ({pct:.0f}%), "
            + (f"{rate:.2f} steps/s, ETA {_dur(p.get('eta_s'))}" if rate else "starting")
            + (", evaluating" if p.get("phase") == "evaluating" else ""))
    age = now - p.get("updated_at", now)
    if age > 3 * HEARTBEAT_S:
        text += f" (heartbeat {_dur(age)} old)"
    return text


class LiveView:
    """The running trials' progress: on a terminal one line rewritten in place (at most every 2 s); otherwise
    (a log, a notebook) a plain line through `emit` every `interval` seconds, and only when some trial moved."""

    def __init__(self, emit: Callable[[str], None], tty: TextIO | None = None, interval: float = LIVE_S) -> None:
        self.emit, self.tty = emit, tty
        self.interval = 2.0 if tty is not None else interval
        self.last_print = 0.0
        self.last_steps: dict[str, int] = {}
        self.pending = False  # a terminal line without its newline yet

    def update(self, progress: dict[str, dict], elapsed: float, now: float | None = None) -> bool:
        """`progress`: trial -> its progress dict. Returns whether something was printed."""
        now = time.time() if now is None else now
        if not progress or now - self.last_print < self.interval:
            return False
        steps = {k: p["step"] for k, p in progress.items()}
        if self.tty is None and steps == self.last_steps:
            return False
        line = f"[{elapsed:6.0f}s] " + " | ".join(f"{k}: {describe(p, now)}" for k, p in sorted(progress.items()))
        if self.tty is not None:
            self.tty.write("\r\x1b[K" + line)
            self.tty.flush()
            self.pending = True
        else:
            self.emit(line)
        self.last_print, self.last_steps = now, steps
        return True

    def before_line(self) -> None:
        """Call before printing a normal line: ends the in-place line on a terminal."""
        if self.pending and self.tty is not None:
            self.tty.write("\n")
            self.pending = False
