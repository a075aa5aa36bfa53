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

CPSL (Li et al., CVPR 2022, lslrh/CPSL), detected automatically by its classifier keys (`layer5.head.1.weight`)
or its file wrapper: train.py `validation()` saves `torch.save({"ResNet101": {"model_state":
net.state_dict(), "prototypes_ema": ...}, "iter": ..., "best_iou": ...})` as a `.pkl`, and test.py / models/
deeplabv2.py `Deeplab(restore_from=...)` read `checkpoint["ResNet101"]["model_state"]` (the warm-up's file
also holds the discriminator, ignored). The state dict is its models/deeplabv2.py `ResNet101`: the backbone
above, `layer5` = `Classifier_Module2` (ProDA's head) and, with `--bn_clr`, `bn_pretrain` (BatchNorm(2048)
after layer4). Mapped onto `model.kwargs: {style: proda, head: proda}` (`bn_clr: true` when `bn_pretrain` is
present): `layer5.conv2d_list.<i>.<0 conv|1 GroupNorm>` -> `classifier.branches.<i>.<0|1>`,
`layer5.bottleneck.0.se.<0|2>` (SEBlock's linears) -> `classifier.se.<0|2>`, `layer5.bottleneck.<1 conv|2
GroupNorm>` -> `classifier.fuse.<0|1>`, `layer5.head.1` (1x1, no bias) -> `classifier.cls`,
`bn_pretrain` -> `bn_clr`. Evaluation: CPSL's test.py puts the model in eval mode (every BatchNorm, `bn_pretrain`
too, on its stored running statistics: `--bn_clr` only adds that layer, it re-estimates nothing), feeds the
Cityscapes val images at 2048x1024 as RGB / 255, upsamples the logits bilinearly (align_corners=True) to
2048x1024 and takes the argmax against the 2048x1024 labels: what `uda-ray evaluate` does under
experiments/gta5_to_cityscapes_deeplabv2_cpsl.yaml with style proda (no multi-scale, no flip in either).
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
# CPSL's (ProDA's) Classifier_Module2 and bn_pretrain -> ours (ProDAClassifier, DeepLabV2.bn_clr)
_CPSL = [(re.compile(r"^layer5\.conv2d_list\.([0-4])\.([01])\.(weight|bias)$"), r"classifier.branches.\1.\2.\3"),
         (re.compile(r"^layer5\.bottleneck\.0\.se\.([02])\.(weight|bias)$"), r"classifier.se.\1.\2"),
         (re.compile(r"^layer5\.bottleneck\.1\.(weight|bias)$"), r"classifier.fuse.0.\1"),
         (re.compile(r"^layer5\.bottleneck\.2\.(weight|bias)$"), r"classifier.fuse.1.\1"),
         (re.compile(r"^layer5\.head\.1\.weight$"), "classifier.cls.weight"),
         (re.compile(r"^bn_pretrain\.(weight|bias|running_mean|running_var|num_batches_tracked)$"), r"bn_clr.\1")]
_CPSL_HEAD_TENSORS = 5 * 4 + 4 + 2 + 2 + 1  # branches (conv w, b; GroupNorm w, b), SE, fuse conv, GroupNorm, cls


def _strip(key: str) -> str:
    for prefix in ("module.", "Scale."):
        key = key.removeprefix(prefix)
    return key


def is_cpsl(state: Mapping[str, Any]) -> bool:
    """CPSL's layout: its file wrapper ({"ResNet101": {"model_state": ...}}) or ProDA's classifier keys."""
    if isinstance(state.get("ResNet101"), Mapping):
        return True
    return any(_strip(k) == "layer5.head.1.weight" for k in state)


def convert_cpsl_state_dict(state: Mapping[str, Tensor], num_classes: int | None = None
                            ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """CPSL's ResNet101 state dict -> (ours for `style: proda, head: proda` [, `bn_clr: true`], a summary).
    Every key must map (one UserError line naming the first that does not); the head must be complete."""
    out: dict[str, Tensor] = {}
    for raw_key, value in state.items():
        key = _strip(raw_key)
        if _BACKBONE.match(key):
            out[f"backbone.{key}"] = value
            continue
        ours = next((rx.sub(repl, key) for rx, repl in _CPSL if rx.match(key)), None)
        if ours is None:
            raise UserError(f"key {raw_key!r} is not in CPSL's DeepLab-v2 layout (ResNet101 with Classifier_Module2)")
        out[ours] = value
    if "backbone.conv1.weight" not in out:
        raise UserError("no backbone in this checkpoint (no conv1.weight): not a DeepLab-v2 ResNet state dict")
    head = [k for k in out if k.startswith("classifier.")]
    if len(head) != _CPSL_HEAD_TENSORS:
        raise UserError(f"CPSL's classifier (layer5) has {len(head)} of its {_CPSL_HEAD_TENSORS} tensors")
    classes = int(out["classifier.cls.weight"].shape[0])
    if num_classes is not None and classes != num_classes:
        raise UserError(f"CPSL's classifier has {classes} classes, not {num_classes}")
    for key in [k for k in out if k.endswith(".running_var")]:
        out.setdefault(key.removesuffix("running_var") + "num_batches_tracked", torch.tensor(0))
    bn_clr = "bn_clr.weight" in out
    summary = {"backbone_tensors": sum(k.startswith("backbone.") for k in out), "dropped": {},
               "classifiers": {"layer5": "classifier"}, "layout": "cpsl", "classes": classes,
               "kwargs": {"style": "proda", "head": "proda", **({"bn_clr": True} if bn_clr else {})}}
    return out, summary


def convert_state_dict(state: Mapping[str, Tensor], num_classes: int | None = None
                       ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An original-layout state dict -> (ours, a summary). Ours is full-model (`backbone.*`, `classifier.*`,
    `aux_classifier.*`) when a classifier is kept, else backbone-only (torchvision ResNet keys).
    `num_classes`: keep only classifiers with that many outputs (None: keep every classifier).
    CPSL's layout (`is_cpsl`) goes to `convert_cpsl_state_dict`."""
    if is_cpsl(state):
        return convert_cpsl_state_dict(state, num_classes)
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


def read_original(src: str | Path) -> Mapping[str, Tensor]:
    """An original checkpoint's state dict: a plain dict of tensors, possibly under "state_dict" / "model", or
    CPSL's `{"ResNet101": {"model_state": ...}, ...}`. Loaded with weights_only=True; numpy scalars (CPSL's
    `best_iou`) allowed as data."""
    import numpy as np

    src = Path(src)
    if not src.is_file():
        raise UserError(f"{src}: no such file")
    scalar = np._core.multiarray.scalar  # pickled as numpy.core.multiarray.scalar by numpy < 2 (CPSL's files)
    safe = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype,
            *(type(np.dtype(t)) for t in (np.float64, np.float32, np.int64))]
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user error
        raise UserError(f"{src}: cannot be read as a state dict ({type(e).__name__})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("ResNet101"), Mapping):
        if not isinstance(obj["ResNet101"].get("model_state"), Mapping):
            raise UserError(f"{src}: CPSL's 'ResNet101' entry holds no 'model_state'")
        obj = obj["ResNet101"]["model_state"]
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{src}: not a dict of tensors")
    return obj


def convert_file(src: str | Path, dst: str | Path, num_classes: int | None = None) -> dict[str, Any]:
    """Read an original checkpoint (`read_original`), convert it (the layout detected from its keys), write
    `dst` (torch.save of the state dict). Returns the summary with the key count."""
    dst = Path(dst)
    if dst.exists():
        raise UserError(f"{dst} exists; not overwritten")
    state, summary = convert_state_dict(read_original(src), num_classes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dst)
    return {**summary, "keys": len(state), "written": str(dst)}
