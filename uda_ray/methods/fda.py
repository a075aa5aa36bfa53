"""FDA (Yang & Soatto, "FDA: Fourier Domain Adaptation for Semantic Segmentation", CVPR 2020).

Source CE on source images stylized toward the target batch (low-frequency amplitude swap, `uda_ray.fda`) +
lambda_ent * Charbonnier entropy of the target predictions, from step `ent_start_step` on. FDA-MBT (three
betas, averaged softmaxes, pseudo-labels, a self-training round) is a pipeline of ordinary runs: three `fda`
runs, `uda_ray.pipelines.pseudo_labels.generate` over their models, then a `self_training` run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from uda_ray.errors import ConfigError
from uda_ray.fda import fda_source_to_target
from uda_ray.losses import charbonnier_entropy
from uda_ray.methods.base import Method, UDABatch, backward_first_then_last, seg_loss


@dataclass(frozen=True)
class FDAConfig:
    beta: float = 0.01  # window half-size floor(min(H, W) * beta); README default, ablations .01/.05/.09
    lambda_ent: float = 0.005  # Charbonnier entropy weight (the original's entW)
    eta: float = 2.0  # Charbonnier exponent (the original's ita)
    ent_start_step: int = 0  # entropy term from this step on (the original's switch2entropy)

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 0.5:
            raise ConfigError(f"method_cfg.beta must be in [0, 0.5), got {self.beta}")
        if not self.lambda_ent >= 0.0:
            raise ConfigError(f"method_cfg.lambda_ent must be >= 0, got {self.lambda_ent}")
        if not self.eta > 0.0:
            raise ConfigError(f"method_cfg.eta must be > 0, got {self.eta}")
        if self.ent_start_step < 0:
            raise ConfigError(f"method_cfg.ent_start_step must be >= 0, got {self.ent_start_step}")


class FDA(Method):
    """FDA single-beta training: CE on target-stylized source + Charbonnier entropy on target."""

    Config = FDAConfig

    def train_step(self, batch: UDABatch, step: int) -> dict[str, Tensor]:
        """Logged: loss/seg_src (CE on stylized source, aux included), loss/ent_tgt (unweighted Charbonnier
        entropy, only from ent_start_step on)."""
        cfg = self.cfg
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        src_in_tgt = fda_source_to_target(batch.src_img, batch.tgt_img, cfg.beta)  # (B, 3, H, W) in 0..255
        logs: dict[str, Tensor] = {}

        def source_loss() -> Tensor:
            loss = seg_loss(self.model(src_in_tgt), batch.src_lbl, self.aux_weights)
            logs["loss/seg_src"] = loss.detach()
            return loss

        if step >= cfg.ent_start_step and cfg.lambda_ent > 0:
            def target_loss() -> Tensor:
                # at the native (1/8) resolution, as the original computes it before upsampling
                probs = F.softmax(self.model(batch.tgt_img)["out"], dim=1)  # (B, C, h, w)
                ent = charbonnier_entropy(probs, cfg.eta)
                logs["loss/ent_tgt"] = ent.detach()
                return cfg.lambda_ent * ent

            backward_first_then_last(self.model, target_loss, source_loss, self.backward)
        else:
            self.backward(source_loss())
        self.step()
        return logs
