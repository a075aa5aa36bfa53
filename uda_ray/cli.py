"""`uda-ray` command line. Thin: parse, call the modules, print. User errors: one line, exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

from uda_ray.driver_lock import DriverLock, running_driver
from uda_ray.errors import UserError

EXIT_USER = 2


def storage_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get("UDA_RAY_STORAGE") or "uda_ray_runs").expanduser().absolute()


def _hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text}: expected HxW, e.g. 512x1024") from None
    if h < 8 or w < 8:
        raise UserError(f"--size {text}: both sides must be >= 8")
    return h, w


def _resolve_data(space_or_cfg_data: Any, root: Path, select: str | None = None) -> Any:
    """Resolve dataset roots (generating the synthetic benchmark on first use), check they load and split
    as configured, and that the selection metric `select` can be computed on them."""
    from uda_ray.data.loading import build_datasets, has_test_split, prepare, synthetic_dir
    from uda_ray.metric_names import DEFAULT_SELECTION, needs_test_labels

    data_dir = Path(os.environ["UDA_RAY_DATA"]) if os.environ.get("UDA_RAY_DATA") else root / "data"
    d = space_or_cfg_data
    if d.synthetic is not None and not (d.source_root and d.target_root):
        where = synthetic_dir(d, data_dir)
        if not (where / "MANIFEST.json").is_file():
            print(f"generating the synthetic benchmark in {where} ...", flush=True)
    data = prepare(space_or_cfg_data, data_dir)
    build_datasets(data, source=True, target=True, target_labels=bool(data.target_label_root))
    if not has_test_split(data):
        if select and needs_test_labels(select):
            raise UserError(f"{select} needs target test labels, and the target at {data.target_root} has none "
                            f"(select a label-free metric, e.g. {DEFAULT_SELECTION})")
        print(f"the target at {data.target_root} has no labeled test split: test metrics are absent", flush=True)
    return data


def _with_data(raw: dict, data: Any) -> dict:
    raw = dict(raw)
    raw["data"] = {**raw.get("data", {}), "source_root": data.source_root, "target_root": data.target_root,
                   "target_label_root": data.target_label_root}
    return raw


# ------------------------------------------------------------------------------------------------
# sweep / resume


def cmd_sweep(args: argparse.Namespace) -> int:
    from uda_ray.config import parse_set
    from uda_ray.search import check_address, check_resources, init_ray
    from uda_ray.space import load_space
    from uda_ray.stages import resolve_refs

    space = load_space(args.space, parse_set(args.set))
    root = storage_root(args.storage)
    name = args.name or Path(args.space).stem
    sweep_dir = root / name
    _refuse_running(sweep_dir, f"sweep '{name}'")
    if (sweep_dir / "sweep.json").exists():
        raise UserError(f"sweep '{name}' already exists under {root}: `uda-ray resume {name}` continues it, "
                        "or give another --name")
    address = args.address or os.environ.get("RAY_ADDRESS")
    check_address(address)
    data = _resolve_data(space.base.data, root, space.metric)
    base_raw = resolve_refs(_with_data(space.base_raw, data), root)
    seed = space.seed if space.seed is not None else random.SystemRandom().randrange(2**31)
    init_ray(address)
    check_resources(space.base.train, space.driver_cpus, space.max_concurrent_trials, local=not address)

    # the sweep folder is self-contained: resume never depends on the files it was started from
    with DriverLock(sweep_dir, f"sweep '{name}'"):
        if (sweep_dir / "sweep.json").exists():  # another driver created it while we were validating
            raise UserError(f"sweep '{name}' already exists under {root}: `uda-ray resume {name}` continues it")
        return _start_sweep(args, space, sweep_dir, base_raw, seed, address)


def _start_sweep(args: argparse.Namespace, space: Any, sweep_dir: Path, base_raw: dict, seed: int,
                 address: str | None) -> int:
    from uda_ray.config import dump_yaml, read_yaml
    from uda_ray.search import build_tuner, write_meta
    from uda_ray.space import load_space

    name = sweep_dir.name
    (sweep_dir / "base.yaml").write_text(dump_yaml(base_raw))
    raw_space = read_yaml(args.space)
    raw_space.update(base="base.yaml", seed=seed)
    raw_space.pop("set", None)
    (sweep_dir / "space.yaml").write_text(dump_yaml(raw_space))
    meta = {"name": name, "space_file": str(Path(args.space).absolute()), "seed": seed,
            "objective": [dataclasses.asdict(o) for o in space.objectives], "num_samples": space.num_samples,
            "constraints": [dataclasses.asdict(c) for c in space.constraints],
            "address": address, "created": time.time(), "status": "running",
            "pid": os.getpid(), "host": socket.gethostname()}
    write_meta(sweep_dir, meta)
    print(f"sweep '{name}': {space.num_samples} trials over {', '.join(space.params) or 'nothing'} "
          f"(base {space.base.method}/{space.base.model.name}), objective {space.metric} ({space.mode}), "
          f"TPE seed {seed}", flush=True)
    print(f"storage: {sweep_dir}", flush=True)

    space = load_space(sweep_dir / "space.yaml")
    return _fit(build_tuner(space, sweep_dir, seed), sweep_dir, meta, args)


def _fit(tuner: Any, sweep_dir: Path, meta: dict, args: argparse.Namespace) -> int:
    from uda_ray.results import read_table
    from uda_ray.search import run, sweep_status_after, write_meta

    try:
        grid = run(tuner)
        meta["status"] = sweep_status_after(grid)
    except KeyboardInterrupt:
        meta["status"] = "interrupted"
    # Tune turns Ctrl-C into a graceful stop and returns normally: count what really finished
    trials = read_table(sweep_dir / "results", "trials")
    ended = sum(t["status"] in ("completed", "stopped_early", "errored") for t in trials)
    if ended < meta["num_samples"]:
        meta["status"] = "interrupted"
    meta["pid"] = None
    meta["finished"] = time.time()
    write_meta(sweep_dir, meta)
    if meta["status"] == "interrupted":
        print(f"interrupted: `uda-ray resume {sweep_dir.name}` continues it", file=sys.stderr)
        return 130
    started = meta.get("resumed") or meta["created"]
    print(f"sweep '{sweep_dir.name}' {meta['status'].replace('_', ' ')} in {meta['finished'] - started:.0f}s"
          + (" (since the resume)" if meta.get("resumed") else ""), flush=True)
    _print_best(sweep_dir, top=args.top if hasattr(args, "top") else 5)
    _print_vs_oracle(sweep_dir, meta)
    return 0


def _print_vs_oracle(sweep_dir: Path, meta: dict) -> None:
    """How the sweep's pick compares with choosing by the test labels (when it has them)."""
    from uda_ray.results import read_table
    from uda_ray.trust import pick_vs_oracle

    objective = (meta.get("objective") or [{}])[0]
    if objective.get("metric"):
        line = pick_vs_oracle(read_table(sweep_dir / "results", "evals"), objective["metric"], objective["mode"])
        if line:
            print(line)


