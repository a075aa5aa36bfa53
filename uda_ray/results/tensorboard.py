"""TensorBoard event files per trial, keyed by the training step (what `tensorboard --logdir` reads).

Ray Tune writes its own event files into each trial's Tune folder, but with the report count
(`training_iteration`, which restarts at 1 after a resume) on the x axis. These files use the trial's own
`step`, one run per trial under `<sweep>/tensorboard/<trial>/` (or `<run>/tensorboard/`), scalars named as in
the results tables (`test/miou`, `uv/snd`, `train/loss/...`). Written by tensorboardX, which Ray Tune
installs. No Ray here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uda_ray.metric_names import REPORTED_PREFIXES

TB_DIR = "tensorboard"


class TensorBoardLog:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.writers: dict[str, Any] = {}

    def log(self, trial_id: str, result: dict) -> None:
        from tensorboardX import SummaryWriter

        if "step" not in result:
            return
        w = self.writers.get(trial_id)
        if w is None:
            w = self.writers[trial_id] = SummaryWriter(str(self.dir / trial_id), flush_secs=30)
        step = int(result["step"])
        for k, v in result.items():
            if (k.startswith(REPORTED_PREFIXES) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and v == v):
                w.add_scalar(k, float(v), global_step=step)
        w.flush()

    def close(self, trial_id: str | None = None) -> None:
        for k in [trial_id] if trial_id else list(self.writers):
            w = self.writers.pop(k, None)
            if w is not None:
                w.close()
