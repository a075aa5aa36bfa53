"""How a run is launched: the Ray side of `fit` (uda_ray.training.loop).

    tune_trial_fit   `fit` in the calling Tune trial's process (`train.launcher` inline)
    tune_trial_replay  no `fit`: a recorded or synthetic learning curve reported to Tune (launcher replay)
    make_trainer     a TorchTrainer whose workers (ray_train_worker) run `fit` under DDP (launcher ray_train)
    fit_run          the driver side of one run outside a sweep (`uda-ray train`, pipeline stages, reruns): one
                     Ray task running `fit` (inline), or a TorchTrainer with a callback writing the run's tables

Checkpoints are `<run>/checkpoint_step_NNNNNNN` on every path (uda_ray.training.checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from uda_ray.build import build_experiment
from uda_ray.config import ExperimentConfig, experiment_dict
from uda_ray.metric_names import mode_of
from uda_ray.storage import layout, store
from uda_ray.training.loop import fit
from uda_ray.training.sessions import RaySession, RunSession, TuneSession
from uda_ray.training.timing import mark

# ------------------------------------------------------------------------------------------------
# inside a Tune trial or a Ray task (inline) and inside a Ray Train worker


def _write_worker_pid(run_dir: Path, rank: int) -> None:
    """Which process is this rank's worker (operators and the worker-fault test signal it by pid)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"worker-{rank}.pid").write_text(str(os.getpid()))


def _inline_fit(cfg: ExperimentConfig, session: TuneSession) -> dict[str, float]:
    """`fit` in this process as a Ray Train worker of rank 0 would run it: its thread count, device, pid file."""
    mark("train_worker_start", run=str(session.run_dir))
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    if cfg.train.use_gpu:
        torch.cuda.set_device(0)  # Ray gives the process its GPU as CUDA_VISIBLE_DEVICES
    _write_worker_pid(session.run_dir, 0)
    return fit(cfg, session)


def tune_trial_fit(cfg: ExperimentConfig, run_dir: Path) -> dict[str, float]:
    """`fit` in the calling Tune trial's process (launcher inline)."""
    return _inline_fit(cfg, TuneSession(run_dir, cfg))


def tune_trial_replay(cfg: ExperimentConfig, run_dir: Path, params: dict, trial_id: str) -> None:
    """Launcher replay: report the trial's learning curve (uda_ray.training.replay) to Tune as the training loop
    would, evaluation by evaluation (after `seconds_per_eval` each), with a heartbeat in the run folder for the
    live view. Nothing is trained, loaded or checkpointed."""
    import time

    import ray.tune

    from uda_ray.training.progress import Heartbeat
    from uda_ray.training.replay import curve_for, trial_index

    tc, rp = cfg.train, cfg.train.replay_source
    curve = curve_for(rp, params, trial_index(trial_id), tc.max_steps, tc.eval_every)
    beat = Heartbeat(run_dir, curve[-1]["step"] if curve else tc.max_steps, 0)
    t0 = time.time()
    for metrics in curve:
        if rp.seconds_per_eval:
            time.sleep(rp.seconds_per_eval)
        beat.step(int(metrics["step"]))
        ray.tune.report({**metrics, "time/elapsed_s": time.time() - t0})


def _run_task(exp: dict, run_dir: str, results_dir: str, name: str,
              remote: tuple[str, str] | None = None) -> dict[str, Any]:
    """The Ray task of an inline run: its last reported metrics (checkpoint_path included). Under a storage URI
    (`remote`: the URI, the run folder in it) the run folder is this node's staging copy, brought down first
    (a retried task on another node resumes from the store's checkpoints)."""
    if remote is not None:
        run_dir = str(store.local_path(*remote))
        results_dir = str(layout.results_dir(Path(run_dir)))
        store.pull(run_dir)
    cfg = build_experiment(exp, "<run config>")
    session = RunSession(Path(run_dir), cfg, Path(results_dir), name)
    try:
        _inline_fit(cfg, session)
    finally:
        session.close()
    return session.last


def ray_train_worker(config: dict) -> None:
    """`train_loop_per_worker` of the TorchTrainer: config = {"experiment": dict, "run_dir": str}."""
    mark("train_worker_start", run=config["run_dir"])
    cfg = build_experiment(config["experiment"], "<trial config>")
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    session = RaySession(Path(config["run_dir"]))
    _write_worker_pid(session.run_dir, session.rank)
    fit(cfg, session)


# ------------------------------------------------------------------------------------------------
# the driver side


