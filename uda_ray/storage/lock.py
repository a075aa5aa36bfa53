"""One driver per sweep (or run, or pipeline): a lock file in its folder.

`<folder>/driver.lock` holds the pid, host and start time of the driver that owns the folder. It is created
with O_CREAT | O_EXCL, so of two drivers starting at once exactly one gets it. A lock whose driver is gone
(same host, pid no longer running, or the pid now belongs to a process started later) is stale and is taken
over; a lock held from another host cannot be checked from here and is refused with the path to delete if
that driver is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from uda_ray.errors import UserError

LOCK_FILE = "driver.lock"


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 counted from the command name's closing ')'


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "proc_start": _proc_start(os.getpid())}


def holder_alive(info: dict) -> bool | None:
    """True / False for a lock taken on this host; None when it was taken on another host."""
    if info.get("host") != socket.gethostname():
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    start = _proc_start(pid)
    return not (info.get("proc_start") and start and start != info["proc_start"])


def read_lock(directory: Path) -> dict | None:
    return _read_file(Path(directory) / LOCK_FILE)


def running_driver(directory: Path) -> dict | None:
    """The lock's content when a live driver (or one on another host) holds the folder, else None."""
    info = read_lock(directory)
    return info if info is not None and holder_alive(info) is not False else None


def refuse_running(directory: Path, what: str) -> None:
    """Fail before any work when a live driver already owns the folder (the lock is taken later, atomically)."""
    if running_driver(directory) is not None:
        DriverLock(directory, what)._judge_existing()  # raises the one-line refusal


def _describe(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"driver pid {info.get('pid')} on {info.get('host')} since {since}"


class DriverLock:
    """Held for the lifetime of a driver; `release()` (or leaving the `with` block) removes the file."""

    def __init__(self, directory: Path, what: str) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.what = what
        self.info: dict | None = None

    def acquire(self) -> DriverLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._judge_existing()
                continue
            info = _me()
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info))
                f.flush()
                os.fsync(f.fileno())
            self.info = info
            return self
        raise UserError(f"{self.what}: could not take {self.path} (another driver keeps taking it)")

    def _judge_existing(self) -> None:
        """Raise if the existing lock is held; remove it if it is stale (then the caller retries)."""
        info = read_lock(self.path.parent)
        if info is None:  # being written by a driver that just created it, or left empty by a crash then
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return
            if age < 5.0:
                time.sleep(0.2)
                return
            info = {}
        alive = holder_alive(info) if info else False
        if alive:
            raise UserError(f"{self.what} is already running ({_describe(info)}); "
                            "two drivers must not write one folder")
        if alive is None:
            raise UserError(f"{self.what} is locked by a {_describe(info)}, which cannot be checked from "
                            f"here; if that driver is gone, delete {self.path}")
        # stale: move it aside under a name of our own (only one taker wins the rename), check that what we
        # moved is the stale lock we judged and not a fresh one a faster taker just created, then drop it
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read_file(aside)
        if moved != (info or None) and moved is not None and holder_alive(moved):
            try:
                os.link(aside, self.path)  # put the live driver's lock back, unless a new one is already there
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        if self.info is not None and _read_file(self.path) == self.info:
            self.path.unlink(missing_ok=True)
        self.info = None

    def __enter__(self) -> DriverLock:
        return self.acquire() if self.info is None else self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_file(path: Path) -> dict | None:
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None
