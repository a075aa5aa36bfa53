"""Wall-clock marks of a trial's phases, for `benchmarks/trial_overhead.py`: with UDA_RAY_TIMING_LOG set,
`mark(event)` appends {"t", "event", "pid"} as one JSON line to that file (every process of a local cluster
inherits the variable); without it, nothing happens.

The marks name fixed moments of a run (`fit_start`, ..., `loop_start` with the step it starts from and the
rank, `checkpoint_written` once rank 0 has written a checkpoint and before it is persisted and reported,
`fit_end`), so `mark` is also the one seam where outside tooling may observe or hold a run at such a moment
(by wrapping this function before the training modules are imported)."""

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
