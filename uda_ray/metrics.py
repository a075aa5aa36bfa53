"""Confusion matrix -> mIoU, per-class IoU, pixel accuracy; summed across DDP workers. Beside them, Project1's
definitions (github.com/isola-quezada-98/Project1, `val` in train_*.py with utils.py): its mIoU over the first 18
classes (`miou18`) and its mean of per-image accuracies (`ImageAccuracy`)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from uda_ray.data.labels import (
    CLASSES,
    IGNORE,
    MIOU13_CLASSES,
    MIOU16_CLASSES,
    SYNTHIA16_CLASSES,
    SYNTHIA16_MIOU13,
)


class ConfusionMatrix:
    """Accumulates a (C, C) matrix: rows = ground truth, columns = prediction; 255 is ignored."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: (B, H, W) int64 train ids of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ")
        keep = target != IGNORE
        idx = target[keep] * self.num_classes + pred[keep]
        self.mat += torch.bincount(idx, minlength=self.num_classes**2).reshape(self.mat.shape)

    def all_reduce(self) -> None:
        """Sum the matrix over all DDP processes (no-op when not distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.mat)

    def compute(self) -> dict[str, float]:
        return metrics_from_confusion(self.mat)


def iou_per_class(mat: torch.Tensor) -> torch.Tensor:
    """IoU_c = TP / (TP + FP + FN); NaN for classes absent from both labels and predictions."""
    mat = mat.double()
    tp = mat.diag()
    denom = mat.sum(0) + mat.sum(1) - tp
    return torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))


def metrics_from_confusion(mat: torch.Tensor, class_names: tuple[str, ...] | None = None) -> dict[str, float]:
    """mIoU (over classes present in labels or predictions), mIoU-16 / -13, pixel accuracy, IoU per class.

    Values are fractions in [0, 1]. Keys: miou, miou16, miou13, pixel_acc, iou/<class>. A 19-class matrix
    (19-class protocol): miou16 / miou13 are its SYNTHIA subsets (FDA's evaluation). A 16-class matrix (the
    synthia16 protocol, ADVENT / CPSL): miou16 = miou, miou13 its 13-class subset, classes named accordingly.
    """
    if class_names is None:
        class_names = SYNTHIA16_CLASSES if mat.shape[0] == len(SYNTHIA16_CLASSES) else CLASSES
    mat = mat.cpu()
    iou = iou_per_class(mat)
    total = mat.sum().item()
    out = {
        "miou": _nanmean(iou),
        "pixel_acc": (mat.diag().sum().item() / total) if total else float("nan"),
    }
    if mat.shape[0] == len(CLASSES):
        out["miou18"] = miou18(mat)
        out["miou16"] = _nanmean(iou[list(MIOU16_CLASSES)])
        out["miou13"] = _nanmean(iou[list(MIOU13_CLASSES)])
    elif mat.shape[0] == len(SYNTHIA16_CLASSES):
        out["miou16"] = out["miou"]
        out["miou13"] = _nanmean(iou[list(SYNTHIA16_MIOU13)])
    names = class_names if len(class_names) == mat.shape[0] else tuple(str(i) for i in range(mat.shape[0]))
    for name, v in zip(names, iou.tolist()):
        out[f"iou/{name}"] = v
    return out


def miou18(mat: torch.Tensor) -> float:
    """Project1's mIoU of a 19-class confusion matrix: `np.mean(per_class_iu(hist)[:-1])`, the mean over the
    first 18 classes (bicycle dropped), each IoU = TP / (TP + FP + FN + 1e-5): a class absent from both labels
    and predictions counts as 0 (its epsilon), not skipped as in `miou`."""
    mat = mat.double().cpu()
    tp = mat.diag()
    iou = tp / (mat.sum(0) + mat.sum(1) - tp + 1e-5)  # (C,)
    return iou[:18].mean().item()


class ImageAccuracy:
    """Project1's pixel accuracy: the mean over images of each image's accuracy, where an image's accuracy is
    correct pixels / ALL its pixels (its `compute_global_accuracy` divides by len(label): pixels labeled 255
    count, as wrong, since no prediction is 255). Exact under DDP: the per-image accuracies are summed and
    counted on each rank, and both sums all-reduced."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.stats = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of accuracies, images)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: (B, H, W) train ids of the same shape (255 in target = ignore)."""
        correct = (pred == target).flatten(1).double().mean(1)  # (B,) per-image accuracy
        self.stats += torch.stack([correct.sum(), torch.tensor(float(len(correct)), dtype=torch.float64,
                                                               device=correct.device)])

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.stats)

    def compute(self) -> float:
        total, n = self.stats.tolist()
        return total / n if n else float("nan")


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return x.mean().item() if x.numel() else float("nan")
