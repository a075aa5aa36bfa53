"""The ONE training loop, run by every Ray Train worker, inside a single-worker Tune trial, and in-process by
tests and GPU checks.

`fit(cfg, session)` is plain PyTorch: the session supplies rank, device, model wrapping, the latest
checkpoint and a report function. `RaySession` (Ray Train worker), `TuneSession` (the Tune trial's own
process: `train.launcher` inline) and `LocalSession` (one process, no Ray) are the implementations; Ray is
imported only inside the Ray pieces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from uda_ray.build import build_experiment, build_method
from uda_ray.config import ExperimentConfig, dump_yaml, experiment_dict
from uda_ray.data.datasets import scans_once
from uda_ray.data.loading import build_datasets, resolve_loader_workers, splits_of, train_loader, val_loader
from uda_ray.errors import ConfigError
from uda_ray.methods.base import Method, upsample
from uda_ray.metric_names import DEFAULT_SELECTION, mode_of, needs_test_labels
from uda_ray.metrics import ConfusionMatrix
from uda_ray.selection.validators import ValidatorAccumulator
from uda_ray.training.checkpoint import (
    METRICS_FILE,
    STATE_FILE,
    load_state,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from uda_ray.training.progress import Heartbeat
from uda_ray.training.step import LossLog, NonFiniteLoss, train_step
from uda_ray.training.timing import mark

log = logging.getLogger(__name__)
RESTARTS_FILE = "restarts.jsonl"  # one line per restart of the run from a checkpoint
REPORTED_FILE = "reported.jsonl"  # rank 0: every evaluation's metrics, logged before it is reported
DIVERGED_FILE = "diverged.json"  # where a non-finite loss ended an attempt (a restart would repeat it)
# A test hook, inert unless set: "STEP:MARKER" makes rank 0 create the file MARKER and sleep at a chosen moment,
# so that a test can kill the sweep driver there. STEP 0: at the start of a run that starts from nothing,
# before its first training step; any other STEP: in the middle of writing the checkpoint of that step (its
# files written, not yet persisted in the run folder). Only once per MARKER: a resumed run does not stop again.
TEST_PAUSE_ENV = "UDA_RAY_TEST_PAUSE"


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device
    run_dir: Path
    node: dict[str, str]  # where this rank runs: {"node_id", "node_ip"} of its Ray node; {} outside Ray

    def wrap(self, module: nn.Module) -> nn.Module: ...
    def latest_checkpoint(self) -> Path | None: ...
    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...


# ------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, num_classes: int, device: torch.device) -> dict[str, float]:
    """Confusion matrix at the label's full resolution (logits upsampled bilinearly), summed over ranks."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, device)
    for item in loader:
        lbl = item["lbl"].to(device)  # (B, H, W) full resolution
        logits = model(item["img"].to(device))["out"]  # (B, C, h, w)
        cm.update(upsample(logits, tuple(lbl.shape[-2:])).argmax(1), lbl)
    cm.all_reduce()
    model.train(was_training)
    return cm.compute()


@torch.no_grad()
def evaluate_unlabeled(model: nn.Module, loader: Any, num_classes: int, device: torch.device, pixels: int,
                       seed: int) -> dict[str, float]:
    """The label-free validators (uda_ray.selection.validators) of the model's softmax on unlabeled images, at the
    model's output resolution; pixels for SND / BNM sampled per image by (seed, image name). Under DDP the
    running sums are summed and the pixel samples gathered over ranks (ValidatorAccumulator.reduce)."""
    was_training = model.training
    model.eval()
    acc = ValidatorAccumulator(num_classes, pixels_per_image=pixels, seed=seed)
    for item in loader:
        probs = model(item["img"].to(device))["out"].float().softmax(1)
        acc.update(probs, [name_key(n) for n in item["name"]])
    acc.reduce()
    model.train(was_training)
    return acc.compute()


