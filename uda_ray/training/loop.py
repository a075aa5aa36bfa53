"""The ONE training loop, run by every Ray Train worker, inside a single-worker Tune trial or Ray task, and
in-process by tests and GPU checks.

`fit(cfg, session)` is plain PyTorch: the session (uda_ray.training.sessions) supplies rank, device, model
wrapping, the latest checkpoint and a report function. `fit` seeds, builds the method, resumes (or starts from
`init_from`), loads the data, writes the run's files, profiles the model, then runs the loop: every
`eval_every` steps an evaluation (uda_ray.training.evaluate), a checkpoint and a report. How a run is launched
(Tune trial, Ray task, Ray Train) is uda_ray.training.launchers; no Ray here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from uda_ray.build import build_method
from uda_ray.config import ExperimentConfig, experiment_dict
from uda_ray.config_loader import dump_yaml
from uda_ray.data.datasets import scans_once
from uda_ray.data.loading import build_datasets, resolve_loader_workers, splits_of, train_loader
from uda_ray.methods.base import Method
from uda_ray.training.checkpoint import (
    checkpoint_dir_name,
    load_state,
    load_weights,
    new_writing_dir,
    remove_orphaned_checkpoint_folders,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from uda_ray.training.evaluate import check_selectable, eval_loaders, evaluate_splits, model_profile
from uda_ray.training.progress import Heartbeat
from uda_ray.training.sessions import Session
from uda_ray.training.step import LossLog, NonFiniteLoss, train_step
from uda_ray.training.timing import mark

log = logging.getLogger(__name__)
RESTARTS_FILE = "restarts.jsonl"  # one line per restart of the run from a checkpoint
REPORTED_FILE = "reported.jsonl"  # rank 0: every evaluation's metrics, logged before it is reported
DIVERGED_FILE = "diverged.json"  # where a non-finite loss ended an attempt (a restart would repeat it)


def fit(cfg: ExperimentConfig, session: Session) -> dict[str, float]:
    """Train `cfg.method` for `cfg.train.max_steps` steps, evaluating and checkpointing every `eval_every`:
    seed, build the method, resume (or start from `init_from`), load the data, write the run's files, profile
    the model, then the loop. Returns the last evaluation's metrics."""
    mark("fit_start", run=str(session.run_dir))
    if session.rank == 0:
        remove_orphaned_checkpoint_folders()
    _seed_all(cfg.seed)  # identical init on every rank
    method = build_method(cfg, session.wrap, session.device)
    mark("model_built", run=str(session.run_dir))
    digest = _config_digest(cfg)
    start, restart = _resume_or_init(cfg, session, method, digest)
    if cfg.data.pseudo_from and type(method).uses_target_labels:
        cfg = _own_pseudo_labels(cfg, session)
    data = _RunData.build(cfg, session, type(method), start)
    if session.rank == 0:
        _write_run_files(cfg, session, data.splits)
    mark("data_ready", run=str(session.run_dir))
    profile = _profile(cfg, session, method, data.ds) if cfg.train.profile and session.rank == 0 else {}
    mark("profiled", run=str(session.run_dir))
    metrics = _loop(cfg, session, method, data, start, restart, profile, digest)
    mark("fit_end", run=str(session.run_dir))
    return metrics


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ------------------------------------------------------------------------------------------------
# resuming


def _resume_or_init(cfg: ExperimentConfig, session: Session, method: Method, digest: str
                    ) -> tuple[int, dict[str, Any]]:
    """Resume from the session's latest checkpoint (method state, step, every RNG), or load `init_from`'s
    weights into a fresh run. Returns (the step to start at, the restart fields of the first evaluation)."""
    ckpt = session.latest_checkpoint()
    if ckpt is None:
        if cfg.train.init_from:
            load_weights(method.model_raw, cfg.train.init_from)
            method.weights_loaded()
            log.info("initialized from %s", cfg.train.init_from)
        return 0, {}
    state = load_state(ckpt, map_location=session.device)
    if getattr(session, "restored_copy", None) is not None:
        shutil.rmtree(session.restored_copy, ignore_errors=True)
        session.restored_copy = None
    method.load_state_dict(state["method"])
    start = state["step"]
    rng = state["rng"]
    set_rng_state(rng[session.rank] if len(rng) == session.world_size else rng[0])
    log.info("resumed from %s at step %d", ckpt, start)
    _refuse_known_divergence(session.run_dir, start, digest)
    restart = {"resumed_from": start, "restarts": _record_restart(session.run_dir, start)} \
        if session.rank == 0 else {}
    if getattr(session, "replay_on_resume", False):
        _replay_reports(session, start, state)
    return start, restart


def _replay_reports(session: Session, start: int, state: dict[str, Any]) -> None:
    """Report every evaluation up to the checkpoint of `start` again, in order. The driver may have died after
    checkpoints were persisted but before their results reached the results tables: Ray Train persists a
    checkpoint while its result can still wait in Tune's queues (more than one result can be in flight). The
    tables keep one row per step, so what the driver already had is not duplicated."""
    replay = _reported_up_to(session.run_dir, start) or ([state["metrics"]] if state.get("metrics") else [])
    for metrics in replay:
        # every evaluation was reported with its checkpoint: its row names that folder, replayed or not
        path = session.run_dir / checkpoint_dir_name(int(metrics["step"]))
        session.report({**metrics, "checkpoint_path": str(path)}, None)


