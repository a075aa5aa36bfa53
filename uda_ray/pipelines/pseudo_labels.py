"""Class-wise confidence-thresholded pseudo-labels, as in BDL (Li et al., "Bidirectional Learning for Domain
Adaptation of Semantic Segmentation", CVPR 2019; percentile 0.5) and FDA-MBT (Yang & Soatto, CVPR 2020;
percentile 0.66, softmaxes of three models averaged).

Per class c: threshold_c = the `percentile` confidence of the pixels predicted as c over the whole target
train set, capped at `cap` (0.9); pixels below their class's threshold become 255 (ignored).

Percentile, as both originals compute it ("nearest rank"): sort the n confidences ascending and take index
round(n * percentile), round half to even (numpy's np.round, Python's round). The originals index out of range
when that rounds to n (e.g. n = 1, percentile 0.66); we clip the index to n - 1. Classes never predicted get
`cap` (the originals use 0; no pixel is ever compared against it).

A fixed `threshold` instead (CPSL's stages 2 and 3: confidence >= 0.95, `--threshold 0.95`) keeps exactly the
pixels whose confidence reaches it, in every class: a percentile-1.0 threshold capped at 0.95 would keep each
class's most confident pixel even below 0.95.

`threshold: image_median` (Montressori, Rosini & Vanderputten's real-time DA project,
github.com/micolrosini/Real-Time-Domain-Adaptation-in-Image-Segmentation, createpseudolabels.py): thresholds
per IMAGE and per class predicted in it. Its loop computes, for each image (batch 1) and each class c, the
median (torch.median: the lower middle value) of the max-softmax confidences of the pixels of THAT image
predicted as c, caps it at 0.9 (`cap`), and sets pixels below their class's threshold to 255. So it is per
class within the image, not one median of the whole image's confidences. Its code appends a 0 AND the median
of an empty tensor for a class absent from the image, which shifts every later class's threshold by one
position (a bug); the rule it states, done here, gives an absent class no threshold at all (no pixel of the
image is compared against it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from uda_ray.build import load_trained
from uda_ray.data.datasets import DATASETS
from uda_ray.data.datasets import pseudo_label_relpath as label_path
from uda_ray.data.labels import IGNORE
from uda_ray.data.loading import input_transform, target_dataset
from uda_ray.data.transforms import eval_transform
from uda_ray.fda import fda_source_to_target
from uda_ray.methods.base import upsample

log = logging.getLogger(__name__)



def _check(percentile: float, cap: float) -> None:
    if not 0.0 <= percentile <= 1.0:
        raise ValueError(f"percentile must be in [0, 1], got {percentile}")
    if not 0.0 < cap <= 1.0:
        raise ValueError(f"cap must be in (0, 1], got {cap}")


def _nearest_rank(below_cap: Tensor, n: int, percentile: float, cap: float) -> float:
    """The percentile of n confidences of which only those < cap are given (the rest sort after them)."""
    if n == 0:
        return cap
    k = min(round(n * percentile), n - 1)  # 0-based rank in ascending order
    if k >= below_cap.numel():
        return cap  # the k-th value is >= cap: capped
    return float(torch.kthvalue(below_cap.float().cpu(), k + 1).values)


def class_thresholds(probs_max: Tensor, preds: Tensor, num_classes: int, percentile: float = 0.5,
                     cap: float = 0.9) -> Tensor:
    """Per-class thresholds (C,) float32 from confidences probs_max (N,) of pixels predicted preds (N,)."""
    _check(percentile, cap)
    conf, pred = probs_max.flatten(), preds.flatten()
    out = torch.full((num_classes,), cap, dtype=torch.float32)
    for c in range(num_classes):
        x = conf[pred == c]  # (n_c,)
        out[c] = _nearest_rank(x[x < cap], x.numel(), percentile, cap)
    return out


IMAGE_MEDIAN = "image_median"  # the per-image rule's name (data.pseudo_threshold, the action's `threshold`)


def image_median_thresholds(conf: Tensor, pred: Tensor, num_classes: int, cap: float = 0.9) -> Tensor:
    """Seed 000's per-image thresholds (C,) float32: for each class predicted in the image, the median (lower
    middle value, as torch.median) of its pixels' confidences conf (H, W), capped at `cap`; `cap` for the
    classes not predicted (no pixel is compared against them)."""
    conf, pred = conf.flatten().float(), pred.flatten()
    out = torch.full((num_classes,), cap, dtype=torch.float32)
    for c in pred.unique().tolist():
        out[c] = min(float(conf[pred == c].median()), cap)
    return out


def mask_below(conf: Tensor, pred: Tensor, thresholds: Tensor) -> Tensor:
    """Labels (same shape as pred, int64): pred where conf >= threshold[pred], else 255."""
    thr = thresholds.to(conf.device, conf.dtype)[pred]  # (...,) the threshold of each pixel's class
    return torch.where(conf < thr, torch.full_like(pred, IGNORE), pred).long()


def apply_thresholds(probs: Tensor, thresholds: Tensor) -> Tensor:
    """probs (B, C, H, W) -> pseudo-labels (B, H, W) int64: argmax, 255 where max prob < its class's
    threshold."""
    conf, pred = probs.max(dim=1)  # (B, H, W) each
    return mask_below(conf, pred, thresholds)


@torch.no_grad()
def ensemble_probs(models: list[nn.Module], img: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Mean softmax (B, C, h, w) of the models' main logits on img (B, 3, H, W) in 0..255, as FDA-MBT.

    With `size`, the mean probabilities are upsampled bilinearly (align_corners=True) to it, as BDL and FDA do
    (they upsample softmaxes, not logits). Models are used in whatever mode they are in (generate sets eval).
    """
    probs = torch.stack([F.softmax(m(img)["out"].float(), dim=1) for m in models]).mean(0)  # (B, C, h, w)
    return upsample(probs, size) if size is not None else probs


