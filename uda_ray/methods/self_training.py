"""Self-training on class-wise thresholded pseudo-labels: BDL's SSL round (Li et al., "Bidirectional Learning
for Domain Adaptation of Semantic Segmentation", CVPR 2019) and FDA-MBT's (Yang & Soatto, CVPR 2020).

Source CE + lambda_tgt * target CE on the pseudo-labels (255 ignored) + optional lambda_ent * an entropy of the
target predictions (ADVENT's, or FDA's Charbonnier entropy, which FDA's self-training round SStrain.py keeps:
source CE + pseudo-label CE + entW * Charbonnier entropy of the pseudo-labelled target) + optional lambda_adv *
AdaptSegNet's adversarial term (seed 000 self-trains with it). The pseudo-labels come from
`uda_ray.pseudo_labels.generate`; the loop loads their folder as the target labels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.config import OptimConfig
from uda_ray.data.labels import IGNORE
from uda_ray.errors import ConfigError
from uda_ray.fda import fda_source_to_target
from uda_ray.losses import bce_domain, charbonnier_entropy, entropy_loss
from uda_ray.methods.adversarial import (
    SOURCE,
    Adversarial,
    AdversarialConfig,
    backward_target_then_source,
    check_multi_level,
    check_weight,
    frozen,
    resolve_aux_weights,
)
from uda_ray.methods.base import Method, UDABatch, seg_loss, unwrap, upsample
from uda_ray.models.discriminators import DISCRIMINATORS


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
    d_optim: OptimConfig = field(default_factory=lambda: AdversarialConfig().d_optim)  # Adam 1e-4
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
        if self.discriminator not in DISCRIMINATORS:
            raise ConfigError(f"method_cfg.discriminator: unknown '{self.discriminator}' "
                              f"(valid: {', '.join(DISCRIMINATORS)})")


def pseudo_label_loss(out: dict[str, Any], lbl: Tensor, aux_weights: tuple[float, ...]) -> Tensor:
    """seg_loss on pseudo-labels (B, H, W); a zero that still reaches every head when all pixels are 255 (a
    crop can fall entirely below the thresholds; the plain mean would be NaN)."""
    if bool((lbl != IGNORE).any()):
        return seg_loss(out, lbl, aux_weights)
    heads = [out["out"], *(out.get("aux") or [])]
    return sum((lg.sum() * 0.0 for lg in heads), start=out["out"].new_zeros(()))


class SelfTraining(Adversarial):
    """Source CE + target CE on pseudo-labels (+ entropy, + adversarial with lambda_adv > 0)."""

    Config = SelfTrainingConfig
    uses_target_labels = True

    def __init__(self, model: nn.Module, cfg: SelfTrainingConfig, optim: OptimConfig, **kwargs: Any) -> None:
        if cfg.lambda_adv > 0:
            super().__init__(model, cfg, optim, **kwargs)  # Adversarial: discriminator(s), their optimizers
            return
        # no adversarial term: no discriminator to build, train or checkpoint
        Method.__init__(self, model, cfg, optim, **kwargs)
        check_multi_level(cfg.multi_level, self.aux_weights)
        self.seg_aux_weights = resolve_aux_weights(cfg.lambda_seg_aux, self.aux_weights)
        self.levels = ()
        self.lambda_adv = {"main": 0.0, "aux": 0.0}
        self.discs, self.d_opts = {}, {}

    def _segmenter_step(self, batch: UDABatch) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor]]:
        if batch.tgt_lbl is None:
            raise ValueError("self_training needs pseudo-labels as target labels (data.target_label_root)")
        cfg = self.cfg
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        size = tuple(batch.tgt_img.shape[-2:])
        logs: dict[str, Tensor] = {}
        tgt_maps: list[Tensor] = []

        def target_loss(tgt_out: dict[str, Any]) -> Tensor:
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
            for lvl, m in zip(self.levels, self._d_inputs(tgt_out, size)):  # (B, C, H, W) each
                adv = bce_domain(unwrap(self.discs[lvl])(m), SOURCE)  # fool D: target labeled as source
                logs[f"loss/adv{self._suffix(lvl)}"] = adv.detach()
                tgt_maps.append(m.detach())
                loss = loss + self.lambda_adv[lvl] * adv
            return loss

        with frozen([unwrap(d) for d in self.discs.values()]):
            src_out, _, loss_src = backward_target_then_source(self.model, batch, self.seg_aux_weights,
                                                               target_loss)
        self.opt.step()
        src_maps: list[Tensor] = []
        if self.levels:
            with torch.no_grad():
                src_maps = self._d_inputs(src_out, tuple(batch.src_img.shape[-2:]))
        return {"loss/seg_src": loss_src, **logs}, src_maps, tgt_maps

    def train_step(self, batch: UDABatch, step: int) -> dict[str, Tensor]:
        """Logged: loss/seg_src, loss/seg_tgt (unweighted pseudo-label CE), loss/ent (if on); with the
        adversarial term also loss/adv, loss/d_src, loss/d_tgt as in `adversarial`."""
        if self.cfg.fda_beta > 0:  # FDA (Yang & Soatto 2020): the source restyled with the target's amplitude
            batch = dataclasses.replace(batch, src_img=fda_source_to_target(batch.src_img, batch.tgt_img,
                                                                            self.cfg.fda_beta))
        logs, src_maps, tgt_maps = self._segmenter_step(batch)
        if self.levels:
            logs.update(self._discriminator_step(src_maps, tgt_maps))
        return logs