def _reported_up_to(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """The evaluations rank 0 logged before reporting them (REPORTED_FILE), one per step, steps <= `step`."""
    p = Path(run_dir) / REPORTED_FILE
    if not p.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in p.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
        if isinstance(m, dict) and int(m.get("step", step + 1)) <= step:
            by_step.setdefault(int(m["step"]), m)
    return [by_step[k] for k in sorted(by_step)]


def _log_reported(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Append an evaluation to REPORTED_FILE before it is reported (replayed from there on a resume)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / REPORTED_FILE, "a") as f:
        f.write(json.dumps(metrics, default=float) + "\n")


def _record_restart(run_dir: Path, step: int) -> int:
    """Append this restart to the run's log; returns how many restarts the run has had."""
    run_dir.mkdir(parents=True, exist_ok=True)
    p = run_dir / RESTARTS_FILE
    with open(p, "a") as f:
        f.write(json.dumps({"resumed_from": step, "at": time.time(), "pid": os.getpid()}) + "\n")
    return sum(1 for ln in p.read_text().splitlines() if ln.strip())


def _config_digest(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(json.dumps(experiment_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _mark_divergence(run_dir: Path, step: int, loss: str, digest: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DIVERGED_FILE).write_text(json.dumps({"step": step, "loss": loss, "config": digest}))


def _refuse_known_divergence(run_dir: Path, start: int, digest: str) -> None:
    """The loop replays exactly from a checkpoint: a restart of the same config before the step where an earlier
    attempt's loss became non-finite would diverge there again, so fail now instead of recomputing up to it."""
    p = run_dir / DIVERGED_FILE
    if p.is_file():
        d = json.loads(p.read_text())
        if d.get("config") == digest and d["step"] >= start:
            raise FloatingPointError(f"{d['loss']} became non-finite at step {d['step']} in an earlier attempt "
                                     f"(learning rate too high?); not retried from step {start}")


# ------------------------------------------------------------------------------------------------
# the run's data and files


def _own_pseudo_labels(cfg: ExperimentConfig, session: Session) -> ExperimentConfig:
    """Rank 0 writes the run's pseudo-labels (once: a resumed run reuses them), the others wait."""
    from uda_ray.pipelines.pseudo_labels import IMAGE_MEDIAN, from_checkpoints

    d = cfg.data
    out = session.run_dir / "pseudo_labels"
    if session.rank == 0 and not (out / "manifest.json").is_file():
        log.info("pseudo-labels from %s (%s, percentile %s, cap %s)", d.pseudo_from, d.pseudo_threshold,
                 d.pseudo_percentile, d.pseudo_cap)
        threshold = IMAGE_MEDIAN if d.pseudo_threshold == IMAGE_MEDIAN else None
        from_checkpoints([Path(d.pseudo_from)], out, percentile=d.pseudo_percentile, cap=d.pseudo_cap,
                         stylize_beta=d.pseudo_stylize_beta, device=str(session.device), threshold=threshold)
    if session.world_size > 1:
        dist.barrier()
    return dataclasses.replace(cfg, data=dataclasses.replace(d, target_label_root=str(out), pseudo_from=None))


@dataclass
class _RunData:
    """The run's datasets and splits, its training streams (source, target, held-out source) positioned at
    the start step, and its evaluation loaders."""

    ds: dict[str, Any]
    splits: Any
    src_it: Any
    tgt_it: Any
    held_it: Any
    loaders: Any

    @classmethod
    def build(cls, cfg: ExperimentConfig, session: Session, method_cls: type, start: int) -> _RunData:
        tc = cfg.train
        with scans_once():  # the splits and the datasets read the same folders: list each once
            splits = splits_of(cfg.data)
            check_selectable(cfg, bool(splits.test))
            ds = build_datasets(cfg.data, source=method_cls.uses_source,
                                target=method_cls.uses_target or method_cls.uses_target_labels,
                                target_labels=method_cls.uses_target_labels, splits=splits)
        workers = resolve_loader_workers(cfg.data.loader_workers, tc.cpus_per_worker,
                                         ("src" in ds) + ("tgt" in ds))
        kw = dict(rank=session.rank, world_size=session.world_size, seed=cfg.seed, start_step=start,
                  workers=workers, pin_memory=session.device.type == "cuda")
        src_it = train_loader(ds["src"], tc.batch_size, stream=1, **kw) if "src" in ds else None
        tgt_it = train_loader(ds["tgt"], tc.batch_size, stream=2, **kw) if "tgt" in ds else None
        held_it = train_loader(ds["src"], tc.batch_size, stream=3, **kw) if method_cls.uses_held_out_source else None
        loaders = eval_loaders(ds, cfg, session.rank, session.world_size, workers)
        return cls(ds, splits, src_it, tgt_it, held_it, loaders)

    def next_batches(self) -> tuple[Any, Any, Any]:
        """The next (source, target, held-out source) batches; None for a stream the method does not use."""
        s = next(self.src_it) if self.src_it else None
        t = next(self.tgt_it) if self.tgt_it else None
        h = next(self.held_it) if self.held_it is not None else None
        return s, t, h


def _write_run_files(cfg: ExperimentConfig, session: Session, splits: Any) -> None:
    """The resolved config and the splits beside the run's checkpoints (rank 0)."""
    session.run_dir.mkdir(parents=True, exist_ok=True)
    (session.run_dir / "config.yaml").write_text(dump_yaml(experiment_dict(cfg)))
    splits.write(session.run_dir)


def _profile(cfg: ExperimentConfig, session: Session, method: Method, ds: dict[str, Any]) -> dict[str, float]:
    """Params / GFLOPs / latency of the eval model at the evaluation input size, measured once per model in a
    sweep (a cache beside the runs)."""
    from uda_ray.models.profile import PROFILE_CACHE, device_key, measured_once

    h, w = ds["holdout"][0]["img"].shape[-2:]
    key = {"model": experiment_dict(cfg)["model"], "size": [int(h), int(w)], **device_key(session.device)}
    return measured_once(session.run_dir.parent / PROFILE_CACHE, key,
                         lambda: model_profile(method.eval_model(), (int(h), int(w)), session.device))


# ------------------------------------------------------------------------------------------------
# the loop


def _loop(cfg: ExperimentConfig, session: Session, method: Method, data: _RunData, start: int,
          restart: dict[str, Any], profile: dict[str, float], digest: str) -> dict[str, float]:
    """The steps from `start` to max_steps; every eval_every steps (and at the last) an evaluation, a
    checkpoint and a report."""
    tc = cfg.train
    mark("loop_start", run=str(session.run_dir), steps=tc.max_steps - start, start=start, rank=session.rank)
    losses = LossLog()  # per-step losses stay on the device until the loop logs
    n_sum, t0, t_last = 0, time.time(), time.time()
    metrics: dict[str, Any] = {}
    # rank 0's heartbeat: <run>/progress.json every few seconds (step, steps/s, ETA) between evaluations
    beat = Heartbeat(session.run_dir, tc.max_steps, start) if session.rank == 0 else None
    for step in range(start, tc.max_steps):
        s, t, h = data.next_batches()
        losses.add(step, train_step(method, s, t, step, cfg.poly_horizon, session.device, tc.amp, held=h))
        n_sum += 1
        done = step + 1
        if beat is not None:
            beat.step(done)
        if done % tc.eval_every != 0 and done != tc.max_steps:
            continue
        if beat is not None:
            beat.evaluating(True)
        metrics = _evaluation(cfg, session, method, data, losses, done, digest)
        now = time.time()
        metrics.update({"time/elapsed_s": now - t0, "time/step_s": (now - t_last) / max(n_sum, 1),
                        **profile, **session.node, **restart})  # restart: the first evaluation after a restart
        restart, n_sum, t_last = {}, 0, now
        _checkpoint_and_report(cfg, session, method, done, metrics)
        if beat is not None:
            beat.evaluating(False)
    return metrics


def _evaluation(cfg: ExperimentConfig, session: Session, method: Method, data: _RunData, losses: LossLog,
                step: int, digest: str) -> dict[str, Any]:
    """The evaluation after `step` steps: the step, every evaluation split's metrics, the training losses'
    averages since the last evaluation and the learning rate. A non-finite loss is recorded (DIVERGED_FILE,
    so that a restart does not repeat it) and raised."""
    try:
        train_avg = losses.averages()  # the one device -> host copy of the losses
    except NonFiniteLoss as e:
        _mark_divergence(session.run_dir, e.step, e.key, digest)
        raise
    ev = evaluate_splits(method.eval_model(), data.loaders, cfg, session.device)
    return {"step": step, **ev, **{f"train/{k}": v for k, v in train_avg.items()},
            "train/lr": method.optimizers[0].param_groups[0]["lr"]}


def _checkpoint_and_report(cfg: ExperimentConfig, session: Session, method: Method, step: int,
                           metrics: dict[str, Any]) -> None:
    """Every rank's RNG state gathered; rank 0 writes the checkpoint into a temporary folder that the session
    persists with the report (all ranks report, as Ray Train requires)."""
    rng = _gather(rng_state(), session.world_size)
    tmp = new_writing_dir() if session.rank == 0 else None
    try:
        if tmp is not None:
            save_checkpoint(tmp, method_state=method.state_dict(), step=step, rng=rng,
                            config=experiment_dict(cfg), metrics=metrics)
            mark("checkpoint_written", run=str(session.run_dir), step=step)
            if getattr(session, "replay_on_resume", False):  # logged before it is reported: see _replay_reports
                _log_reported(session.run_dir, metrics)
        session.report(metrics, tmp)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _gather(obj: Any, world_size: int) -> list:
    """`obj` of every rank, in rank order."""
    if world_size == 1:
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
