"""Building blocks shared by several methods (this file is not a method; no method imports another's file).

- output-space adversarial adaptation: the discriminator(s), their training step, the segmenter's fooling
  term (AdaptSegNet, Tsai et al. CVPR 2018; ADVENT, Vu et al. CVPR 2019), composed into the methods that
  use it (`OutputAdversary`);
- teachers: EMA update, frozen copies, an eval-mode context;
- pixel features: the projection head beside the classifier;
- randomness and DDP: a checkpointable generator, draws made for the global batch, reductions;
- the photometric strong view and the pseudo-label CE used by several self-training methods.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.data.labels import IGNORE
from uda_ray.errors import ConfigError
from uda_ray.losses import bce_domain
from uda_ray.methods.base import LossScaling, Method, UDABatch, seg_loss, sync_grads, unwrap, upsample
from uda_ray.models.discriminators import DISCRIMINATORS
from uda_ray.training.optim import OptimConfig, build_optimizer

# -- distributed helpers --------------------------------------------------------------------------


def is_distributed() -> bool:
    """Is a process group with more than one worker running?"""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_reduce_(t: Tensor) -> Tensor:
    if world_rank()[0] > 1:
        dist.all_reduce(t)
    return t


def all_gather_cat(t: Tensor) -> Tensor:
    """(B, ...) per worker -> (world * B, ...) in rank order, identical on every worker."""
    world = world_rank()[0]
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def global_rand(gen: torch.Generator, b: int, *shape: int) -> Tensor:
    """Uniform draws for the whole global batch (world * b, *shape); returns this worker's (b, *shape).
    Every worker draws the same numbers, so the generators stay in step and N workers sample exactly what one
    worker does on the same global batch."""
    world, rank = world_rank()
    return torch.rand(world * b, *shape, generator=gen)[rank * b:(rank + 1) * b]


class GeneratorState:
    """A torch.Generator with a state_dict (checkpointed like a module)."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Tensor]:
        return {"state": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.gen.set_state(state["state"])


# -- teachers and heads ---------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """The module in eval mode inside the block, its previous mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, rate: float) -> None:
    """teacher <- rate * teacher + (1 - rate) * student for parameters; buffers copied (as CPSL / ProDA)."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(rate).add_(ps.detach(), alpha=1.0 - rate)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        bt.copy_(bs)


def frozen_copy(m: nn.Module) -> nn.Module:
    """A deep copy without gradients, in eval mode (a teacher)."""
    return copy.deepcopy(m).requires_grad_(False).eval()


def feature_channels(model: nn.Module, device: torch.device) -> int:
    """F of the model's "feat" output, from one tiny eval-mode forward (the contract does not expose it)."""
    with eval_mode(model), torch.no_grad():
        f = model(torch.zeros(1, 3, 64, 64, device=device))["feat"].shape[1]
    return int(f)


def projection_head(in_dim: int, out_dim: int) -> nn.Module:
    """SupCon's MLP head per pixel: two 1x1 convs F -> min(F, 512) -> out_dim, ReLU between."""
    hidden = min(in_dim, 512)
    return nn.Sequential(nn.Conv2d(in_dim, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, out_dim, 1))


# -- self-training pieces -------------------------------------------------------------------------


def pseudo_label_loss(out: dict[str, Any], lbl: Tensor, aux_weights: tuple[float, ...]) -> Tensor:
    """seg_loss on pseudo-labels (B, H, W); a zero that still reaches every head when all pixels are 255 (a
    crop can fall entirely below the thresholds; the plain mean would be NaN)."""
    if bool((lbl != IGNORE).any()):
        return seg_loss(out, lbl, aux_weights)
    heads = [out["out"], *(out.get("aux") or [])]
    return sum((lg.sum() * 0.0 for lg in heads), start=out["out"].new_zeros(()))


def _gray(x: Tensor) -> Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]  # (B, 1, H, W)


