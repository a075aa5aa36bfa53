"""The strict config loader: YAML files (one level of `base:`), dotted overrides, and dict -> frozen dataclass.

One code path turns a YAML file plus overrides (`--set optim.lr=1e-3` or Tune's sampled values) into validated
frozen dataclasses (uda_ray.config holds them): unknown keys, wrong types and out-of-range values raise
ConfigError naming the key and the file. Only int -> float coercion is silent.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from uda_ray.errors import ConfigError

# --------------------------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (PyYAML's YAML 1.1 rule wants `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: malformed YAML{where}: {problem}") from None


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder, not a file")
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror or e})") from None
    data = parse_yaml(text, str(p))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------------------------
# dict -> dataclass, strictly


_SCALARS = {  # type hint -> (does a YAML value fit it, what the error says it must be)
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the type hint `tp`; build nested dataclasses. Only int -> float coerces."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), key, source)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return build(tp, value, source, prefix=key + ".")
    if tp is Any:
        return value
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        fits, what = _SCALARS[tp]
        if not fits(value):
            raise ConfigError(f"{source}: '{key}' must be {what}, got {value!r}")
        return float(value) if tp is float else value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _coerce_union(value: Any, args: tuple, key: str, source: str) -> Any:
    """The first member of a union (`X | None`, ...) that `value` fits; one line naming the key if none."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key, source)
        except ConfigError as e:
            errors.append(str(e))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    whats = [e.split(f"'{key}' must be ", 1)[1].rsplit(", got ", 1)[0] for e in errors if f"'{key}' must be " in e]
    if len(whats) == len(errors):  # "must be a number or one of 'x', got 'y'"
        raise ConfigError(f"{source}: '{key}' must be {' or '.join(whats)}, got {value!r}")
    raise ConfigError(f"{source}: '{key}' has the wrong type: {value!r}")


def build(cls: type, raw: dict, source: str = "<config>", prefix: str = "") -> Any:
    """Build dataclass `cls` from `raw`, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (valid keys: {', '.join(fields) or 'none'})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], prefix + name, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{prefix}{name}'")
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    try:
        object.__setattr__(obj, GIVEN, frozenset(kwargs))  # not a field: never saved, compared or flattened
    except AttributeError:  # a class with __slots__: no record (given_keys says None)
        pass
    return obj


GIVEN = "_given_keys"  # the attribute `build` leaves on what it builds: the keys the raw dict gave


def given_keys(cfg: Any) -> frozenset[str] | None:
    """The keys that were given (file, base, overrides) when the loader built `cfg`; None if it did not build
    it (a dataclass made in code, or by dataclasses.replace)."""
    return getattr(cfg, GIVEN, None)


def to_dict(cfg: Any) -> Any:
    """Dataclasses -> plain nested dicts/lists (tuples become lists: YAML- and JSON-friendly)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}. Lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for k, v in flat.items():
        set_dotted(out, k, v)
    return out


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override '{key}': empty key part")
    node = d
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Return a deep copy of `raw` with dotted `overrides` applied (CLI --set and Tune samples)."""
    out = copy.deepcopy(raw)
    for k, v in overrides.items():
        set_dotted(out, k, v)
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """['optim.lr=1e-3', 'method=adversarial'] -> {'optim.lr': 0.001, 'method': 'adversarial'}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_yaml(v, f"--set {k}") if v.strip() else None
    return out


def merge(base: dict, child: dict) -> dict:
    """Deep-merge `child` over `base` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


LENGTH_KEYS = ("max_steps", "epochs")  # train.*: the two ways to give a run's length


def _child_length_wins(parent: dict, child: dict) -> None:
    """A child that gives the run's length one way (train.max_steps or train.epochs) drops the other way from
    its base: inherited, it would be a second, disagreeing length (uda_ray.driver.prepare.resolve_epochs)."""
    ctrain, ptrain = child.get("train"), parent.get("train")
    if not (isinstance(ctrain, dict) and isinstance(ptrain, dict)):
        return
    for key, other in (LENGTH_KEYS, LENGTH_KEYS[::-1]):
        if key in ctrain and other not in ctrain:
            ptrain.pop(other, None)


def load_raw(path: str | Path) -> dict:
    """Read a YAML file, resolving at most one level of `base: other.yaml` (relative to the file)."""
    p = Path(path)
    raw = read_yaml(p)
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{p}: 'base' must be a file path")
        bp = (p.parent / base) if not Path(base).is_absolute() else Path(base)
        if not bp.is_file() and Path(base).is_file():
            bp = Path(base)  # also accept paths relative to the working directory
        parent = read_yaml(bp)
        if "base" in parent:
            raise ConfigError(f"{bp}: 'base' chains are not allowed (one level of inheritance at most)")
        if raw.get("method", parent.get("method")) != parent.get("method"):
            parent.pop("method_cfg", None)  # another method: the base's hyperparameters do not apply
        _child_length_wins(parent, raw)
        raw = merge(parent, raw)
    return raw
