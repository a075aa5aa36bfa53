"""Wall-clock marks of a trial's phases, for `benchmarks/trial_overhead.py`: with UDA_RAY_TIMING_LOG set,
`mark(event)` appends {"t", "event", "pid"} as one JSON line to that file (every process of a local cluster
inherits the variable); without it, nothing happens."""

from __future__ import annotations

import json
import os
import time

ENV = "UDA_RAY_TIMING_LOG"


def mark(event: str, **fields: object) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    with open(path, "a") as f:  # one short write per line: concurrent appends stay whole lines
        f.write(json.dumps({"t": time.time(), "event": event, "pid": os.getpid(), **fields}) + "\n")
