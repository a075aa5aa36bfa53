"""Self-training on class-wise thresholded pseudo-labels: BDL's SSL round (Li et al., "Bidirectional Learning
for Domain Adaptation of Semantic Segmentation", CVPR 2019) and FDA-MBT's (Yang & Soatto, CVPR 2020).

Source CE + lambda_tgt * target CE on the pseudo-labels (255 ignored) + optional lambda_ent * an entropy of the
target predictions (ADVENT's, or FDA's Charbonnier entropy, which FDA's self-training round SStrain.py keeps:
source CE + pseudo-label CE + entW * Charbonnier entropy of the pseudo-labelled target) + optional lambda_adv *
AdaptSegNet's adversarial term. The pseudo-labels come from
`uda_ray.pipelines.pseudo_labels.generate`; the loop loads their folder as the target labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.errors import ConfigError
from uda_ray.fda import fda_source_to_target
from uda_ray.losses import charbonnier_entropy, entropy_loss
from uda_ray.methods.base import Method, UDABatch, upsample
from uda_ray.methods.blocks import (
    OutputAdversary,
    adversarial_segmenter_step,
    check_discriminator,
    check_multi_level,
    check_weight,
    d_optim_default,
    pseudo_label_loss,
    resolve_aux_weights,
)
from uda_ray.training.optim import OptimConfig


@dataclass(frozen=True)
class SelfTrainingConfig:
    lambda_tgt: float = 1.0  # target CE on the pseudo-labels
    lambda_ent: float = 0.0  # entropy on target (off by default)
    entropy: str = "advent"  # "advent" (mean self-information) | "charbonnier" (FDA's, exponent eta)
    eta: float = 2.0  # Charbonnier exponent (FDA's ita)
    lambda_adv: float = 0.0  # > 0: AdaptSegNet's adversarial term and its discriminator(s); 0: none built
    lambda_adv_aux: float = 2e-4  # ... on the first aux output (multi_level only)
    discriminator: str = "fc"  # "fc" | "dsc", as in `adversarial`
    multi_level: bool = False  # second discriminator on the first aux output
    lambda_seg_aux: float | None = None  # CE weight of every aux head (source and target); None = the model's
    d_optim: OptimConfig = field(default_factory=d_optim_default)  # Adam 1e-4
    fda_beta: float = 0.0  # > 0: source CE on FDA-stylized source (FDA's self-training round, FDA-MBT)

    def __post_init__(self) -> None:
        for name in ("lambda_tgt", "lambda_ent", "lambda_adv", "lambda_adv_aux", "lambda_seg_aux"):
            check_weight(name, getattr(self, name))
        if self.entropy not in ("advent", "charbonnier"):
            raise ConfigError(f"method_cfg.entropy must be 'advent' or 'charbonnier', got '{self.entropy}'")
        if not self.eta > 0.0:
            raise ConfigError(f"method_cfg.eta must be > 0, got {self.eta}")
        if not 0.0 <= self.fda_beta < 0.5:
            raise ConfigError(f"method_cfg.fda_beta must be in [0, 0.5), got {self.fda_beta}")
        check_discriminator(self.discriminator)


class SelfTraining(Method):
    """Source CE + target CE on pseudo-labels (+ entropy, + adversarial with lambda_adv > 0)."""

    Config = SelfTrainingConfig
    uses_target_labels = True

    def __init__(self, model: nn.Module, cfg: SelfTrainingConfig, optim: OptimConfig, **kwargs: Any) -> None:
        super().__init__(model, cfg, optim, **kwargs)
        check_multi_level(cfg.multi_level, self.aux_weights)
        self.seg_aux_weights = resolve_aux_weights(cfg.lambda_seg_aux, self.aux_weights)
        self.adversary: OutputAdversary | None = None  # no adversarial term: no discriminator to build or train
        if cfg.lambda_adv > 0:
            self.adversary = OutputAdversary(cfg.discriminator, self.num_classes, multi_level=cfg.multi_level,
                                             lambda_adv=cfg.lambda_adv, lambda_adv_aux=cfg.lambda_adv_aux,
                                             d_optim=cfg.d_optim, wrap=self.wrap, device=self.device,
                                             scaling=self.scaling)
            self.optimizers.extend(self.adversary.optimizers)
        self.discs = self.adversary.discs if self.adversary else {}

    def _target_terms(self, batch: UDABatch) -> Callable[[dict[str, Any], dict[str, Tensor]], Tensor]:
        """lambda_tgt * pseudo-label CE (+ lambda_ent * entropy) of the target outputs."""
        cfg, size = self.cfg, tuple(batch.tgt_img.shape[-2:])

        def terms(tgt_out: dict[str, Any], logs: dict[str, Tensor]) -> Tensor:
            ce = pseudo_label_loss(tgt_out, batch.tgt_lbl, self.seg_aux_weights)
            logs["loss/seg_tgt"] = ce.detach()
            loss = cfg.lambda_tgt * ce
            if cfg.lambda_ent > 0 and cfg.entropy == "charbonnier":
                # at the native resolution, as FDA computes it before upsampling
                ent = charbonnier_entropy(F.softmax(tgt_out["out"], dim=1), cfg.eta)
                logs["loss/ent"] = ent.detach()
                loss = loss + cfg.lambda_ent * ent
            elif cfg.lambda_ent > 0:
                ent = entropy_loss(F.softmax(upsample(tgt_out["out"], size), dim=1))  # in [0, 1]
                logs["loss/ent"] = ent.detach()
                loss = loss + cfg.lambda_ent * ent
            return loss

        return terms

    def train_step(self, batch: UDABatch, step: int) -> dict[str, Tensor]:
        """Logged: loss/seg_src, loss/seg_tgt (unweighted pseudo-label CE), loss/ent (if on); with the
        adversarial term also loss/adv, loss/d_src, loss/d_tgt as in `adversarial`."""
        if batch.tgt_lbl is None:
            raise ValueError("self_training needs pseudo-labels as target labels (data.target_label_root)")
        if self.cfg.fda_beta > 0:  # FDA (Yang & Soatto 2020): the source restyled with the target's amplitude
            batch = dataclasses.replace(batch, src_img=fda_source_to_target(batch.src_img, batch.tgt_img,
                                                                            self.cfg.fda_beta))
        logs, src_maps, tgt_maps = adversarial_segmenter_step(self, batch, self.seg_aux_weights, self.adversary,
                                                              self._target_terms(batch))
        if self.adversary is not None:
            logs.update(self.adversary.train_discriminators(src_maps, tgt_maps))
        return logs

    def stateful(self) -> dict[str, Any]:
        return {**super().stateful(), **(self.adversary.stateful() if self.adversary else {})}
