"""Pipelines: ordered stages, each an ordinary training run or an action reading earlier stages' artefacts.

```yaml
name: intrada_synthetic
set: {train.max_steps: 150}                  # optional overrides for every experiment stage (`uda-ray pipeline
                                             # --set KEY=VALUE` adds more, applied after the stages' own)
stages:
  - name: inter                              # IntraDA step 1: AdvEnt inter-domain
    experiment: ../experiments/synthetic_bisenet_r18_advent.yaml
  - name: rank                               # step 2: entropy ranking + pseudo-labels
    intrada_rank: {from: inter, lambda: 0.67, normalize_rare: false}
  - name: intra                              # step 3: AdvEnt, easy split (pseudo-labeled) -> hard split
    experiment: ../experiments/synthetic_bisenet_r18_intrada.yaml
    set: {data.ranking: "@rank"}
```
`select:` (optional, default the label-free uda_ray.metric_names.DEFAULT_SELECTION) names the metric that
picks `@STAGE:best` and the checkpoints actions start `from`; experiment stages keep their checkpoints by it.
`control:` (optional) names the experiment stage that a `--seeds N --report` compares every other with,
paired by seed.
In `set` values, `@STAGE` is that stage's output folder and `@STAGE:best` its best checkpoint (by `select`).
Everything lives under <storage>/pipelines/<name>/<stage>; a stage already complete is skipped, so running
the same command again continues an interrupted pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uda_ray import checks
from uda_ray.build import load_experiment
from uda_ray.config import ConfigError
from uda_ray.config_loader import build, read_yaml
from uda_ray.metric_names import DEFAULT_SELECTION, check_metric, is_pool_metric, mode_of
from uda_ray.pipelines.actions import ACTIONS
from uda_ray.results.tables import read_table
from uda_ray.storage import layout
from uda_ray.target_labels import row_marked
from uda_ray.training.checkpoint import best_checkpoint_in, latest_metrics


@dataclass(frozen=True)
class StageConfig:
    name: str
    experiment: str | None = None
    set: dict = field(default_factory=dict)
    intrada_rank: dict | None = None  # {from: STAGE, lambda: 0.67, normalize_rare: false}
    # {from: STAGE or [STAGES], percentile: 0.5, cap: 0.9, stylize_beta: null, flip: false}
    # or {from: ..., threshold: 0.95} (a fixed threshold)
    pseudo_labels: dict | None = None
    evaluate_ensemble: dict | None = None  # {from: [STAGES]}

    @property
    def action(self) -> tuple[str, dict] | None:
        for a in ACTIONS:
            if getattr(self, a) is not None:
                return a, getattr(self, a)
        return None


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    stages: list[StageConfig]
    set: dict = field(default_factory=dict)
    # the metric that picks `@STAGE:best` and the checkpoints actions start from; also every experiment
    # stage's `select` (its kept checkpoints) unless the stage's `set` names another
    select: str = DEFAULT_SELECTION
    # optional: the stage every other is compared with, paired by seed, in a `--seeds N --report` (e.g. the
    # BatchNorm control: what an adaptation method must beat)
    control: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "select", check_metric(self.select, "select"))


@dataclass
class Pipeline:
    cfg: PipelineConfig
    path: Path  # the pipeline file (experiment paths are relative to it)
    cli_set: dict = field(default_factory=dict)  # `uda-ray pipeline --set`: every experiment stage, applied last

    def overrides(self, st: StageConfig) -> dict:
        """The `--set`-style overrides of an experiment stage: the pipeline's select, its set, the stage's,
        then the command line's (which win)."""
        # a pool metric (uv/ensv) picks among a stage's checkpoints afterwards; the stage keeps them by the default
        select = DEFAULT_SELECTION if is_pool_metric(self.cfg.select) else self.cfg.select
        return {"select": select, **self.cfg.set, **st.set, **self.cli_set}

    def experiment_path(self, st: StageConfig) -> Path:
        p = Path(st.experiment)
        return p if p.is_absolute() else self.path.parent / p


