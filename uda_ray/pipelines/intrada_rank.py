"""IntraDA (Pan et al., "Unsupervised Intra-domain Adaptation for Semantic Segmentation through
Self-Supervision", CVPR 2020): the entropy ranking that splits the target train set into an easy and a hard
subdomain, and the easy split's pseudo-labels. The stages around it are ordinary runs of a pipeline.

What the original `entropy.py` does, and what we do:
- Logits of the inter-domain (AdvEnt) model are upsampled (bilinear, align_corners=True) to the input size,
  softmaxed, and the image's score is the mean of I(p) = -p log2(p) / log2(C). The original averages over
  (C, H, W); we sum over C and average over pixels (the normalized entropy in [0, 1], as `entropy_loss`):
  a constant factor C, so the ranking is the same.
- Entropy normalization (`--normalize`): the score is multiplied by (K - n) / K + 0.5, where n is the number
  of the K = 11 Cityscapes "rare" classes (wall, fence, pole, traffic light, traffic sign, terrain, rider,
  truck, bus, train, motorcycle) present in the argmax map at the input size. Images showing rare classes get
  lower scores and move to the easy split, so the pseudo-labels cover those classes.
- Ascending sort (stable: ties keep dataset order); easy = the first int(N * lambda) images (floor).
- Pseudo-labels are the plain argmax. The original saves them at the input size; we upsample the logits to
  the label's size instead (the full-resolution file that Cityscapes' `label_root` reads).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from uda_ray.data.datasets import pseudo_label_relpath as pseudo_label_path
from uda_ray.errors import ConfigError
from uda_ray.losses import self_information
from uda_ray.methods.base import unwrap, upsample

CITYSCAPES_RARE_CLASSES: tuple[int, ...] = (3, 4, 5, 6, 7, 9, 12, 14, 15, 16, 17)  # IntraDA's list


def rare_class_factor(pred: torch.Tensor, rare_classes: tuple[int, ...] = CITYSCAPES_RARE_CLASSES) -> float:
    """IntraDA's entropy normalizer (K - n) / K + 0.5 for an (H, W) argmax map showing n of K rare classes."""
    present = set(torch.unique(pred).tolist())
    n = len(present.intersection(rare_classes))
    return (len(rare_classes) - n) / len(rare_classes) + 0.5


def _as_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items  # collate_fn: keep the items; images may differ in size between batches


@torch.no_grad()
def rank_by_entropy(model: nn.Module, dataset: Dataset, lambda_: float = 0.67, normalize_rare: bool = False,
                    device: torch.device | str = "cpu", batch_size: int = 1, num_workers: int = 0,
                    ) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """Rank target images by prediction entropy (easiest first) and split them as IntraDA does.

    dataset items: {"img": float (3, H, W) 0..255, "lbl": int64 (h, w) (only its size is used), "name": str}.
    Returns (easy names, hard names, {easy name: uint8 (h, w) argmax train ids at the label's size}).
    Deterministic: the model runs in eval mode, in dataset order, without augmentation.
    """
    if not (math.isfinite(lambda_) and 0.0 <= lambda_ <= 1.0):
        raise ConfigError(f"intrada lambda must be in [0, 1], got {lambda_}")
    model = unwrap(model)
    was_training = model.training
    model.eval()
    scores: list[tuple[str, float]] = []
    labels: dict[str, np.ndarray] = {}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_as_list)
    try:
        for items in loader:
            img = torch.stack([it["img"] for it in items]).to(device, torch.float32)  # (B, 3, H, W)
            logits = model(img)["out"]  # (B, C, H/8, W/8)
            up = upsample(logits, tuple(img.shape[-2:]))  # (B, C, H, W), IntraDA's interp_target
            ent = self_information(F.softmax(up, dim=1)).sum(1).mean((1, 2))  # (B,) normalized entropy
            pred = up.argmax(1)  # (B, H, W)
            for b, it in enumerate(items):
                factor = rare_class_factor(pred[b]) if normalize_rare else 1.0
                scores.append((it["name"], float(ent[b]) * factor))
                lbl = it.get("lbl")
                size = tuple(lbl.shape[-2:]) if lbl is not None else tuple(img.shape[-2:])
                pl = upsample(logits[b : b + 1], size).argmax(1)[0]  # (h, w) at the label's size
                labels[it["name"]] = pl.to(torch.uint8).cpu().numpy()
    finally:
        model.train(was_training)
    if len(labels) != len(scores):
        raise ValueError("dataset item names must be unique")
    ranked = [name for name, _ in sorted(scores, key=lambda s: s[1])]  # stable: ties keep dataset order
    n_easy = int(len(ranked) * lambda_)  # floor, as the original
    easy, hard = ranked[:n_easy], ranked[n_easy:]
    return easy, hard, {name: labels[name] for name in easy}


def write_split(out_dir: str | Path, easy: list[str], hard: list[str], pseudo: dict[str, np.ndarray], *,
                lambda_: float | None = None, normalize_rare: bool | None = None) -> Path:
    """Write easy_split.txt / hard_split.txt (one name a line, easiest first), the pseudo-labels as uint8
    train-id PNGs in the Cityscapes layout `gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png`, and last
    `manifest.json` (lambda, normalize flag, counts): its presence marks a complete split. Returns out_dir."""
    out = Path(out_dir)
    missing = [n for n in easy if n not in pseudo]
    if missing:
        raise ValueError(f"no pseudo-label for {len(missing)} easy image(s), e.g. {missing[0]!r}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    for name, arr in pseudo.items():
        if arr.dtype != np.uint8 or arr.ndim != 2:
            raise ValueError(f"pseudo-label of {name!r} must be uint8 (H, W), got {arr.dtype} {arr.shape}")
        path = out / pseudo_label_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)  # mode "L"
    for fname, names in (("easy_split.txt", easy), ("hard_split.txt", hard)):
        (out / fname).write_text("".join(f"{n}\n" for n in names))
    manifest = {"lambda": lambda_, "normalize_rare": normalize_rare, "n_easy": len(easy), "n_hard": len(hard),
                "n_pseudo": len(pseudo), "label_layout": "gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_split(out_dir: str | Path) -> tuple[list[str], list[str]]:
    """(easy names, hard names) from a folder written by `write_split`."""
    out = Path(out_dir)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out}: no manifest.json (not a complete IntraDA split)")
    easy, hard = ((out / f).read_text().splitlines() for f in ("easy_split.txt", "hard_split.txt"))
    return easy, hard
