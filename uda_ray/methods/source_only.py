"""Source only: supervised CE on labeled source frames, no adaptation (the lower bound)."""

from __future__ import annotations

from torch import Tensor

from uda_ray.methods.base import Method, UDABatch, seg_loss


class SourceOnly(Method):
    uses_target = False

    def train_step(self, batch: UDABatch, step: int) -> dict[str, Tensor]:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = seg_loss(self.model(batch.src_img), batch.src_lbl, self.aux_weights)
        self.backward(loss)
        self.step()
        return {"loss/seg_src": loss.detach()}