def load_pipeline(path: str | Path, overrides: dict[str, Any] | None = None, name: str | None = None) -> Pipeline:
    """The pipeline file, every stage checked; `overrides` (dotted, the command line's --set) change every
    experiment stage, applied after the file's `set` and the stage's own; `name` (--name) replaces the file's
    name, so one file runs under several settings (seeds) side by side."""
    p = Path(path)
    cfg = build(PipelineConfig, read_yaml(p), str(p))
    if name is not None:
        cfg = dataclasses.replace(cfg, name=checks.run_name(name))
    if not cfg.stages:
        raise ConfigError(f"{p}: a pipeline needs at least one stage")
    seen: set[str] = set()
    pipe = Pipeline(cfg, p, dict(overrides or {}))
    for st in cfg.stages:
        where = f"{p}: stage '{st.name}'"
        if st.name in seen:
            raise ConfigError(f"{where}: duplicate stage name")
        if (st.experiment is None) == (st.action is None):
            raise ConfigError(f"{where}: give exactly one of experiment, {', '.join(ACTIONS)}")
        cli = list(pipe.cli_set.values()) if st.experiment is not None else []
        for v in list(st.set.values()) + list((st.action or ("", {}))[1].values()) + cli:
            ref = _ref_stage(v)
            if ref is not None and ref not in seen:
                raise ConfigError(f"{where}: refers to '{ref}', which is not an earlier stage")
        if st.action:
            src = st.action[1].get("from")
            if not all(isinstance(x, str) and x in seen for x in _as_list(src)):
                raise ConfigError(f"{where}: 'from' must name earlier stage(s), got {src!r}")
            checks.action_args(st.action[0], ACTIONS[st.action[0]], st.action[1], where)
        else:  # validate now, not hours later (the model too: its kwargs and pretrained weights)
            checks.experiment(load_experiment(pipe.experiment_path(st), pipe.overrides(st)), where)
        seen.add(st.name)
    if cfg.control is not None and cfg.control not in [st.name for st in cfg.stages if st.experiment]:
        raise ConfigError(f"{p}: control '{cfg.control}' must name an experiment stage")
    return pipe


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


def _ref_stage(v: Any) -> str | None:
    if isinstance(v, str) and v.startswith("@"):
        return v[1:].split(":", 1)[0].split("/", 1)[0]
    return None


def best_of_stage(d: Path, select: str) -> Path:
    """A stage's best checkpoint by `select`: from its checkpoints' metrics, or for a pool metric (uv/ensv) by
    scoring its kept checkpoints as a pool (uda_ray.selection.ensv)."""
    if is_pool_metric(select):
        from uda_ray.selection.ensv import best_checkpoint

        return best_checkpoint(d)
    return best_checkpoint_in(d, select, mode_of(select))


def resolve_stage_refs(values: dict, pdir: Path, select: str = DEFAULT_SELECTION) -> dict:
    """'@stage' -> <pdir>/<stage>; '@stage:best' -> its best checkpoint by `select`; '@stage/sub' -> a path
    inside."""
    out = {}
    for k, v in values.items():
        if _ref_stage(v) is not None:
            stage, _, rest = v[1:].partition(":")
            d = layout.stage_dir(pdir, stage)
            out[k] = str(best_of_stage(d, select)) if rest == "best" else str(d)
        else:
            out[k] = v
    return out


SETTINGS = "settings.json"  # in a pipeline's folder: the settings every stage of it was run with


def _settings(pipe: Pipeline) -> dict:
    """The pipeline-wide settings in effect: `select`, and the file's `set` under the command line's --set."""
    return _effective({"select": pipe.cfg.select, "set": pipe.cfg.set, "cli_set": pipe.cli_set})


def _effective(settings: dict) -> dict:
    """One `set` (the command line's entries win), so that a --set equal to the file's value changes nothing;
    also reads the folders written before, which kept the two apart."""
    merged = {**settings.get("set", {}), **settings.get("cli_set", {})}
    return json.loads(json.dumps({"select": settings.get("select"), "set": merged}, sort_keys=True, default=str))