def name_key(name: str) -> int:
    """A stable integer of an image name (seeds its validator pixel sample, orders the gathered samples)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)


def evaluate_splits(model: nn.Module, loaders: dict[str, Any], cfg: ExperimentConfig, device: torch.device
                    ) -> dict[str, float]:
    """Every evaluation of a run: test/... (when the target has a labeled test split), src_val/miou and
    src_val/pixel_acc, sel/miou (with a labeled selection split), uv/... validators, time/eval_s."""
    t0 = time.time()
    c = cfg.model.num_classes
    out: dict[str, float] = {}
    if "test" in loaders:
        out.update({f"test/{k}": v for k, v in evaluate(model, loaders["test"], c, device).items()})
    if "src_val" in loaders:
        ev = evaluate(model, loaders["src_val"], c, device)
        out.update({"src_val/miou": ev["miou"], "src_val/pixel_acc": ev["pixel_acc"]})
    if "sel" in loaders:
        out["sel/miou"] = evaluate(model, loaders["sel"], c, device)["miou"]
    if "holdout" in loaders:
        out.update(evaluate_unlabeled(model, loaders["holdout"], c, device, cfg.data.validator_pixels,
                                      cfg.data.split_seed))
    out["time/eval_s"] = time.time() - t0
    return out


def eval_loaders(ds: dict, cfg: ExperimentConfig, rank: int, world_size: int, workers: int = 0) -> dict[str, Any]:
    """This rank's loaders of the evaluation splits. The test and selection splits use eval_batch_size
    (labels at full resolution); source val and the holdout, at input size, the training batch size."""
    tc = cfg.train
    return {k: val_loader(ds[k], tc.eval_batch_size if k in ("test", "sel") else max(tc.batch_size, tc.eval_batch_size),
                          rank=rank, world_size=world_size, workers=workers)
            for k in ("test", "src_val", "sel", "holdout") if k in ds}


def check_selectable(cfg: ExperimentConfig, has_test: bool) -> None:
    """The run's selection metric must be one it reports (checked before any compute)."""
    if needs_test_labels(cfg.select) and not has_test:
        raise ConfigError(f"select: {cfg.select} needs target test labels, and the target at "
                          f"{cfg.data.target_root} has none (choose a label-free metric, e.g. {DEFAULT_SELECTION})")


def model_profile(model: nn.Module, size_hw: tuple[int, int], device: torch.device) -> dict[str, float]:
    """Params, GFLOPs (torch's FLOP counter: a multiply-add = 2 FLOPs) and latency of the eval model."""
    from uda_ray.models.profile import count_gflops, count_params, measure_latency

    was_training = model.training
    lat = measure_latency(model, size_hw, device=str(device), warmup=1, iters=3)
    out = {"model/params": float(count_params(model)), "model/gflops": count_gflops(model, size_hw),
           "model/latency_ms": lat["latency_ms"], "model/fps": lat["fps"]}
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------
# checkpoints


