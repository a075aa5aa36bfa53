"""Where `fit` runs: the Session it is given supplies the rank, the device, the model wrapping, the latest
checkpoint and the report function.

    LocalSession  one process, no Ray (tests, GPU checks, benchmarks): checkpoints and reports kept locally
    TuneSession   the Tune trial's own process (`train.launcher` inline): checkpoints persisted in the run
                  folder under Ray Train's names, metrics to Tune
    RunSession    one run in one Ray task, launcher inline: TuneSession's checkpoints, reports written into the
                  run's results tables and TensorBoard log
    RaySession    a Ray Train worker: checkpoints and metrics to ray.train.report

Ray is imported only inside the Ray sessions' methods.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from uda_ray.config import ExperimentConfig, experiment_dict
from uda_ray.metric_names import mode_of
from uda_ray.storage import store
from uda_ray.training.checkpoint import (
    checkpoint_dir_name,
    local_checkpoint_dir,
    local_checkpoints,
    persist_checkpoint,
    prune_checkpoints,
    remove_unfinished_copies,
    run_checkpoints,
)


class Session(Protocol):
    """What `fit` needs of the process it runs in. Two optional attributes are read with getattr:
    `replay_on_resume` (True: on a resume, report again every evaluation up to the checkpoint, see
    uda_ray.training.loop) and `restored_copy` (a local copy of a remote checkpoint, removed once loaded)."""

    rank: int
    world_size: int
    device: torch.device
    run_dir: Path
    node: dict[str, str]  # where this rank runs: {"node_id", "node_ip"} of its Ray node; {} outside Ray

    def wrap(self, module: nn.Module) -> nn.Module: ...
    def latest_checkpoint(self) -> Path | None: ...
    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...


class LocalSession:
    """One process, no Ray: checkpoints under run_dir/checkpoints/step_NNNNNNN, reports kept in memory."""

    def __init__(self, run_dir: Path, device: str = "cpu") -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.run_dir = Path(run_dir)
        self.node: dict[str, str] = {}
        self.reports: list[dict] = []

    def wrap(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def latest_checkpoint(self) -> Path | None:
        found = local_checkpoints(self.run_dir)
        return found[-1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dest = local_checkpoint_dir(self.run_dir, int(metrics["step"]))
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)


def _ray_node() -> dict[str, str]:
    """This process's Ray node ({"node_id", "node_ip"}), {} when Ray is not initialized here."""
    import ray

    if not ray.is_initialized():
        return {}
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


class TuneSession:
    """Inside a Tune function trial (`train.launcher` inline): `fit` runs in the trial's own process, one
    worker, no Ray Train. Checkpoints are persisted in the run folder under Ray Train's names
    (`<run>/checkpoint_step_NNNNNNN`, the `keep_checkpoints` best by the selection metric and the latest kept),
    then the metrics go to Tune with `checkpoint_path`, as the Ray Train path reports them. A restarted trial
    (Tune's FailureConfig after a dead process, or a restored sweep) resumes from the run folder's latest
    checkpoint: Tune is not handed the checkpoint (it would copy every one into its own trial folder), so
    `ray.tune.get_checkpoint()` has nothing the run folder does not hold."""

    replay_on_resume = True

    def __init__(self, run_dir: Path, cfg: ExperimentConfig) -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device("cuda", 0) if cfg.train.use_gpu else torch.device("cpu")
        self.run_dir = Path(run_dir)
        self.node = _ray_node()
        self._keep, self._metric, self._mode = cfg.train.keep_checkpoints, cfg.select, mode_of(cfg.select)

    def wrap(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def latest_checkpoint(self) -> Path | None:
        remove_unfinished_copies(self.run_dir)  # copies a dead attempt left unfinished
        found = run_checkpoints(self.run_dir)
        return found[-1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self._send(self._persist(dict(metrics), checkpoint_dir))

    def _send(self, metrics: dict[str, Any]) -> None:
        import ray.tune

        ray.tune.report(metrics)

    def _persist(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> dict[str, Any]:
        """The checkpoint into the run folder (then the ranking's pruning); the metrics with its path."""
        step = int(metrics["step"])
        dest = self.run_dir / checkpoint_dir_name(step)
        if checkpoint_dir is not None:
            persist_checkpoint(checkpoint_dir, self.run_dir, step)
            gone = prune_checkpoints(self.run_dir, self._keep, self._metric, self._mode)
            store.push(dest)  # under a storage URI's staging folder: into the store, the same layout
            for g in gone:
                store.remove(g)
        if dest.is_dir():  # also on a replayed evaluation whose checkpoint is still kept
            metrics["checkpoint_path"] = str(dest)
        # (a replayed one whose checkpoint was pruned since keeps the path it had: see loop._replay_reports)
        return metrics


class RunSession(TuneSession):
    """One run (`uda-ray train`, a pipeline stage, a rerun) in one Ray task, launcher inline: TuneSession's
    checkpoints, its reports written straight into the run's results tables and TensorBoard log (what the Ray
    Train path's controller callback writes)."""

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, results_dir: Path, name: str) -> None:
        from uda_ray.results.tables import ResultsWriter
        from uda_ray.results.tensorboard import TB_DIR, TensorBoardLog

        super().__init__(run_dir, cfg)
        self._writer = ResultsWriter.for_run(results_dir, name, cfg.select)
        self._tb = TensorBoardLog(Path(results_dir).parent / TB_DIR)
        self._name, self._exp = name, experiment_dict(cfg)
        self.last: dict[str, Any] = {}

    def _send(self, metrics: dict[str, Any]) -> None:
        self._writer.result(self._name, self._exp, {}, metrics)
        self._tb.log(self._name, metrics)
        self.last = metrics

    def close(self) -> None:
        self._tb.close()


class RaySession:
    """Inside a Ray Train worker."""

    replay_on_resume = True

    def __init__(self, run_dir: Path) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_dir = run_dir
        self.restored_copy: Path | None = None
        self.node = _ray_node()
        self._prepare = ray.train.torch.prepare_model

    def wrap(self, module: nn.Module) -> nn.Module:
        return self._prepare(module)

    def latest_checkpoint(self) -> Path | None:
        import pyarrow.fs
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
            return Path(ckpt.path)  # local or mounted shared storage: read in place, nothing copied
        # remote storage: a local copy, removed once loaded (loop._resume_or_init); every resume used to leave one
        self.restored_copy = Path(tempfile.mkdtemp(prefix="uda_ray_restore_"))
        return Path(ckpt.to_directory(str(self.restored_copy)))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(int(metrics["step"])))
