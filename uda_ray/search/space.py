"""Search-space YAML -> a validated SearchSpace (no Ray here: loading is testable offline).

```yaml
base: ../experiments/x.yaml            # the experiment every trial starts from (relative to this file)
set: {train.max_steps: 300}            # optional fixed overrides of the base
objective: {metric: uv/im}             # default: the base's `select`; mode from uda_ray.metric_names;
                                       # a list of them for a Pareto search (trials keep checkpoints by the first)
constraints: {model/fps: ">= 30"}      # optional: the sampler and the Pareto front keep to these
num_samples: 8
max_concurrent_trials: 1
seed: 0                                # Optuna TPE seed; omit for a fresh one per sweep (recorded)
scheduler: {asha: {grace_period: 100, reduction_factor: 3}}   # or null
baseline: false                        # true: the first trial runs the base's own values of the params
params:
  optim.lr: {loguniform: [1.0e-4, 5.0e-2]}
  method: {choice: [source_only, target_only]}
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uda_ray.config import ConfigError, ExperimentConfig
from uda_ray.config_loader import apply_overrides, build, load_raw, read_yaml
from uda_ray.metric_names import DEFAULT_SELECTION, check_metric, mode_of

KINDS = ("uniform", "loguniform", "int", "choice")


@dataclass(frozen=True)
class Param:
    kind: str
    values: tuple  # (low, high) or the choices

    def corners(self) -> list[Any]:
        return list(self.values)


@dataclass(frozen=True)
class Objective:
    metric: str = DEFAULT_SELECTION
    mode: str | None = None  # default: the metric's mode in the registry (uda_ray.metric_names)

    def __post_init__(self) -> None:
        metric = check_metric(self.metric, "objective.metric", per_run=True)
        object.__setattr__(self, "metric", metric)
        if self.mode is None:
            object.__setattr__(self, "mode", mode_of(metric))
        elif self.mode not in ("max", "min"):
            raise ConfigError(f"objective mode must be 'max' or 'min', got '{self.mode}'")
        elif self.mode != mode_of(metric):
            raise ConfigError(f"objective: {metric} is better when {'higher' if mode_of(metric) == 'max' else 'lower'}"
                              f" (mode {mode_of(metric)}), got mode {self.mode}")


@dataclass(frozen=True)
class Constraint:
    """`metric op bound` a trial must meet to count (e.g. model/fps >= 30), honoured by the Optuna sampler
    (its constraints_func) and by the Pareto front. `violation` is > 0 when the constraint is violated."""

    metric: str
    op: str  # ">=" or "<="
    bound: float

    MISSING = 1.0e9  # violation of a trial that never reported the metric

    def violation(self, value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return self.MISSING
        return float(self.bound - value) if self.op == ">=" else float(value - self.bound)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


def parse_constraints(raw: Any, source: str) -> tuple[Constraint, ...]:
    """`{model/fps: ">= 30", model/gflops: "<= 5"}` -> constraints (metric names checked against the registry)."""
    import re

    if raw in (None, {}):
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: constraints must be a mapping like {{model/fps: \">= 30\"}}, got {raw!r}")
    out = []
    for metric, spec in raw.items():
        name = check_metric(metric, f"{source}: constraints", per_run=True)
        m = re.fullmatch(r"\s*(>=|<=)\s*([-+0-9.eE]+)\s*", str(spec))
        try:
            bound = float(m.group(2)) if m else None
        except ValueError:
            bound = None
        if m is None or bound is None or bound != bound:
            raise ConfigError(f"{source}: constraints.{metric}: expected '>= NUMBER' or '<= NUMBER', got {spec!r}")
        out.append(Constraint(name, m.group(1), bound))
    return tuple(out)


@dataclass(frozen=True)
class ASHAConfig:
    grace_period: int = 100
    reduction_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ConfigError("scheduler.asha: grace_period must be >= 1 and reduction_factor > 1")


@dataclass(frozen=True)
class SchedulerConfig:
    asha: ASHAConfig | None = None


@dataclass(frozen=True)
class _SpaceFile:
    base: str
    params: dict = field(default_factory=dict)
    set: dict = field(default_factory=dict)
    objective: Any = None
    num_samples: int = 8
    max_concurrent_trials: int = 1
    seed: int | None = None
    scheduler: SchedulerConfig | None = None
    driver_cpus: float = 0.25
    constraints: dict | None = None
    baseline: bool = False


@dataclass(frozen=True)
class SearchSpace:
    path: str
    base_raw: dict  # base experiment with `set` applied, not yet sampled
    base: ExperimentConfig
    params: dict[str, Param]
    objectives: tuple[Objective, ...]
    num_samples: int
    max_concurrent_trials: int
    seed: int | None
    scheduler: SchedulerConfig | None
    driver_cpus: float
    constraints: tuple[Constraint, ...] = ()
    baseline: dict[str, Any] | None = None  # `baseline: true`: the base's value of each searched param

    @property
    def metric(self) -> str:
        return self.objectives[0].metric

    @property
    def mode(self) -> str:
        return self.objectives[0].mode

    def experiment(self, sample: dict[str, Any], source: str = "trial") -> ExperimentConfig:
        """The experiment of one sample: the same override path as `--set`."""
        from uda_ray.build import build_experiment  # the registries (torch): not for reading constraints

        return build_experiment(apply_overrides(self.base_raw, sample), source)


def _parse_param(key: str, spec: Any, source: str) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{source}: params.{key} must be one of {{{' | '.join(KINDS)}: ...}}, got {spec!r}")
    ((kind, vals),) = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"{source}: params.{key}: unknown kind '{kind}' (valid: {', '.join(KINDS)})")
    if kind == "choice":
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"{source}: params.{key}: choice needs a non-empty list")
        return Param(kind, tuple(vals))
    if not isinstance(vals, list) or len(vals) != 2 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals
    ):
        raise ConfigError(f"{source}: params.{key}: {kind} needs [low, high], got {vals!r}")
    lo, hi = vals
    if kind == "int" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ConfigError(f"{source}: params.{key}: int bounds must be integers, got {vals!r}")
    if not lo < hi:
        raise ConfigError(f"{source}: params.{key}: empty or inverted range [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{source}: params.{key}: loguniform needs low > 0, got {lo}")
    return Param(kind, (lo, hi))


EPOCH_LENGTH_KEYS = ("train.epochs", "train.batch_size", "train.num_workers")  # each changes epochs' steps


def check_grace(grace_period: int, max_steps: int, source: str) -> None:
    if grace_period > max_steps:
        raise ConfigError(f"{source}: scheduler.asha.grace_period exceeds train.max_steps ({max_steps})")


def load_space(path: str | Path, overrides: dict[str, Any] | None = None) -> SearchSpace:
    """Load and fully validate a search space: every corner of every param must give a valid experiment."""
    from uda_ray.build import build_experiment

    p = Path(path)
    raw = read_yaml(p)
    if "base" not in raw:
        raise ConfigError(f"{p}: missing required key 'base' (the experiment file every trial starts from)")
    sf = build(_SpaceFile, raw, str(p))
    base_path = p.parent / sf.base if not Path(sf.base).is_absolute() else Path(sf.base)
    if not base_path.is_file() and Path(sf.base).is_file():
        base_path = Path(sf.base)
    if not base_path.is_file():
        raise ConfigError(f"{p}: base experiment '{sf.base}' not found (looked at {base_path})")
    base_raw = apply_overrides(load_raw(base_path), {**sf.set, **(overrides or {})})
    base_raw.setdefault("name", base_path.stem)
    base = build_experiment(base_raw, str(base_path))

    # the objective defaults to the base's selection metric; every trial then ranks its checkpoints (kept
    # checkpoints, best step) by the (first) objective, so a trial's best value and its kept checkpoint agree
    objs = sf.objective if isinstance(sf.objective, list) else [sf.objective or {"metric": base.select}]
    objectives = tuple(build(Objective, o, str(p), "objective.") for o in objs)
    if not objectives:
        raise ConfigError(f"{p}: objective list is empty")
    base_raw = {**base_raw, "select": objectives[0].metric}
    base = build_experiment(base_raw, str(base_path))
    if sf.num_samples < 1:
        raise ConfigError(f"{p}: num_samples must be >= 1, got {sf.num_samples}")
    if sf.max_concurrent_trials < 1:
        raise ConfigError(f"{p}: max_concurrent_trials must be >= 1, got {sf.max_concurrent_trials}")
    if sf.driver_cpus <= 0:
        raise ConfigError(f"{p}: driver_cpus must be > 0 (Ray refuses zero)")
    # with train.epochs the length is known once the data are (uda_ray.driver.sweeps checks it then)
    if sf.scheduler and sf.scheduler.asha and base.train.epochs is None:
        check_grace(sf.scheduler.asha.grace_period, base.train.max_steps, str(p))
    params = {k: _parse_param(k, v, str(p)) for k, v in (sf.params or {}).items()}
    length = [k for k in params if k in EPOCH_LENGTH_KEYS] if base.train.epochs is not None else []
    if length:
        raise ConfigError(f"{p}: {length[0]} cannot be searched with train.epochs: it changes the run's length, "
                          "and ASHA needs one budget per sweep")
    space = SearchSpace(str(p), base_raw, base, params, objectives, sf.num_samples, sf.max_concurrent_trials,
                        sf.seed, sf.scheduler, sf.driver_cpus, parse_constraints(sf.constraints, str(p)),
                        baseline_point(base, params, str(p)) if sf.baseline else None)
    for key, prm in params.items():  # each corner, the others at their first corner
        for v in prm.corners():
            sample = {k: q.corners()[0] for k, q in params.items()}
            sample[key] = v
            space.experiment(sample, f"{p}: params.{key}={v!r}")
    return space



_NO_VALUE = object()


def _base_value(base: ExperimentConfig, key: str) -> Any:
    """The value of the dotted `key` in the built base experiment (its YAML, else the defaults), or _NO_VALUE."""
    v: Any = base
    for part in key.split("."):
        if isinstance(v, dict):
            v = v.get(part, _NO_VALUE)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = getattr(v, part, _NO_VALUE)
        else:
            return _NO_VALUE
        if v is _NO_VALUE:
            return v
    return list(v) if isinstance(v, tuple) else v


def _in_param(v: Any, prm: Param) -> bool:
    if prm.kind == "choice":  # True == 1 in Python: a bool matches only a bool
        return any(v == c and isinstance(v, bool) == isinstance(c, bool) for c in prm.values)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if prm.kind == "int" and v != int(v):
        return False
    return prm.values[0] <= v <= prm.values[1]


def baseline_point(base: ExperimentConfig, params: dict[str, Param], source: str) -> dict[str, Any]:
    """`baseline: true`: each searched parameter at the base experiment's own value, which must lie in its
    range or choices (ConfigError naming the parameter otherwise)."""
    out = {}
    for key, prm in params.items():
        v = _base_value(base, key)
        if v is _NO_VALUE or (v is None and not (prm.kind == "choice" and None in prm.values)):
            raise ConfigError(f"{source}: baseline: the base experiment has no value for params.{key}")
        if not _in_param(v, prm):
            raise ConfigError(f"{source}: baseline: the base's {key}={v!r} is outside params.{key} "
                              f"({prm.kind}: {list(prm.values)!r})")
        out[key] = v if prm.kind == "choice" else int(v) if prm.kind == "int" else float(v)
    return out
