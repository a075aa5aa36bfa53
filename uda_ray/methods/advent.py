"""ADVENT (Vu et al., "ADVENT: Adversarial Entropy Minimization for Domain Adaptation in Semantic
Segmentation", CVPR 2019): MinEnt (direct entropy minimization) and AdvEnt (adversarial on entropy maps).

The paper's best GTA5 -> Cityscapes number (45.5) is an ensemble (0.5 / 0.5 softmax average) of a MinEnt model
and an AdvEnt model trained separately, not one model trained with a joint MinEnt + AdvEnt loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.losses import entropy_loss, self_information
from uda_ray.methods.base import Method, UDABatch, upsample
from uda_ray.methods.blocks import (
    AdversarialConfig,
    OutputAdversarialMethod,
    backward_target_then_source,
    check_multi_level,
    check_weight,
    output_levels,
    resolve_aux_weights,
)
from uda_ray.training.optim import OptimConfig


@dataclass(frozen=True)
class MinEntConfig:
    lambda_ent: float = 1e-3  # entropy weight on the main output
    lambda_ent_aux: float = 2e-4  # ... on the first aux output (multi_level only)
    lambda_seg_aux: float | None = None  # source CE weight of every aux head; None = the model's aux_weights
    multi_level: bool = False  # also minimize the entropy of the first aux output

    def __post_init__(self) -> None:
        for name in ("lambda_ent", "lambda_ent_aux", "lambda_seg_aux"):
            check_weight(name, getattr(self, name))


class MinEnt(Method):
    """ADVENT MinEnt: source CE + lambda_ent * entropy_loss(softmax(target logits upsampled to the input))."""

    Config = MinEntConfig

    def __init__(self, model: nn.Module, cfg: MinEntConfig, optim: OptimConfig, **kwargs: Any) -> None:
        super().__init__(model, cfg, optim, **kwargs)
        check_multi_level(cfg.multi_level, self.aux_weights)
        self.seg_aux_weights = resolve_aux_weights(cfg.lambda_seg_aux, self.aux_weights)

    def train_step(self, batch: UDABatch, step: int) -> dict[str, Tensor]:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        size = tuple(batch.tgt_img.shape[-2:])
        weights = (self.cfg.lambda_ent, self.cfg.lambda_ent_aux)
        ents: list[Tensor] = []

        def ent_loss(tgt_out: dict[str, Any]) -> Tensor:
            for lg in output_levels(tgt_out, self.cfg.multi_level):  # (B, C, h, w)
                ents.append(entropy_loss(F.softmax(upsample(lg, size), dim=1)))  # scalar in [0, 1]
            return sum((w * e for w, e in zip(weights, ents)), start=ents[0].new_zeros(()))

        _, _, loss_src = backward_target_then_source(self.model, batch, self.seg_aux_weights, ent_loss,
                                                     self.backward)
        self.step()
        logs = {"loss/seg_src": loss_src, "loss/ent": ents[0].detach()}
        if self.cfg.multi_level:
            logs["loss/ent_aux"] = ents[1].detach()
        return logs


class AdvEnt(OutputAdversarialMethod):
    """ADVENT AdvEnt: AdaptSegNet's adversarial training, D seeing weighted self-information maps I(p)
    instead of p (same defaults: lambda_adv 1e-3 main / 2e-4 aux, D Adam 1e-4)."""

    Config = AdversarialConfig

    @staticmethod
    def d_input(probs: Tensor) -> Tensor:
        return self_information(probs)  # (B, C, H, W), summed over C in [0, 1]
