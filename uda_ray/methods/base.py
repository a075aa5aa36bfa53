"""The method interface and the helpers every method shares.

A method owns its optimization step (forward/backward passes, optimizers, extra networks); the loop
owns data, LR schedule, evaluation, logging and checkpointing. Methods never import ray: `wrap` is
`ray.train.torch.prepare_model` inside Ray workers and the identity (plus `.to(device)`) in tests.
Every backward pass and optimizer step of a method goes through `Method.backward` / `Method.step` (or the
method's `scaling`): under `train.amp: fp16` they scale the loss and step through a GradScaler per optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.data.labels import IGNORE
from uda_ray.training.optim import OptimConfig, build_optimizer

Wrap = Callable[[nn.Module], nn.Module]


@dataclass
class UDABatch:
    """One step's data. Images are float (B, 3, H, W) RGB in 0..255 (models normalize); labels
    (B, H, W) int64 train ids with 255 = ignore. Absent parts are None."""

    src_img: Tensor | None = None
    src_lbl: Tensor | None = None
    tgt_img: Tensor | None = None
    tgt_lbl: Tensor | None = None  # oracle / pseudo-labels only
    # a second source batch, other images than src_img's (methods with uses_held_out_source: MPL's reward)
    src_img_held: Tensor | None = None
    src_lbl_held: Tensor | None = None

    def to(self, device: torch.device | str) -> UDABatch:
        """On `device`, images float32 and labels int64 there: uint8 batches (a quarter of the bytes) are
        copied first and converted on the device, with the same values as a conversion on the host."""
        def move(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True).to(dtype)

        return UDABatch(move(self.src_img, torch.float32), move(self.src_lbl, torch.int64),
                        move(self.tgt_img, torch.float32), move(self.tgt_lbl, torch.int64),
                        move(self.src_img_held, torch.float32), move(self.src_lbl_held, torch.int64))


@dataclass(frozen=True)
class NoConfig:
    """A method without hyperparameters of its own."""


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under a DDP wrapper."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def sync_grads(module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """For several backward passes per optimizer step under DDP: all but the last in `no_sync()`."""
    if not last and isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def _backward(loss: Tensor) -> None:
    loss.backward()


def backward_first_then_last(model: nn.Module, first: Callable[[], Tensor],
                             last: Callable[[], Tensor], backward: Callable[[Tensor], None] = _backward) -> None:
    """Accumulate the gradients of two losses, each from its own forward of `model`.

    `first()` runs forwards that may leave some parameters unused (e.g. a target loss on the main head
    only); `last()` runs a forward that touches every parameter (the source CE with its aux heads). On a plain
    module: one backward of the sum. Under DDP (default settings, no find_unused_parameters) several forwards
    before one backward are not allowed: two backward passes, the first with its forward inside no_sync, the
    last synchronized (its backward must reach every parameter for DDP to finalize the all-reduce).
    `backward`: how a loss is backpropagated (a method's `backward`: loss scaling under fp16).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with sync_grads(model, last=False):
            backward(first())
        backward(last())
    else:
        backward(first() + last())


def upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, h, w) -> (B, C, H, W), bilinear with align_corners=True as in AdaptSegNet / ADVENT."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def seg_loss(out: dict[str, Any], lbl: Tensor, aux_weights: tuple[float, ...]) -> Tensor:
    """CE(main) + sum_i w_i * CE(aux_i), logits upsampled to the label's (H, W); 255 ignored."""
    size = tuple(lbl.shape[-2:])
    loss = F.cross_entropy(upsample(out["out"], size), lbl, ignore_index=IGNORE)
    for w, aux in zip(aux_weights, out.get("aux") or []):
        loss = loss + w * F.cross_entropy(upsample(aux, size), lbl, ignore_index=IGNORE)
    return loss