def cmd_resume(args: argparse.Namespace) -> int:
    from uda_ray.search import read_meta

    sweep_dir = _sweep_dir(args)
    meta = read_meta(sweep_dir)
    with DriverLock(sweep_dir, f"sweep '{meta['name']}'"):
        return _resume(args, sweep_dir, meta)


def _resume(args: argparse.Namespace, sweep_dir: Path, meta: dict) -> int:
    from ray import tune

    from uda_ray.search import build_tuner, check_address, init_ray, write_meta
    from uda_ray.space import load_space

    if not tune.Tuner.can_restore(str(sweep_dir / "tune")):
        raise UserError(f"sweep '{meta['name']}' has no Tune state to restore under {sweep_dir / 'tune'}")
    space = load_space(sweep_dir / "space.yaml")
    address = args.address or os.environ.get("RAY_ADDRESS") or meta.get("address")
    check_address(address)
    meta.update(status="running", pid=os.getpid(), host=socket.gethostname(), resumed=time.time())
    write_meta(sweep_dir, meta)
    print(f"resuming sweep '{meta['name']}' from {sweep_dir}", flush=True)
    init_ray(address)
    return _fit(build_tuner(space, sweep_dir, meta["seed"], restore=True), sweep_dir, meta, args)


def _refuse_running(directory: Path, what: str) -> None:
    """Fail before any work when a live driver already owns the folder (the lock is taken later, atomically)."""
    info = running_driver(directory)
    if info is not None:
        DriverLock(directory, what)._judge_existing()  # raises the one-line refusal


