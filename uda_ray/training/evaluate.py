"""A run's evaluations: the labeled splits' confusion matrices, the label-free validators on the held-out target
images, the evaluation loaders, the check that the selection metric is one the run reports, and the model's
profile (params, GFLOPs, latency). Plain PyTorch: under DDP the sums are reduced over the ranks."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uda_ray.config import ExperimentConfig
from uda_ray.data.loading import val_loader
from uda_ray.errors import ConfigError
from uda_ray.methods.base import upsample
from uda_ray.metric_names import DEFAULT_SELECTION, needs_test_labels
from uda_ray.metrics import ConfusionMatrix, ImageAccuracy
from uda_ray.selection.validators import ValidatorAccumulator


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, num_classes: int, device: torch.device,
             label_size: tuple[int, int] | None = None) -> dict[str, float]:
    """Confusion matrix at the label's full resolution (logits upsampled bilinearly), summed over ranks; with
    `label_size` (W, H: data.eval_label_size) the labels are first resized to it (nearest). Also acc_img, the
    mean of per-image accuracies (uda_ray.metrics.ImageAccuracy)."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, device)
    acc = ImageAccuracy(device)
    for item in loader:
        lbl = item["lbl"].to(device)  # (B, H, W) full resolution
        if label_size is not None:
            lbl = resize_labels(lbl, label_size)
        logits = model(item["img"].to(device))["out"]  # (B, C, h, w)
        pred = upsample(logits, tuple(lbl.shape[-2:])).argmax(1)  # (B, H, W)
        cm.update(pred, lbl)
        acc.update(pred, lbl)
    cm.all_reduce()
    acc.all_reduce()
    model.train(was_training)
    return {**cm.compute(), "acc_img": acc.compute()}


def resize_labels(lbl: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels (B, H, W) resized to `size` (W, H) by nearest neighbour (PIL's NEAREST, as Project1 resizes its
    validation labels: github.com/isola-quezada-98/Project1)."""
    w, h = size
    if tuple(lbl.shape[-2:]) == (h, w):
        return lbl
    return F.interpolate(lbl[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()


@torch.no_grad()
def evaluate_unlabeled(model: nn.Module, loader: Any, num_classes: int, device: torch.device, pixels: int,
                       seed: int) -> dict[str, float]:
    """The label-free validators (uda_ray.selection.validators) of the model's softmax on unlabeled images, at the
    model's output resolution; pixels for SND / BNM sampled per image by (seed, image name). Under DDP the
    running sums are summed and the pixel samples gathered over ranks (ValidatorAccumulator.reduce)."""
    was_training = model.training
    model.eval()
    acc = ValidatorAccumulator(num_classes, pixels_per_image=pixels, seed=seed)
    for item in loader:
        probs = model(item["img"].to(device))["out"].float().softmax(1)
        acc.update(probs, [name_key(n) for n in item["name"]])
    acc.reduce()
    model.train(was_training)
    return acc.compute()


def name_key(name: str) -> int:
    """A stable integer of an image name (seeds its validator pixel sample, orders the gathered samples)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)


def evaluate_splits(model: nn.Module, loaders: dict[str, Any], cfg: ExperimentConfig, device: torch.device
                    ) -> dict[str, float]:
    """Every evaluation of a run: test/... (when the target has a labeled test split), src_val/miou and
    src_val/pixel_acc, sel/miou (with a labeled selection split), uv/... validators, time/eval_s."""
    t0 = time.time()
    c = cfg.model.num_classes
    out: dict[str, float] = {}
    size = cfg.data.eval_label_size
    if "test" in loaders:
        out.update({f"test/{k}": v for k, v in evaluate(model, loaders["test"], c, device, size).items()})
    if "src_val" in loaders:
        ev = evaluate(model, loaders["src_val"], c, device)
        out.update({"src_val/miou": ev["miou"], "src_val/pixel_acc": ev["pixel_acc"]})
    if "sel" in loaders:
        out["sel/miou"] = evaluate(model, loaders["sel"], c, device, size)["miou"]
    if "holdout" in loaders:
        out.update(evaluate_unlabeled(model, loaders["holdout"], c, device, cfg.data.validator_pixels,
                                      cfg.data.split_seed))
    out["time/eval_s"] = time.time() - t0
    return out


def eval_loaders(ds: dict, cfg: ExperimentConfig, rank: int, world_size: int, workers: int = 0) -> dict[str, Any]:
    """This rank's loaders of the evaluation splits. The test and selection splits use eval_batch_size
    (labels at full resolution); source val and the holdout, at input size, the training batch size."""
    tc = cfg.train
    return {k: val_loader(ds[k], tc.eval_batch_size if k in ("test", "sel") else max(tc.batch_size, tc.eval_batch_size),
                          rank=rank, world_size=world_size, workers=workers)
            for k in ("test", "src_val", "sel", "holdout") if k in ds}


def check_selectable(cfg: ExperimentConfig, has_test: bool) -> None:
    """The run's selection metric must be one it reports (checked before any compute)."""
    if needs_test_labels(cfg.select) and not has_test:
        raise ConfigError(f"select: {cfg.select} needs target test labels, and the target at "
                          f"{cfg.data.target_root} has none (choose a label-free metric, e.g. {DEFAULT_SELECTION})")


def model_profile(model: nn.Module, size_hw: tuple[int, int], device: torch.device) -> dict[str, float]:
    """Params, GFLOPs (torch's FLOP counter: a multiply-add = 2 FLOPs) and latency of the eval model.

    Measured under a forked RNG: the random inputs it draws must not move the run's own random stream. A sweep
    measures each model once (a cache beside its runs), so without the fork a trial's training depended on
    whether it or a concurrent trial measured first."""
    from uda_ray.models.profile import count_gflops, count_params, measure_latency

    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        lat = measure_latency(model, size_hw, device=str(device), warmup=1, iters=3)
        out = {"model/params": float(count_params(model)), "model/gflops": count_gflops(model, size_hw),
               "model/latency_ms": lat["latency_ms"], "model/fps": lat["fps"]}
    model.train(was_training)
    return out
