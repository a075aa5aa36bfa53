"""Single runs (`uda-ray train`), pipelines and seed reruns: each a plan (every check, no side effect but the
generation of the synthetic benchmark once the experiment is valid) and its execution, which uda_ray.api runs
inside the call's Ray connection. Every experiment is prepared by uda_ray.driver.prepare.prepare_experiment.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from uda_ray.driver.prepare import cluster_address, overrides_dict, prepare_experiment, raw_of, with_data
from uda_ray.driver.sweeps import DEFAULT_OBJECTIVE
from uda_ray.storage import layout
from uda_ray.storage.lock import DriverLock, refuse_running

progress = logging.getLogger("uda_ray.training.progress")


# ------------------------------------------------------------------------------------------------
# one run


@dataclasses.dataclass
class TrainPlan:
    cfg: Any  # the prepared ExperimentConfig
    root: Path
    name: str
    address: str | None

    @property
    def dir(self) -> Path:
        return layout.run_dir(self.root, self.name)


def plan_train(experiment: str | os.PathLike, *, storage: str | os.PathLike | None,
               overrides: Mapping[str, Any] | Iterable[str], name: str | None, address: str | None) -> TrainPlan:
    """A run of the experiment file, checked and prepared (uda_ray.api.train's arguments)."""
    from uda_ray import checks
    from uda_ray.build import experiment_raw
    from uda_ray.config import experiment_dict
    from uda_ray.target_labels import MARK, trains_on_target_gt

    root = layout.root(storage)
    raw = experiment_raw(experiment, overrides_dict(overrides))
    name = checks.run_name(name) if name else None
    address = cluster_address(address)
    cfg = prepare_experiment(raw, str(experiment), root).cfg
    plan = TrainPlan(cfg, root, name or cfg.name, address)
    progress.info(f"training {cfg.method}/{cfg.model.name} for {cfg.train.max_steps} steps on "
                  f"{cfg.train.num_workers} worker(s); run folder {plan.dir}"
                  + (f" [{MARK}]" if trains_on_target_gt(experiment_dict(cfg)) else ""))
    refuse_running(plan.dir, f"run '{plan.name}'")
    return plan


def train(plan: TrainPlan) -> dict:
    """Train a planned run (Ray is connected): its last metrics, checkpoint_path, run_dir, select_metric and
    target_ground_truth."""
    from uda_ray.config import experiment_dict
    from uda_ray.search.cluster import check_resources
    from uda_ray.target_labels import trains_on_target_gt
    from uda_ray.training.launchers import fit_run

    cfg = plan.cfg
    check_resources(cfg.train, 0.0, 1, local=not plan.address)
    with DriverLock(plan.dir, f"run '{plan.name}'"):
        return {**fit_run(cfg, layout.runs_dir(plan.root), plan.name), "run_dir": str(plan.dir),
                "select_metric": cfg.select, "target_ground_truth": trains_on_target_gt(experiment_dict(cfg))}


# ------------------------------------------------------------------------------------------------
# pipelines


@dataclasses.dataclass
class PipelinePlan:
    pipe: Any  # the loaded uda_ray.pipelines.runner.Pipeline (every stage validated)
    path: str
    root: Path
    report: str | None
    address: str | None

    @property
    def dir(self) -> Path:
        return layout.pipeline_dir(self.root, self.pipe.cfg.name)


def plan_pipeline(path: str | os.PathLike, *, storage: str | os.PathLike | None, report: str | None,
                  address: str | None, overrides: Mapping[str, Any] | Iterable[str] = (),
                  name: str | None = None) -> PipelinePlan:
    """A pipeline file loaded and every stage checked, with the `--set` overrides of every experiment stage
    (uda_ray.api.pipeline's arguments)."""
    from uda_ray.checks import output_file
    from uda_ray.pipelines.runner import check_settings, load_pipeline

    pipe = load_pipeline(path, overrides_dict(overrides), name)
    root = layout.root(storage)
    if report:
        output_file(report, "--report")
    plan = PipelinePlan(pipe, str(path), root, report, cluster_address(address))
    check_settings(pipe, plan.dir)
    progress.info(f"pipeline '{pipe.cfg.name}': {len(pipe.cfg.stages)} stages under {plan.dir}")
    refuse_running(plan.dir, f"pipeline '{pipe.cfg.name}'")
    return plan


def pipeline(plan: PipelinePlan) -> list[dict]:
    """Run a planned pipeline's stages (Ray is connected); one summary dict per stage, and the report."""
    from uda_ray.pipelines.runner import run_pipeline
    from uda_ray.training.launchers import fit_run

    pipe, root = plan.pipe, plan.root

    def prepare(cfg: Any) -> Any:  # each experiment stage, once its `@stage` references are resolved
        return prepare_experiment(raw_of(cfg), cfg.name, root).cfg

    with DriverLock(plan.dir, f"pipeline '{pipe.cfg.name}'"):
        summary = run_pipeline(pipe, root, fit_run, prepare, log=progress.info)
    if plan.report:
        _pipeline_report(plan)
    return [{**row, "select_metric": pipe.cfg.select} for row in summary]


def plan_pipeline_seeds(path: str | os.PathLike, seeds: int, *, storage: str | os.PathLike | None,
                        report: str | None, address: str | None, overrides: Mapping[str, Any] | Iterable[str] = (),
                        name: str | None = None) -> list[PipelinePlan]:
    """The pipeline once per seed 0 .. seeds-1 (`seed` set last, over `overrides`), each in its own folder
    `<name>_s<seed>` (name: `name` or the file's), every one checked before any runs; `report` is written by
    `pipeline_seeds_report` once all have run."""
    from uda_ray.checks import output_file
    from uda_ray.errors import UserError
    from uda_ray.pipelines.runner import load_pipeline

    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if report:
        output_file(report, "--report")
    given = overrides_dict(overrides)
    base = name or load_pipeline(path, given).cfg.name
    return [plan_pipeline(path, storage=storage, report=None, address=address, name=f"{base}_s{seed}",
                          overrides={**given, "seed": seed}) for seed in range(seeds)]


def pipeline_seeds_report(plans: list[PipelinePlan], report: str, command: str) -> None:
    """The mean ± std over seeds of every stage of these per-seed pipeline runs, as markdown at `report`."""
    from uda_ray.results.markdown import markdown_seeds_report

    cfg = plans[0].pipe.cfg
    stages = [(st.name, [layout.stage_dir(p.dir, st.name) for p in plans]) for st in cfg.stages]
    note = (f"Produced by `{command}` from the runs' Parquet tables ({', '.join(str(p.dir) for p in plans)}): "
            f"the pipeline once per seed (`seed` 0 to {len(plans) - 1}). mIoU on the target test split (Cityscapes "
            f"val layout) at the label's full resolution: of the checkpoint each run's selection metric "
            f"({cfg.select}) picks, and of the best checkpoint by the test labels themselves (the oracle, an upper "
            "bound on selection); mean ± sample std over the seeds, then each seed's value.")
    base = cfg.name.removesuffix("_s0")  # plan_pipeline_seeds named the folders <base>_s<seed>
    if cfg.control:
        note += (f" The last column: each run's selected test mIoU minus {cfg.control}'s at the same seed (the "
                 "pipeline's `control:`), mean ± sample std of those differences and each seed's.")
    Path(report).write_text(markdown_seeds_report(f"Pipeline {base}, {len(plans)} seeds", stages, note,
                                                  selection=cfg.select, control=cfg.control))


def _pipeline_report(plan: PipelinePlan) -> None:
    """A markdown table of the stages' results at `plan.report`."""
    from uda_ray.results.markdown import markdown_report

    cfg, pdir = plan.pipe.cfg, plan.dir
    runs = [(st.name, layout.stage_dir(pdir, st.name)) for st in cfg.stages
            if layout.results_dir(layout.stage_dir(pdir, st.name)).is_dir()]
    note = (f"Produced by `uda-ray pipeline {plan.path} --report {plan.report}` from the runs' Parquet tables "
            f"({pdir}). mIoU on the target test split (Cityscapes val layout) at the label's full resolution: of "
            f"the checkpoint each run's selection metric ({cfg.select}) picks, and of the best checkpoint by "
            "the test labels themselves (the oracle, an upper bound on selection).")
    Path(plan.report).write_text(markdown_report(f"Pipeline {cfg.name}", runs, note, selection=cfg.select))


# ------------------------------------------------------------------------------------------------
# seed reruns


@dataclasses.dataclass
class RerunPlan:
    dir: Path  # the sweep's folder
    specs: list  # uda_ray.selection.seed_variance.RerunSpec, every one
    todo: list  # those not finished yet
    first: Any  # the prepared ExperimentConfig of the first spec (its data are every run's)
    cfgs: dict  # spec name -> its prepared ExperimentConfig (of those to train)
    metric: str
    mode: str
    address: str | None


def plan_rerun(name: str, *, top: int, seeds: int, metric: str | None, storage: str | os.PathLike | None,
               address: str | None) -> RerunPlan:
    """The runs to train, each experiment checked, the data resolved (uda_ray.api.rerun's arguments)."""
    from uda_ray.selection import seed_variance as rr

    root = layout.root(storage)
    sweep_d = layout.find_sweep(root, name)
    meta = layout.read_meta(sweep_d)
    metric, mode = _rerun_metric(meta, metric)
    specs = rr.plan(sweep_d, top, seeds, metric, mode)
    address = cluster_address(address, meta)
    first = prepare_experiment(specs[0].experiment, f"sweep {name}", root, select=None).cfg
    todo = [s for s in specs
            if not rr.finished(layout.rerun_dir(sweep_d, s.name), s.experiment["train"]["max_steps"])]
    progress.info(f"rerun of sweep '{name}': top {len({s.trial_id for s in specs})} configuration(s) by {metric} "
                  f"({mode}) x {seeds} seed(s) = {len(specs)} runs ({len(specs) - len(todo)} already complete) "
                  f"under {layout.reruns_dir(sweep_d)}")
    return RerunPlan(sweep_d, specs, todo, first, _rerun_configs(first.data, todo), metric, mode, address)


def _rerun_metric(meta: dict, metric: str | None) -> tuple[str, str]:
    """The metric that ranks the configurations (default the sweep's objective) and its mode."""
    from uda_ray.metric_names import check_metric, mode_of

    if metric is None:
        objective = (meta.get("objective") or [DEFAULT_OBJECTIVE])[0]
        return objective["metric"], objective.get("mode") or mode_of(objective["metric"])
    metric = check_metric(metric, "--metric")
    return metric, mode_of(metric)


def _rerun_configs(data: Any, todo: list) -> dict:
    """The experiments to train with the data prepared for the first (one line if the sweep's datasets are
    gone), each checked before any is trained."""
    from uda_ray import checks
    from uda_ray.build import build_experiment

    cfgs = {}
    for spec in todo:
        source = f"rerun {spec.name}"
        cfgs[spec.name] = cfg = build_experiment(with_data(spec.experiment, data), source)
        checks.experiment(cfg, source)
    return cfgs


def rerun(plan: RerunPlan) -> list[dict]:
    """Train a planned rerun's unfinished runs (Ray is connected when there are any) and summarize all of them:
    one row per configuration (also in the sweep's results/rerun_summary.parquet)."""
    from uda_ray.search.cluster import check_resources
    from uda_ray.selection import seed_variance as rr
    from uda_ray.training.launchers import fit_run

    if plan.todo:
        check_resources(plan.first.train, 0.0, 1, local=not plan.address)

    def train_one(spec: rr.RerunSpec, where: Path) -> None:
        fit_run(plan.cfgs[spec.name], where, spec.name)

    summary = rr.rerun(plan.dir, plan.specs, train_one, plan.metric, plan.mode, log=progress.info)
    return [s for s in summary if s["trial_id"] in {sp.trial_id for sp in plan.specs}]