def _sweep_dir(args: argparse.Namespace) -> Path:
    root = storage_root(args.storage)
    d = root / args.sweep
    if not (d / "sweep.json").is_file():
        known = sorted(p.parent.name for p in root.glob("*/sweep.json"))
        raise UserError(f"unknown sweep '{args.sweep}' under {root}"
                        + (f" (known: {', '.join(known)})" if known else " (no sweeps there)"))
    return d


# ------------------------------------------------------------------------------------------------
# best / ls


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _print_best(sweep_dir: Path, top: int = 5, metric: str | None = None, method: str | None = None) -> list:
    from uda_ray.metric_names import REPORTED_PREFIXES, check_metric
    from uda_ray.results import best_trials, read_table

    if metric:
        metric = check_metric(metric, "--metric")
    evals = read_table(sweep_dir / "results", "evals")
    if metric and evals and not any(e.get(metric) is not None for e in evals):
        known = sorted({k for e in evals for k in e if k.startswith(REPORTED_PREFIXES) and e[k] is not None
                        and not k.startswith("test/iou/")})
        raise UserError(f"no evaluation of this sweep reports '{metric}' (reported: {', '.join(known)})")
    rows = best_trials(sweep_dir / "results", metric=metric, top=top, method=method)
    if not rows:
        print("no evaluated trials yet" + (f" for method {method}" if method else ""))
        return rows
    print(f"top {len(rows)} by {rows[0]['rank_metric']} ({rows[0]['rank_mode']}):")
    for i, r in enumerate(rows, 1):
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in json.loads(r["params"]).items())
        test = "" if r["rank_metric"] == "test/miou" else (
            f"  test/miou={r['rank_test_miou']:.4f}" if r["rank_test_miou"] is not None else "  test/miou: absent")
        print(f"{i:>2}. {r['trial_id']}  {r['rank_metric']}={r['rank_value']:.4f} @ step {r['rank_step']}{test}  "
              f"[{r['status']}]  {r['method']}  {params}")
    return rows


def _print_pareto(sweep_dir: Path, meta: dict, method: str | None = None) -> list[dict]:
    """The Pareto front of a multi-objective sweep (values at each completed trial's last evaluation)."""
    from uda_ray.results import pareto_front

    objectives, constraints = meta["objective"], meta.get("constraints") or []
    rows = [r for r in pareto_front(sweep_dir / "results", objectives, constraints)
            if not method or r["method"] == method]
    front = [r for r in rows if r["on_front"]]
    names = ", ".join(f"{o['metric']} ({o['mode']})" for o in objectives)
    if not front:
        print("no completed trial on a Pareto front yet" + (f" for method {method}" if method else "")
              + (f" ({sum(not r['feasible'] for r in rows)} completed but infeasible)" if rows else ""))
        return []
    cons = "; constraints " + ", ".join(f"{c['metric']} {c['op']} {c['bound']:g}" for c in constraints) \
        if constraints else ""
    print(f"Pareto front: {len(front)} of {len(rows)} completed trials over {names}{cons}:")
    for i, r in enumerate(front, 1):
        vals = "  ".join(f"{o['metric']}={v:.4g}" for o, v in zip(objectives, r["values"]))
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in json.loads(r["params"]).items())
        print(f"{i:>2}. {r['trial_id']}  {vals}  @ step {r['step']}  {r['method']}/{r['model']}  {params}")
    bad = [r for r in rows if not r["feasible"]]
    if bad:
        print("infeasible: " + ", ".join(f"{r['trial_id']} ({'; '.join(r['violated'])})" for r in bad))
    for r in front:  # the fields an export names
        r.update(rank_metric=objectives[0]["metric"], rank_value=r["values"][0], rank_step=r["step"],
                 rank_checkpoint=r["checkpoint"])
    return front