def check_settings(pipe: Pipeline, pdir: Path) -> None:
    """Refuse to continue a pipeline folder under other pipeline-wide settings (the file's `select` and `set`,
    the command line's --set): its completed stages would be skipped and reported as if run with these."""
    f = pdir / SETTINGS
    if not f.is_file():
        return
    have, want = _effective(json.loads(f.read_text())), _settings(pipe)
    if have != want:
        diff = sorted(k for k in {**have["set"], **want["set"]} if have["set"].get(k) != want["set"].get(k))
        what = ", ".join(diff) or "select"
        raise ConfigError(f"pipeline '{pipe.cfg.name}' in {pdir} was run with other settings ({what}); give "
                          f"--name to run these beside it, or the same settings to continue it")


def stage_done(pipe: Pipeline, st: StageConfig, pdir: Path) -> bool:
    d = layout.stage_dir(pdir, st.name)
    if st.action:
        return (d / "manifest.json").is_file()
    cfg = load_experiment(pipe.experiment_path(st), pipe.overrides(st))
    m = latest_metrics(d)
    steps = cfg.train.max_steps
    if cfg.train.epochs is not None:  # its steps were computed from the data: the run's own config has them
        saved = d / "config.yaml"
        if not saved.is_file():
            return False
        steps = int(read_yaml(saved)["train"]["max_steps"])
    return bool(m) and int(m.get("step", 0)) >= steps


def run_pipeline(pipe: Pipeline, root: Path, run_experiment: Callable[[Any, Path, str], dict],
                 prepare: Callable[[Any], Any], log: Callable[[str], None] = print) -> list[dict]:
    """Run the stages in order. `run_experiment(cfg, storage, name)` trains (one run);
    `prepare(cfg)` returns an experiment stage's cfg ready to run (uda_ray.driver.prepare.prepare_experiment:
    references and dataset roots resolved, checked)."""
    pdir = layout.pipeline_dir(root, pipe.cfg.name)
    check_settings(pipe, pdir)
    pdir.mkdir(parents=True, exist_ok=True)
    (pdir / SETTINGS).write_text(json.dumps(_settings(pipe), indent=2, sort_keys=True) + "\n")
    summary = []
    for st in pipe.cfg.stages:
        t0 = time.time()
        if stage_done(pipe, st, pdir):
            log(f"stage {st.name}: already complete, skipped")
        elif st.action:
            _run_action(pipe, st, pdir, log)
        else:
            overrides = resolve_stage_refs(pipe.overrides(st), pdir, pipe.cfg.select)
            cfg = load_experiment(pipe.experiment_path(st), overrides)
            cfg = dataclasses.replace(prepare(cfg), name=st.name)
            log(f"stage {st.name}: {cfg.method}/{cfg.model.name}, {cfg.train.max_steps} steps")
            run_experiment(cfg, pdir, st.name)
        summary.append(_stage_row(pipe, st, pdir, time.time() - t0))
    (pdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run_action(pipe: Pipeline, st: StageConfig, pdir: Path, log: Callable[[str], None]) -> None:
    """An action stage, from the best checkpoint(s) of the stages it names (by the pipeline's `select`)."""
    name, args = st.action
    sel = pipe.cfg.select
    args = resolve_stage_refs({k: v for k, v in args.items() if k != "from"}, pdir, sel)
    args = {("lambda_" if k == "lambda" else k): v for k, v in args.items()}
    cks = [best_of_stage(layout.stage_dir(pdir, f), sel) for f in _as_list(st.action[1]["from"])]
    log(f"stage {st.name}: {name} from {', '.join(str(c) for c in cks)}")
    ACTIONS[name](cks, layout.stage_dir(pdir, st.name), **args)


def _stage_row(pipe: Pipeline, st: StageConfig, pdir: Path, seconds: float) -> dict:
    """A stage's line of the summary: its kind, time, mark, and its last evaluation's metrics."""
    row = {"stage": st.name, "kind": st.action[0] if st.action else "train", "seconds": seconds}
    results = layout.results_dir(layout.stage_dir(pdir, st.name))
    trials = read_table(results, "trials")
    if trials:
        row["target_ground_truth"] = row_marked(trials[0])
    evals = read_table(results, "evals")
    if evals:
        last = max(evals, key=lambda e: e["step"])
        row.update({k: last.get(k) for k in ("step", pipe.cfg.select, "test/miou", "test/pixel_acc")})
    return row