class FlipAveraged(nn.Module):
    """A segmenter whose prediction is the mean softmax of the image and of its mirror image (mirrored back),
    as CPSL's pseudo-labels (`generate_pseudo_label.py --flip`). "out" holds the log of that mean, so the
    softmax `ensemble_probs` takes gives the mean back."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> dict[str, Any]:
        p = F.softmax(self.model(x)["out"].float(), dim=1)  # (B, C, h, w)
        q = F.softmax(self.model(x.flip(-1))["out"].float(), dim=1).flip(-1)
        return {"out": torch.log((p + q) / 2), "aux": []}


def _predictions(models: list[nn.Module], dataset: Dataset, device: torch.device, num_workers: int):
    """Yield (name, conf (H, W) float32, pred (H, W) int64, C) per item at its label resolution, on device."""
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers)
    for i, item in enumerate(loader):
        img = torch.as_tensor(item["img"]).float().to(device)[None]  # (1, 3, H, W)
        lbl = item.get("lbl")
        size = tuple(lbl.shape[-2:]) if lbl is not None else tuple(img.shape[-2:])
        probs = ensemble_probs(models, img, size)[0]  # (C, H, W)
        conf, pred = probs.max(dim=0)  # (H, W) each
        if (i + 1) % 100 == 0:
            log.info("pseudo-labels: %d / %d images", i + 1, len(dataset))
        yield item["name"], conf, pred, probs.shape[0]


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished tmp folder to out_dir, replacing an older one (never seen half-written)."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def generate(models: list[nn.Module], dataset: Dataset, out_dir: str | Path, percentile: float = 0.5,
             cap: float = 0.9, device: torch.device | str = "cpu", source_desc: dict | None = None,
             num_workers: int = 0, threshold: float | str | None = None) -> dict[str, Any]:
    """Pseudo-label a target train set with one model or an ensemble (mean softmax); write a label folder.

    Items of `dataset`: {"img": float (3, H, W) 0..255, "lbl": (H, W) (only its size is used: the output
    resolution), "name": "train/CITY/CITY_x_y_leftImg8bit.png"}. Two inference passes: the first counts the
    pixels predicted per class and keeps the confidences below `cap` (4 bytes each; the thresholds need only
    those, see `_nearest_rank`), the second writes uint8 train-id PNGs under out_dir/gtFine/... and
    out_dir/manifest.json. The models are moved to `device` and set to eval mode. Written into a temporary
    sibling folder, then moved into place. Returns the manifest. With a fixed `threshold` (percentile and cap
    unused): one pass, every pixel with confidence < threshold becomes 255. With `threshold` "image_median"
    (percentile unused): one pass, each image thresholded by its own `image_median_thresholds` (the
    real-time DA project's createpseudolabels.py).
    """
    _check(percentile, cap)
    check_threshold(threshold)
    device = torch.device(device)
    out_dir = Path(out_dir)
    for m in models:
        m.to(device).eval()
    if threshold == IMAGE_MEDIAN:
        rule = {"threshold": IMAGE_MEDIAN, "cap": cap,
                "median": "per image, per class predicted in it: torch.median of its pixels' confidences "
                          "(github.com/micolrosini/Real-Time-Domain-Adaptation-in-Image-Segmentation)"}
        return _write(models, dataset, out_dir, device, num_workers,
                      lambda conf, pred, n: image_median_thresholds(conf, pred, n, cap), source_desc, rule)
    if threshold is not None:
        fixed = float(threshold)
        return _write(models, dataset, out_dir, device, num_workers,
                      lambda conf, pred, n: torch.full((n,), fixed), source_desc, {"threshold": threshold})
    thresholds = _class_thresholds_pass(models, dataset, device, num_workers, percentile, cap)
    rule = {"percentile": percentile, "cap": cap,
            "percentile_method": "nearest rank: ascending sort, index round_half_even(n * percentile), "
                                 "clipped to n - 1 (BDL / FDA)"}
    return _write(models, dataset, out_dir, device, num_workers, lambda conf, pred, n: thresholds, source_desc, rule)


def check_threshold(threshold: float | str | None) -> None:
    """A fixed threshold in (0, 1], "image_median", or None (class-wise percentiles)."""
    if isinstance(threshold, str):
        if threshold != IMAGE_MEDIAN:
            raise ValueError(f"threshold: a number in (0, 1] or '{IMAGE_MEDIAN}', got {threshold!r}")
    elif threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


def _class_thresholds_pass(models: list[nn.Module], dataset: Dataset, device: torch.device, num_workers: int,
                           percentile: float, cap: float) -> Tensor:
    """The counting pass: pixels predicted per class and the confidences below `cap` (4 bytes each), then
    each class's threshold (C,) by `_nearest_rank`."""
    counts: Tensor | None = None  # (C,) pixels predicted per class
    below_pred: list[Tensor] = []  # per image: (n_i,) uint8 classes of the pixels with conf < cap
    below_conf: list[Tensor] = []  # (n_i,) float32 their confidences
    for _, conf, pred, num_classes in _predictions(models, dataset, device, num_workers):
        if counts is None:
            counts = torch.zeros(num_classes, dtype=torch.int64)
        counts += torch.bincount(pred.flatten().cpu(), minlength=len(counts))
        keep = conf < cap
        below_pred.append(pred[keep].to(torch.uint8).cpu())
        below_conf.append(conf[keep].cpu())
    if counts is None:
        raise ValueError("pseudo-labels: the dataset is empty")
    all_pred, all_conf = torch.cat(below_pred), torch.cat(below_conf)
    del below_pred, below_conf
    return torch.tensor([_nearest_rank(all_conf[all_pred == c], int(counts[c]), percentile, cap)
                         for c in range(len(counts))], dtype=torch.float32)  # (C,)


def _write(models: list[nn.Module], dataset: Dataset, out_dir: Path, device: torch.device, num_workers: int,
           thresholds_of: Any, source_desc: dict | None, rule: dict) -> dict[str, Any]:
    """The writing pass: each image thresholded by thresholds_of(conf (H, W), pred (H, W), C) -> (C,) (the
    same class-wise or fixed thresholds for every image, or the image's own). The manifest's `thresholds`: the
    last image's (the same for all but image_median)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    counts: Tensor | None = None  # (C,) pixels predicted per class
    kept: Tensor | None = None  # (C,) pixels kept per class
    thresholds: Tensor | None = None
    n_images = 0
    try:
        for name, conf, pred, num_classes in _predictions(models, dataset, device, num_workers):
            thresholds = thresholds_of(conf, pred, num_classes).float()  # (C,)
            if counts is None or kept is None:
                counts = torch.zeros(num_classes, dtype=torch.int64)
                kept = torch.zeros(num_classes, dtype=torch.int64)
            counts += torch.bincount(pred.flatten().cpu(), minlength=num_classes)
            lbl = mask_below(conf, pred, thresholds).cpu()  # (H, W) int64, 255 = below threshold
            kept += torch.bincount(lbl[lbl != IGNORE], minlength=num_classes)
            path = tmp / label_path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(lbl.numpy().astype(np.uint8)).save(path)
            n_images += 1
        if counts is None or kept is None or thresholds is None:
            raise ValueError("pseudo-labels: the dataset is empty")
        total = int(counts.sum())
        manifest = {
            "format": 1,
            "model": source_desc or {},
            **rule,
            "num_classes": len(counts),
            "thresholds": None if rule.get("threshold") == IMAGE_MEDIAN else [float(t) for t in thresholds],
            "num_images": n_images,
            "pixels": total,
            "pixels_predicted_per_class": [int(c) for c in counts],
            "pixels_kept_per_class": [int(c) for c in kept],
            "ignored_fraction": 1.0 - int(kept.sum()) / max(total, 1),
            "probs": "mean softmax of the models, bilinear (align_corners) upsampled to the label size",
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("pseudo-labels: %d images -> %s (%.1f%% ignored)", n_images, out_dir,
             100 * manifest["ignored_fraction"])
    return manifest


class Stylized(Dataset):
    """Target items whose images are FDA-stylized toward a source image (item i gets source i mod N)."""

    def __init__(self, target: Any, source: Any, beta: float) -> None:
        self.target, self.source, self.beta = target, source, beta

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.target[i])
        style = self.source[i % len(self.source)]["img"]
        item["img"] = fda_source_to_target(item["img"][None], style[None], self.beta)[0]
        return item


def from_checkpoints(checkpoints: list[Path], out: Path, percentile: float = 0.5, cap: float = 0.9,
                     stylize_beta: float | None = None, weights: str = "model", device: str = "cpu",
                     threshold: float | Literal["image_median"] | None = None, flip: bool = False) -> dict[str, Any]:
    """Class-wise thresholded pseudo-labels of the target train set from one trained model or an ensemble
    (mean softmax: FDA-MBT) given by their checkpoints. With `stylize_beta`, predictions are made on target
    images FDA-stylized toward the source; with `flip`, each model's softmax is averaged with its softmax on
    the mirrored image (CPSL); `threshold`: a fixed one (CPSL) or "image_median" (micolrosini's real-time DA
    project), see `generate`."""
    loaded = [load_trained(c, device, weights) for c in checkpoints]
    cfg = loaded[0][0]
    ds = target_dataset(cfg.data)
    if stylize_beta:
        tf = input_transform(eval_transform(cfg.data.target_size), cfg.data)
        src = DATASETS[cfg.data.source](Path(cfg.data.source_root), "train", tf, label_set=cfg.data.label_set)
        ds = Stylized(ds, src, stylize_beta)
    desc = {"checkpoints": [str(c) for c in checkpoints], "weights": weights, "stylize_beta": stylize_beta,
            "flip": flip, "target_root": cfg.data.target_root}
    models = [FlipAveraged(m) if flip else m for _, m in loaded]
    return generate(models, ds, out, percentile=percentile, cap=cap, device=device, source_desc=desc,
                    threshold=threshold)
