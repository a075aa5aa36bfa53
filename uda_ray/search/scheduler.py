"""The sweep's early-stopping scheduler: ASHA whose rungs survive a resume. Imports Ray: import it where Ray is
needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler

from uda_ray.results.tables import read_table
from uda_ray.search.private import asha_replay, experiment_path_of
from uda_ray.storage import layout


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive a resume. Tune does not save its scheduler with the experiment (it
    drops `_scheduler_alg` from the controller's state), so a restored ASHA starts with empty rungs and
    the next trials would be judged against no one. Each trial restored as finished is recorded again
    from its rows in the results tables (what the scheduler saw: one row per result, in step order);
    a trial restored as unfinished replays its results from its checkpoint and is judged as before."""

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.status not in (Trial.TERMINATED, Trial.ERROR):
            return
        if "_restored_evals" not in self.__dict__:  # read once, grouped by trial (not scanned once per trial)
            results = layout.results_dir(Path(experiment_path_of(trial)).parent)
            self._restored_evals: dict[str, list[dict]] = {}
            for r in read_table(results, "evals"):
                self._restored_evals.setdefault(r["trial_id"], []).append(r)
        asha_replay(self, trial, sorted(self._restored_evals.pop(trial.trial_id, []), key=lambda r: r["step"]))
