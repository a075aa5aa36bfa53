"""Checks run on the driver before anything is written or any worker starts: each failure is one UserError
line naming the input (the CLI prints it, exit status 2).

Files and names (output files, run names), the model of an experiment (its builder's keyword arguments and
its pretrained weights, loaded the way the workers will load them), and the arguments of pipeline actions
(typed by the action's signature, through the strict config loader). The storage root is checked where it is
resolved (uda_ray.storage.layout.root).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import typing
from pathlib import Path
from typing import Any

from uda_ray.errors import ConfigError, UserError
from uda_ray.storage.layout import is_reference

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def output_file(path: str | os.PathLike, flag: str) -> Path:
    """A file to be written: its folder exists and it is not itself a folder."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p}: is a folder; give a file name")
    if not p.parent.is_dir():
        raise UserError(f"{flag} {p}: the folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {p}: the folder {p.parent} is not writable")
    return p


def run_name(name: str, flag: str = "--name") -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"{flag} '{name}': use letters, digits, '_', '.', '-' (it names a folder)")
    return name


# ------------------------------------------------------------------------------------------------
# models


def model_kwargs(name: str, kwargs: dict, source: str = "model") -> None:
    """`model.kwargs` against the builder's signature."""
    from uda_ray.models import MODELS

    params = inspect.signature(MODELS[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [k for k in params if k not in ("num_classes", "pretrained")]
    for k in kwargs:
        if k not in valid:
            raise ConfigError(f"{source}: model.kwargs.{k}: {name} takes no argument '{k}' "
                              f"(valid: {', '.join(valid) or 'none'})")


_checked: set[str] = set()


def model(cfg: Any, source: str = "model") -> None:
    """Build the model on the driver as a worker will (its kwargs, its pretrained file loaded and fitted), so a
    bad one is one line here, not a traceback in a Ray worker. `pretrained: imagenet` is not fetched here."""
    key = json.dumps([cfg.name, cfg.num_classes, cfg.pretrained, cfg.kwargs], sort_keys=True, default=str)
    if key in _checked:
        return
    model_kwargs(cfg.name, cfg.kwargs, source)
    pre = cfg.pretrained
    if isinstance(pre, str) and pre.startswith("@"):  # a pipeline stage's output: checked when it exists
        pre = None
    if pre not in (None, "imagenet"):
        p = Path(pre).expanduser()
        if not p.exists():
            raise UserError(f"{source}: model.pretrained: no such file {p}")
        if not p.is_file():
            raise UserError(f"{source}: model.pretrained: {p} is not a file")
    from uda_ray.models import MODELS

    try:
        MODELS[cfg.name](num_classes=cfg.num_classes, pretrained=None if pre == "imagenet" else pre, **cfg.kwargs)
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: model {cfg.name} with kwargs {cfg.kwargs}: {e}") from None
    _checked.add(key)


def experiment(cfg: Any, source: str) -> None:
    """Everything about one experiment the workers would otherwise find out: its model and `init_from`."""
    model(cfg.model, source)
    init = cfg.train.init_from
    if init and not init.startswith("@") and not is_reference(init) and not Path(init).exists():
        raise UserError(f"{source}: train.init_from: no such checkpoint {init}")


def space(sp: Any) -> None:
    """The base experiment and each searched model configuration of a search space."""
    experiment(sp.base, sp.path)
    for key, prm in sp.params.items():
        if key.startswith(("model.", "train.init_from")) or key == "model":
            for v in prm.corners():
                sample = {k: q.corners()[0] for k, q in sp.params.items()}
                sample[key] = v
                experiment(sp.experiment(sample, f"{sp.path}: params.{key}={v!r}"), f"{sp.path}: params.{key}={v!r}")


# ------------------------------------------------------------------------------------------------
# pipeline actions


def action_args(action: str, fn: Any, args: dict, source: str) -> dict:
    """The arguments of a pipeline action (all but `from`), typed by the action function's signature through
    the strict loader: an unknown name or a wrong type is one line naming the key. Returns them checked."""
    from uda_ray.config_loader import build

    hints = typing.get_type_hints(fn)
    fields = []
    for name, p in inspect.signature(fn).parameters.items():
        if name in ("checkpoints", "out") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        key = name  # `lambda` (a Python keyword) is written `lambda` in YAML and checked as `lambda_`
        default = p.default if p.default is not inspect.Parameter.empty else dataclasses.MISSING
        fields.append((key, hints.get(name, Any), dataclasses.field(default=default)))
    cls = dataclasses.make_dataclass(f"{action}_args", fields, frozen=True)
    given = {("lambda_" if k == "lambda" else k): v for k, v in args.items() if k != "from"}
    refs = {k: v for k, v in given.items() if isinstance(v, str) and v.startswith("@")}  # resolved at run time
    typed = build(cls, {k: v for k, v in given.items() if k not in refs}, source, prefix=f"{action}.")
    unknown = [k for k in refs if k not in {f.name for f in dataclasses.fields(cls)}]
    if unknown:
        raise ConfigError(f"{source}: unknown key '{action}.{unknown[0]}'")
    return {**dataclasses.asdict(typed), **refs}