def cmd_best(args: argparse.Namespace) -> int:
    from uda_ray.config import dump_yaml
    from uda_ray.search import read_meta

    sweep_dir = _sweep_dir(args)
    if args.top < 1:
        raise UserError("--top must be >= 1")
    if args.index < 1:
        raise UserError("--index must be >= 1")
    meta = read_meta(sweep_dir)
    pareto = len(meta.get("objective") or []) > 1 and not args.metric
    if pareto:
        rows = _print_pareto(sweep_dir, meta, method=args.method)
    else:
        rows = _print_best(sweep_dir, top=max(args.top, args.index), metric=args.metric, method=args.method)
    if args.export:
        if not rows:
            raise UserError("nothing to export: no evaluated trial")
        if args.index > len(rows):
            raise UserError(f"--index {args.index}: the list above has only {len(rows)}")
        pick = rows[args.index - 1]
        cfg = json.loads(pick["config_json"])
        cfg["name"] = f"{sweep_dir.name}-{'pareto' if pareto else 'best'}{args.index if args.index > 1 else ''}"
        if pareto:
            vals = ", ".join(f"{o['metric']}={v:.4g}" for o, v in zip(meta["objective"], pick["values"]))
            what = f"Pareto-front trial {args.index} ({vals})"
        else:
            what = "best trial" if args.index == 1 else f"trial number {args.index}"
        head = (f"# {what} {pick['trial_id']} of sweep {sweep_dir.name}: {pick['rank_metric']}="
                f"{pick['rank_value']:.4f} at step {pick['rank_step']}\n"
                f"# its checkpoint: {pick['rank_checkpoint']}\n")
        out = Path(args.export)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(head + dump_yaml(cfg))
        os.replace(tmp, out)
        print(f"wrote {out}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from uda_ray.results import read_table
    root = storage_root(args.storage)
    sweeps = sorted(root.glob("*/sweep.json"))
    if not sweeps:
        print(f"no sweeps under {root}")
        return 0
    print(f"{'sweep':<32} {'status':<22} {'trials':>6} {'done':>5} {'early':>5} {'err':>4} {'best':>8}")
    for p in sweeps:
        meta = json.loads(p.read_text())
        status = meta.get("status", "?")
        if status == "running" and not running_driver(p.parent):
            status = "interrupted"
        trials = read_table(p.parent / "results", "trials")
        count = {s: sum(t["status"] == s for t in trials) for s in ("completed", "stopped_early", "errored")}
        scored = [t["best_value"] for t in trials if t.get("best_value") is not None]
        mode = (meta.get("objective") or [{"mode": "max"}])[0]["mode"]
        best = f"{(max if mode == 'max' else min)(scored):.4f}" if scored else "-"
        print(f"{meta['name']:<32} {status:<22} {len(trials):>6} {count['completed']:>5} "
              f"{count['stopped_early']:>5} {count['errored']:>4} {best:>8}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from uda_ray.report import resolve, write_report

    kind, folder = resolve(storage_root(args.storage), args.name)
    out = Path(args.out) if args.out else folder / "report.html"
    t0 = time.time()
    write_report(kind, folder, out, predictions=not args.no_predictions)
    print(f"wrote {out} ({kind} {folder.name}, {out.stat().st_size / 1e6:.1f} MB, {time.time() - t0:.1f}s)")
    return 0


# ------------------------------------------------------------------------------------------------
# validators / rerun


def validators(name: str, storage: str | None = None) -> tuple[list[dict], Path]:
    """Measure every validator of a sweep, pipeline or run against test mIoU (uda_ray.trust); writes
    results/validators.parquet beside the other tables and returns (rows, path)."""
    from uda_ray import trust

    _, results_dir, sources = trust.locate(name, storage_root(storage))
    rows = trust.validators_table(trust.read_evals(sources))
    return rows, trust.write_table(results_dir, rows)


def cmd_validators(args: argparse.Namespace) -> int:
    from uda_ray.trust import format_table

    rows, path = validators(args.name, args.storage)
    print(format_table(rows))
    print(f"wrote {path}")
    return 0


def rerun(sweep: str, top: int, seeds: int, metric: str | None = None, storage: str | None = None,
          address: str | None = None, log: Any = print) -> list[dict]:
    """Retrain the top `top` configurations of a sweep with `seeds` new seeds each (uda_ray.rerun);
    returns the per-configuration summary (also in results/rerun_summary.parquet)."""
    from uda_ray import rerun as rr
    from uda_ray.build import build_experiment
    from uda_ray.search import check_address, check_resources, init_ray, read_meta
    from uda_ray.train import fit_run

    root = storage_root(storage)
    sweep_dir = _sweep_dir(argparse.Namespace(sweep=sweep, storage=storage))
    meta = read_meta(sweep_dir)
    objective = (meta.get("objective") or [{"metric": "test/miou", "mode": "max"}])[0]
    if metric is None:
        metric, mode = objective["metric"], objective["mode"]
    else:
        from uda_ray.metric_names import check_metric, mode_of

        metric = check_metric(metric, "--metric")
        mode = mode_of(metric)
    specs = rr.plan(sweep_dir, top, seeds, metric, mode)
    address = address or os.environ.get("RAY_ADDRESS") or meta.get("address")
    check_address(address)
    first = build_experiment(specs[0].experiment, f"sweep {sweep}")
    data = _resolve_data(first.data, root)  # one line if the sweep's datasets are gone
    todo = [s for s in specs if not rr.finished(sweep_dir / rr.RERUN_DIR / s.name, s.experiment["train"]["max_steps"])]
    log(f"rerun of sweep '{sweep}': top {len({s.trial_id for s in specs})} configuration(s) by {metric} ({mode}) "
        f"x {seeds} seed(s) = {len(specs)} runs ({len(specs) - len(todo)} already complete) under "
        f"{sweep_dir / rr.RERUN_DIR}")
    if todo:
        init_ray(address)
        check_resources(first.train, 0.0, 1, local=not address)

    def train(spec: rr.RerunSpec, where: Path) -> None:
        cfg = build_experiment(_with_data(spec.experiment, data), f"rerun {spec.name}")
        fit_run(cfg, where, spec.name)

    summary = rr.rerun(sweep_dir, specs, train, metric, mode, log=log)
    return [s for s in summary if s["trial_id"] in {sp.trial_id for sp in specs}]


def cmd_rerun(args: argparse.Namespace) -> int:
    from uda_ray.rerun import format_summary

    summary = rerun(args.sweep, args.top, args.seeds, metric=args.metric, storage=args.storage,
                    address=args.address)
    print(format_summary(summary))
    results = _sweep_dir(args) / "results"
    print(f"tables: {results / 'reruns.parquet'}, {results / 'rerun_summary.parquet'}")
    return 0


# ------------------------------------------------------------------------------------------------
# train / data / profile


def _metrics_line(m: dict, select: str) -> str:
    """`select=v test/miou=v` — a test metric the run does not report is said to be absent."""
    parts = [f"{k}={m[k]:.4f}" if isinstance(m.get(k), float) else f"{k}: absent"
             for k in dict.fromkeys((select, "test/miou"))]
    return " ".join(parts)


def cmd_train(args: argparse.Namespace) -> int:
    from uda_ray.build import build_experiment, load_experiment
    from uda_ray.config import experiment_dict, parse_set
    from uda_ray.search import check_address, check_resources, init_ray
    from uda_ray.stages import resolve_refs
    from uda_ray.train import fit_run

    cfg = load_experiment(args.experiment, parse_set(args.set))
    root = storage_root(args.storage)
    cfg = build_experiment(resolve_refs(experiment_dict(cfg), root), str(args.experiment))
    address = args.address or os.environ.get("RAY_ADDRESS")
    check_address(address)
    data = _resolve_data(cfg.data, root, cfg.select)
    cfg = build_experiment(_with_data(experiment_dict(cfg), data), str(args.experiment))
    name = args.name or cfg.name
    print(f"training {cfg.method}/{cfg.model.name} for {cfg.train.max_steps} steps on "
          f"{cfg.train.num_workers} worker(s); run folder {root / 'runs' / name}", flush=True)
    _refuse_running(root / "runs" / name, f"run '{name}'")
    init_ray(address)
    check_resources(cfg.train, 0.0, 1, local=not address)
    with DriverLock(root / "runs" / name, f"run '{name}'"):
        m = fit_run(cfg, root / "runs", name)
    print(f"done: step {m.get('step')} " + _metrics_line(m, cfg.select))
    print(f"latest checkpoint: {m['checkpoint_path']}\nresults: {root / 'runs' / name / 'results'}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from uda_ray.build import build_experiment
    from uda_ray.config import experiment_dict
    from uda_ray.pipeline import load_pipeline, run_pipeline
    from uda_ray.results import markdown_report
    from uda_ray.search import check_address, init_ray
    from uda_ray.stages import resolve_refs
    from uda_ray.train import fit_run

    pipe = load_pipeline(args.pipeline)
    root = storage_root(args.storage)
    address = args.address or os.environ.get("RAY_ADDRESS")
    check_address(address)

    def prepare(cfg: Any) -> Any:
        data = _resolve_data(cfg.data, root, cfg.select)
        return build_experiment(resolve_refs(_with_data(experiment_dict(cfg), data), root), cfg.name)

    print(f"pipeline '{pipe.cfg.name}': {len(pipe.cfg.stages)} stages under {root / 'pipelines' / pipe.cfg.name}",
          flush=True)
    pdir = root / "pipelines" / pipe.cfg.name
    _refuse_running(pdir, f"pipeline '{pipe.cfg.name}'")
    init_ray(address)
    t0 = time.time()
    with DriverLock(pdir, f"pipeline '{pipe.cfg.name}'"):
        summary = run_pipeline(pipe, root, fit_run, prepare)
    print(f"pipeline '{pipe.cfg.name}' done in {time.time() - t0:.0f}s")
    for row in summary:
        print(f"  {row['stage']:<24} {row['kind']:<14}"
              + (f" {_metrics_line(row, pipe.cfg.select)} @ step {row['step']}" if row.get("step") else ""))
    if args.report:
        pdir = root / "pipelines" / pipe.cfg.name
        runs = [(st.name, pdir / st.name) for st in pipe.cfg.stages if (pdir / st.name / "results").is_dir()]
        note = (f"Produced by `uda-ray pipeline {args.pipeline} --report {args.report}` from the runs' Parquet "
                f"tables ({pdir}). mIoU on the target val split at the label's full resolution.")
        out = Path(args.report)
        out.write_text(markdown_report(f"Pipeline {pipe.cfg.name}", runs, note))
        print(f"wrote {out}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from uda_ray.data.synthetic import generate

    h, w = _hw(args.size)
    for k in ("n_source", "n_target", "n_val"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1")
    t0 = time.time()
    out = generate(Path(args.out), n_source=args.n_source, n_target=args.n_target, n_val=args.n_val,
                   size=(w, h), seed=args.seed, synthia=args.synthia)
    print(f"wrote {out} in {time.time() - t0:.1f}s")
    return 0


def cmd_convert_weights(args: argparse.Namespace) -> int:
    from uda_ray.models.convert import convert_file

    if args.num_classes is not None and args.num_classes < 2:
        raise UserError("--num-classes must be >= 2")
    s = convert_file(args.src, args.dst, args.num_classes)
    heads = ", ".join(f"{k} -> {v}" for k, v in s["classifiers"].items()) or "none"
    dropped = "".join(f"; dropped {k} ({v})" for k, v in s["dropped"].items())
    print(f"wrote {s['written']}: {s['layout']}, {s['keys']} tensors; classifiers: {heads}{dropped}. "
          f"Use it with model.kwargs.style: caffe and model.pretrained: {s['written']}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from uda_ray.profile import format_report, profile

    h, w = _hw(args.size)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here")
    print(format_report(profile(args.model, size=(h, w), device=args.device, amp=args.amp)))
    return 0


# ------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uda-ray", description="Hyperparameter search for UDA segmentation on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    sub = p.add_subparsers(dest="cmd", required=True)

    def storage(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--storage", help="storage root (default $UDA_RAY_STORAGE or ./uda_ray_runs)")

    sp = sub.add_parser("sweep", help="run a search space")
    sp.add_argument("space")
    sp.add_argument("--name")
    sp.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local cluster)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the base experiment")
    sp.add_argument("--top", type=int, default=5)
    storage(sp)
    sp.set_defaults(fn=cmd_sweep)

    sp = sub.add_parser("resume", help="continue an interrupted sweep")
    sp.add_argument("sweep")
    sp.add_argument("--address")
    storage(sp)
    sp.set_defaults(fn=cmd_resume)

    sp = sub.add_parser("best", help="the best trials of a sweep")
    sp.add_argument("sweep")
    sp.add_argument("--top", type=int, default=5)
    sp.add_argument("--metric", help="rank by this reported metric (default: the sweep's objective)")
    sp.add_argument("--method")
    sp.add_argument("--export", metavar="FILE", help="write the winner as a runnable experiment YAML")
    sp.add_argument("--index", type=int, default=1,
                    help="export the N-th entry of the printed list (the Pareto front of a multi-objective sweep)")
    storage(sp)
    sp.set_defaults(fn=cmd_best)

    sp = sub.add_parser("validators", help="how well each validator tracks test mIoU (Spearman, selection regret)")
    sp.add_argument("name", help="a sweep, a pipeline or a run")
    storage(sp)
    sp.set_defaults(fn=cmd_validators)

    sp = sub.add_parser("rerun", help="retrain a sweep's top configurations with new seeds: mean ± std")
    sp.add_argument("sweep")
    sp.add_argument("--top", type=int, default=3, help="configurations to retrain (default 3)")
    sp.add_argument("--seeds", type=int, default=3, help="new seeds per configuration (default 3)")
    sp.add_argument("--metric", help="rank configurations by this metric (default: the sweep's objective)")
    sp.add_argument("--address")
    storage(sp)
    sp.set_defaults(fn=cmd_rerun)

    sp = sub.add_parser("ls", help="list sweeps")
    storage(sp)
    sp.set_defaults(fn=cmd_ls)

    sp = sub.add_parser("report", help="one self-contained HTML page about a sweep, a run or a pipeline")
    sp.add_argument("name", help="a sweep, a run (runs/NAME) or a pipeline (pipelines/NAME), or a folder")
    sp.add_argument("--out", metavar="FILE.html", help="where to write it (default: NAME's folder/report.html)")
    sp.add_argument("--no-predictions", action="store_true",
                    help="skip running the best checkpoint on target images (e.g. data not on this machine)")
    storage(sp)
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser("train", help="run one experiment (a Ray Train run)")
    sp.add_argument("experiment")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--name", help="run name (default: the experiment's name); an existing run resumes")
    sp.add_argument("--address")
    storage(sp)
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("pipeline", help="run the stages of a pipeline in order (skips completed ones)")
    sp.add_argument("pipeline")
    sp.add_argument("--address")
    sp.add_argument("--report", metavar="FILE.md", help="write a markdown table of the stages' results")
    storage(sp)
    sp.set_defaults(fn=cmd_pipeline)

    sp = sub.add_parser("data", help="datasets")
    dsub = sp.add_subparsers(dest="data_cmd", required=True)
    ds = dsub.add_parser("synth", help="write the synthetic domain-shift benchmark")
    ds.add_argument("--out", required=True)
    ds.add_argument("--n-source", type=int, default=200)
    ds.add_argument("--n-target", type=int, default=200)
    ds.add_argument("--n-val", type=int, default=50)
    ds.add_argument("--size", default="128x256", help="HxW")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--synthia", action="store_true", help="also write a SYNTHIA-layout source")
    ds.set_defaults(fn=cmd_data_synth)

    sp = sub.add_parser("convert-weights", help="convert an AdaptSegNet / ADVENT DeepLab-v2 checkpoint to this "
                        "project's keys (for model.kwargs.style: caffe)")
    sp.add_argument("src", help="the original .pth (e.g. DeepLab_resnet_pretrained_imagenet.pth, a trained model)")
    sp.add_argument("dst", help="the converted .pth to write (not overwritten)")
    sp.add_argument("--num-classes", type=int, default=None,
                    help="keep only classifiers with this many outputs (the init files' other heads are dropped)")
    sp.set_defaults(fn=cmd_convert_weights)

    sp = sub.add_parser("profile", help="params, GFLOPs and latency of a model")
    sp.add_argument("model")
    sp.add_argument("--size", default="512x1024", help="HxW")
    sp.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    sp.add_argument("--amp", action="store_true")
    sp.set_defaults(fn=cmd_profile)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return args.fn(args)
    except UserError as e:
        print(f"uda-ray: error: {e}", file=sys.stderr)
        if type(e).__name__ == "ClusterUnreachable":  # ray.init still retries in a thread: do not wait
            sys.stderr.flush()
            os._exit(EXIT_USER)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()  # the local cluster this command started ends with it


if __name__ == "__main__":
    sys.exit(main())
