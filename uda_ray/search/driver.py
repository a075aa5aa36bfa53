"""The trial: a Tune function that fits one experiment, inline or as a Ray Train run, and the resources its
Tune actor asks for. Importing this module does not import ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uda_ray.errors import UserError
from uda_ray.storage import layout, store

TRAIN_FAILED_FILE = "train_failed.txt"  # a Ray Train run that used up train.max_failures (Tune must not rerun it)


def trial_driver(config: dict, sweep: dict) -> None:
    """Runs inside a Tune trial: build the trial's experiment and fit it in the run folder
    `<sweep>/train/train-<trial id>`, in this process (`train.launcher` inline: one worker) or as a TorchTrainer
    of that name (ray_train: DDP workers, each a process of its own).

    The folder is named after the trial, so a restarted or restored trial resumes from its latest checkpoint
    instead of starting over. Tune restarts a trial whose process died up to train.max_failures times (its
    FailureConfig); a Ray Train run restarts its own workers that many times, and a run that used them up is
    not started again by Tune's restart.
    """
    import ray.tune

    from uda_ray.build import build_experiment
    from uda_ray.config_loader import apply_overrides
    from uda_ray.training.timing import mark

    trial_id = ray.tune.get_context().get_trial_id()
    mark("trial_driver_start", trial=trial_id)
    params = plain(config["params"])
    cfg = build_experiment(apply_overrides(sweep["base_raw"], params), f"trial {trial_id}")
    # under a storage URI, this node's staging copy of the sweep folder; a trial restarted on a node that lacks
    # its run folder brings its checkpoints down from the store first
    sweep_dir = store.local_path(*sweep["store"]) if sweep.get("store") else Path(sweep["dir"])
    run_dir = layout.trial_dir(sweep_dir, trial_id)
    store.pull(run_dir)
    if cfg.train.launcher == "replay":  # trains nothing: a recorded or synthetic curve (uda_ray.training.replay)
        from uda_ray.training.launchers import tune_trial_replay

        tune_trial_replay(cfg, run_dir, params, trial_id)
        mark("trial_driver_end", trial=trial_id)
        return
    if cfg.train.inline:
        from uda_ray.training.launchers import tune_trial_fit

        mark("inline_fit_start", trial=trial_id)
        tune_trial_fit(cfg, run_dir)
        mark("trial_driver_end", trial=trial_id)
        return
    _fit_ray_train(cfg, run_dir, trial_id)
    mark("trial_driver_end", trial=trial_id)


def _fit_ray_train(cfg: Any, run_dir: Path, trial_id: str) -> None:
    """Fit as the TorchTrainer named after the run folder, reporting to Tune; a run that failed for good
    leaves TRAIN_FAILED_FILE, so that Tune's restart of this trial fails at once instead of running it again."""
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    from uda_ray.training.launchers import make_trainer
    from uda_ray.training.timing import mark

    failed = run_dir / TRAIN_FAILED_FILE
    if failed.is_file():  # Tune restarted this trial after its Ray Train run had failed for good
        raise RuntimeError(failed.read_text())
    trainer = make_trainer(cfg, run_dir.parent, run_dir.name, callbacks=[TuneReportCallback()])
    mark("trainer_fit_start", trial=trial_id)
    try:
        trainer.fit()
    except TrainingFailedError as e:  # the run's own restarts used up (not: this process or the cluster ending)
        run_dir.mkdir(parents=True, exist_ok=True)
        failed.write_text(f"the Ray Train run failed after {cfg.train.max_failures} restart(s): "
                          + ((str(e).strip().splitlines() or [type(e).__name__])[-1])[:500])
        raise
    mark("trainer_fit_end", trial=trial_id)


def trial_resources(config: dict, sweep: dict) -> Any:
    """The resources of a trial's Tune actor: the whole worker (train.cpus_per_worker, one GPU with use_gpu)
    when `fit` runs inline in it; `driver_cpus` for the driver of a Ray Train run (whose workers ask for their
    own)."""
    from ray.tune import PlacementGroupFactory

    from uda_ray.build import build_experiment
    from uda_ray.config_loader import apply_overrides

    try:
        tc = build_experiment(apply_overrides(sweep["base_raw"], plain(config["params"])), "<trial config>").train
    except UserError:  # a sampled config the trial itself will refuse (and end errored): the base's resources
        tc = build_experiment(sweep["base_raw"], "<base config>").train
    if tc.launcher == "replay":  # one process that trains nothing: its CPU share, never a GPU
        return PlacementGroupFactory([{"CPU": tc.cpus_per_worker}])
    if tc.inline:
        return PlacementGroupFactory([{"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}])
    return PlacementGroupFactory([{"CPU": sweep["driver_cpus"]}])


def plain(d: dict) -> dict:
    """numpy scalars from samplers -> Python scalars (the strict loader wants real ints/floats)."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in d.items()}
