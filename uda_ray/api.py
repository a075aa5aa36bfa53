"""The Python API: everything the `uda-ray` command line does, callable from a notebook or a Ray Job script.

    from uda_ray import api
    s = api.sweep("search_spaces/my_space.yaml", storage="/shared/uda", name="adv-lr")
    print(s.status, s.best(top=3))                   # rows as dicts, best first
    api.best("adv-lr", storage="/shared/uda", metric="uv/snd")
    api.ls("/shared/uda")                            # one dict per sweep
    api.train("experiments/x.yaml", overrides=["train.max_steps=2000"])
    api.pipeline("experiments/pipelines/fda_mbt.yaml")

Every function returns plain objects (dicts, lists of dicts, a `Sweep` dataclass, pyarrow Tables). Errors a
user can cause raise `uda_ray.errors.UserError` (the CLI prints them as one line, exit status 2). Progress
lines (the sweep's live view, stage starts, ...) go to the logger "uda_ray.training.progress" at INFO: the CLI prints
them; in a notebook call `show_progress()` (or configure logging) to see them.

Storage: `storage` is the root folder of sweeps and runs (default $UDA_RAY_STORAGE, else ./uda_ray_runs; a
shared filesystem path on a multi-node cluster). Ray: with `address` (or $RAY_ADDRESS, set inside a Ray Job)
the functions connect to that cluster; without, they start a local one for the call and stop it after. A Ray
connection made by the caller before the call is used as is and left open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from uda_ray.errors import UserError
from uda_ray.storage.lock import DriverLock, running_driver

progress = logging.getLogger("uda_ray.training.progress")
INTERRUPTED, ENDED = "interrupted", ("completed", "stopped_early", "errored")


class _StdoutHandler(logging.Handler):
    """Progress lines to the current sys.stdout (looked up per line, so redirections are followed)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stdout, flush=True)


def show_progress(enabled: bool = True) -> None:
    """Print the progress lines (the sweep's live view, ...) on stdout, or stop printing them."""
    for h in [h for h in progress.handlers if isinstance(h, _StdoutHandler)]:
        progress.removeHandler(h)
    if enabled:
        progress.addHandler(_StdoutHandler())
        progress.setLevel(logging.INFO)
        progress.propagate = False


# ------------------------------------------------------------------------------------------------
# shared steps


def storage_root(storage: str | os.PathLike | None = None) -> Path:
    """The storage root: `storage`, else $UDA_RAY_STORAGE, else ./uda_ray_runs (absolute); a folder, or a path
    where one can be made (UserError otherwise)."""
    from uda_ray.checks import storage_root as check

    return check(Path(storage or os.environ.get("UDA_RAY_STORAGE") or "uda_ray_runs").expanduser().absolute())


