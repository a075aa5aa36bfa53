"""Target only: supervised CE on labeled target frames — the oracle every UDA table reports as upper bound."""

from __future__ import annotations

from torch import Tensor

from uda_ray.methods.base import Method, UDABatch, seg_loss


class TargetOnly(Method):
    uses_source = False
    uses_target_labels = True
    default_target_labels = "ground_truth"  # the oracle: ground truth unless given pseudo-labels

    def train_step(self, batch: UDABatch, step: int) -> dict[str, Tensor]:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = seg_loss(self.model(batch.tgt_img), batch.tgt_lbl, self.aux_weights)
        self.backward(loss)
        self.step()
        return {"loss/seg_tgt": loss.detach()}
