"""Contrastive learning with pseudo-labels, model 2 of a two-model pipeline: CE on target-stylized source
(FDA, Yang & Soatto, CVPR 2020) + lambda_ent * ADVENT entropy on target (Vu et al., CVPR 2019) + lambda_con *
supervised contrastive loss (Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020) between the
pixels of a target image and of its twin stylized toward the source, positives = same pseudo-label.

Model 1 of the pipeline is `minent` (source CE + entropy); its pseudo-labels (`uda_ray.pipelines.pseudo_labels`) reach
this method as the target labels. Choices (ours, documented):
- embeddings: the model's "feat" output through a projection head owned by the method (two 1x1 convs,
  F -> min(F, 512) -> proj_dim, ReLU between: SupCon's MLP head, per pixel), L2-normalized; the head trains
  in the segmenter's optimizer at 10x lr, like the classifier it stands beside;
- pixels: `pixels_per_image` locations per image drawn with the method's seeded generator (state in the
  checkpoint), the same locations in both views, valid (non-255) labels first; labels downsampled (nearest) to
  the feature resolution;
- SupCon per image, symmetric (target anchors vs twin candidates and back), averaged over the images;
  temperature 0.07, lambda_con 0.1; anchors without a positive are skipped (`supcon_loss`);
- the target and its twin go through the network as one batch (one forward: the contrastive loss couples
  them, and DDP allows one forward per backward); BatchNorm, where not frozen, sees both;
- lambda_ent 1e-3: ADVENT's MinEnt weight; beta 0.01: FDA's default, used for both stylizations.
DDP: every worker draws the random numbers for the whole global batch and keeps its rank's slice, so the
generators stay in step and 2 workers sample exactly what 1 worker does on the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.data.labels import IGNORE
from uda_ray.errors import ConfigError
from uda_ray.fda import fda_source_to_target
from uda_ray.losses import entropy_loss, supcon_loss
from uda_ray.methods.base import Method, UDABatch, backward_first_then_last, seg_loss, upsample
from uda_ray.methods.blocks import GeneratorState, feature_channels, global_rand, projection_head
from uda_ray.training.optim import OptimConfig


@dataclass(frozen=True)
class ContrastiveConfig:
    beta: float = 0.01  # FDA window for source -> target (CE) and target -> source (the twin)
    lambda_ent: float = 1e-3  # ADVENT entropy on target
    lambda_con: float = 0.1  # supervised contrastive term
    temperature: float = 0.07  # SupCon temperature
    proj_dim: int = 128  # embedding size of the projection head
    pixels_per_image: int = 256  # sampled locations per image (in both views)
    seed: int = 0  # the pixel-sampling generator's seed

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 0.5:
            raise ConfigError(f"method_cfg.beta must be in [0, 0.5), got {self.beta}")
        for name in ("lambda_ent", "lambda_con"):
            if not getattr(self, name) >= 0.0:
                raise ConfigError(f"method_cfg.{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0.0:
            raise ConfigError(f"method_cfg.temperature must be > 0, got {self.temperature}")
        if self.proj_dim < 1 or self.pixels_per_image < 1:
            raise ConfigError("method_cfg.proj_dim and method_cfg.pixels_per_image must be >= 1")


class Contrastive(Method):
    """Model 2: FDA source CE + target entropy + pixel SupCon between a target image and its twin."""

    Config = ContrastiveConfig
    uses_target_labels = True

    def __init__(self, model: nn.Module, cfg: ContrastiveConfig, optim: OptimConfig, **kwargs: Any) -> None:
        super().__init__(model, cfg, optim, **kwargs)
        head = projection_head(feature_channels(self.model_raw, self.device), cfg.proj_dim)
        self.head_raw = head.to(self.device)
        self.head = self.wrap(self.head_raw)
        lr = 10 * optim.lr
        self.opt.add_param_group({"params": list(head.parameters()), "lr": lr, "initial_lr": lr})
        self.rng = GeneratorState(cfg.seed)

    def _sample(self, lbl: Tensor, k: int) -> Tensor:
        """(B, N) labels -> (B, k) pixel indices: random, valid (non-255) ones first."""
        b, n = lbl.shape
        scores = global_rand(self.rng.gen, b, n).to(lbl.device)  # the same draws as one worker's
        scores = scores - 2.0 * (lbl == IGNORE).float()  # (B, N): ignored pixels only if too few valid ones
        return scores.topk(min(k, n), dim=1).indices

    def contrastive_loss(self, feat: Tensor, lbl: Tensor) -> Tensor:
        """feat (2B, F, h, w): B target images then their twins; lbl (B, H, W) pseudo-labels."""
        b = lbl.shape[0]
        z = self.head(feat)  # (2B, D, h, w)
        h, w = z.shape[-2:]
        lbl_small = F.interpolate(lbl[:, None].float(), size=(h, w), mode="nearest")[:, 0].long().flatten(1)
        idx = self._sample(lbl_small, self.cfg.pixels_per_image)  # (B, K)
        z_tgt, z_twin = z[:b].flatten(2), z[b:].flatten(2)  # (B, D, N) each
        losses = []
        for i in range(b):
            fa, fb = z_tgt[i][:, idx[i]].t(), z_twin[i][:, idx[i]].t()  # (K, D) each, normalized in supcon
            la = lbl_small[i, idx[i]]  # (K,) the same labels in both views
            t = self.cfg.temperature
            losses.append(0.5 * (supcon_loss(fa, fb, la, la, t) + supcon_loss(fb, fa, la, la, t)))
        return torch.stack(losses).mean()

    def train_step(self, batch: UDABatch, step: int) -> dict[str, Tensor]:
        """Logged: loss/seg_src (CE on stylized source), loss/ent (if lambda_ent > 0), loss/con (if
        lambda_con > 0), all unweighted."""
        cfg = self.cfg
        self.model.train()
        self.head.train()
        self.opt.zero_grad(set_to_none=True)
        src_in_tgt = fda_source_to_target(batch.src_img, batch.tgt_img, cfg.beta)  # (B, 3, H, W)
        logs: dict[str, Tensor] = {}

        def source_loss() -> Tensor:
            loss = seg_loss(self.model(src_in_tgt), batch.src_lbl, self.aux_weights)
            logs["loss/seg_src"] = loss.detach()
            return loss

        if cfg.lambda_ent == 0 and cfg.lambda_con == 0:
            self.backward(source_loss())
            self.step()
            return logs
        if cfg.lambda_con > 0 and batch.tgt_lbl is None:
            raise ValueError("contrastive needs pseudo-labels as target labels (data.target_label_root)")

        def target_loss() -> Tensor:
            b, size = batch.tgt_img.shape[0], tuple(batch.tgt_img.shape[-2:])
            imgs = batch.tgt_img
            if cfg.lambda_con > 0:
                twin = fda_source_to_target(batch.tgt_img, batch.src_img, cfg.beta)  # target in source style
                imgs = torch.cat([batch.tgt_img, twin])  # (2B, 3, H, W)
            out = self.model(imgs)
            loss = out["out"].new_zeros(())
            if cfg.lambda_ent > 0:
                ent = entropy_loss(F.softmax(upsample(out["out"][:b], size), dim=1))  # in [0, 1]
                logs["loss/ent"] = ent.detach()
                loss = loss + cfg.lambda_ent * ent
            if cfg.lambda_con > 0:
                con = self.contrastive_loss(out["feat"], batch.tgt_lbl)
                logs["loss/con"] = con.detach()
                loss = loss + cfg.lambda_con * con
            return loss

        backward_first_then_last(self.model, target_loss, source_loss, self.backward)
        self.step()
        return logs

    def stateful(self) -> dict[str, Any]:
        return {**super().stateful(), "proj_head": self.head_raw, "rng": self.rng}