def _overrides(overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    """{"optim.lr": 1e-3} or ["optim.lr=1e-3", ...] (the CLI's --set) -> a dict of dotted overrides."""
    from uda_ray.config import parse_set

    if isinstance(overrides, Mapping):
        return dict(overrides)
    return parse_set(list(overrides))


def resolve_data(data: Any, root: Path, select: str | None = None) -> Any:
    """Dataset roots resolved (the synthetic benchmark generated on first use under <root>/data or
    $UDA_RAY_DATA), checked to load and split as configured, and checked to allow computing the selection
    metric `select`: a DataConfig with absolute roots."""
    from uda_ray.data.loading import build_datasets, has_test_split, prepare, synthetic_dir
    from uda_ray.metric_names import DEFAULT_SELECTION, needs_test_labels

    data_dir = Path(os.environ["UDA_RAY_DATA"]) if os.environ.get("UDA_RAY_DATA") else root / "data"
    if data.synthetic is not None and not (data.source_root and data.target_root):
        where = synthetic_dir(data, data_dir)
        if not (where / "MANIFEST.json").is_file():
            progress.info(f"generating the synthetic benchmark in {where} ...")
    data = prepare(data, data_dir)
    build_datasets(data, source=True, target=True, target_labels=bool(data.target_label_root))
    if not has_test_split(data):
        if select and needs_test_labels(select):
            raise UserError(f"{select} needs target test labels, and the target at {data.target_root} has none "
                            f"(select a label-free metric, e.g. {DEFAULT_SELECTION})")
        progress.info(f"the target at {data.target_root} has no labeled test split: test metrics are absent")
    return data


def with_data(raw: dict, data: Any) -> dict:
    """The raw experiment with the resolved dataset roots."""
    raw = dict(raw)
    raw["data"] = {**raw.get("data", {}), "source_root": data.source_root, "target_root": data.target_root,
                   "target_label_root": data.target_label_root}
    return raw


def _address(address: str | None, meta: dict | None = None) -> str | None:
    from uda_ray.search.tune import check_address

    address = address or os.environ.get("RAY_ADDRESS") or (meta or {}).get("address")
    check_address(address)
    return address


@contextlib.contextmanager
def ray_connection(address: str | None) -> Iterator[None]:
    """Ray for the duration of a call: the caller's connection if one is open, else a new one (a local
    cluster without an address) that ends with the call."""
    import ray

    from uda_ray.search.tune import init_ray

    if ray.is_initialized():
        yield
        return
    init_ray(address)
    try:
        yield
    finally:
        ray.shutdown()


def _build(raw: dict, source: str) -> Any:
    from uda_ray.build import build_experiment

    return build_experiment(raw, source)


def refuse_running(directory: Path, what: str) -> None:
    """Fail before any work when a live driver already owns the folder (the lock is taken later, atomically)."""
    if running_driver(directory) is not None:
        DriverLock(directory, what)._judge_existing()  # raises the one-line refusal


def sweep_dir(name: str, storage: str | os.PathLike | None = None) -> Path:
    """The folder of sweep `name` under the storage root; UserError naming the known sweeps if absent."""
    root = storage_root(storage)
    d = root / name
    if not (d / "sweep.json").is_file():
        known = sorted(p.parent.name for p in root.glob("*/sweep.json"))
        raise UserError(f"unknown sweep '{name}' under {root}"
                        + (f" (known: {', '.join(known)})" if known else " (no sweeps there)"))
    return d


# ------------------------------------------------------------------------------------------------
# sweeps


@dataclasses.dataclass
class Sweep:
    """A sweep on disk: its folder, its recorded state (sweep.json), and queries of its results tables."""

    name: str
    dir: Path
    meta: dict

    @classmethod
    def open(cls, name: str, storage: str | os.PathLike | None = None) -> Sweep:
        from uda_ray.search.tune import read_meta

        d = sweep_dir(name, storage)
        return cls(name, d, read_meta(d))

    @property
    def status(self) -> str:
        """running / completed / interrupted / ... (a dead driver's "running" reads "interrupted")."""
        status = self.meta.get("status", "?")
        return INTERRUPTED if status == "running" and not running_driver(self.dir) else status

    @property
    def objective(self) -> dict:
        """{"metric": ..., "mode": ...} of the sweep's (first) objective."""
        return (self.meta.get("objective") or [{"metric": "test/miou", "mode": "max"}])[0]

    def table(self, name: str = "trials") -> Any:
        """A results table ("trials", "evals", "class_iou") as a pyarrow Table."""
        import pyarrow as pa

        from uda_ray.results.tables import read_table

        return pa.Table.from_pylist(read_table(self.dir / "results", name))

    def trials(self) -> list[dict]:
        from uda_ray.results.tables import read_table

        return read_table(self.dir / "results", "trials")

    def best(self, top: int = 5, metric: str | None = None, method: str | None = None) -> list[dict]:
        return best(self.name, storage=self.dir.parent, top=top, metric=metric, method=method)

    def vs_oracle(self) -> str | None:
        """One line comparing the sweep's pick with choosing by the test labels (when it has them)."""
        from uda_ray.results.tables import read_table
        from uda_ray.selection.study import pick_vs_oracle

        obj = self.objective
        if not obj.get("metric"):
            return None
        from uda_ray.metric_names import mode_of

        return pick_vs_oracle(read_table(self.dir / "results", "evals"), obj["metric"],
                              obj.get("mode") or mode_of(obj["metric"]))


def _write_sweep_folder(space_path: Path, space: Any, sweep_d: Path, base_raw: dict, seed: int,
                        address: str | None) -> dict:
    """The sweep folder is self-contained: resume never depends on the files it was started from."""
    from uda_ray.config import dump_yaml, read_yaml
    from uda_ray.search.tune import write_meta

    sweep_d.mkdir(parents=True, exist_ok=True)
    (sweep_d / "base.yaml").write_text(dump_yaml(base_raw))
    raw_space = read_yaml(space_path)
    raw_space.update(base="base.yaml", seed=seed)
    raw_space.pop("set", None)
    (sweep_d / "space.yaml").write_text(dump_yaml(raw_space))
    meta = {"name": sweep_d.name, "space_file": str(space_path.absolute()), "seed": seed,
            "objective": [dataclasses.asdict(o) for o in space.objectives], "num_samples": space.num_samples,
            "constraints": [dataclasses.asdict(c) for c in space.constraints],
            "address": address, "created": time.time(), "status": "running",
            "pid": os.getpid(), "host": socket.gethostname()}
    write_meta(sweep_d, meta)
    return meta


def _fit_sweep(tuner: Any, sweep_d: Path, meta: dict) -> Sweep:
    """Run the Tuner to its end (or Ctrl-C) and record the sweep's status."""
    from uda_ray.results.tables import read_table
    from uda_ray.search.tune import run, sweep_status_after, write_meta

    try:
        meta["status"] = sweep_status_after(run(tuner))
    except KeyboardInterrupt:
        meta["status"] = INTERRUPTED
    # Tune turns Ctrl-C into a graceful stop and returns normally: count what really finished
    ended = sum(t["status"] in ENDED for t in read_table(sweep_d / "results", "trials"))
    if ended < meta["num_samples"]:
        meta["status"] = INTERRUPTED
    meta.update(pid=None, finished=time.time())
    write_meta(sweep_d, meta)
    return Sweep(sweep_d.name, sweep_d, meta)


def sweep(space: str | os.PathLike, *, storage: str | os.PathLike | None = None, address: str | None = None,
          name: str | None = None, overrides: Mapping[str, Any] | Iterable[str] = (),
          warm_start: str | os.PathLike | None = None, mlflow: str | None = None) -> Sweep:
    """Run the search space file `space` to its end: `num_samples` trials, results in
    <storage>/<name>/results (name: default the space file's stem). `overrides` change the base experiment
    ({"train.max_steps": 500} or ["train.max_steps=500"]). `warm_start`: an earlier sweep (name or folder)
    whose finished trials that fit this space seed the sampler (recorded in sweep.json). `mlflow`: a tracking
    URI; each trial is also logged as an MLflow run (needs mlflow-skinny). Returns the Sweep;
    its status is "interrupted" after Ctrl-C (`resume` continues it)."""
    from uda_ray import checks
    from uda_ray.pipelines.actions import resolve_refs
    from uda_ray.search.space import load_space
    from uda_ray.search.tune import check_resources

    space_path = Path(space)
    sp = load_space(space_path, _overrides(overrides))
    if "train.max_steps" in sp.params:
        raise UserError("train.max_steps cannot be searched: ASHA needs one budget per sweep")
    root = storage_root(storage)
    name = checks.run_name(name or space_path.stem)
    sweep_d = root / name
    refuse_running(sweep_d, f"sweep '{name}'")
    if (sweep_d / "sweep.json").exists():
        raise UserError(f"sweep '{name}' already exists under {root}: `uda-ray resume {name}` continues it, "
                        "or give another --name")
    warm = _warm_start(warm_start, root, sp) if warm_start else None  # checked before anything is written
    if mlflow:
        from uda_ray.results.mlflow_log import check_available

        check_available()
        if mlflow.startswith("file:") or "://" not in mlflow:  # MLflow 3 keeps its file store behind a switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    address = _address(address)
    data = resolve_data(sp.base.data, root, sp.metric)
    base_raw = resolve_refs(with_data(sp.base_raw, data), root)
    checks.space(dataclasses.replace(sp, base_raw=base_raw, base=_build(base_raw, str(space_path))))
    seed = sp.seed if sp.seed is not None else random.SystemRandom().randrange(2**31)
    with ray_connection(address):
        check_resources(sp.base.train, sp.driver_cpus, sp.max_concurrent_trials, local=not address)
        with DriverLock(sweep_d, f"sweep '{name}'"):
            if (sweep_d / "sweep.json").exists():  # another driver created it while we were validating
                raise UserError(f"sweep '{name}' already exists under {root}: `uda-ray resume {name}` continues it")
            return _start_sweep(space_path, sp, sweep_d, base_raw, seed, address, warm, mlflow)


def _warm_start(earlier: str | os.PathLike, root: Path, sp: Any) -> dict:
    """The earlier sweep's trials that fit the space `sp`, and those skipped with the reason."""
    from uda_ray.search.tune import warm_start_points

    d = Path(earlier) if (Path(earlier) / "sweep.json").is_file() else root / str(earlier)
    if not (d / "sweep.json").is_file():
        raise UserError(f"--warm-start {earlier}: no sweep of that name under {root}")
    points, skipped = warm_start_points(d, sp)
    progress.info(f"warm start from sweep '{d.name}': {len(points)} of its trials seed the sampler"
                  + (f", {len(skipped)} skipped:" if skipped else ""))
    for tid, why in skipped:
        progress.info(f"  skipped {tid}: {why}")
    return {"dir": d, "points": points, "skipped": skipped}


def _start_sweep(space_path: Path, sp: Any, sweep_d: Path, base_raw: dict, seed: int, address: str | None,
                 warm: dict | None = None, mlflow: str | None = None) -> Sweep:
    from uda_ray.search.space import load_space
    from uda_ray.search.tune import build_tuner, seed_study, write_meta

    meta = _write_sweep_folder(space_path, sp, sweep_d, base_raw, seed, address)
    if warm is not None:  # the persisted study, created with the earlier trials before the searcher loads it
        seed_study(sweep_d, sp, warm["points"])
        meta["warm_start"] = {"from": str(warm["dir"]),
                              "trials": [p["user_attrs"]["warm_start_trial_id"] for p in warm["points"]],
                              "skipped": [{"trial_id": t, "reason": r} for t, r in warm["skipped"]]}
        write_meta(sweep_d, meta)
    progress.info(f"sweep '{sweep_d.name}': {sp.num_samples} trials over {', '.join(sp.params) or 'nothing'} "
                  f"(base {sp.base.method}/{sp.base.model.name}), objective {sp.metric} ({sp.mode}), "
                  f"TPE seed {seed}")
    progress.info(f"storage: {sweep_d}")
    if mlflow:
        meta["mlflow"] = mlflow
        write_meta(sweep_d, meta)
    return _fit_sweep(build_tuner(load_space(sweep_d / "space.yaml"), sweep_d, seed, mlflow=mlflow), sweep_d, meta)


def resume(name: str, *, storage: str | os.PathLike | None = None, address: str | None = None) -> Sweep:
    """Continue an interrupted sweep from its folder (finished trials are not rerun). Returns the Sweep.
    A sweep whose driver died before Ray Tune saved any state (while it started) is started again from its
    folder, with its seed: the same trials as an uninterrupted start."""
    from uda_ray.search.space import load_space
    from uda_ray.search.tune import build_tuner, has_tune_state, read_meta, write_meta

    sweep_d = sweep_dir(name, storage)
    meta = read_meta(sweep_d)
    refuse_running(sweep_d, f"sweep '{meta['name']}'")
    if meta.get("status") not in ("running", INTERRUPTED) and not has_tune_state(sweep_d):
        raise UserError(f"sweep '{meta['name']}' has no Tune state to restore under {sweep_d / 'tune'}")
    with DriverLock(sweep_d, f"sweep '{meta['name']}'"):
        space = load_space(sweep_d / "space.yaml")
        address = _address(address, meta)
        restore = has_tune_state(sweep_d)
        meta.update(status="running", pid=os.getpid(), host=socket.gethostname(), resumed=time.time())
        write_meta(sweep_d, meta)
        progress.info(f"resuming sweep '{meta['name']}' from {sweep_d}" if restore else
                      f"resuming sweep '{meta['name']}' from {sweep_d}: it had not started, starting it")
        with ray_connection(address):
            return _fit_sweep(build_tuner(space, sweep_d, meta["seed"], restore=restore,
                                         mlflow=None if restore else meta.get("mlflow")), sweep_d, meta)


def best(name: str, *, storage: str | os.PathLike | None = None, top: int = 5, metric: str | None = None,
         method: str | None = None) -> list[dict]:
    """The `top` trials of sweep `name`, best first, ranked by `metric` (default: the sweep's objective);
    one dict per trial (rank_metric, rank_value, rank_step, rank_checkpoint, params, config_json, ...).
    Ranked by every evaluation; `rank_checkpoint_kept` says whether the best step's checkpoint is still on
    disk, and `kept_step` / `kept_checkpoint` name the best step whose checkpoint is (results.best_trials)."""
    from uda_ray.metric_names import REPORTED_PREFIXES, check_metric
    from uda_ray.results.tables import best_trials, read_table

    d = sweep_dir(name, storage)
    if top < 1:
        raise UserError("top must be >= 1")
    if metric:
        metric = check_metric(metric, "metric")
        evals = read_table(d / "results", "evals")
        if evals and not any(e.get(metric) is not None for e in evals):
            known = sorted({k for e in evals for k in e if k.startswith(REPORTED_PREFIXES) and e[k] is not None
                            and not k.startswith("test/iou/")})
            raise UserError(f"no evaluation of this sweep reports '{metric}' (reported: {', '.join(known)})")
    return best_trials(d / "results", metric=metric, top=top, method=method)


def pareto(name: str, *, storage: str | os.PathLike | None = None, method: str | None = None) -> list[dict]:
    """The completed trials of a multi-objective sweep at their last evaluation, one dict each: values (per
    objective), on_front, feasible, violated (constraints), step, checkpoint, params, config_json, ..."""
    from uda_ray.results.tables import pareto_front

    s = Sweep.open(name, storage)
    objectives, constraints = s.meta["objective"], s.meta.get("constraints") or []
    rows = pareto_front(s.dir / "results", objectives, constraints)
    return [r for r in rows if not method or r["method"] == method]


def leaderboard(name: str, *, storage: str | os.PathLike | None = None, top: int = 5, metric: str | None = None,
                method: str | None = None) -> dict:
    """What `uda-ray best` shows: of a multi-objective sweep ranked by no `metric`, its Pareto front (kind
    "pareto": `pareto` rows, objectives, constraints); else its `top` trials (kind "best": `best` rows)."""
    s = Sweep.open(name, storage)
    if _multi_objective(s.meta, metric):
        return {"kind": "pareto", "rows": pareto(name, storage=storage, method=method), "method": method,
                "objectives": s.meta["objective"], "constraints": s.meta.get("constraints") or []}
    return {"kind": "best", "rows": best(name, storage=storage, top=top, metric=metric, method=method),
            "method": method}


def _multi_objective(meta: dict, metric: str | None) -> bool:
    """A sweep of several objectives, not ranked by one named metric, is judged by its Pareto front."""
    return len(meta.get("objective") or []) > 1 and not metric


def export_best(name: str, out: str | os.PathLike, *, storage: str | os.PathLike | None = None,
                metric: str | None = None, method: str | None = None, index: int = 1) -> dict:
    """Write a trial of sweep `name` as a runnable experiment YAML at `out` (atomically): the `index`-th best
    (1 = the best; of a multi-objective sweep without `metric`: the `index`-th trial on the Pareto front).
    Returns its row."""
    from uda_ray.checks import output_file
    from uda_ray.config import dump_yaml

    if index < 1:
        raise UserError("index must be >= 1")
    output_file(out, "--export")
    s = Sweep.open(name, storage)
    multi = _multi_objective(s.meta, metric)
    if multi:
        rows = [r for r in pareto(name, storage=storage, method=method) if r["on_front"]]
        for r in rows:  # the fields an export names
            r.update(rank_metric=s.meta["objective"][0]["metric"], rank_value=r["values"][0], rank_step=r["step"],
                     rank_checkpoint=r["checkpoint"])
    else:
        rows = best(name, storage=storage, top=index, metric=metric, method=method)
    if not rows:
        raise UserError("nothing to export: no evaluated trial")
    if index > len(rows):
        raise UserError(f"index {index}: there are only {len(rows)}")
    pick = rows[index - 1]
    cfg = json.loads(pick["config_json"])
    cfg["name"] = f"{name}-{'pareto' if multi else 'best'}{index if index > 1 else ''}"
    if multi:
        vals = ", ".join(f"{o['metric']}={v:.4g}" for o, v in zip(s.meta["objective"], pick["values"]))
        what = f"Pareto-front trial {index} ({vals})"
    else:
        what = "best trial" if index == 1 else f"trial number {index}"
    if pick.get("rank_checkpoint_kept", True):
        ck = f"# its checkpoint: {pick['rank_checkpoint']}\n"
    else:
        from uda_ray.results.text import not_kept_note

        ck = f"# {not_kept_note(pick)}\n"
    head = (f"# {what} {pick['trial_id']} of sweep {name}: {pick['rank_metric']}={pick['rank_value']:.4f} "
            f"at step {pick['rank_step']}\n{ck}")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(head + dump_yaml(cfg))
    os.replace(tmp, out)
    return pick


def ls(storage: str | os.PathLike | None = None) -> list[dict]:
    """One dict per sweep under the storage root: name, status, trials, completed, stopped_early, errored,
    best (the best objective value so far, or None), mode, progress (running trial -> its heartbeat: step,
    max_steps, steps_per_s, eta_s, phase, updated_at; only while the sweep runs)."""
    from uda_ray.training.progress import read_progress

    out = []
    for p in sorted(storage_root(storage).glob("*/sweep.json")):
        s = Sweep.open(p.parent.name, p.parent.parent)
        trials = s.trials()
        count = {st: sum(t["status"] == st for t in trials) for st in ENDED}
        scored = [t["best_value"] for t in trials if t.get("best_value") is not None]
        mode = s.objective["mode"]
        beats = {}
        if s.status == "running":
            for t in trials:
                p = read_progress(s.dir / "train" / f"train-{t['trial_id']}") if t["status"] == "running" else None
                if p:
                    beats[t["trial_id"]] = p
        out.append({"name": s.meta.get("name", s.name), "status": s.status, "trials": len(trials), **count,
                    "best": (max if mode == "max" else min)(scored) if scored else None, "mode": mode,
                    "progress": beats})
    return out


# ------------------------------------------------------------------------------------------------
# single runs and pipelines


def train(experiment: str | os.PathLike, *, storage: str | os.PathLike | None = None,
          overrides: Mapping[str, Any] | Iterable[str] = (), name: str | None = None,
          address: str | None = None) -> dict:
    """Run one experiment (one Ray task, or a Ray Train run with several workers) under <storage>/runs/<name>
    (default: the experiment's name; an existing run resumes). Returns the last reported metrics plus
    checkpoint_path and run_dir."""
    from uda_ray import checks
    from uda_ray.build import build_experiment, load_experiment
    from uda_ray.config import experiment_dict
    from uda_ray.pipelines.actions import resolve_refs
    from uda_ray.search.tune import check_resources
    from uda_ray.target_labels import MARK, trains_on_target_gt
    from uda_ray.training.loop import fit_run

    cfg = load_experiment(experiment, _overrides(overrides))
    root = storage_root(storage)
    cfg = build_experiment(resolve_refs(experiment_dict(cfg), root), str(experiment))
    address = _address(address)
    data = resolve_data(cfg.data, root, cfg.select)
    cfg = build_experiment(with_data(experiment_dict(cfg), data), str(experiment))
    name = checks.run_name(name or cfg.name)
    checks.experiment(cfg, str(experiment))
    run_dir = root / "runs" / name
    progress.info(f"training {cfg.method}/{cfg.model.name} for {cfg.train.max_steps} steps on "
                  f"{cfg.train.num_workers} worker(s); run folder {run_dir}"
                  + (f" [{MARK}]" if trains_on_target_gt(experiment_dict(cfg)) else ""))
    refuse_running(run_dir, f"run '{name}'")
    with ray_connection(address):
        check_resources(cfg.train, 0.0, 1, local=not address)
        with DriverLock(run_dir, f"run '{name}'"):
            return {**fit_run(cfg, root / "runs", name), "run_dir": str(run_dir), "select_metric": cfg.select,
                    "target_ground_truth": trains_on_target_gt(experiment_dict(cfg))}


def pipeline(path: str | os.PathLike, *, storage: str | os.PathLike | None = None, report: str | None = None,
             address: str | None = None) -> list[dict]:
    """Run the stages of a pipeline file in order (completed stages are skipped); one summary dict per
    stage (with the pipeline's selection metric as select_metric). With `report`, also write a markdown table
    of the stages' results there."""
    from uda_ray.build import build_experiment
    from uda_ray.checks import output_file
    from uda_ray.config import experiment_dict
    from uda_ray.pipelines.actions import resolve_refs
    from uda_ray.pipelines.runner import load_pipeline, run_pipeline
    from uda_ray.results.tables import markdown_report
    from uda_ray.training.loop import fit_run

    pipe = load_pipeline(path)
    root = storage_root(storage)
    if report:
        output_file(report, "--report")
    address = _address(address)

    def prepare(cfg: Any) -> Any:
        data = resolve_data(cfg.data, root, cfg.select)
        return build_experiment(resolve_refs(with_data(experiment_dict(cfg), data), root), cfg.name)

    pdir = root / "pipelines" / pipe.cfg.name
    progress.info(f"pipeline '{pipe.cfg.name}': {len(pipe.cfg.stages)} stages under {pdir}")
    refuse_running(pdir, f"pipeline '{pipe.cfg.name}'")
    with ray_connection(address), DriverLock(pdir, f"pipeline '{pipe.cfg.name}'"):
        summary = run_pipeline(pipe, root, fit_run, prepare, log=progress.info)
    if report:
        runs = [(st.name, pdir / st.name) for st in pipe.cfg.stages if (pdir / st.name / "results").is_dir()]
        note = (f"Produced by `uda-ray pipeline {path} --report {report}` from the runs' Parquet tables ({pdir}). "
                "mIoU on the target test split (Cityscapes val layout) at the label's full resolution: of the "
                f"checkpoint each run's selection metric ({pipe.cfg.select}) picks, and of the best checkpoint by "
                "the test labels themselves (the oracle, an upper bound on selection).")
        Path(report).write_text(markdown_report(f"Pipeline {pipe.cfg.name}", runs, note, selection=pipe.cfg.select))
    return [{**row, "select_metric": pipe.cfg.select} for row in summary]


# ------------------------------------------------------------------------------------------------
# reports, validators, reruns


def report(name: str, *, storage: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
           predictions: bool = True) -> Path:
    """One self-contained HTML page about a sweep, a run or a pipeline; returns its path."""
    from uda_ray.results.report import resolve, write_report

    kind, folder = resolve(storage_root(storage), name)
    out = Path(out) if out else folder / "report.html"
    write_report(kind, folder, out, predictions=predictions)
    return out


def validators(name: str, *, storage: str | os.PathLike | None = None) -> tuple[list[dict], Path]:
    """Measure every validator of a sweep, pipeline or run against test mIoU (uda_ray.selection.study); writes
    results/validators.parquet beside the other tables and returns (rows, path)."""
    from uda_ray.selection import study

    _, results_dir, sources = study.locate(name, storage_root(storage))
    rows = study.validators_table(study.read_evals(sources))
    return rows, study.write_table(results_dir, rows)


def rerun(name: str, *, top: int = 3, seeds: int = 3, metric: str | None = None,
          storage: str | os.PathLike | None = None, address: str | None = None) -> list[dict]:
    """Retrain the top `top` configurations of sweep `name` with `seeds` new seeds each
    (uda_ray.selection.seed_variance); returns the per-configuration summary (also in results/rerun_summary.parquet)."""
    from uda_ray.build import build_experiment
    from uda_ray.search.tune import check_resources, read_meta
    from uda_ray.selection import seed_variance as rr
    from uda_ray.training.loop import fit_run

    root = storage_root(storage)
    sweep_d = sweep_dir(name, storage)
    meta = read_meta(sweep_d)
    objective = (meta.get("objective") or [{"metric": "test/miou", "mode": "max"}])[0]
    if metric is None:
        from uda_ray.metric_names import mode_of

        metric = objective["metric"]
        mode = objective.get("mode") or mode_of(metric)
    else:
        from uda_ray.metric_names import check_metric, mode_of

        metric = check_metric(metric, "--metric")
        mode = mode_of(metric)
    specs = rr.plan(sweep_d, top, seeds, metric, mode)
    address = _address(address, meta)
    first = build_experiment(specs[0].experiment, f"sweep {name}")
    data = resolve_data(first.data, root)  # one line if the sweep's datasets are gone
    todo = [s for s in specs if not rr.finished(sweep_d / rr.RERUN_DIR / s.name, s.experiment["train"]["max_steps"])]
    progress.info(f"rerun of sweep '{name}': top {len({s.trial_id for s in specs})} configuration(s) by {metric} "
                  f"({mode}) x {seeds} seed(s) = {len(specs)} runs ({len(specs) - len(todo)} already complete) "
                  f"under {sweep_d / rr.RERUN_DIR}")

    def train_one(spec: rr.RerunSpec, where: Path) -> None:
        cfg = build_experiment(with_data(spec.experiment, data), f"rerun {spec.name}")
        fit_run(cfg, where, spec.name)

    with ray_connection(address) if todo else contextlib.nullcontext():
        if todo:
            check_resources(first.train, 0.0, 1, local=not address)
        summary = rr.rerun(sweep_d, specs, train_one, metric, mode, log=progress.info)
    return [s for s in summary if s["trial_id"] in {sp.trial_id for sp in specs}]


def convert_weights(src: str | os.PathLike, dst: str | os.PathLike, *, num_classes: int | None = None) -> dict:
    """Convert an AdaptSegNet / ADVENT DeepLab-v2 checkpoint to this project's keys (uda_ray.models.convert),
    for `model.kwargs.style: caffe` and `model.pretrained: DST`. `num_classes`: keep only classifiers with that
    many outputs (the init files' other heads are dropped). Returns the summary (layout, classifiers kept and
    dropped, tensor count, the written path)."""
    from uda_ray.models.convert import convert_file

    if num_classes is not None and num_classes < 2:
        raise UserError("num_classes must be >= 2")
    return convert_file(src, dst, num_classes)


# ------------------------------------------------------------------------------------------------
# data and models


def synthetic_data(out: str | os.PathLike, *, n_source: int = 200, n_target: int = 200, n_val: int = 50,
                   size_hw: tuple[int, int] = (128, 256), seed: int = 0, synthia: bool = False) -> Path:
    """Write the synthetic domain-shift benchmark (GTA5 and Cityscapes layouts, optionally SYNTHIA's) under
    `out`; returns its folder."""
    from uda_ray.data.synthetic import generate

    for k, v in (("n_source", n_source), ("n_target", n_target), ("n_val", n_val)):
        if v < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1")
    h, w = _check_size(size_hw)
    return generate(Path(out), n_source=n_source, n_target=n_target, n_val=n_val, size=(w, h), seed=seed,
                    synthia=synthia)


def profile_model(model: str, *, size_hw: tuple[int, int] = (512, 1024), device: str = "cpu",
                  amp: bool = False) -> dict:
    """Parameters, GFLOPs and latency of a registered model at input size (H, W)."""
    from uda_ray.models.profile import profile

    _check_size(size_hw)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here")
    return profile(model, size=size_hw, device=device, amp=amp)


def _check_size(size_hw: tuple[int, int]) -> tuple[int, int]:
    h, w = size_hw
    if h < 8 or w < 8:
        raise UserError(f"--size {h}x{w}: both sides must be >= 8")
    return h, w
