"""Output-space adversarial adaptation: AdaptSegNet (Tsai et al., "Learning to Adapt Structured Output
Space for Semantic Segmentation", CVPR 2018).

Segmenter: CE on source + lambda_adv * BCE(D(softmax(target logits)), source); D: BCE on the detached
source (0) and target (1) softmaxes, each half-weighted. Multi-level: a second discriminator on the first
aux output. The helpers here (`backward_target_then_source`, `output_levels`, ...) are shared with
ADVENT (advent.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.config import OptimConfig
from uda_ray.errors import ConfigError
from uda_ray.losses import bce_domain
from uda_ray.methods.base import Method, UDABatch, build_optimizer, seg_loss, sync_grads, unwrap, upsample
from uda_ray.models.discriminators import DISCRIMINATORS

SOURCE, TARGET = 0.0, 1.0  # domain labels, as in AdaptSegNet / ADVENT
D_MIN_SIDE = 32  # five 4x4 stride-2 convs need >= 32 px per side (real inputs are >= 512: unaffected)


def _d_optim_default() -> OptimConfig:
    return OptimConfig(name="adam", lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, momentum=0.9)


def check_weight(name: str, value: float | None) -> None:
    """Loss weights must be finite and >= 0 (None allowed where the field is optional)."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"method_cfg.{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class AdversarialConfig:
    discriminator: str = "fc"  # "fc" (AdaptSegNet) | "dsc" (depthwise-separable, ~14.5x fewer params)
    lambda_adv: float = 1e-3  # adversarial weight on the main output
    lambda_adv_aux: float = 2e-4  # ... on the first aux output (multi_level only)
    lambda_seg_aux: float | None = None  # source CE weight of every aux head; None = the model's aux_weights
    multi_level: bool = False  # second discriminator on the first aux output (BiSeNet: the 1/16 head)
    d_optim: OptimConfig = field(default_factory=_d_optim_default)  # Adam 1e-4, betas (0.9, 0.99)

    def __post_init__(self) -> None:
        if self.discriminator not in DISCRIMINATORS:
            raise ConfigError(f"method_cfg.discriminator: unknown '{self.discriminator}' "
                              f"(valid: {', '.join(DISCRIMINATORS)})")
        for name in ("lambda_adv", "lambda_adv_aux", "lambda_seg_aux"):
            check_weight(name, getattr(self, name))
        if not isinstance(self.d_optim, OptimConfig):
            raise ConfigError(f"method_cfg.d_optim must be an optimizer config, got {self.d_optim!r}")


# -- helpers shared with ADVENT ---------------------------------------------------------------


def resolve_aux_weights(lambda_seg_aux: float | None,
                        model_aux_weights: tuple[float, ...]) -> tuple[float, ...]:
    """Source CE weights of the aux heads: the model's own, or `lambda_seg_aux` for every head it has."""
    if lambda_seg_aux is None:
        return tuple(model_aux_weights)
    return tuple(lambda_seg_aux for _ in model_aux_weights)


def check_multi_level(multi_level: bool, model_aux_weights: tuple[float, ...]) -> None:
    if multi_level and not model_aux_weights:
        raise ConfigError("method_cfg.multi_level needs a model with aux outputs (this one has none)")


def output_levels(out: dict[str, Any], multi_level: bool) -> list[Tensor]:
    """The logits the adaptation loss sees: [main] or [main, first aux], each (B, C, h, w)."""
    return [out["out"], out["aux"][0]] if multi_level else [out["out"]]


def d_input_size(size: tuple[int, ...]) -> tuple[int, int]:
    """The (H, W) a discriminator sees: the input size, scaled up (aspect kept) to >= D_MIN_SIDE per side."""
    h, w = int(size[0]), int(size[1])
    scale = max(1.0, D_MIN_SIDE / min(h, w))
    return math.ceil(h * scale), math.ceil(w * scale)


@contextlib.contextmanager
def frozen(modules: list[nn.Module]) -> Iterator[None]:
    """requires_grad off for the modules' params: passes through them build no graph to them (D gets no grads,
    and DDP's reducer on them is never involved)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def backward_target_then_source(model: nn.Module, batch: UDABatch, aux_weights: tuple[float, ...],
                                target_loss: Callable[[dict[str, Any]], Tensor]
                                ) -> tuple[dict[str, Any], dict[str, Any], Tensor]:
    """Accumulate the gradients of one segmenter step in two backward passes (one graph in memory at a
    time, as in AdaptSegNet / ADVENT): target_loss(model(tgt_img)) first inside no_sync, then the source CE.

    The order is swapped from the originals' (source, then target; the summed gradient is the same) for
    DDP: the synchronized pass must give every parameter a gradient, and the target loss may not touch the
    aux heads (single-level), which DDP without find_unused_parameters cannot finalize: their gradients would
    silently stay unreduced. The source CE touches them all.
    Returns (source outputs, target outputs, detached source CE).
    """
    with sync_grads(model, last=False):
        tgt_out = model(batch.tgt_img)
        target_loss(tgt_out).backward()
    src_out = model(batch.src_img)
    loss_src = seg_loss(src_out, batch.src_lbl, aux_weights)
    loss_src.backward()
    return src_out, tgt_out, loss_src.detach()


# -- the method -------------------------------------------------------------------------------


class Adversarial(Method):
    """AdaptSegNet output-space adversarial training (one or two discriminators)."""

    Config = AdversarialConfig

    def __init__(self, model: nn.Module, cfg: AdversarialConfig, optim: OptimConfig, **kwargs: Any) -> None:
        super().__init__(model, cfg, optim, **kwargs)
        check_multi_level(cfg.multi_level, self.aux_weights)
        self.seg_aux_weights = resolve_aux_weights(cfg.lambda_seg_aux, self.aux_weights)
        self.levels: tuple[str, ...] = ("main", "aux") if cfg.multi_level else ("main",)
        self.lambda_adv = {"main": cfg.lambda_adv, "aux": cfg.lambda_adv_aux}
        self.discs: dict[str, nn.Module] = {}  # wrapped (DDP under Ray Train)
        self.d_opts: dict[str, torch.optim.Optimizer] = {}
        for lvl in self.levels:
            d = DISCRIMINATORS[cfg.discriminator](self.num_classes).to(self.device)
            self.discs[lvl] = self.wrap(d)
            self.d_opts[lvl] = build_optimizer(d.parameters(), cfg.d_optim)
            self.optimizers.append(self.d_opts[lvl])  # the loop's poly schedule covers D too

    def d_input(self, probs: Tensor) -> Tensor:
        """What D sees, from (B, C, H, W) probabilities: AdaptSegNet the probabilities themselves."""
        return probs

    def _d_inputs(self, out: dict[str, Any], size: tuple[int, ...]) -> list[Tensor]:
        """Per level: d_input(softmax(logits upsampled to the input size)), each (B, C, H, W)."""
        hw = d_input_size(size)
        levels = output_levels(out, self.cfg.multi_level)  # each (B, C, h, w)
        return [self.d_input(F.softmax(upsample(lg, hw), dim=1)) for lg in levels]

    @staticmethod
    def _suffix(lvl: str) -> str:
        return "" if lvl == "main" else f"_{lvl}"

    def _segmenter_step(self, batch: UDABatch) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor]]:
        """Source CE + adversarial loss on target, segmenter optimizer step. D is used unwrapped and frozen.
        Returns (detached losses, detached source D inputs, detached target D inputs)."""
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        tgt_size = tuple(batch.tgt_img.shape[-2:])
        logs: dict[str, Tensor] = {}
        tgt_maps: list[Tensor] = []

        def adversarial_loss(tgt_out: dict[str, Any]) -> Tensor:
            loss = torch.zeros((), device=self.device)
            for lvl, m in zip(self.levels, self._d_inputs(tgt_out, tgt_size)):  # (B, C, H, W)
                adv = bce_domain(unwrap(self.discs[lvl])(m), SOURCE)  # fool D: target labeled as source
                loss = loss + self.lambda_adv[lvl] * adv
                logs[f"loss/adv{self._suffix(lvl)}"] = adv.detach()
                tgt_maps.append(m.detach())
            return loss

        with frozen([unwrap(d) for d in self.discs.values()]):
            src_out, _, loss_src = backward_target_then_source(self.model, batch, self.seg_aux_weights,
                                                               adversarial_loss)
        self.opt.step()
        with torch.no_grad():
            src_maps = self._d_inputs(src_out, tuple(batch.src_img.shape[-2:]))
        return {"loss/seg_src": loss_src, **logs}, src_maps, tgt_maps

    def _discriminator_step(self, src_maps: list[Tensor], tgt_maps: list[Tensor]) -> dict[str, Tensor]:
        """Each D: BCE(D(source), 0) / 2 + BCE(D(target), 1) / 2 on detached inputs, then its optimizer step.
        One forward of the (DDP-wrapped) D on the batch concatenation when the sizes match (D has no
        normalization layers, so this equals two forwards); otherwise two passes, the first in no_sync."""
        logs: dict[str, Tensor] = {}
        for lvl, src, tgt in zip(self.levels, src_maps, tgt_maps):
            d, opt = self.discs[lvl], self.d_opts[lvl]
            d.train()
            opt.zero_grad(set_to_none=True)
            if src.shape[1:] == tgt.shape[1:]:
                d_out = d(torch.cat([src, tgt]))  # (Bs + Bt, 1, H/32, W/32)
                loss_s, loss_t = bce_domain(d_out[: len(src)], SOURCE), bce_domain(d_out[len(src):], TARGET)
                (loss_s / 2 + loss_t / 2).backward()
            else:
                with sync_grads(d, last=False):
                    loss_s = bce_domain(d(src), SOURCE)
                    (loss_s / 2).backward()
                loss_t = bce_domain(d(tgt), TARGET)
                (loss_t / 2).backward()
            opt.step()
            sfx = self._suffix(lvl)
            logs[f"loss/d_src{sfx}"], logs[f"loss/d_tgt{sfx}"] = loss_s.detach(), loss_t.detach()
        return logs

    def train_step(self, batch: UDABatch, step: int) -> dict[str, Tensor]:
        """Logged: loss/seg_src (weighted source CE), loss/adv (unweighted BCE of the fooling term),
        loss/d_src and loss/d_tgt (unhalved D BCEs); `_aux` variants for the second level."""
        logs, src_maps, tgt_maps = self._segmenter_step(batch)
        logs.update(self._discriminator_step(src_maps, tgt_maps))
        return logs

    def stateful(self) -> dict[str, Any]:
        state = super().stateful()
        for lvl in self.levels:
            state[f"d_{lvl}"] = unwrap(self.discs[lvl])
            state[f"opt_d_{lvl}"] = self.d_opts[lvl]
        return state
