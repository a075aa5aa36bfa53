"""DeepLab-v2 with a dilated ResNet-101 (Chen et al., TPAMI 2017), as used by the UDA papers.

Two backbone styles. "torchvision": torchvision's ResNet-101 (v1.5: a block's stride on its 3x3 conv) with
layer3/layer4 dilated, ImageNet-normalized RGB input. "caffe": the ResNet-101 of DeepLab's Caffe release that
AdaptSegNet, ADVENT, IntraDA and CPSL build on (wasidennis/AdaptSegNet model/deeplab*.py, valeoai/ADVENT
advent/model/deeplabv2.py): the stride on the block's first 1x1 conv, a ceil-mode max-pool, the first block of
layer3 / layer4 already dilated (2 / 4), and BGR input minus the Caffe mean (104.01, 116.67, 122.68), no std.
"proda": the same Caffe ResNet fed RGB / 255 with no mean or std, as ProDA and CPSL do (lslrh/CPSL
data/cityscapes_dataset.py `mean_rgb["cityscapes"] = [0, 0, 0]`, `img / 255.0`; their models/deeplabv2.py loads
torchvision's ImageNet weights into it, so `pretrained: imagenet` is accepted there). `bn_clr`: CPSL's extra
BatchNorm(2048) between layer4 and the classifier (its `--bn_clr`, `bn_pretrain`, used by its stage 2 / 3 models).
The originals' published weights load after `uda-ray convert-weights` (`uda_ray.models.convert`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from uda_ray.errors import ConfigError
from uda_ray.models.resnet import (
    CAFFE_MEAN_BGR,
    CaffeNormalize,
    Normalize,
    load_pretrained,
    read_pretrained,
    resnet,
    resnet_stages,
)

__all__ = ["CAFFE_MEAN_BGR", "CaffeNormalize", "DeepLabV2", "deeplabv2_r101", "deeplabv2_r101_ml"]
STYLES = ("torchvision", "caffe", "proda")


def caffe_resnet(blocks: tuple[int, int, int, int] = (3, 4, 23, 3)) -> nn.Module:
    """torchvision's dilated ResNet rearranged into DeepLab's Caffe ResNet (same parameter names and shapes):
    layer2's stride moved from the 3x3 conv to the 1x1 conv, ceil-mode max-pool, the first blocks of layer3 and
    layer4 at dilation 2 and 4 (torchvision keeps them at the previous dilation)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    net = ResNet(Bottleneck, list(blocks), replace_stride_with_dilation=[False, True, True])
    net.fc, net.avgpool = nn.Identity(), nn.Identity()
    net.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    first = net.layer2[0]
    first.conv1.stride, first.conv2.stride = (2, 2), (1, 1)
    for layer, d in ((net.layer3, 2), (net.layer4, 4)):
        layer[0].conv2.dilation, layer[0].conv2.padding = (d, d), (d, d)
    return net


class UnitRGB(nn.Module):
    """RGB in 0..255 -> RGB / 255, no mean or std (ProDA's / CPSL's input)."""

    def forward(self, x: Tensor) -> Tensor:
        return x / 255.0  # (B, 3, H, W)


