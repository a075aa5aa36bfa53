"""From a config to objects: experiments validated against the method and model registries, models, methods.

config.py holds the plain dataclasses and the strict loader; this is the one place that knows the
registries (`METHODS`, `MODELS`), so neither the configs nor the methods import each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uda_ray import target_labels
from uda_ray.config import ExperimentConfig, ModelConfig
from uda_ray.config_loader import apply_overrides, build, load_raw
from uda_ray.errors import ConfigError, UserError
from uda_ray.methods import METHODS
from uda_ray.methods.base import Method
from uda_ray.models import MODELS
from uda_ray.training.checkpoint import load_state


def build_experiment(raw: dict, source: str = "<config>") -> ExperimentConfig:
    """Validate a raw experiment dict (base resolved, overrides applied): the strict loader, the method's own
    Config for `method_cfg`, the model name against MODELS."""
    raw = dict(raw)
    method = raw.get("method", "source_only")
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"{source}: unknown method '{method}' (valid: {', '.join(METHODS)})")
    mcfg = build(METHODS[method].Config, raw.pop("method_cfg", None) or {}, source, prefix="method_cfg.")
    cfg = build(ExperimentConfig, raw, source)
    if cfg.model.name not in MODELS:
        raise ConfigError(f"{source}: model.name: unknown model '{cfg.model.name}' (valid: {', '.join(MODELS)})")
    try:
        target_labels.check(cfg, METHODS[method])
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return dataclasses.replace(cfg, method_cfg=mcfg)


def experiment_raw(path: str | Path, overrides: dict[str, Any] | None = None) -> dict:
    """An experiment YAML (one `base:` level resolved) with dotted overrides, as a raw dict (not validated);
    its name defaults to the file's stem."""
    raw = apply_overrides(load_raw(path), overrides or {})
    if "name" not in raw:
        raw["name"] = Path(path).stem
    return raw


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """An experiment YAML (one `base:` level resolved) with dotted overrides, validated."""
    return build_experiment(experiment_raw(path, overrides), str(path))


def build_model(cfg: ModelConfig, normalize: str = "imagenet") -> nn.Module:
    """The segmenter of `cfg`, with the input normalization `normalize` (data.normalize)."""
    from uda_ray.models.resnet import set_input_normalization

    model = MODELS[cfg.name](num_classes=cfg.num_classes, pretrained=cfg.pretrained, **cfg.kwargs)
    return set_input_normalization(model, normalize)


def build_method(cfg: ExperimentConfig, wrap: Callable | None, device: torch.device | str) -> Method:
    cls = METHODS[cfg.method]

    def segmenter() -> nn.Module:
        model = build_model(cfg.model, cfg.data.normalize)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            model.compile()  # in place: the module, its type and its state_dict keys stay the same
        return model

    return cls(segmenter(), cfg.method_cfg, cfg.optim, num_classes=cfg.model.num_classes,
               wrap=wrap, device=device, model_factory=segmenter, amp=cfg.train.amp)


def checkpoint_experiment(checkpoint: str | Path) -> tuple[ExperimentConfig, dict]:
    """The experiment a checkpoint was trained with, and its state (loaded safely: weights_only)."""
    state = load_state(checkpoint)
    return build_experiment(state["config"], str(checkpoint)), state


def load_trained(checkpoint: str | Path, device: str = "cpu", weights: str = "model"
                 ) -> tuple[ExperimentConfig, nn.Module]:
    """The experiment of a checkpoint and its segmenter (eval mode) with the trained weights: "model" the
    student, "teacher" the method's teacher (EMA teacher of CPSL / MPL) when it has one."""
    cfg, state = checkpoint_experiment(checkpoint)
    if weights not in ("model", "teacher"):
        raise UserError(f"weights: 'model' or 'teacher', got {weights!r}")
    if weights not in state["method"]:
        raise UserError(f"{checkpoint}: the {cfg.method} checkpoint has no '{weights}' weights")
    model = build_model(cfg.model, cfg.data.normalize)
    model.load_state_dict(state["method"][weights])
    return cfg, model.to(device).eval()
