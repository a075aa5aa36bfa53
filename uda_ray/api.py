"""The Python API: everything the `uda-ray` command line does, callable from a notebook or a Ray Job script.

    from uda_ray import api
    s = api.sweep("search_spaces/my_space.yaml", storage="/shared/uda", name="adv-lr")
    print(s.status, s.best(top=3))                   # rows as dicts, best first
    api.best("adv-lr", storage="/shared/uda", metric="uv/snd")
    api.ls("/shared/uda")                            # one dict per sweep
    api.train("experiments/x.yaml", overrides=["train.max_steps=2000"])
    api.pipeline("experiments/pipelines/fda_mbt.yaml", overrides=["train.max_steps=200"])
    api.evaluate("uda_ray_runs/runs/x/checkpoints/checkpoint_step_0002000")  # test metrics and validators

Every function returns plain objects (dicts, lists of dicts, a `Sweep` dataclass, pyarrow Tables). Errors a
user can cause raise `uda_ray.errors.UserError` (the CLI prints them as one line, exit status 2). Progress
lines (the sweep's live view, stage starts, ...) go to the logger "uda_ray.training.progress" at INFO: the CLI
prints them; in a notebook call `show_progress()` (or configure logging) to see them.

Storage: `storage` is the root folder of sweeps and runs (default $UDA_RAY_STORAGE, else ./uda_ray_runs; a
shared filesystem path on a multi-node cluster; the plan of its folders: uda_ray.storage.layout). Ray: with
`address` (or $RAY_ADDRESS, set inside a Ray Job) the functions connect to that cluster; without, they start a
local one for the call and stop it after. A Ray connection made by the caller before the call is used as is
and left open.

This module is the public surface and the call's Ray connection; the work is in uda_ray.driver (each call a
checked plan, then its execution inside the connection).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from uda_ray.driver import evaluate as evaluation
from uda_ray.driver import runs, sweeps
from uda_ray.driver.prepare import resolve_data, with_data
from uda_ray.driver.queries import best, export_best, leaderboard, pareto
from uda_ray.driver.sweeps import ENDED, INTERRUPTED, Sweep, ls
from uda_ray.errors import UserError
from uda_ray.storage import layout
from uda_ray.storage.lock import refuse_running

__all__ = ["ENDED", "INTERRUPTED", "Sweep", "best", "convert_weights", "ensv", "evaluate", "export_best",
           "leaderboard", "ls", "pareto", "pipeline", "profile_model", "ray_connection", "refuse_running", "report",
           "rerun", "resolve_data", "resume", "show_progress", "storage_root", "sweep", "sweep_dir", "synthetic_data",
           "train", "validators", "with_data"]

progress = logging.getLogger("uda_ray.training.progress")


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


def storage_root(storage: str | os.PathLike | None = None) -> Path:
    """The storage root: `storage`, else $UDA_RAY_STORAGE, else ./uda_ray_runs (absolute); a folder, or a path
    where one can be made (UserError otherwise)."""
    return layout.root(storage)


def sweep_dir(name: str, storage: str | os.PathLike | None = None) -> Path:
    """The folder of sweep `name` under the storage root; UserError naming the known sweeps if absent."""
    return layout.find_sweep(layout.root(storage), name)


@contextlib.contextmanager
def ray_connection(address: str | None) -> Iterator[None]:
    """Ray for the duration of a call: the caller's connection if one is open, else a new one (a local
    cluster without an address) that ends with the call."""
    import ray

    from uda_ray.search.cluster import init_ray

    if ray.is_initialized():
        yield
        return
    init_ray(address)
    try:
        yield
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------------
# sweeps (the queries best, pareto, leaderboard, export_best and ls: uda_ray.driver)


def sweep(space: str | os.PathLike, *, storage: str | os.PathLike | None = None, address: str | None = None,
          name: str | None = None, overrides: Mapping[str, Any] | Iterable[str] = (),
          warm_start: str | os.PathLike | None = None, mlflow: str | None = None) -> Sweep:
    """Run the search space file `space` to its end: `num_samples` trials, results in
    <storage>/<name>/results (name: default the space file's stem). `overrides` change the base experiment
    ({"train.max_steps": 500} or ["train.max_steps=500"]). `warm_start`: an earlier sweep (name or folder)
    whose finished trials that fit this space seed the sampler (recorded in sweep.json). `mlflow`: a tracking
    URI; each trial is also logged as an MLflow run (needs mlflow-skinny). Returns the Sweep;
    its status is "interrupted" after Ctrl-C (`resume` continues it)."""
    plan = sweeps.plan_start(space, storage=storage, address=address, name=name, overrides=overrides,
                             warm_start=warm_start, mlflow=mlflow)
    with ray_connection(plan.address):
        return sweeps.start(plan)


def resume(name: str, *, storage: str | os.PathLike | None = None, address: str | None = None) -> Sweep:
    """Continue an interrupted sweep from its folder (finished trials are not rerun). Returns the Sweep.
    A sweep whose driver died before Ray Tune saved any state (while it started) is started again from its
    folder, with its seed: the same trials as an uninterrupted start."""
    plan = sweeps.plan_resume(name, storage=storage, address=address)
    with ray_connection(plan.address):
        return sweeps.resume(plan)


# ------------------------------------------------------------------------------------------------
# single runs and pipelines


def train(experiment: str | os.PathLike, *, storage: str | os.PathLike | None = None,
          overrides: Mapping[str, Any] | Iterable[str] = (), name: str | None = None,
          address: str | None = None) -> dict:
    """Run one experiment (one Ray task, or a Ray Train run with several workers) under <storage>/runs/<name>
    (default: the experiment's name; an existing run resumes). Returns the last reported metrics plus
    checkpoint_path and run_dir."""
    plan = runs.plan_train(experiment, storage=storage, overrides=overrides, name=name, address=address)
    with ray_connection(plan.address):
        return runs.train(plan)


def pipeline(path: str | os.PathLike, *, storage: str | os.PathLike | None = None, report: str | None = None,
             address: str | None = None, overrides: Mapping[str, Any] | Iterable[str] = (),
             name: str | None = None, seeds: int | None = None) -> list[dict]:
    """Run the stages of a pipeline file in order (completed stages are skipped); one summary dict per
    stage (with the pipeline's selection metric as select_metric). With `report`, also write a markdown table
    of the stages' results there. `overrides` change every experiment stage ({"train.max_steps": 500} or
    ["train.max_steps=500"]), applied last: after the file's `set:` and each stage's own `set`. `name`
    replaces the file's name (its folder): a folder run with other settings is refused, not continued.
    `seeds`: run it once per seed 0 .. seeds-1 (`seed` set over `overrides`), in folders `<name>_s<seed>`; the
    summaries of all (each with its `seed`) and a `report` of every stage's mean ± std over the seeds."""
    if seeds is None:
        plan = runs.plan_pipeline(path, storage=storage, report=report, address=address, overrides=overrides,
                                  name=name)
        with ray_connection(plan.address):
            return runs.pipeline(plan)
    plans = runs.plan_pipeline_seeds(path, seeds, storage=storage, report=report, address=address,
                                     overrides=overrides, name=name)
    with ray_connection(plans[0].address):
        summary = [{**row, "seed": seed} for seed, plan in enumerate(plans) for row in runs.pipeline(plan)]
    if report:
        runs.pipeline_seeds_report(plans, report, f"uda-ray pipeline {path} --seeds {seeds} --report {report}")
    return summary


def evaluate(checkpoint: str | os.PathLike, *, experiment: str | os.PathLike | None = None,
             overrides: Mapping[str, Any] | Iterable[str] = (), weights: str = "model", device: str = "cpu",
             storage: str | os.PathLike | None = None, out: str | os.PathLike | None = None) -> dict:
    """Evaluate a trained segmenter in-process (no Ray): the evaluation the training loop runs (target test
    split: mIoU, pixel accuracy, per-class IoU; source val; the label-free validators). `checkpoint`: a
    uda_ray checkpoint (folder with state.pt, or the file), under its own experiment; `overrides` may change
    its data.* settings and train.eval_batch_size. With `experiment` (a YAML), `checkpoint` is a weights file
    (a state_dict of the segmenter, e.g. after convert_weights) evaluated under that experiment (any
    override). `weights`: "model" or "teacher" (a checkpoint's EMA teacher). Returns {"source", "step",
    "metrics", ...}; with `out`, also written there as JSON."""
    plan = evaluation.plan_evaluate(checkpoint, experiment=experiment, overrides=overrides, weights=weights,
                                    device=device, storage=storage, out=out)
    return evaluation.evaluate(plan)


# ------------------------------------------------------------------------------------------------
# reports, validators, reruns


def report(name: str, *, storage: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
           predictions: bool = True) -> Path:
    """One self-contained HTML page about a sweep, a run or a pipeline; returns its path."""
    from uda_ray.results.report import write_report

    kind, folder = layout.find(layout.root(storage), name)
    out = Path(out) if out else layout.report_file(folder)
    write_report(kind, folder, out, predictions=predictions)
    return out


def validators(name: str, *, storage: str | os.PathLike | None = None) -> tuple[list[dict], Path]:
    """Measure every validator of a sweep, pipeline or run against test mIoU (uda_ray.selection.study); writes
    results/validators.parquet beside the other tables and returns (rows, path)."""
    from uda_ray.selection import study

    evals, results_dir = _evals_of(name, storage)
    rows = study.validators_table(evals)
    return rows, study.write_table(results_dir, rows)


def validators_across(names: list[str], *, storage: str | os.PathLike | None = None
                      ) -> tuple[dict[str, list[dict]], list[dict], list[dict]]:
    """The validators of several sweeps, pipelines or runs (e.g. one sweep per method), each measured as
    `validators` does (and its table written), then (per-name rows, pooled rows: all their checkpoints as one
    pool, across rows: mean Spearman / regret and worst-model rate over the names measured apart;
    uda_ray.selection.study.pooled_evals / across)."""
    from uda_ray.selection import study

    if len(set(names)) != len(names):
        from uda_ray.errors import UserError

        raise UserError(f"validators: a name is given twice ({', '.join(names)})")
    found = {n: _evals_of(n, storage) for n in names}
    per = {n: study.validators_table(evals) for n, (evals, _) in found.items()}
    for n, (_, results_dir) in found.items():
        study.write_table(results_dir, per[n])
    pooled = study.validators_table(study.pooled_evals({n: evals for n, (evals, _) in found.items()}))
    return per, pooled, study.across(per)


def _evals_of(name: str, storage: str | os.PathLike | None) -> tuple[list[dict], Path]:
    """The eval rows of a sweep, pipeline or run (with uv/ensv where `ensv` scored its pool), and its results
    folder."""
    from uda_ray.selection import study
    from uda_ray.selection.ensv import with_pool_metrics

    _, results_dir, sources = layout.find_evals(layout.root(storage), name)
    return with_pool_metrics(study.read_evals(sources), results_dir), results_dir


def ensv(name: str, *, storage: str | os.PathLike | None = None, device: str = "cpu") -> tuple[list[dict], Path]:
    """EnsV (uda_ray.selection.ensv) of the kept checkpoints of sweep or run `name`, scored as one pool on the
    held-out target slice; writes results/ensv.parquet (read by `best --metric uv/ensv`, `--export` and
    `validators`) and returns (rows best first, path). UserError when there is no pool of >= 2 checkpoints."""
    from uda_ray.errors import UserError
    from uda_ray.selection import ensv as pool

    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: expected cpu or cuda")
    kind, results_dir, _ = layout.find_evals(layout.root(storage), name)
    if kind == "pipeline":
        raise UserError(f"{name} is a pipeline: its `select: uv/ensv` scores a stage's checkpoints at @stage:best")
    members = pool.sweep_pool(results_dir) if kind == "sweep" else pool.run_pool(results_dir.parent)
    pool.check_pool(members, f"{kind} {name}")
    rows = pool.compute(members, results_dir, device)
    return rows, results_dir / f"{pool.TABLE}.parquet"


def rerun(name: str, *, top: int = 3, seeds: int = 3, metric: str | None = None,
          storage: str | os.PathLike | None = None, address: str | None = None) -> list[dict]:
    """Retrain the top `top` configurations of sweep `name` with `seeds` new seeds each
    (uda_ray.selection.seed_variance); returns the per-configuration summary (also in results/rerun_summary.parquet)."""
    plan = runs.plan_rerun(name, top=top, seeds=seeds, metric=metric, storage=storage, address=address)
    with ray_connection(plan.address) if plan.todo else contextlib.nullcontext():
        return runs.rerun(plan)


def convert_weights(src: str | os.PathLike, dst: str | os.PathLike, *, num_classes: int | None = None) -> dict:
    """Convert an AdaptSegNet / ADVENT DeepLab-v2 checkpoint to this project's keys (uda_ray.models.convert),
    for `model.kwargs.style: caffe` and `model.pretrained: DST`; a CPSL .pkl (detected) for the summary's
    `kwargs` (style proda, head proda, bn_clr). `num_classes`: keep only classifiers with that
    many outputs (the init files' other heads are dropped). Returns the summary (layout, classifiers kept and
    dropped, tensor count, the written path)."""
    from uda_ray.models.convert import convert_file

    if num_classes is not None and num_classes < 2:
        raise UserError("num_classes must be >= 2")
    return convert_file(src, dst, num_classes)


# ------------------------------------------------------------------------------------------------
# data and models


def synthetic_data(out: str | os.PathLike, *, n_source: int = 200, n_target: int = 200, n_val: int = 50,
                   size_hw: tuple[int, int] = (128, 256), seed: int = 0, synthia: bool = False,
                   version: int = 2, colour_shift: float | None = None,
                   layout_shift: float | None = None) -> Path:
    """Write the synthetic domain-shift benchmark (GTA5 and Cityscapes layouts, optionally SYNTHIA's; `version`
    1 or 2, and for 2 its `colour_shift` and `layout_shift` in [0, 1], None: uda_ray.config.V2_SHIFT_DEFAULTS,
    docs/benchmark.md) under `out`; returns its folder."""
    from uda_ray.config import SYNTH_SHIFTS, synth_shift_default
    from uda_ray.data.synthetic import generate

    for k, v in (("n_source", n_source), ("n_target", n_target), ("n_val", n_val)):
        if v < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1")
    if version not in (1, 2):
        raise UserError(f"--benchmark-version must be 1 or 2, got {version}")
    shifts = {name: synth_shift_default(version, name) if value is None else value
              for name, value in zip(SYNTH_SHIFTS, (colour_shift, layout_shift))}
    for name, value in shifts.items():
        if not 0.0 <= value <= 1.0 or (version == 1 and value != 1.0):
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1] and needs --benchmark-version 2, "
                            f"got {value}")
    h, w = _check_size(size_hw)
    return generate(Path(out), n_source=n_source, n_target=n_target, n_val=n_val, size=(w, h), seed=seed,
                    synthia=synthia, version=version, **shifts)


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