def photometric(img: Tensor, r: Tensor, strength: float = 0.4) -> Tensor:
    """Strong view, photometric part of CPSL's RandAugmentMC (github.com/lslrh/CPSL): with p 0.5 colour jitter
    (brightness, contrast, saturation factors in [1 - s, 1 + s], s = --jitter 0.4), with p 0.5 Gaussian blur
    (sigma 1). img (B, 3, H, W) in 0..255; r (B, 5) uniform draws (flags, then the three factors)."""
    f = (1.0 - strength + 2.0 * strength * r[:, 2:5])[:, :, None, None, None]  # (B, 3, 1, 1, 1)
    x = img * f[:, 0]
    m = _gray(x).mean((1, 2, 3), keepdim=True)
    x = (x - m) * f[:, 1] + m
    g = _gray(x)
    x = ((x - g) * f[:, 2] + g).clamp(0.0, 255.0)
    x = torch.where((r[:, 0] < 0.5)[:, None, None, None], x, img)
    k = torch.exp(-torch.arange(-2.0, 3.0, device=img.device) ** 2 / 2.0)
    k = (k[:, None] * k[None, :] / k.sum() ** 2).expand(3, 1, 5, 5)  # (3, 1, 5, 5) normalized
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.to(x.dtype), groups=3)
    return torch.where((r[:, 1] < 0.5)[:, None, None, None], blurred, x)


# -- output-space adversarial adaptation ------------------------------------------------------------

SOURCE, TARGET = 0.0, 1.0  # domain labels, as in AdaptSegNet / ADVENT
D_MIN_SIDE = 32  # five 4x4 stride-2 convs need >= 32 px per side (real inputs are >= 512: unaffected)


def d_optim_default() -> OptimConfig:
    """AdaptSegNet's discriminator optimizer: Adam 1e-4, betas (0.9, 0.99)."""
    return OptimConfig(name="adam", lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, momentum=0.9)


def check_weight(name: str, value: float | None) -> None:
    """Loss weights must be finite and >= 0 (None allowed where the field is optional)."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"method_cfg.{name} must be a finite number >= 0, got {value}")


def check_discriminator(name: str) -> None:
    if name not in DISCRIMINATORS:
        raise ConfigError(f"method_cfg.discriminator: unknown '{name}' (valid: {', '.join(DISCRIMINATORS)})")


@dataclass(frozen=True)
class AdversarialConfig:
    """Hyperparameters of output-space adversarial training (AdaptSegNet; ADVENT's AdvEnt)."""

    discriminator: str = "fc"  # "fc" (AdaptSegNet) | "dsc" (depthwise-separable, ~14.5x fewer params)
    lambda_adv: float = 1e-3  # adversarial weight on the main output
    lambda_adv_aux: float = 2e-4  # ... on the first aux output (multi_level only)
    lambda_seg_aux: float | None = None  # source CE weight of every aux head; None = the model's aux_weights
    multi_level: bool = False  # second discriminator on the first aux output (BiSeNet: the 1/16 head)
    d_optim: OptimConfig = field(default_factory=d_optim_default)  # Adam 1e-4, betas (0.9, 0.99)

    def __post_init__(self) -> None:
        check_discriminator(self.discriminator)
        for name in ("lambda_adv", "lambda_adv_aux", "lambda_seg_aux"):
            check_weight(name, getattr(self, name))
        if not isinstance(self.d_optim, OptimConfig):
            raise ConfigError(f"method_cfg.d_optim must be an optimizer config, got {self.d_optim!r}")


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
                                target_loss: Callable[[dict[str, Any]], Tensor],
                                backward: Callable[[Tensor], None]) -> tuple[dict[str, Any], dict[str, Any], Tensor]:
    """Accumulate the gradients of one segmenter step in two backward passes (one graph in memory at a
    time, as in AdaptSegNet / ADVENT): target_loss(model(tgt_img)) first inside no_sync, then the source CE.

    The order is swapped from the originals' (source, then target; the summed gradient is the same) for
    DDP: the synchronized pass must give every parameter a gradient, and the target loss may not touch the
    aux heads (single-level), which DDP without find_unused_parameters cannot finalize: their gradients would
    silently stay unreduced. The source CE touches them all. `backward`: the method's (loss scaling under fp16).
    Returns (source outputs, target outputs, detached source CE).
    """
    with sync_grads(model, last=False):
        tgt_out = model(batch.tgt_img)
        backward(target_loss(tgt_out))
    src_out = model(batch.src_img)
    loss_src = seg_loss(src_out, batch.src_lbl, aux_weights)
    backward(loss_src)
    return src_out, tgt_out, loss_src.detach()