def make_trainer(cfg: ExperimentConfig, storage: Path, name: str, callbacks: list | None = None) -> Any:
    """A TorchTrainer running `fit` on `cfg.train.num_workers` DDP workers (gloo on CPU, NCCL on GPU)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = cfg.train
    remote = store.located(storage)  # under a storage URI: Ray Train writes the checkpoints into the store itself
    return TorchTrainer(
        ray_train_worker,
        train_loop_config={"experiment": experiment_dict(cfg), "run_dir": str(storage / name)},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage) if remote is None else remote.remote(storage),
            storage_filesystem=None if remote is None else remote.fs,
            callbacks=callbacks or [],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=tc.keep_checkpoints,
                checkpoint_score_attribute=cfg.select,  # the experiment's selection metric
                checkpoint_score_order=mode_of(cfg.select),
            ),
            # a dead worker restarts the worker group from the latest checkpoint (max_failures times);
            # an unsatisfiable worker group fails the run instead of retrying forever
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures, controller_failure_limit=1),
        ),
    )


def run_results_callback(results_dir: Path, run_name: str, cfg: ExperimentConfig) -> Any:
    """A Ray Train callback writing a single run's results tables (the same schema as a sweep's)."""
    from ray.train import UserCallback

    from uda_ray.results.tables import ResultsWriter
    from uda_ray.results.tensorboard import TB_DIR, TensorBoardLog

    exp = experiment_dict(cfg)

    class RunResults(UserCallback):
        def __init__(self) -> None:
            self.writer: ResultsWriter | None = None
            self.tb: TensorBoardLog | None = None

        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            if self.writer is None:  # created in the controller actor, where results arrive
                self.writer = ResultsWriter.for_run(results_dir, run_name, cfg.select)
            m = dict(metrics[0])
            if "step" not in m:
                return
            if checkpoint is not None:
                m["checkpoint_path"] = checkpoint.path
            self.writer.result(run_name, exp, {}, m)
            if self.tb is None:
                self.tb = TensorBoardLog(Path(results_dir).parent / TB_DIR)
            self.tb.log(run_name, m)

        def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
            w = self.writer or ResultsWriter.for_run(results_dir, run_name, cfg.select)
            err = "; ".join(str(e).splitlines()[-1] if str(e) else type(e).__name__
                            for e in worker_exceptions.values())
            w.end(run_name, exp, {}, "errored", err[:500])

    return RunResults()


def fit_run(cfg: ExperimentConfig, storage: Path, name: str) -> dict[str, Any]:
    """Driver side of one training run (`uda-ray train`, pipeline stages, reruns) in <storage>/<name>, results
    tables under its results/: one Ray task running `fit` (`train.launcher` inline, or auto with one worker),
    else a TorchTrainer. Returns the last reported metrics with checkpoint_path."""
    from uda_ray.results.tables import ResultsWriter

    results_dir = layout.results_dir(storage / name)
    if cfg.train.inline:
        return _fit_run_inline(cfg, storage, name)
    trainer = make_trainer(cfg, storage, name, callbacks=[run_results_callback(results_dir, name, cfg)])
    result = trainer.fit()
    writer = ResultsWriter.for_run(results_dir, name, cfg.select)
    writer.end(name, experiment_dict(cfg), {}, "completed")
    m = dict(result.metrics or {})
    m["checkpoint_path"] = result.checkpoint.path if result.checkpoint else None
    return m


def _fit_run_inline(cfg: ExperimentConfig, storage: Path, name: str) -> dict[str, Any]:
    """One Ray task with the worker's resources runs `fit`; a task whose process dies (or whose `fit` raises) is
    run again up to train.max_failures times and resumes from the run folder's latest checkpoint, as a Ray Train
    run restarts its worker group."""
    import ray

    from uda_ray.results.tables import ResultsWriter

    tc, exp = cfg.train, experiment_dict(cfg)
    results_dir = layout.results_dir(storage / name)
    task = ray.remote(_run_task).options(num_cpus=tc.cpus_per_worker, num_gpus=1 if tc.use_gpu else 0,
                                         max_retries=tc.max_failures, retry_exceptions=True)
    remote = store.located(storage / name)
    where = None if remote is None else (remote.uri, (storage / name).absolute().relative_to(remote.staging).as_posix())
    try:
        last = ray.get(task.remote(exp, str(storage / name), str(results_dir), name, where))
    except Exception as e:
        err = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        store.pull(results_dir)  # what the task wrote on its node, before the driver adds the run's end
        ResultsWriter.for_run(results_dir, name, cfg.select).end(name, exp, {}, "errored", err[:500])
        raise
    store.pull(results_dir)
    ResultsWriter.for_run(results_dir, name, cfg.select).end(name, exp, {}, "completed")
    return dict(last)
