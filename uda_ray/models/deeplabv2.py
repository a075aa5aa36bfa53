"""DeepLab-v2 with a dilated ResNet-101 (Chen et al., TPAMI 2017), as used by the UDA papers."""

from __future__ import annotations

from torch import Tensor, nn

from uda_ray.models.resnet import Normalize, load_pretrained, read_pretrained, resnet, resnet_stages


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


class DeepLabV2(nn.Module):
    """torchvision ResNet-101 with layer3/layer4 dilated (output stride 8) + ASPP classifier on layer4.

    Input (B, 3, H, W) RGB in 0..255 (normalized inside). Output dict: "out" logits at 1/8;
    "aux" = [ASPP logits from layer3] in train mode if `multi_level` (else / in eval: []);
    "feat" = layer4 features (B, 2048, H/8, W/8).
    `freeze_bn` (the UDA papers' setting, batch 1): every BatchNorm stays in eval mode, even after
    `.train()`, and its affine parameters get requires_grad=False.
    """

    def __init__(self, num_classes: int = 19, multi_level: bool = False, freeze_bn: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.freeze_bn = freeze_bn
        self.normalize = Normalize()
        self.backbone = resnet(101, dilate=(False, True, True))
        self.classifier = ASPPClassifier(2048, num_classes)
        self.aux_classifier = ASPPClassifier(1024, num_classes) if multi_level else None
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
        return {"out": self.classifier(f4), "aux": aux, "feat": f4}

    def param_groups(self, lr: float) -> list[dict]:
        """Backbone at `lr`, classifier(s) at 10 * lr (the AdaptSegNet / ADVENT recipe)."""
        heads = [self.classifier] + ([self.aux_classifier] if self.aux_classifier is not None else [])
        return [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr, "lr_mult": 1.0},
            {
                "params": [p for h in heads for p in h.parameters() if p.requires_grad],
                "lr": 10 * lr,
                "lr_mult": 10.0,
            },
        ]


def _build(num_classes: int, pretrained: str | None, multi_level: bool, freeze_bn: bool) -> DeepLabV2:
    state = read_pretrained(pretrained, 101)
    model = DeepLabV2(num_classes, multi_level, freeze_bn)
    load_pretrained(model, model.backbone, state, str(pretrained))
    return model


def deeplabv2_r101(num_classes: int = 19, pretrained: str | None = None, freeze_bn: bool = True) -> DeepLabV2:
    """Single-level DeepLab-v2 ResNet-101 (no aux output)."""
    return _build(num_classes, pretrained, False, freeze_bn)


def deeplabv2_r101_ml(
    num_classes: int = 19, pretrained: str | None = None, freeze_bn: bool = True
) -> DeepLabV2:
    """Multi-level DeepLab-v2 ResNet-101: extra ASPP classifier on layer3 as aux output (weight 0.1)."""
    return _build(num_classes, pretrained, True, freeze_bn)