def _identity(probs: Tensor) -> Tensor:
    return probs


class OutputAdversary:
    """Output-space discriminator(s), one per level (main, and the first aux output with multi_level), with
    their optimizers: the segmenter's fooling term and the discriminators' own step.

    D sees `d_input(softmax(logits upsampled to the input size))`: the probabilities for AdaptSegNet, the
    self-information maps for ADVENT's AdvEnt. D: BCE on the detached source (0) and target (1) inputs, each
    half-weighted. `scaling`: the method's loss scaling (fp16: each discriminator's optimizer has its own
    GradScaler, so a discriminator's overflow skips only its own step).
    """

    def __init__(self, discriminator: str, num_classes: int, *, multi_level: bool, lambda_adv: float,
                 lambda_adv_aux: float, d_optim: OptimConfig, wrap: Callable[[nn.Module], nn.Module],
                 device: torch.device, d_input: Callable[[Tensor], Tensor] = _identity,
                 scaling: LossScaling | None = None) -> None:
        self.scaling = scaling or LossScaling("off", device)
        self.multi_level = multi_level
        self.levels: tuple[str, ...] = ("main", "aux") if multi_level else ("main",)
        self.lambda_adv = {"main": lambda_adv, "aux": lambda_adv_aux}
        self.d_input = d_input
        self.discs: dict[str, nn.Module] = {}  # wrapped (DDP under Ray Train)
        self.d_opts: dict[str, torch.optim.Optimizer] = {}
        for lvl in self.levels:
            d = DISCRIMINATORS[discriminator](num_classes).to(device)
            self.discs[lvl] = wrap(d)
            self.d_opts[lvl] = build_optimizer(d.parameters(), d_optim)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The discriminators' optimizers (the loop's poly schedule covers them too)."""
        return list(self.d_opts.values())

    @staticmethod
    def suffix(lvl: str) -> str:
        return "" if lvl == "main" else f"_{lvl}"

    def inputs(self, out: dict[str, Any], size: tuple[int, ...]) -> list[Tensor]:
        """Per level: d_input(softmax(logits upsampled to the input size)), each (B, C, H, W)."""
        hw = d_input_size(size)
        levels = output_levels(out, self.multi_level)  # each (B, C, h, w)
        return [self.d_input(F.softmax(upsample(lg, hw), dim=1)) for lg in levels]

    def frozen(self) -> contextlib.AbstractContextManager:
        """The discriminators without gradients (the segmenter's step)."""
        return frozen([unwrap(d) for d in self.discs.values()])

    def add_fooling_terms(self, loss: Tensor, tgt_out: dict[str, Any], size: tuple[int, ...],
                          logs: dict[str, Tensor], tgt_maps: list[Tensor]) -> Tensor:
        """loss + sum over levels of lambda_adv * BCE(D(target input), SOURCE): fool D into calling the target
        source. D is used unwrapped (and frozen by the caller); the detached inputs are appended to tgt_maps."""
        for lvl, m in zip(self.levels, self.inputs(tgt_out, size)):  # (B, C, H, W)
            adv = bce_domain(unwrap(self.discs[lvl])(m), SOURCE)
            logs[f"loss/adv{self.suffix(lvl)}"] = adv.detach()
            tgt_maps.append(m.detach())
            loss = loss + self.lambda_adv[lvl] * adv
        return loss

    def train_discriminators(self, src_maps: list[Tensor], tgt_maps: list[Tensor]) -> dict[str, Tensor]:
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
                self.scaling.backward(loss_s / 2 + loss_t / 2, opt)
            else:
                with sync_grads(d, last=False):
                    loss_s = bce_domain(d(src), SOURCE)
                    self.scaling.backward(loss_s / 2, opt)
                loss_t = bce_domain(d(tgt), TARGET)
                self.scaling.backward(loss_t / 2, opt)
            self.scaling.step(opt)
            sfx = self.suffix(lvl)
            logs[f"loss/d_src{sfx}"], logs[f"loss/d_tgt{sfx}"] = loss_s.detach(), loss_t.detach()
        return logs

    def stateful(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for lvl in self.levels:
            state[f"d_{lvl}"] = unwrap(self.discs[lvl])
            state[f"opt_d_{lvl}"] = self.d_opts[lvl]
        return state


def adversarial_segmenter_step(method: Method, batch: UDABatch, seg_aux_weights: tuple[float, ...],
                               adversary: OutputAdversary | None,
                               target_terms: Callable[[dict[str, Any], dict[str, Tensor]], Tensor] | None = None,
                               ) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor]]:
    """One segmenter step: target_terms(target outputs, logs) (if any) + the adversary's fooling terms on the
    target, then the source CE (`backward_target_then_source`), then the optimizer step; D frozen throughout.
    Returns (detached losses, detached source D inputs, detached target D inputs); no D inputs without an
    adversary."""
    method.model.train()
    method.opt.zero_grad(set_to_none=True)
    size = tuple(batch.tgt_img.shape[-2:])
    logs: dict[str, Tensor] = {}
    tgt_maps: list[Tensor] = []

    def target_loss(tgt_out: dict[str, Any]) -> Tensor:
        loss = target_terms(tgt_out, logs) if target_terms else torch.zeros((), device=method.device)
        if adversary is not None:
            loss = adversary.add_fooling_terms(loss, tgt_out, size, logs, tgt_maps)
        return loss

    with adversary.frozen() if adversary is not None else contextlib.nullcontext():
        src_out, _, loss_src = backward_target_then_source(method.model, batch, seg_aux_weights, target_loss,
                                                           method.backward)
    method.step()
    src_maps: list[Tensor] = []
    if adversary is not None:
        with torch.no_grad():
            src_maps = adversary.inputs(src_out, tuple(batch.src_img.shape[-2:]))
    return {"loss/seg_src": loss_src, **logs}, src_maps, tgt_maps