def _gather(obj: Any, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------------
# the loop


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


def _resume_or_init(cfg: ExperimentConfig, session: Session, method: Method, digest: str
                    ) -> tuple[int, dict[str, Any]]:
    """Resume from the session's latest checkpoint (method state, step, every RNG), or load `init_from`'s
    weights into a fresh run. Returns (the step to start at, the restart fields of the first evaluation)."""
    ckpt = session.latest_checkpoint()
    if ckpt is None:
        if cfg.train.init_from:
            load_weights(method.model_raw, cfg.train.init_from)
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
        # The driver may have died after checkpoints were persisted but before their results reached the
        # results tables: Ray Train persists a checkpoint while its result can still wait in Tune's queues
        # (more than one result can be in flight). Report every evaluation up to this checkpoint again, in
        # order; the tables keep one row per step, so what the driver already had is not duplicated.
        replay = _reported_up_to(session.run_dir, start) or ([state["metrics"]] if state.get("metrics") else [])
        for metrics in replay:
            # every evaluation was reported with its checkpoint: its row names that folder, replayed or not
            path = session.run_dir / checkpoint_dir_name(int(metrics["step"]))
            session.report({**metrics, "checkpoint_path": str(path)}, None)
    return start, restart


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


def _loop(cfg: ExperimentConfig, session: Session, method: Method, data: _RunData, start: int,
          restart: dict[str, Any], profile: dict[str, float], digest: str) -> dict[str, float]:
    """The steps from `start` to max_steps; every eval_every steps (and at the last) an evaluation, a
    checkpoint and a report."""
    tc, device = cfg.train, session.device
    mark("loop_start", run=str(session.run_dir), steps=tc.max_steps - start)
    losses = LossLog()  # per-step losses stay on the device until the loop logs
    n_sum, t0, t_last = 0, time.time(), time.time()
    metrics: dict[str, float] = {}
    # rank 0's heartbeat: <run>/progress.json every few seconds (step, steps/s, ETA) between evaluations
    beat = Heartbeat(session.run_dir, tc.max_steps, start) if session.rank == 0 else None
    if start == 0 and session.rank == 0:
        _test_pause(0)
    for step in range(start, tc.max_steps):
        s, t, h = data.next_batches()
        losses.add(step, train_step(method, s, t, step, cfg.poly_horizon, device, tc.amp, held=h))
        n_sum += 1
        done = step + 1
        if beat is not None:
            beat.step(done)
        if done % tc.eval_every == 0 or done == tc.max_steps:
            if beat is not None:
                beat.evaluating(True)
            try:
                train_avg = losses.averages()  # the one device -> host copy of the losses
            except NonFiniteLoss as e:
                _mark_divergence(session.run_dir, e.step, e.key, digest)
                raise
            ev = evaluate_splits(method.eval_model(), data.loaders, cfg, device)
            now = time.time()
            metrics = {
                "step": done,
                **ev,
                **{f"train/{k}": v for k, v in train_avg.items()},
                "train/lr": method.optimizers[0].param_groups[0]["lr"],
                "time/elapsed_s": now - t0,
                "time/step_s": (now - t_last) / max(n_sum, 1),
                **profile,
                **session.node,
                **restart,  # on the first evaluation after a restart only
            }
            restart = {}
            n_sum, t_last = 0, now
            _checkpoint_and_report(cfg, session, method, done, metrics)
            if beat is not None:
                beat.evaluating(False)
    return metrics


def _checkpoint_and_report(cfg: ExperimentConfig, session: Session, method: Method, step: int,
                           metrics: dict[str, Any]) -> None:
    """Every rank's RNG state gathered; rank 0 writes the checkpoint into a temporary folder that the session
    persists with the report (all ranks report, as Ray Train requires)."""
    rng = _gather(rng_state(), session.world_size)
    tmp = Path(tempfile.mkdtemp(prefix=f"{CKPT_TMP_PREFIX}{os.getpid()}_")) if session.rank == 0 else None
    try:
        if tmp is not None:
            save_checkpoint(tmp, method_state=method.state_dict(), step=step, rng=rng,
                            config=experiment_dict(cfg), metrics=metrics)
            _test_pause(step)
            if getattr(session, "replay_on_resume", False):  # logged before it is reported: see _resume_or_init
                session.run_dir.mkdir(parents=True, exist_ok=True)
                with open(session.run_dir / REPORTED_FILE, "a") as f:
                    f.write(json.dumps(metrics, default=float) + "\n")
        session.report(metrics, tmp)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


CKPT_TMP_PREFIX = "uda_ray_ckpt_"  # + the writer's pid + "_": a checkpoint being written, in the temp dir


def remove_orphaned_checkpoint_folders(tmp_dir: str | None = None) -> list[Path]:
    """Remove the checkpoint folders a writer killed mid-write left in the temp dir: those named by a pid that
    no longer runs on this host (a folder whose pid was reused stays until that process ends too). Returns them."""
    removed = []
    for d in Path(tmp_dir or tempfile.gettempdir()).glob(f"{CKPT_TMP_PREFIX}*_*"):
        pid = d.name[len(CKPT_TMP_PREFIX):].split("_", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _test_pause(step: int) -> None:
    """The TEST_PAUSE_ENV test hook (does nothing unless that variable is set)."""
    spec = os.environ.get(TEST_PAUSE_ENV)
    if not spec:
        return
    at, _, marker = spec.partition(":")
    if int(at) != step or not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # once: the first writer of MARKER pauses
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(600)  # the test kills the driver (and with it this worker) meanwhile


def checkpoint_dir_name(step: int) -> str:
    """The folder of a run's checkpoint of `step`, under the run's folder (Ray Train's and the inline path's)."""
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def _record_restart(run_dir: Path, step: int) -> int:
    """Append this restart to the run's log; returns how many restarts the run has had."""
    run_dir.mkdir(parents=True, exist_ok=True)
    p = run_dir / RESTARTS_FILE
    with open(p, "a") as f:
        f.write(json.dumps({"resumed_from": step, "at": time.time(), "pid": os.getpid()}) + "\n")
    return sum(1 for ln in p.read_text().splitlines() if ln.strip())


def _config_digest(cfg: ExperimentConfig) -> str:
    import hashlib

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


def _own_pseudo_labels(cfg: ExperimentConfig, session: Session) -> ExperimentConfig:
    """Rank 0 writes the run's pseudo-labels (once: a resumed run reuses them), the others wait."""
    import dataclasses

    from uda_ray.pipelines.pseudo_labels import from_checkpoints

    d = cfg.data
    out = session.run_dir / "pseudo_labels"
    if session.rank == 0 and not (out / "manifest.json").is_file():
        log.info("pseudo-labels from %s (percentile %s, cap %s)", d.pseudo_from, d.pseudo_percentile, d.pseudo_cap)
        from_checkpoints([Path(d.pseudo_from)], out, percentile=d.pseudo_percentile, cap=d.pseudo_cap,
                      stylize_beta=d.pseudo_stylize_beta, device=str(session.device))
    if session.world_size > 1:
        dist.barrier()
    return dataclasses.replace(cfg, data=dataclasses.replace(d, target_label_root=str(out), pseudo_from=None))


class LocalSession:
    """One process, no Ray: checkpoints under run_dir/checkpoints/step_NNNNNN, reports kept in memory."""

    def __init__(self, run_dir: Path, device: str = "cpu") -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.run_dir = Path(run_dir)
        self.node: dict[str, str] = {}
        self.reports: list[dict] = []

    def wrap(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.run_dir / "checkpoints").glob("step_*"))
        return found[-1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dest = self.run_dir / "checkpoints" / f"step_{int(metrics['step']):07d}"
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)


# ------------------------------------------------------------------------------------------------
# Ray edges: inside a Tune trial (inline) and inside a Ray Train worker


CHECKPOINT_PREFIX = "checkpoint_step_"  # <run>/checkpoint_step_NNNNNNN, as Ray Train names them here


def _ckpt_score(ck: Path, metric: str, mode: str) -> float:
    """A checkpoint's selection metric from its metrics.json, signed so that higher is better (-inf: none)."""
    import math

    try:
        v = json.loads((ck / METRICS_FILE).read_text()).get(metric)
    except (OSError, json.JSONDecodeError):
        return -math.inf
    if not isinstance(v, (int, float)) or v != v:
        return -math.inf
    return float(v) if mode == "max" else -float(v)


def _step_of(ck: Path) -> int:
    return int(ck.name[len(CHECKPOINT_PREFIX):])


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run folder (checkpoint_step_*, each holding its state), by step."""
    found = [p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def prune_checkpoints(run_dir: Path, keep: int, metric: str, mode: str) -> list[Path]:
    """Delete all but the `keep` best checkpoints by `metric` (ties: the later one) and the latest, as Ray
    Train's CheckpointConfig(num_to_keep, checkpoint_score_attribute, checkpoint_score_order) keeps them.
    Returns the deleted folders."""
    cks = run_checkpoints(run_dir)
    if len(cks) <= keep:
        return []
    ranked = sorted(cks, key=lambda c: (_ckpt_score(c, metric, mode), _step_of(c)), reverse=True)
    kept = set(ranked[:keep]) | {cks[-1]}
    gone = [c for c in cks if c not in kept]
    for c in gone:
        shutil.rmtree(c, ignore_errors=True)
    return gone


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
        import ray

        self.rank, self.world_size = 0, 1
        self.device = torch.device("cuda", 0) if cfg.train.use_gpu else torch.device("cpu")
        self.run_dir = Path(run_dir)
        self.node = {"node_id": ray.get_runtime_context().get_node_id(),
                     "node_ip": ray.util.get_node_ip_address()} if ray.is_initialized() else {}
        self._keep, self._metric, self._mode = cfg.train.keep_checkpoints, cfg.select, mode_of(cfg.select)

    def wrap(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def latest_checkpoint(self) -> Path | None:
        for tmp in self.run_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp"):  # copies a dead attempt left unfinished
            shutil.rmtree(tmp, ignore_errors=True)
        found = run_checkpoints(self.run_dir)
        return found[-1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self._send(self._persist(dict(metrics), checkpoint_dir))

    def _send(self, metrics: dict[str, Any]) -> None:
        import ray.tune

        ray.tune.report(metrics)

    def _persist(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> dict[str, Any]:
        """The checkpoint into the run folder (then the ranking's pruning); the metrics with its path."""
        dest = self.run_dir / checkpoint_dir_name(int(metrics["step"]))
        if checkpoint_dir is not None:
            tmp = self.run_dir / f".{dest.name}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)  # a crash leaves a temporary folder, never a partial checkpoint
            prune_checkpoints(self.run_dir, self._keep, self._metric, self._mode)
        if dest.is_dir():  # also on a replayed evaluation whose checkpoint is still kept
            metrics["checkpoint_path"] = str(dest)
        # (a replayed one whose checkpoint was pruned since keeps the path it had: see _resume_or_init)
        return metrics


class RunSession(TuneSession):
    """One run (`uda-ray train`, a pipeline stage, a rerun) in one Ray task, launcher inline: TuneSession's
    checkpoints, its reports written straight into the run's results tables and TensorBoard log (what the Ray
    Train path's controller callback writes)."""

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, results_dir: Path, name: str) -> None:
        from uda_ray.results.tables import ResultsWriter
        from uda_ray.results.tensorboard import TB_DIR, TensorBoardLog

        super().__init__(run_dir, cfg)
        self._writer = ResultsWriter(results_dir, name, cfg.select, mode_of(cfg.select), None)
        self._tb = TensorBoardLog(Path(results_dir).parent / TB_DIR)
        self._name, self._exp = name, experiment_dict(cfg)
        self.last: dict[str, Any] = {}

    def _send(self, metrics: dict[str, Any]) -> None:
        self._writer.result(self._name, self._exp, {}, metrics)
        self._tb.log(self._name, metrics)
        self.last = metrics

    def close(self) -> None:
        self._tb.close()


def _inline_fit(cfg: ExperimentConfig, session: TuneSession) -> dict[str, float]:
    """`fit` in this process as a Ray Train worker of rank 0 would run it: its thread count, device, pid file."""
    mark("train_worker_start", run=str(session.run_dir))
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    if cfg.train.use_gpu:
        torch.cuda.set_device(0)  # Ray gives the process its GPU as CUDA_VISIBLE_DEVICES
    session.run_dir.mkdir(parents=True, exist_ok=True)
    (session.run_dir / "worker-0.pid").write_text(str(os.getpid()))
    return fit(cfg, session)


def tune_trial_fit(cfg: ExperimentConfig, run_dir: Path) -> dict[str, float]:
    """`fit` in the calling Tune trial's process (launcher inline)."""
    return _inline_fit(cfg, TuneSession(run_dir, cfg))


def _run_task(exp: dict, run_dir: str, results_dir: str, name: str) -> dict[str, Any]:
    """The Ray task of an inline run: its last reported metrics (checkpoint_path included)."""
    cfg = build_experiment(exp, "<run config>")
    session = RunSession(Path(run_dir), cfg, Path(results_dir), name)
    try:
        _inline_fit(cfg, session)
    finally:
        session.close()
    return session.last


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
        self.node = {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
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
        # remote storage: a local copy, removed once loaded (_resume_or_init); every resume used to leave one
        self.restored_copy = Path(tempfile.mkdtemp(prefix="uda_ray_restore_"))
        return Path(ckpt.to_directory(str(self.restored_copy)))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(int(metrics["step"])))


def ray_train_worker(config: dict) -> None:
    """`train_loop_per_worker` of the TorchTrainer: config = {"experiment": dict, "run_dir": str}."""
    mark("train_worker_start", run=config["run_dir"])
    cfg = build_experiment(config["experiment"], "<trial config>")
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    session = RaySession(Path(config["run_dir"]))
    # which process is this rank's worker (operators and the worker-fault test signal it by pid)
    session.run_dir.mkdir(parents=True, exist_ok=True)
    (session.run_dir / f"worker-{session.rank}.pid").write_text(str(os.getpid()))
    fit(cfg, session)


def make_trainer(cfg: ExperimentConfig, storage: Path, name: str, callbacks: list | None = None) -> Any:
    """A TorchTrainer running `fit` on `cfg.train.num_workers` DDP workers (gloo on CPU, NCCL on GPU)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = cfg.train
    return TorchTrainer(
        ray_train_worker,
        train_loop_config={"experiment": experiment_dict(cfg), "run_dir": str(storage / name)},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
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
                self.writer = ResultsWriter(results_dir, run_name, cfg.select, mode_of(cfg.select), None)
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
            w = self.writer or ResultsWriter(results_dir, run_name, cfg.select, mode_of(cfg.select), None)
            err = "; ".join(str(e).splitlines()[-1] if str(e) else type(e).__name__
                            for e in worker_exceptions.values())
            w.end(run_name, exp, {}, "errored", err[:500])

    return RunResults()


def fit_run(cfg: ExperimentConfig, storage: Path, name: str) -> dict[str, Any]:
    """Driver side of one training run (`uda-ray train`, pipeline stages, reruns) in <storage>/<name>, results
    tables under its results/: one Ray task running `fit` (`train.launcher` inline, or auto with one worker),
    else a TorchTrainer. Returns the last reported metrics with checkpoint_path."""
    from uda_ray.results.tables import ResultsWriter

    results_dir = storage / name / "results"
    if cfg.train.inline:
        return _fit_run_inline(cfg, storage, name)
    trainer = make_trainer(cfg, storage, name, callbacks=[run_results_callback(results_dir, name, cfg)])
    result = trainer.fit()
    writer = ResultsWriter(results_dir, name, cfg.select, mode_of(cfg.select), None)
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
    results_dir = storage / name / "results"
    task = ray.remote(_run_task).options(num_cpus=tc.cpus_per_worker, num_gpus=1 if tc.use_gpu else 0,
                                         max_retries=tc.max_failures, retry_exceptions=True)
    try:
        last = ray.get(task.remote(exp, str(storage / name), str(results_dir), name))
    except Exception as e:
        err = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        ResultsWriter(results_dir, name, cfg.select, mode_of(cfg.select), None).end(name, exp, {}, "errored", err[:500])
        raise
    ResultsWriter(results_dir, name, cfg.select, mode_of(cfg.select), None).end(name, exp, {}, "completed")
    return dict(last)
