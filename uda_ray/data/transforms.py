"""Paired image/label transforms: resize, random crop, random flip, keeping image and label aligned.

A training transform is two parts: `prepare` (deterministic: decode result -> resized uint8 arrays, what a
decoded-once cache stores) and `augment` (random crop and flip from the item's rng, on uint8 arrays). With
`uint8=True` the tensors stay uint8 (image (3, H, W), label (H, W)) through the DataLoader, a quarter of the
bytes of float32; the loop converts them on the device (`UDABatch.to`), which gives the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from uda_ray.data.labels import IGNORE


def to_tensors(img: Image.Image | np.ndarray, lbl: np.ndarray, uint8: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL RGB or (H, W, 3) uint8 + (H, W) label -> (3, H, W) image in 0..255 (not normalized) + (H, W) label:
    float32 + int64, or uint8 + uint8 with `uint8=True`."""
    arr = np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else img
    x = torch.from_numpy(_owned(arr)).permute(2, 0, 1)
    y = torch.from_numpy(_owned(lbl))
    if uint8:
        return x.contiguous(), y.to(torch.uint8)
    return x.to(torch.float32).contiguous(), y.to(torch.int64)


def _owned(a: np.ndarray) -> np.ndarray:
    """A writable, contiguous array (a copy of read-only, memory-mapped or strided views)."""
    return a if a.flags.writeable and a.flags.c_contiguous and not isinstance(a, np.memmap) else np.array(a)


def resize_label(lbl: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) uint8 label to size (W, H)."""
    if (lbl.shape[1], lbl.shape[0]) == tuple(size):
        return lbl
    return np.asarray(Image.fromarray(lbl).resize(size, Image.Resampling.NEAREST))


RESIZE_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class PairTransform:
    """Resize (bilinear image / nearest label), random rescale, random crop, random h-flip; sizes are (W, H).

    All randomness comes from the `rng` passed to each call. `eval_mode=True` resizes the image only
    and keeps the label at full resolution (evaluation happens there); no crop, no flip.
    """

    def __init__(self, resize: tuple[int, int] | None = None, crop: tuple[int, int] | None = None,
                 hflip: bool = False, eval_mode: bool = False, random_width: tuple[int, int] | None = None,
                 uint8: bool = False):
        if eval_mode and (crop is not None or hflip or random_width is not None):
            raise ValueError("eval_mode takes no crop, no flip and no random rescale")
        self.resize, self.crop, self.hflip, self.eval_mode = resize, crop, hflip, eval_mode
        self.random_width = random_width
        self.uint8 = uint8
        self.filter = "bilinear"  # the image resize filter: "bilinear" | "bicubic" (data.resize_filter)

    def __call__(self, img: Image.Image, lbl: np.ndarray, rng: np.random.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.eval_mode:
            size = tuple(self.resize) if self.resize is not None else img.size
            if size != img.size:
                img = img.resize(size, RESIZE_FILTERS[self.filter])
            return to_tensors(img, lbl, self.uint8)
        if rng is None:
            raise ValueError("a training-mode PairTransform needs an rng")
        size = None
        if self.random_width is not None:
            # one resize to (w, w * H / W) of the resize target: the resize then RandomSized of CPSL / ProDA
            base = tuple(self.resize) if self.resize is not None else img.size
            w = int(rng.uniform(*self.random_width))
            size = (w, max(1, int(w * base[1] / base[0])))
        return self.augment(*self.prepare(img, lbl, size), rng)

    @property
    def cacheable(self) -> bool:
        """Whether `prepare` is deterministic (no random rescale), so that its output can be cached."""
        return not self.eval_mode and self.random_width is None

    def cache_key(self) -> str:
        """What `prepare` depends on besides the files (a decoded-once cache's key)."""
        return f"resize={tuple(self.resize) if self.resize else None}" + \
            (f",filter={self.filter}" if self.filter != "bilinear" else "")

    def prepare(self, img: Image.Image, lbl: np.ndarray, size: tuple[int, int] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """The deterministic part: (H, W, 3) uint8 image resized (bilinear) to `size` (default: `resize`),
        (H, W) uint8 label resized (nearest) to the image's size (which also fixes the odd label whose size
        differs from its image)."""
        size = size or (tuple(self.resize) if self.resize is not None else img.size)
        if size != img.size:
            img = img.resize(size, RESIZE_FILTERS[self.filter])
        return np.asarray(img.convert("RGB")), resize_label(np.asarray(lbl, dtype=np.uint8), img.size)

    def augment(self, img: np.ndarray, lbl: np.ndarray, rng: np.random.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The random part, on (H, W, 3) / (H, W) uint8 arrays (memory-mapped ones are only read where
        cropped): random crop, random flip, then tensors."""
        if self.crop is not None:
            img, lbl = _random_crop(img, lbl, self.crop, rng)
        if self.hflip and rng.random() < 0.5:
            img, lbl = img[:, ::-1], lbl[:, ::-1]
        return to_tensors(img, lbl, self.uint8)


def eval_transform(resize: tuple[int, int] | None = None) -> PairTransform:
    """The evaluation transform: image resized to `resize` (W, H), label kept at full resolution."""
    return PairTransform(resize, eval_mode=True)


def _random_crop(x: np.ndarray, y: np.ndarray, crop: tuple[int, int], rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Crop (W, H) of (H, W, 3) / (H, W) arrays at a random offset; pad bottom/right first (image 0, label
    IGNORE) if smaller."""
    cw, ch = crop
    h, w = y.shape
    if h < ch or w < cw:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        x = np.pad(x, ((0, ph), (0, pw), (0, 0)), constant_values=0)
        y = np.pad(y, ((0, ph), (0, pw)), constant_values=IGNORE)
        h, w = y.shape
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return x[top:top + ch, left:left + cw], y[top:top + ch, left:left + cw]