class OutputAdversarialMethod(Method):
    """Base of the methods that are AdaptSegNet's training with one choice of what D sees (`d_input`)."""

    Config = AdversarialConfig

    @staticmethod
    def d_input(probs: Tensor) -> Tensor:
        """What D sees, from (B, C, H, W) probabilities."""
        raise NotImplementedError

    def __init__(self, model: nn.Module, cfg: AdversarialConfig, optim: OptimConfig, **kwargs: Any) -> None:
        super().__init__(model, cfg, optim, **kwargs)
        check_multi_level(cfg.multi_level, self.aux_weights)
        self.seg_aux_weights = resolve_aux_weights(cfg.lambda_seg_aux, self.aux_weights)
        self.adversary = OutputAdversary(cfg.discriminator, self.num_classes, multi_level=cfg.multi_level,
                                         lambda_adv=cfg.lambda_adv, lambda_adv_aux=cfg.lambda_adv_aux,
                                         d_optim=cfg.d_optim, wrap=self.wrap, device=self.device,
                                         d_input=self.d_input, scaling=self.scaling)
        self.discs, self.d_opts = self.adversary.discs, self.adversary.d_opts
        self.optimizers.extend(self.adversary.optimizers)

    def _d_inputs(self, out: dict[str, Any], size: tuple[int, ...]) -> list[Tensor]:
        return self.adversary.inputs(out, size)

    def _segmenter_step(self, batch: UDABatch) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor]]:
        """Source CE + adversarial loss on target, segmenter optimizer step. D is used unwrapped and frozen.
        Returns (detached losses, detached source D inputs, detached target D inputs)."""
        return adversarial_segmenter_step(self, batch, self.seg_aux_weights, self.adversary)

    def _discriminator_step(self, src_maps: list[Tensor], tgt_maps: list[Tensor]) -> dict[str, Tensor]:
        return self.adversary.train_discriminators(src_maps, tgt_maps)

    def train_step(self, batch: UDABatch, step: int) -> dict[str, Tensor]:
        """Logged: loss/seg_src (weighted source CE), loss/adv (unweighted BCE of the fooling term),
        loss/d_src and loss/d_tgt (unhalved D BCEs); `_aux` variants for the second level."""
        logs, src_maps, tgt_maps = self._segmenter_step(batch)
        logs.update(self._discriminator_step(src_maps, tgt_maps))
        return logs

    def stateful(self) -> dict[str, Any]:
        return {**super().stateful(), **self.adversary.stateful()}
