"""Optimizers and the poly learning-rate schedule: the optimizer config, its factory, the schedule.

Shared by the methods (each builds its own optimizers) and the training loop (which applies the schedule to
all of them), so it depends on nothing else in the package but the error type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uda_ray.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where an optimizer is built: reading configs and tables needs no torch
    import torch

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    lr: float = 2.5e-2
    momentum: float = 0.9  # SGD / RMSprop
    weight_decay: float = 1.0e-4
    betas: tuple[float, float] = (0.9, 0.99)  # Adam / AdamW
    poly_power: float = 0.9  # lr = lr0 * (1 - step / horizon) ** poly_power
    # The poly schedule's horizon, separate from the run length: the originals decay over a longer horizon
    # and stop early (ADVENT: 250k / stop 120k; AdaptSegNet: 250k / 150k; FDA: 150k / 100k), so the lr is
    # still ~0.5x lr0 at their last step. None: the run's train.max_steps. In a method's own optimizer config
    # (e.g. method_cfg.d_optim) None means the segmenter's horizon.
    poly_horizon: int | None = None

    def __post_init__(self) -> None:
        _check(self.name in OPTIMIZERS, f"optimizer name '{self.name}' unknown (valid: {', '.join(OPTIMIZERS)})")
        _check(self.lr > 0, f"optimizer lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "optimizer weight_decay must be >= 0")
        _check(0 <= self.momentum < 1, "optimizer momentum must be in [0, 1)")
        _check(all(0 <= b < 1 for b in self.betas), "optimizer betas must be in [0, 1)")
        _check(self.poly_power >= 0, "optimizer poly_power must be >= 0")
        _check(self.poly_horizon is None or self.poly_horizon >= 1, "optimizer poly_horizon must be >= 1")


def build_optimizer(params: list[dict] | Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Optimizer from param groups (each may carry its own "lr"); records "initial_lr", "poly_power" and
    "poly_horizon" (None: the run's horizon, given to `set_lr`) for the poly schedule."""
    import torch

    groups = list(params)
    groups = [dict(g) for g in groups] if groups and isinstance(groups[0], dict) else [{"params": groups}]
    for g in groups:
        g.setdefault("lr", cfg.lr)
        g["initial_lr"] = g["lr"]
        g["poly_power"] = cfg.poly_power
        g["poly_horizon"] = cfg.poly_horizon
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name}")


def poly_factor(step: int, horizon: int, power: float) -> float:
    """lr multiplier (1 - step / horizon) ** power of the poly schedule."""
    return max(0.0, 1.0 - step / horizon) ** power


def set_lr(optimizer: torch.optim.Optimizer, step: int, horizon: int) -> None:
    """Poly schedule, each group with the power and horizon of the optimizer config it was built from;
    `horizon` (the run's: optim.poly_horizon, else train.max_steps) where that config left it None."""
    for g in optimizer.param_groups:
        h = g.get("poly_horizon") or horizon
        g["lr"] = g["initial_lr"] * poly_factor(step, h, g.get("poly_power", 0.9))
