"""Paired image/label transforms: resize, random crop, random flip, keeping image and label aligned."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from uda_ray.data.labels import IGNORE


def to_tensors(img: Image.Image, lbl: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL RGB + (H, W) uint8 -> float32 (3, H, W) in 0..255 (not normalized) + int64 (H, W)."""
    x = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1).contiguous()
    return x, torch.from_numpy(np.ascontiguousarray(lbl).astype(np.int64))


def resize_label(lbl: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) uint8 label to size (W, H)."""
    if (lbl.shape[1], lbl.shape[0]) == tuple(size):
        return lbl
    return np.asarray(Image.fromarray(lbl).resize(size, Image.Resampling.NEAREST))


class PairTransform:
    """Resize (bilinear image / nearest label), random rescale, random crop, random h-flip; sizes are (W, H).

    All randomness comes from the `rng` passed to each call. `eval_mode=True` resizes the image only
    and keeps the label at full resolution (evaluation happens there); no crop, no flip.
    """

    def __init__(self, resize: tuple[int, int] | None = None, crop: tuple[int, int] | None = None,
                 hflip: bool = False, eval_mode: bool = False, random_width: tuple[int, int] | None = None):
        if eval_mode and (crop is not None or hflip or random_width is not None):
            raise ValueError("eval_mode takes no crop, no flip and no random rescale")
        self.resize, self.crop, self.hflip, self.eval_mode = resize, crop, hflip, eval_mode
        self.random_width = random_width

    def __call__(self, img: Image.Image, lbl: np.ndarray, rng: np.random.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.eval_mode and rng is None:
            raise ValueError("a training-mode PairTransform needs an rng")
        size = tuple(self.resize) if self.resize is not None else img.size
        if self.random_width is not None and not self.eval_mode:
            # one resize to (w, w * H / W) of the resize target: the resize then RandomSized of CPSL / ProDA
            w = int(rng.uniform(*self.random_width))
            size = (w, max(1, int(w * size[1] / size[0])))
        if size != img.size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        if self.eval_mode:
            return to_tensors(img, lbl)
        lbl = resize_label(lbl, img.size)  # also fixes the odd label whose size differs from its image
        x, y = to_tensors(img, lbl)  # (3, H, W), (H, W)
        if self.crop is not None:
            x, y = _random_crop(x, y, self.crop, rng)
        if self.hflip and rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


def eval_transform(resize: tuple[int, int] | None = None) -> PairTransform:
    """The evaluation transform: image resized to `resize` (W, H), label kept at full resolution."""
    return PairTransform(resize, eval_mode=True)


def _random_crop(x: torch.Tensor, y: torch.Tensor, crop: tuple[int, int], rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop (W, H) at a random offset; pad bottom/right first (image 0, label IGNORE) if smaller."""
    cw, ch = crop
    h, w = y.shape
    if h < ch or w < cw:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=0.0)
        y = torch.nn.functional.pad(y, (0, pw, 0, ph), value=IGNORE)
        h, w = y.shape
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return x[:, top:top + ch, left:left + cw].contiguous(), y[top:top + ch, left:left + cw].contiguous()
