"""Segmentation models: one literal dict from name to builder.

Every builder is `build(num_classes: int = 19, pretrained: str | None = None, **kwargs) -> nn.Module`;
`pretrained` is None, "imagenet" or a path to a local `.pth` (torchvision ResNet or full-model state
dict). Every model takes (B, 3, H, W) RGB in 0..255, returns {"out", "aux", "feat"} and has
`aux_weights` and `param_groups(lr)`. Discriminators live in `uda_ray.models.discriminators`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from uda_ray.models.bisenet import bisenet_r18, bisenet_r101
from uda_ray.models.deeplabv2 import deeplabv2_r101, deeplabv2_r101_ml
from uda_ray.models.enet import enet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "bisenet_r18": bisenet_r18,
    "bisenet_r101": bisenet_r101,
    "deeplabv2_r101": deeplabv2_r101,  # single-level
    "deeplabv2_r101_ml": deeplabv2_r101_ml,  # multi-level: aux ASPP on layer3
    "enet": enet,  # no ImageNet backbone; "out" at the input resolution
}

__all__ = ["MODELS"]