class LossScaling:
    """fp16 loss scaling (`train.amp: fp16`): one `torch.amp.GradScaler` per optimizer, as PyTorch's AMP notes
    advise for several models, losses and optimizers stepped independently (a segmenter and a discriminator
    have gradients of very different sizes: one scaler backing off for the discriminator's overflow would
    shrink the segmenter's scale too). Each backward pass of an optimizer's loss is scaled by that optimizer's
    scaler; its step unscales the gradients, skips the update when one is inf/NaN, then updates the scale
    (halved after a skip, doubled after `growth_interval` clean steps). Disabled ("off", "bf16": bfloat16
    has float32's range, no scaling needed), `backward` and `step` are exactly `loss.backward()` and
    `opt.step()`.
    """

    def __init__(self, amp: str, device: torch.device) -> None:
        self.enabled = amp == "fp16"
        self.device_type = device.type
        self._scalers: dict[int, torch.amp.GradScaler] = {}  # by id(optimizer)

    def scaler(self, opt: torch.optim.Optimizer) -> torch.amp.GradScaler:
        """The optimizer's GradScaler (made on first use)."""
        if id(opt) not in self._scalers:
            self._scalers[id(opt)] = torch.amp.GradScaler(self.device_type)
        return self._scalers[id(opt)]

    def backward(self, loss: Tensor, opt: torch.optim.Optimizer) -> None:
        """Backpropagate `loss`, whose gradients `opt` will step on (scaled by its scaler under fp16)."""
        if self.enabled:
            self.scaler(opt).scale(loss).backward()
        else:
            loss.backward()

    def step(self, opt: torch.optim.Optimizer) -> None:
        """`opt.step()`; under fp16 on unscaled gradients, skipped when one is not finite, then the scale's
        update (one step per scaler per training step, so the update follows each step)."""
        if self.enabled:
            scaler = self.scaler(opt)
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    def step_applied(self, opt: torch.optim.Optimizer) -> bool:
        """`step(opt)`, returning whether the update was applied (False: skipped for inf/NaN gradients).
        Under fp16 this reads the scale back (a host sync): a skip, and only a skip, lowers it."""
        if not self.enabled:
            opt.step()
            return True
        scaler = self.scaler(opt)
        before = scaler.get_scale()
        self.step(opt)
        return scaler.get_scale() >= before


class Method:
    """Base class: one segmenter, one optimizer. Subclasses override `train_step` and extend the state."""

    Config: ClassVar[type] = NoConfig
    uses_source: ClassVar[bool] = True  # the loop loads source batches
    uses_target: ClassVar[bool] = True  # the loop loads target train images
    uses_target_labels: ClassVar[bool] = False  # oracle or pseudo-labels
    # what target labels it reads when given no pseudo-labels: "pseudo" = none, the run is refused
    # (uda_ray.target_labels); "ground_truth" only for the oracle, target_only
    default_target_labels: ClassVar[str] = "pseudo"
    uses_held_out_source: ClassVar[bool] = False  # the loop also loads src_img_held / src_lbl_held

    def __init__(self, model: nn.Module, cfg: Any, optim: OptimConfig, *, num_classes: int,
                 wrap: Wrap | None = None, device: torch.device | str = "cpu",
                 model_factory: Callable[[], nn.Module] | None = None, amp: str = "off") -> None:
        self.cfg = cfg
        self.optim_cfg = optim
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.wrap: Wrap = wrap or (lambda m: m.to(self.device))
        self.model_factory = model_factory
        self.model_raw = model.to(self.device)
        self.aux_weights: tuple[float, ...] = tuple(getattr(model, "aux_weights", ()))
        self.model = self.wrap(self.model_raw)
        groups = model.param_groups(optim.lr) if hasattr(model, "param_groups") else model.parameters()
        self.opt = build_optimizer(groups, optim)
        self.optimizers: list[torch.optim.Optimizer] = [self.opt]
        # the loop runs train_step under autocast; under fp16 every backward/step goes through the scalers
        self.scaling = LossScaling(amp, self.device)

    def backward(self, loss: Tensor, opt: torch.optim.Optimizer | None = None) -> None:
        """Backpropagate a loss of `opt`'s parameters (default: the segmenter's optimizer); every backward pass
        of a method goes through here or `self.scaling` (loss scaling under fp16)."""
        self.scaling.backward(loss, opt or self.opt)

    def step(self, opt: torch.optim.Optimizer | None = None) -> None:
        """`opt.step()` (default: the segmenter's optimizer), through its scaler under fp16."""
        self.scaling.step(opt or self.opt)

    # -- interface -------------------------------------------------------------------------
    def train_step(self, batch: UDABatch, step: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def eval_model(self) -> nn.Module:
        return self.model_raw

    def weights_loaded(self) -> None:
        """Called once the segmenter's weights were replaced after construction (`train.init_from` in a fresh
        run): a method that copied the segmenter into another model at construction copies it again."""

    def stateful(self) -> dict[str, Any]:
        """Everything with a state_dict that a checkpoint must hold. Subclasses extend."""
        return {"model": self.model_raw, "opt": self.opt}

    def _checkpointed(self) -> dict[str, Any]:
        """`stateful()`, and under fp16 the GradScaler of each of its optimizers ("grad_scaler/<its key>"):
        the scale and its growth tracker, plain floats and ints."""
        items = self.stateful()
        if self.scaling.enabled:
            items.update({f"grad_scaler/{k}": self.scaling.scaler(v) for k, v in list(items.items())
                          if isinstance(v, torch.optim.Optimizer)})
        return items

    def state_dict(self) -> dict:
        return {k: v.state_dict() for k, v in self._checkpointed().items()}

    def load_state_dict(self, state: dict) -> None:
        items = self._checkpointed()
        missing = set(items) - set(state)
        if missing:
            raise KeyError(f"checkpoint lacks {sorted(missing)}")
        for k, v in items.items():
            v.load_state_dict(state[k])
