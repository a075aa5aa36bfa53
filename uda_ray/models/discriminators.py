"""Output-space discriminators: AdaptSegNet's fully convolutional one and a depthwise-separable one."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

from torch import Tensor, nn


def _five_layers(num_classes: int, ndf: int, layer: Callable[[int, int], list[nn.Module]]) -> nn.Sequential:
    """Five stride-2 layers C -> ndf -> 2 ndf -> 4 ndf -> 8 ndf -> 1, the modules of each from `layer(cin, cout)`,
    LeakyReLU(0.2) after the first four."""
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(pairwise([num_classes, ndf, ndf * 2, ndf * 4, ndf * 8, 1])):
        layers += layer(cin, cout)
        if i < 4:
            layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


class FCDiscriminator(nn.Module):
    """AdaptSegNet (Tsai et al., CVPR 2018): five 4x4 stride-2 convs C->64->128->256->512->1.

    LeakyReLU(0.2) after the first four, no normalization; 2,781,121 parameters for C=19.
    (B, C, H, W) -> (B, 1, H/32, W/32) logits.
    """

    def __init__(self, num_classes: int, ndf: int = 64) -> None:
        super().__init__()
        self.net = _five_layers(num_classes, ndf, lambda cin, cout: [nn.Conv2d(cin, cout, 4, stride=2, padding=1)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 1, H/32, W/32)


class DSCDiscriminator(nn.Module):
    """Lightweight discriminator: the FC one with each conv made depthwise-separable.

    Each layer = depthwise 4x4 stride-2 conv (groups = in channels) then pointwise 1x1, both with
    bias; LeakyReLU(0.2) after the first four layers; 191,364 parameters for C=19.
    (B, C, H, W) -> (B, 1, H/32, W/32) logits.
    """

    def __init__(self, num_classes: int, ndf: int = 64) -> None:
        super().__init__()
        self.net = _five_layers(num_classes, ndf, lambda cin, cout: [
            nn.Conv2d(cin, cin, 4, stride=2, padding=1, groups=cin),  # depthwise
            nn.Conv2d(cin, cout, 1),  # pointwise
        ])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 1, H/32, W/32)


DISCRIMINATORS: dict[str, type[nn.Module]] = {"fc": FCDiscriminator, "dsc": DSCDiscriminator}
