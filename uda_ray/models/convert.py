"""Convert the originals' DeepLab-v2 checkpoints to this project's key layout (`uda-ray convert-weights`).

The layouts read (parameter names of wasidennis/AdaptSegNet model/deeplab.py and deeplab_multi.py, and of
valeoai/ADVENT advent/model/deeplabv2.py, which IntraDA and CPSL reuse):

- backbone: `conv1`, `bn1`, `layer1`..`layer4` . `<block>` . `conv1..3` / `bn1..3` / `downsample.0|1`, the same
  names torchvision's ResNet uses, so they map one to one (onto `backbone.` in a full model);
- classifiers: `layer5.conv2d_list.<i>` and `layer6.conv2d_list.<i>` (four dilated 3x3 convs with bias). Which
  one is the main head differs between the files (AdaptSegNet's single-level `layer5` is the main head, its
  multi-level `layer5` the aux head on layer3), so a classifier is placed by its input channels: 2048 (layer4)
  -> `classifier`, 1024 (layer3) -> `aux_classifier`;
- prefixes: the ImageNet-init files carry a `Scale.` prefix, DataParallel checkpoints `module.`; both dropped.

A classifier whose class count differs from `num_classes` (the init files' COCO / ImageNet head, which the
originals drop as well) is left out: the result is then a backbone-only state dict, which
`model.pretrained: <file>` loads into the backbone. Old checkpoints lack BatchNorm's `num_batches_tracked`;
it is added as 0. The converted weights are for `model.kwargs.style: caffe` (the originals' architecture).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from uda_ray.errors import UserError

_BACKBONE = re.compile(r"^(conv1\.weight|bn1\.\w+|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.\w+|"
                       r"downsample\.0\.weight|downsample\.1\.\w+))$")
_CLASSIFIER = re.compile(r"^layer[56]\.conv2d_list\.(\d+)\.(weight|bias)$")
_HEAD_BY_CHANNELS = {2048: "classifier", 1024: "aux_classifier"}


def _strip(key: str) -> str:
    for prefix in ("module.", "Scale."):
        key = key.removeprefix(prefix)
    return key


def convert_state_dict(state: Mapping[str, Tensor], num_classes: int | None = None
                       ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An original-layout state dict -> (ours, a summary). Ours is full-model (`backbone.*`, `classifier.*`,
    `aux_classifier.*`) when a classifier is kept, else backbone-only (torchvision ResNet keys).
    `num_classes`: keep only classifiers with that many outputs (None: keep every classifier)."""
    backbone: dict[str, Tensor] = {}
    heads: dict[str, dict[str, Tensor]] = {}  # original layer name -> {"<i>.<weight|bias>": tensor}
    for raw_key, value in state.items():
        key = _strip(raw_key)
        if _BACKBONE.match(key):
            backbone[key] = value
            continue
        m = _CLASSIFIER.match(key)
        if m:
            heads.setdefault(key.split(".", 1)[0], {})[f"{m.group(1)}.{m.group(2)}"] = value
            continue
        raise UserError(f"key {raw_key!r} is not in the AdaptSegNet / ADVENT DeepLab-v2 layout")
    if "conv1.weight" not in backbone:
        raise UserError("no backbone in this checkpoint (no conv1.weight): not a DeepLab-v2 ResNet state dict")
    for key in [k for k in backbone if k.endswith(".running_var")]:  # BatchNorm counters of newer PyTorch
        backbone.setdefault(key.removesuffix("running_var") + "num_batches_tracked", torch.tensor(0))

    out: dict[str, Tensor] = {}
    kept: dict[str, str] = {}
    dropped: dict[str, str] = {}
    for layer, params in sorted(heads.items()):
        w = params.get("0.weight")
        if w is None or w.dim() != 4:
            raise UserError(f"{layer}.conv2d_list has no 4-d conv weight at index 0")
        classes, channels = int(w.shape[0]), int(w.shape[1])
        ours = _HEAD_BY_CHANNELS.get(channels)
        if ours is None:
            raise UserError(f"{layer}.conv2d_list takes {channels} input channels (expected 2048 or 1024)")
        if num_classes is not None and classes != num_classes:
            dropped[layer] = f"{classes} classes (not {num_classes})"
            continue
        if ours in kept.values():
            raise UserError(f"two classifiers on {channels} channels ({layer} and another)")
        kept[layer] = ours
        out.update({f"{ours}.branches.{k}": v for k, v in params.items()})
    summary = {"backbone_tensors": len(backbone), "classifiers": kept, "dropped": dropped,
               "layout": "full model" if kept else "backbone only"}
    if not kept:
        return dict(backbone), summary
    out.update({f"backbone.{k}": v for k, v in backbone.items()})
    return out, summary


def convert_file(src: str | Path, dst: str | Path, num_classes: int | None = None) -> dict[str, Any]:
    """Read an original checkpoint (a plain state dict of tensors, possibly under "state_dict" / "model"),
    convert it, write `dst` (torch.save of the state dict). Returns the summary with the key count."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UserError(f"{src}: no such file")
    if dst.exists():
        raise UserError(f"{dst} exists; not overwritten")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user error
        raise UserError(f"{src}: cannot be read as a state dict ({type(e).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{src}: not a dict of tensors")
    state, summary = convert_state_dict(obj, num_classes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dst)
    return {**summary, "keys": len(state), "written": str(dst)}
