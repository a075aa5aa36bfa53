"""The per-step pieces of the training loop, device-friendly: no host sync per step.

`train_step` is one step of the loop (learning rates, the batch copied and converted on the device, the
method's step under the configured mixed precision); `LossLog` keeps each step's losses on the device and reads
them back once, when the loop logs (on a GPU, turning a loss into a Python float waits for the GPU: once per
step, it keeps the CPU from queueing the next step's work while the GPU runs). The values read back are the
per-step floats themselves (float64 copies of the losses, exact for float32, bfloat16 and float16), summed in
Python in step order: the logged averages are bit-identical to a per-step `float(loss)`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor

from uda_ray.methods.base import Method, UDABatch
from uda_ray.training.optim import set_lr

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLoss(FloatingPointError):
    """A loss became NaN or infinite; `step` is the first step where one did, `key` that loss."""

    def __init__(self, key: str, value: float, step: int, first: int, last: int) -> None:
        super().__init__(f"{key} became {value} at step {step} (found when reading steps {first}..{last} back "
                         "for logging; learning rate too high?)")
        self.key, self.value, self.step = key, value, step


class LossLog:
    """Each step's losses, kept on their device until `read()`."""

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._keys: list[list[str]] = []
        self._values: list[Tensor] = []  # one (n_losses,) float64 tensor per step

    def add(self, step: int, losses: dict[str, Any]) -> None:
        if not losses:
            return
        vals = [v.detach().reshape(()).to(torch.float64) if isinstance(v, Tensor)
                else torch.tensor(float(v), dtype=torch.float64) for v in losses.values()]
        dev = vals[0].device
        self._steps.append(step)
        self._keys.append(list(losses))
        self._values.append(torch.stack([v.to(dev) for v in vals]))

    def __len__(self) -> int:
        return len(self._steps)

    def per_step(self) -> list[tuple[int, dict[str, float]]]:
        """[(step, {loss: float})] since the last read, read back from the device in one copy; clears the log.
        Raises NonFiniteLoss naming the first step (and loss) that was not finite."""
        if not self._steps:
            return []
        sizes = [len(v) for v in self._values]
        flat = torch.cat([v.to(self._values[0].device) for v in self._values]).cpu().tolist()
        out, i = [], 0
        for step, keys, n in zip(self._steps, self._keys, sizes):
            out.append((step, dict(zip(keys, flat[i:i + n]))))
            i += n
        first, last = self._steps[0], self._steps[-1]
        self._steps, self._keys, self._values = [], [], []
        for step, vals in out:
            for k, v in vals.items():
                if not math.isfinite(v):
                    raise NonFiniteLoss(k, v, step, first, last)
        return out

    def averages(self) -> dict[str, float]:
        """{loss: mean over the steps that logged it} since the last read (sums in step order); clears the log."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for _, vals in self.per_step():
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        return {k: v / counts[k] for k, v in sums.items()}


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The mixed-precision context of a training step: none for "off"."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def train_step(method: Method, src: dict | None, tgt: dict | None, step: int, horizon: int,
               device: torch.device, amp: str = "off", held: dict | None = None) -> dict[str, Tensor]:
    """One step of the loop: poly learning rates, the batch onto the device (uint8 -> float32 there), the
    method's step (under autocast with `amp`). `held`: the held-out source items of methods with
    uses_held_out_source. Returns the method's detached losses, still on the device."""
    for opt in method.optimizers:
        set_lr(opt, step, horizon)
    batch = UDABatch(
        src_img=src["img"] if src else None, src_lbl=src["lbl"] if src else None,
        tgt_img=tgt["img"] if tgt else None,
        tgt_lbl=tgt["lbl"] if (tgt and type(method).uses_target_labels) else None,
        src_img_held=held["img"] if held else None, src_lbl_held=held["lbl"] if held else None,
    ).to(device)
    with autocast(amp, device):
        return method.train_step(batch, step)
