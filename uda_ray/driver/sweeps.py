"""The sweep lifecycle: the `Sweep` handle and its status, starting a sweep (its self-contained folder, a warm
start from an earlier sweep), resuming one, and listing the sweeps under a storage root.

Starting and resuming are each a plan (`plan_start`, `plan_resume`: every check, no side effect but the
generation of the synthetic benchmark once the experiment is valid) and its execution (`start`, `resume`),
which uda_ray.api runs inside the call's Ray connection. Where a sweep's files live: uda_ray.storage.layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from uda_ray.driver import queries
from uda_ray.driver.prepare import cluster_address, overrides_dict, prepare_experiment
from uda_ray.errors import UserError
from uda_ray.storage import layout, store
from uda_ray.storage.lock import DriverLock, refuse_running, running_driver

progress = logging.getLogger("uda_ray.training.progress")
INTERRUPTED, ENDED = "interrupted", ("completed", "stopped_early", "errored")
DEFAULT_OBJECTIVE = {"metric": "test/miou", "mode": "max"}  # of a sweep.json that names none


@dataclasses.dataclass
class Sweep:
    """A sweep on disk: its folder, its recorded state (sweep.json), and queries of its results tables."""

    name: str
    dir: Path
    meta: dict

    @classmethod
    def open(cls, name: str, storage: str | os.PathLike | None = None) -> Sweep:
        d = layout.find_sweep(layout.root(storage), name)
        return cls(name, d, layout.read_meta(d))

    @property
    def status(self) -> str:
        """running / completed / interrupted / ... (a dead driver's "running" reads "interrupted")."""
        status = self.meta.get("status", "?")
        return INTERRUPTED if status == "running" and not running_driver(self.dir) else status

    @property
    def objective(self) -> dict:
        """{"metric": ..., "mode": ...} of the sweep's (first) objective."""
        return (self.meta.get("objective") or [DEFAULT_OBJECTIVE])[0]

    def table(self, name: str = "trials") -> Any:
        """A results table ("trials", "evals", "class_iou") as a pyarrow Table."""
        import pyarrow as pa

        return pa.Table.from_pylist(self._rows(name))

    def trials(self) -> list[dict]:
        return self._rows("trials")

    def best(self, top: int = 5, metric: str | None = None, method: str | None = None) -> list[dict]:
        return queries.best(self.name, storage=self.dir.parent, top=top, metric=metric, method=method)

    def baseline_gain(self) -> dict | None:
        """The winner against the sweep's baseline trial (`baseline: true`); None without one."""
        return queries.baseline_gain(self.name, storage=self.dir.parent) if self.meta.get("baseline") else None

    def vs_oracle(self) -> str | None:
        """One line comparing the sweep's pick with choosing by the test labels (when it has them)."""
        from uda_ray.metric_names import mode_of
        from uda_ray.selection.study import pick_vs_oracle

        obj = self.objective
        if not obj.get("metric"):
            return None
        return pick_vs_oracle(self._rows("evals"), obj["metric"], obj.get("mode") or mode_of(obj["metric"]))

    def _rows(self, table: str) -> list[dict]:
        from uda_ray.results.tables import read_table

        return read_table(layout.results_dir(self.dir), table)


def ls(storage: str | os.PathLike | None = None) -> list[dict]:
    """One dict per sweep under the storage root: name, status, trials, completed, stopped_early, errored,
    best (the best objective value so far, or None), mode, progress (running trial -> its heartbeat: step,
    max_steps, steps_per_s, eta_s, phase, updated_at; only while the sweep runs)."""
    from uda_ray.training.progress import read_progress

    out = []
    for d in layout.sweep_folders(layout.root(storage)):
        s = Sweep(d.name, d, layout.read_meta(d))
        trials = s.trials()
        count = {st: sum(t["status"] == st for t in trials) for st in ENDED}
        scored = [t["best_value"] for t in trials if t.get("best_value") is not None]
        mode = s.objective["mode"]
        beats = {}
        if s.status == "running":
            for t in trials:
                p = read_progress(layout.trial_dir(d, t["trial_id"])) if t["status"] == "running" else None
                if p:
                    beats[t["trial_id"]] = p
        out.append({"name": s.meta.get("name", s.name), "status": s.status, "trials": len(trials), **count,
                    "best": (max if mode == "max" else min)(scored) if scored else None, "mode": mode,
                    "progress": beats})
    return out


# ------------------------------------------------------------------------------------------------
# starting a sweep


@dataclasses.dataclass
class StartPlan:
    """A sweep checked and ready to start: its space (the base experiment prepared), folder, seed, ..."""

    space_path: Path
    space: Any  # the SearchSpace, its base prepared (references and dataset roots resolved)
    dir: Path
    seed: int
    address: str | None
    warm: dict | None
    mlflow: str | None


def plan_start(space: str | os.PathLike, *, storage: str | os.PathLike | None, address: str | None,
               name: str | None, overrides: Mapping[str, Any] | Iterable[str], warm_start: str | os.PathLike | None,
               mlflow: str | None) -> StartPlan:
    """Everything `start` needs, checked (uda_ray.api.sweep's arguments): UserError before anything is written."""
    from uda_ray import checks
    from uda_ray.search.space import check_grace, load_space

    space_path = Path(space)
    sp = load_space(space_path, overrides_dict(overrides))
    if "train.max_steps" in sp.params:
        raise UserError("train.max_steps cannot be searched: ASHA needs one budget per sweep")
    root = layout.root(storage)
    name = checks.run_name(name or space_path.stem)
    sweep_d = layout.sweep_dir(root, name)
    refuse_running(sweep_d, f"sweep '{name}'")
    _refuse_existing(sweep_d, root, hint=" or give another --name")
    warm = _warm_start(warm_start, root, sp) if warm_start else None
    if mlflow:
        _check_mlflow(mlflow)
    address = cluster_address(address)

    def check(raw: dict, base: Any) -> None:  # the base experiment and each searched model configuration
        checks.space(dataclasses.replace(sp, base_raw=raw, base=base))

    ready = prepare_experiment(sp.base_raw, str(space_path), root, select=sp.metric, check=check, replay=True)
    if sp.scheduler and sp.scheduler.asha and ready.cfg.train.epochs is not None:  # its steps known now
        check_grace(sp.scheduler.asha.grace_period, ready.cfg.train.max_steps, str(space_path))
    sp = dataclasses.replace(sp, base_raw=ready.raw, base=ready.cfg)
    seed = sp.seed if sp.seed is not None else random.SystemRandom().randrange(2**31)
    return StartPlan(space_path, sp, sweep_d, seed, address, warm, mlflow)


def start(plan: StartPlan) -> Sweep:
    """Run a planned sweep to its end (or Ctrl-C); Ray is connected."""
    from uda_ray.search.cluster import check_resources

    sp = plan.space
    check_resources(sp.base.train, sp.driver_cpus, sp.max_concurrent_trials, local=not plan.address)
    with DriverLock(plan.dir, f"sweep '{plan.dir.name}'"):
        _refuse_existing(plan.dir, plan.dir.parent)  # another driver created it while we were validating
        return _start(plan)


def _refuse_existing(sweep_d: Path, root: Path, hint: str = "") -> None:
    if layout.is_sweep(sweep_d):
        raise UserError(f"sweep '{sweep_d.name}' already exists under {root}: `uda-ray resume {sweep_d.name}` "
                        f"continues it{',' if hint else ''}{hint}")


def _check_mlflow(uri: str) -> None:
    from uda_ray.results.mlflow_log import check_available

    check_available()
    if uri.startswith("file:") or "://" not in uri:  # MLflow 3 keeps its file store behind a switch
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _warm_start(earlier: str | os.PathLike, root: Path, sp: Any) -> dict:
    """The earlier sweep's trials that fit the space `sp`, and those skipped with the reason."""
    from uda_ray.search.study import warm_start_points

    d = Path(earlier) if layout.is_sweep(Path(earlier)) else layout.sweep_dir(root, str(earlier))
    if not layout.is_sweep(d):
        raise UserError(f"--warm-start {earlier}: no sweep of that name under {root}")
    points, skipped = warm_start_points(d, sp)
    progress.info(f"warm start from sweep '{d.name}': {len(points)} of its trials seed the sampler"
                  + (f", {len(skipped)} skipped:" if skipped else ""))
    for tid, why in skipped:
        progress.info(f"  skipped {tid}: {why}")
    return {"dir": d, "points": points, "skipped": skipped}


def _start(plan: StartPlan) -> Sweep:
    from uda_ray.search.space import load_space
    from uda_ray.search.study import seed_study
    from uda_ray.search.tune import build_tuner

    sp, sweep_d, warm = plan.space, plan.dir, plan.warm
    meta = _write_sweep_folder(plan)
    if warm is not None:  # the persisted study, created with the earlier trials before the searcher loads it
        seed_study(sweep_d, sp, warm["points"])
        meta["warm_start"] = {"from": str(warm["dir"]),
                              "trials": [p["user_attrs"]["warm_start_trial_id"] for p in warm["points"]],
                              "skipped": [{"trial_id": t, "reason": r} for t, r in warm["skipped"]]}
        layout.write_meta(sweep_d, meta)
    progress.info(f"sweep '{sweep_d.name}': {sp.num_samples} trials over {', '.join(sp.params) or 'nothing'} "
                  f"(base {sp.base.method}/{sp.base.model.name}), objective {sp.metric} ({sp.mode}), "
                  f"TPE seed {plan.seed}")
    remote = store.located(sweep_d)
    progress.info(f"storage: {sweep_d}" if remote is None else
                  f"storage: {store.redact(remote.uri)}/{sweep_d.name} (staged in {sweep_d})")
    if plan.mlflow:
        meta["mlflow"] = plan.mlflow
        layout.write_meta(sweep_d, meta)
    tuner = build_tuner(load_space(sweep_d / "space.yaml"), sweep_d, plan.seed, mlflow=plan.mlflow)
    return _fit(tuner, sweep_d, meta)


def _write_sweep_folder(plan: StartPlan) -> dict:
    """The sweep folder is self-contained: resume never depends on the files it was started from."""
    from uda_ray.config_loader import dump_yaml, read_yaml

    sp, sweep_d = plan.space, plan.dir
    sweep_d.mkdir(parents=True, exist_ok=True)
    (sweep_d / "base.yaml").write_text(dump_yaml(sp.base_raw))
    raw_space = read_yaml(plan.space_path)
    raw_space.update(base="base.yaml", seed=plan.seed)
    raw_space.pop("set", None)
    (sweep_d / "space.yaml").write_text(dump_yaml(raw_space))
    store.push(sweep_d / "base.yaml")  # under a storage URI: into the store (sweep.json is pushed by write_meta)
    store.push(sweep_d / "space.yaml")
    meta = {"name": sweep_d.name, "space_file": str(plan.space_path.absolute()), "seed": plan.seed,
            "objective": [dataclasses.asdict(o) for o in sp.objectives], "num_samples": sp.num_samples,
            "constraints": [dataclasses.asdict(c) for c in sp.constraints],
            "address": plan.address, "created": time.time(), "status": "running",
            "pid": os.getpid(), "host": socket.gethostname()}
    if sp.baseline is not None:  # the first trial runs the base's own values (uda_ray.search.searcher)
        from uda_ray.search.tune import baseline_trial_id

        meta["baseline"] = {"trial_id": baseline_trial_id(sweep_d, plan.seed), "params": sp.baseline}
    layout.write_meta(sweep_d, meta)
    return meta


def _fit(tuner: Any, sweep_d: Path, meta: dict) -> Sweep:
    """Run the Tuner to its end (or Ctrl-C) and record the sweep's status."""
    from uda_ray.results.tables import read_table
    from uda_ray.search.tune import TUNE_DIR, run, sweep_status_after

    try:
        meta["status"] = sweep_status_after(run(tuner))
    except KeyboardInterrupt:
        meta["status"] = INTERRUPTED
    # Tune turns Ctrl-C into a graceful stop and returns normally: count what really finished
    ended = sum(t["status"] in ENDED for t in read_table(layout.results_dir(sweep_d), "trials"))
    if ended < meta["num_samples"]:
        meta["status"] = INTERRUPTED
    meta.update(pid=None, finished=time.time())
    store.push(sweep_d / TUNE_DIR)  # Tune's final state and its trial folders, under a storage URI
    layout.write_meta(sweep_d, meta)
    return Sweep(sweep_d.name, sweep_d, meta)


# ------------------------------------------------------------------------------------------------
# resuming a sweep


@dataclasses.dataclass
class ResumePlan:
    dir: Path
    meta: dict
    space: Any  # the SearchSpace of the sweep folder
    address: str | None


def plan_resume(name: str, *, storage: str | os.PathLike | None, address: str | None) -> ResumePlan:
    """Everything `resume` needs, checked: UserError before anything is written."""
    from uda_ray.search.space import load_space
    from uda_ray.search.tune import has_tune_state

    sweep_d = layout.find_sweep(layout.root(storage), name)
    meta = layout.read_meta(sweep_d)
    refuse_running(sweep_d, f"sweep '{meta['name']}'")
    if meta.get("status") not in ("running", INTERRUPTED) and not has_tune_state(sweep_d):
        raise UserError(f"sweep '{meta['name']}' has no Tune state to restore under {sweep_d / 'tune'}")
    space = load_space(sweep_d / "space.yaml")
    return ResumePlan(sweep_d, meta, space, cluster_address(address, meta))


def resume(plan: ResumePlan) -> Sweep:
    """Continue a planned resume to the sweep's end (or Ctrl-C); Ray is connected. A sweep whose driver died
    before Ray Tune saved any state is started again from its folder, with its seed."""
    from uda_ray.search.tune import build_tuner, has_tune_state

    sweep_d, meta = plan.dir, plan.meta
    with DriverLock(sweep_d, f"sweep '{meta['name']}'"):
        restore = has_tune_state(sweep_d)
        meta.update(status="running", pid=os.getpid(), host=socket.gethostname(), resumed=time.time())
        layout.write_meta(sweep_d, meta)
        progress.info(f"resuming sweep '{meta['name']}' from {sweep_d}" if restore else
                      f"resuming sweep '{meta['name']}' from {sweep_d}: it had not started, starting it")
        tuner = build_tuner(plan.space, sweep_d, meta["seed"], restore=restore,
                            mlflow=None if restore else meta.get("mlflow"))
        return _fit(tuner, sweep_d, meta)
