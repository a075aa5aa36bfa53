"""BiSeNet: Bilateral Segmentation Network for real-time semantic segmentation (Yu et al., ECCV 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.models.resnet import Normalize, load_pretrained, read_pretrained, resnet, resnet_stages


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class AttentionRefinement(nn.Module):
    """ARM: global pool -> 1x1 conv -> BN -> sigmoid -> channel-wise multiply.

    The BN sees (B, C, 1, 1) vectors, so train mode needs a batch of at least 2.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        att = torch.sigmoid(self.bn(self.conv(x.mean((2, 3), keepdim=True))))  # (B, C, 1, 1)
        return x * att  # (B, C, h, w)


class FeatureFusion(nn.Module):
    """FFM: concat -> conv-BN-ReLU -> channel attention (pool -> 1x1 -> ReLU -> 1x1 -> sigmoid) -> x + x*att."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.fuse = conv_bn_relu(cin, cout, 3)
        self.attention = nn.Sequential(
            nn.Conv2d(cout, cout, 1), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 1), nn.Sigmoid()
        )

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        x = self.fuse(torch.cat([spatial, context], dim=1))  # (B, cout, H/8, W/8)
        att = self.attention(x.mean((2, 3), keepdim=True))  # (B, cout, 1, 1)
        return x + x * att


class BiSeNet(nn.Module):
    """Spatial path (three stride-2 conv-BN-ReLU, 1/8) + ResNet context path fused by an FFM.

    Input (B, 3, H, W) RGB in 0..255 (normalized inside). Output dict: "out" logits at 1/8,
    "aux" = [logits from the 1/16 context, logits from the 1/32 context] in train mode ([] in eval),
    "feat" = the FFM output fed to the final 1x1 classifier.

    As in the PyTorch BiSeNet of https://github.com/ooooverflow/BiSeNet (`model/build_BiSeNet.py`), the FFM
    outputs `fusion_channels` = num_classes channels by default with a 3x3 conv, and the 1/32 global-pool
    context multiplies the 1/32 ARM output.
    """

    aux_weights: tuple[float, ...] = (1.0, 1.0)  # loss = main + aux16 + aux32

    def __init__(self, num_classes: int = 19, depth: int = 18, fusion_channels: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.depth = depth
        self.normalize = Normalize()
        self.spatial = nn.Sequential(
            conv_bn_relu(3, 64, 3, 2), conv_bn_relu(64, 128, 3, 2), conv_bn_relu(128, 256, 3, 2)
        )
        self.backbone = resnet(depth)
        expansion = 1 if depth < 50 else 4
        c16, c32 = 256 * expansion, 512 * expansion  # channels of layer3 (1/16) and layer4 (1/32)
        self.arm16 = AttentionRefinement(c16)
        self.arm32 = AttentionRefinement(c32)
        fused = fusion_channels or num_classes
        self.ffm = FeatureFusion(256 + c16 + c32, fused)
        self.classifier = nn.Conv2d(fused, num_classes, 1)
        self.aux16 = nn.Conv2d(c16, num_classes, 1)
        self.aux32 = nn.Conv2d(c32, num_classes, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor | list[Tensor]]:
        x = self.normalize(x)  # (B, 3, H, W)
        spatial = self.spatial(x)  # (B, 256, H/8, W/8)
        _, _, f16, f32 = resnet_stages(self.backbone, x)  # (B, c16, H/16, W/16), (B, c32, H/32, W/32)
        ctx16 = self.arm16(f16)
        ctx32 = self.arm32(f32) * f32.mean((2, 3), keepdim=True)  # global context (B, c32, 1, 1)
        size = spatial.shape[-2:]
        context = torch.cat(
            [F.interpolate(c, size=size, mode="bilinear", align_corners=False) for c in (ctx16, ctx32)], dim=1
        )  # (B, c16 + c32, H/8, W/8)
        feat = self.ffm(spatial, context)  # (B, fused, H/8, W/8)
        aux = [self.aux16(ctx16), self.aux32(ctx32)] if self.training else []  # 1/16 and 1/32 logits
        return {"out": self.classifier(feat), "aux": aux, "feat": feat}

    def param_groups(self, lr: float) -> list[dict]:
        """One group at `lr`, as in the original."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]


def _build(depth: int, num_classes: int, pretrained: str | None, fusion_channels: int | None) -> BiSeNet:
    state = read_pretrained(pretrained, depth)
    model = BiSeNet(num_classes, depth, fusion_channels)
    load_pretrained(model, model.backbone, state, str(pretrained))
    return model


def bisenet_r18(
    num_classes: int = 19, pretrained: str | None = None, fusion_channels: int | None = None
) -> BiSeNet:
    """BiSeNet with a ResNet-18 context path."""
    return _build(18, num_classes, pretrained, fusion_channels)


def bisenet_r101(
    num_classes: int = 19, pretrained: str | None = None, fusion_channels: int | None = None
) -> BiSeNet:
    """BiSeNet with a ResNet-101 context path."""
    return _build(101, num_classes, pretrained, fusion_channels)
