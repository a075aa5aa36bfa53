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
from uda_ray.data.labels import IGNORE
from uda_ray.data.loading import names_of, val_loader
from uda_ray.errors import ConfigError
from uda_ray.methods.base import upsample
from uda_ray.metric_names import DEFAULT_SELECTION, needs_test_labels
from uda_ray.metrics import ConfusionMatrix, ImageAccuracy
from uda_ray.selection.estimators import atc_threshold, dev, mix, mixval_counts, mixval_scores, neg_entropy
from uda_ray.selection.samples import PixelSamples, at_positions, gather_dict, sample_positions, sum_over_ranks
from uda_ray.selection.validators import ValidatorAccumulator, pixel_sample


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
                       seed: int, source: PixelSamples | None = None, mixval: bool = True) -> dict[str, float]:
    """The label-free validators (uda_ray.selection.validators) of the model's softmax on unlabeled images, at the
    model's output resolution; pixels for SND / BNM (and DEV's target features) sampled per image by (seed, image
    name); MixVal (uda_ray.selection.estimators) on mixes with each image's partner (`mix_partners`); with the
    source-val `source` samples (`evaluate_source`), ATC and DEV. Under DDP the running sums are summed and the
    pixel samples gathered over ranks, so every rank computes what one process would."""
    was_training = model.training
    model.eval()
    acc = ValidatorAccumulator(num_classes, pixels_per_image=pixels, seed=seed)
    t_atc = atc_threshold(source.cat("score"), source.cat("correct")) if source is not None and len(source) else None
    partners, tgt, probes = mix_partners(loader) if mixval else None, PixelSamples(), []
    sums = torch.zeros(6, dtype=torch.float64)  # ATC: pixels above t, pixels; MixVal: mixval_counts
    for item in loader:
        out = model(item["img"].to(device))
        probs = out["out"].float().softmax(1)  # (B, C, h, w)
        keys = [name_key(n) for n in item["name"]]
        acc.update(probs, keys)
        if t_atc is not None:
            sums[0] += float((neg_entropy(probs.movedim(1, -1)) > t_atc).sum())
            sums[1] += probs[:, 0].numel()
            feat = out.get("feat", out["out"]).float()
            for f, key in zip(feat, keys):
                flat = pixel_sample(probs.shape[2] * probs.shape[3], pixels, seed, key)
                tgt.add(key, feat=at_positions(f, flat, tuple(probs.shape[2:])))
        if partners is not None:
            probes += _mix_probe(model, item, probs.argmax(1), partners, device)
    acc.reduce()
    tgt.reduce()
    if partners is not None:  # every image's pseudo-label, for its partner's mix (held by whichever rank)
        labels = gather_dict({name: lbl for name, lbl, _, _ in probes})
        for _, lbl, other, pred in probes:
            sums[2:] += mixval_counts(pred, lbl, labels[other])
    sums = sum_over_ranks(sums)
    model.train(was_training)
    res = {**acc.compute(), **mixval_scores(sums[2:])}
    if t_atc is not None and sums[1] > 0:
        res["uv/atc"] = float(sums[0] / sums[1])
        res["uv/dev"] = dev(source.cat("feat"), source.cat("loss"), tgt.cat("feat"), seed)
    return res


def mix_partners(loader: Any) -> Any:
    """MixVal's partner of each held-out image: the next image of the full held-out split (dataset order,
    cyclic), whichever rank holds it: name -> its item. None when the split has fewer than two images or the
    loader's dataset is not a split of a named dataset."""
    full = getattr(loader.dataset, "dataset", None)
    if full is None or not hasattr(full, "items") or len(full) < 2:
        return None
    names = names_of(full)
    nxt = {n: (i + 1) % len(names) for i, n in enumerate(names)}
    return lambda name: full[nxt[name]]


def _mix_probe(model: nn.Module, item: dict, labels: torch.Tensor, partners: Any, device: torch.device
               ) -> list[tuple[str, torch.Tensor, str, torch.Tensor]]:
    """MixVal's probes of one batch: each image mixed (lambda 0.55) with its partner and predicted, one forward
    pass. Returns (name, its pseudo-label, the partner's name, the mix's prediction) per image, (h, w) int16 on
    the CPU; the partner's pseudo-label comes from the pass over the partner itself (`evaluate_unlabeled`)."""
    others = [partners(n) for n in item["name"]]
    mixed = mix(item["img"].to(device), torch.stack([o["img"] for o in others]).to(device))
    pred = model(mixed)["out"].argmax(1).to(torch.int16).cpu()  # (B, h, w)
    own = labels.to(torch.int16).cpu()
    return [(n, own[i], o["name"], pred[i]) for i, (n, o) in enumerate(zip(item["name"], others))]


@torch.no_grad()
def evaluate_source(model: nn.Module, loader: Any, num_classes: int, device: torch.device, pixels: int, seed: int
                    ) -> tuple[dict[str, float], PixelSamples]:
    """`evaluate` of the labeled source-val split, and ATC's and DEV's samples of it: at `pixels` labeled pixels
    per image (seeded by (seed, image name)), the confidence score (negative entropy), whether the prediction is
    right, the cross-entropy loss (logits upsampled to the label, as the confusion matrix sees them) and the
    model's features there (nearest position); gathered over ranks."""
    was_training = model.training
    model.eval()
    cm, samples = ConfusionMatrix(num_classes, device), PixelSamples()
    for item in loader:
        lbl = item["lbl"].to(device)  # (B, H, W)
        out = model(item["img"].to(device))
        logits = upsample(out["out"], tuple(lbl.shape[-2:])).float()  # (B, C, H, W)
        cm.update(logits.argmax(1), lbl)
        feat = out.get("feat", out["out"]).float()
        for lg, lb, f, name in zip(logits, lbl, feat, item["name"]):
            key = name_key(name)
            flat = sample_positions(lb != IGNORE, pixels, seed, key).to(device)
            lp = lg.flatten(1)[:, flat].T.log_softmax(1)  # (k, C)
            y = lb.flatten()[flat]
            samples.add(key, score=neg_entropy(lp.exp()), correct=lp.argmax(1) == y,
                        loss=-lp.gather(1, y.unsqueeze(1)).squeeze(1).double(),
                        feat=at_positions(f, flat, tuple(lb.shape)))
    cm.all_reduce()
    samples.reduce()
    model.train(was_training)
    return cm.compute(), samples


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
    source = None
    if "src_val" in loaders:
        ev, source = evaluate_source(model, loaders["src_val"], c, device, cfg.data.validator_pixels,
                                     cfg.data.split_seed)
        out.update({"src_val/miou": ev["miou"], "src_val/pixel_acc": ev["pixel_acc"]})
    if "sel" in loaders:
        out["sel/miou"] = evaluate(model, loaders["sel"], c, device, size)["miou"]
    if "holdout" in loaders:
        out.update(evaluate_unlabeled(model, loaders["holdout"], c, device, cfg.data.validator_pixels,
                                      cfg.data.split_seed, source))
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