class ASPPClassifier(nn.Module):
    """Sum of four 3x3 convs (with bias) at dilation = padding 6/12/18/24; weights ~ N(0, 0.01)."""

    def __init__(self, cin: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(cin, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)  # (B, C, h, w)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out


class ProDAClassifier(nn.Module):
    """The DeepLab-v2 head of CPSL (inherited from ProDA, Zhang et al. CVPR 2021; CPSL models/deeplabv2.py):
    five parallel branches on the layer4 features, a 1x1 conv and 3x3 convs at dilation 6/12/18/24, each to
    256 channels with GroupNorm(32) and ReLU; their concatenation (1280 channels) re-weighted by
    squeeze-and-excitation (reduction 16), fused by a 3x3 conv to 256 channels with GroupNorm (no ReLU): the
    features CPSL's prototypes see; then Dropout2d(0.1) and a 1x1 conv without bias to the classes.
    Initialization as there: the fusing conv Kaiming-normal (fan in) with zero bias, the classifier N(0, 0.001),
    the rest PyTorch's defaults.
    """

    def __init__(self, cin: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24), width: int = 256,
                 droprate: float = 0.1, se_reduction: int = 16) -> None:
        super().__init__()

        def branch(k: int, r: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, width, k, padding=r if k == 3 else 0, dilation=r, bias=True),
                                 nn.GroupNorm(32, width), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList([branch(1, 1)] + [branch(3, r) for r in rates])
        n = width * (len(rates) + 1)
        self.se = nn.Sequential(nn.Linear(n, n // se_reduction), nn.ReLU(inplace=True),
                                nn.Linear(n // se_reduction, n), nn.Sigmoid())
        self.fuse = nn.Sequential(nn.Conv2d(n, width, 3, padding=1, bias=True), nn.GroupNorm(32, width))
        self.dropout = nn.Dropout2d(droprate)
        self.cls = nn.Conv2d(width, num_classes, 1, bias=False)
        nn.init.kaiming_normal_(self.fuse[0].weight, a=0, mode="fan_in")
        nn.init.zeros_(self.fuse[0].bias)
        nn.init.normal_(self.cls.weight, 0.0, 0.001)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, cin, h, w) -> (logits (B, C, h, w), features (B, 256, h, w))."""
        y = torch.cat([b(x) for b in self.branches], dim=1)  # (B, 1280, h, w)
        y = y * self.se(y.mean(dim=(2, 3)))[:, :, None, None]
        feat = self.dropout(self.fuse(y))
        return self.cls(feat), feat


HEADS = ("aspp", "proda")


class DeepLabV2(nn.Module):
    """torchvision ResNet-101 with layer3/layer4 dilated (output stride 8) + ASPP classifier on layer4.

    Input (B, 3, H, W) RGB in 0..255 (normalized inside). Output dict: "out" logits at 1/8;
    "aux" = [ASPP logits from layer3] in train mode if `multi_level` (else / in eval: []);
    "feat" = layer4 features (B, 2048, H/8, W/8); with head "proda" the head's features (B, 256, H/8, W/8).
    `freeze_bn` (the UDA papers' setting, batch 1): every BatchNorm stays in eval mode, even after
    `.train()`, and its affine parameters get requires_grad=False.
    """

    def __init__(self, num_classes: int = 19, multi_level: bool = False, freeze_bn: bool = True,
                 style: str = "torchvision", blocks: tuple[int, int, int, int] = (3, 4, 23, 3),
                 head: str = "aspp", bn_clr: bool = False) -> None:
        super().__init__()
        if style not in STYLES:
            raise ConfigError(f"model.kwargs.style: unknown '{style}' (valid: {', '.join(STYLES)})")
        if head not in HEADS:
            raise ConfigError(f"model.kwargs.head: unknown '{head}' (valid: {', '.join(HEADS)})")
        if head == "proda" and multi_level:
            raise ConfigError("model.kwargs.head: proda is single-level (use deeplabv2_r101)")
        self.head = head
        self.num_classes = num_classes
        self.freeze_bn = freeze_bn
        self.style = style
        if style in ("caffe", "proda"):
            self.normalize: nn.Module = CaffeNormalize() if style == "caffe" else UnitRGB()
            self.backbone = caffe_resnet(blocks)
        else:
            if tuple(blocks) != (3, 4, 23, 3):
                raise ConfigError("DeepLabV2: `blocks` other than ResNet-101's is for the caffe style's tests only")
            self.normalize = Normalize()
            self.backbone = resnet(101, dilate=(False, True, True))
        self.classifier: nn.Module = ASPPClassifier(2048, num_classes) if head == "aspp" else \
            ProDAClassifier(2048, num_classes)
        self.aux_classifier = ASPPClassifier(1024, num_classes) if multi_level else None
        self.bn_clr = nn.BatchNorm2d(2048) if bn_clr else None  # CPSL's `bn_pretrain` on the layer4 features
        self.aux_weights: tuple[float, ...] = (0.1,) if multi_level else ()
        if freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> DeepLabV2:
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor | list[Tensor]]:
        x = self.normalize(x)  # (B, 3, H, W)
        _, _, f3, f4 = resnet_stages(self.backbone, x)  # (B, 1024, H/8, W/8), (B, 2048, H/8, W/8)
        aux = [self.aux_classifier(f3)] if self.training and self.aux_classifier is not None else []
        if self.bn_clr is not None:
            f4 = self.bn_clr(f4)
        if self.head == "proda":
            out, feat = self.classifier(f4)  # feat: the head's 256-channel features, as CPSL's prototypes use
            return {"out": out, "aux": aux, "feat": feat}
        return {"out": self.classifier(f4), "aux": aux, "feat": f4}

    def param_groups(self, lr: float) -> list[dict]:
        """Backbone at `lr`, classifier(s) (and CPSL's bn_clr, as its get_10x_lr_params) at 10 * lr (the
        AdaptSegNet / ADVENT recipe)."""
        heads = [self.classifier] + [m for m in (self.aux_classifier, self.bn_clr) if m is not None]
        return [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr},
            {
                "params": [p for h in heads for p in h.parameters() if p.requires_grad],
                "lr": 10 * lr,
            },
        ]


def _build(num_classes: int, pretrained: str | None, multi_level: bool, freeze_bn: bool, style: str,
           head: str = "aspp", bn_clr: bool = False) -> DeepLabV2:
    if style == "caffe" and pretrained == "imagenet":  # (proda: CPSL itself loads torchvision's weights)
        raise ConfigError("model.pretrained: imagenet is torchvision's ResNet-101 (another architecture and input "
                          "normalization); the caffe style takes the originals' init weights, converted with "
                          "`uda-ray convert-weights`, as a .pth path")
    state = read_pretrained(pretrained, 101)
    model = DeepLabV2(num_classes, multi_level, freeze_bn, style, head=head, bn_clr=bn_clr)
    load_pretrained(model, model.backbone, state, str(pretrained))
    return model


def deeplabv2_r101(num_classes: int = 19, pretrained: str | None = None, freeze_bn: bool = True,
                   style: str = "torchvision", head: str = "aspp", bn_clr: bool = False) -> DeepLabV2:
    """Single-level DeepLab-v2 ResNet-101 (no aux output); style "torchvision", "caffe" or "proda"; head "aspp"
    (DeepLab's) or "proda" (CPSL's); bn_clr: CPSL's extra BatchNorm before the head."""
    return _build(num_classes, pretrained, False, freeze_bn, style, head, bn_clr)


def deeplabv2_r101_ml(num_classes: int = 19, pretrained: str | None = None, freeze_bn: bool = True,
                      style: str = "torchvision", head: str = "aspp") -> DeepLabV2:
    """Multi-level DeepLab-v2 ResNet-101: extra ASPP classifier on layer3 as aux output (weight 0.1)."""
    return _build(num_classes, pretrained, True, freeze_bn, style, head)
