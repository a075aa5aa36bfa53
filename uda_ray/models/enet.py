"""ENet: A Deep Neural Network Architecture for Real-Time Semantic Segmentation (Paszke et al., 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.errors import UserError
from uda_ray.models.resnet import Normalize, load_pretrained, read_pretrained

BN_EPS = 1e-3  # the reference Torch model's BatchNorm epsilon
# (dilation, asymmetric kernel size or 0) of bottlenecks x.1-x.8 of stages 2 and 3: regular, dilated 2,
# asymmetric 5, dilated 4, regular, dilated 8, asymmetric 5, dilated 16 (the paper's Table 1)
SECTION = ((1, 0), (2, 0), (1, 5), (4, 0), (1, 0), (8, 0), (1, 5), (16, 0))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class InitialBlock(nn.Module):
    """3x3 stride-2 conv (13 filters) beside a 2x2 max-pool of the input (3 channels) -> concat -> BN -> PReLU.

    The pool uses ceil_mode so both halves have ceil(H/2) x ceil(W/2) pixels for odd sizes too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 13, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.bn = _bn(16)
        self.act = nn.PReLU(16)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(torch.cat([self.conv(x), self.pool(x)], dim=1)))  # (B, 16, H/2, W/2)


class EncoderBottleneck(nn.Module):
    """Residual bottleneck of stages 1-3 (PReLU everywhere).

    main: 1x1 projection to cout/4 (2x2 stride 2 when downsampling) -> BN -> PReLU -> 3x3 conv (regular or
    dilated) or 5x1 then 1x5 (asymmetric) -> BN -> PReLU -> 1x1 expansion -> BN -> spatial dropout.
    skip: identity, or a 2x2 max-pool whose indices the decoder unpools with, then zero channels up to cout.
    Downsampling halves h, w rounding up (ceil-mode pool; one zero row/column before the 2x2 conv when odd), so
    the decoder's stride-2 transposed conv can give back any size.
    out = PReLU(main + skip). Projections have no bias (the paper); the middle convs keep theirs as in the
    reference Torch model (the first of an asymmetric pair does not).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        dropout: float,
        downsample: bool = False,
        dilation: int = 1,
        asymmetric: int = 0,
    ) -> None:
        super().__init__()
        mid = cout // 4
        stride = 2 if downsample else 1
        if asymmetric:
            pad = asymmetric // 2
            middle: list[nn.Module] = [
                nn.Conv2d(mid, mid, (asymmetric, 1), padding=(pad, 0), bias=False),
                nn.Conv2d(mid, mid, (1, asymmetric), padding=(0, pad)),
            ]
        else:
            middle = [nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation)]
        project = [nn.Conv2d(cin, mid, stride, stride, bias=False), _bn(mid), nn.PReLU(mid)]
        expand = [nn.Conv2d(mid, cout, 1, bias=False), _bn(cout), nn.Dropout2d(dropout)]
        self.main = nn.Sequential(*project, *middle, _bn(mid), nn.PReLU(mid), *expand)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True) if downsample else None
        self.extra_channels = cout - cin
        self.act = nn.PReLU(cout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, cin, h, w) -> (B, cout, h', w') and the max-pool indices (None unless downsampling)."""
        skip, indices = (x, None) if self.pool is None else self.pool(x)  # (B, cin, h', w')
        if self.pool is not None:  # odd h or w: pad one zero row/column so the 2x2 conv meets the pool's ceil
            x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        if self.extra_channels:
            skip = F.pad(skip, (0, 0, 0, 0, 0, self.extra_channels))  # zero feature maps up to cout
        return self.act(self.main(x) + skip), indices


class DecoderBottleneck(nn.Module):
    """Residual bottleneck of stages 4-5 (ReLU everywhere, no dropout, as in the reference model).

    main: 1x1 projection to cout/4 -> BN -> ReLU -> 3x3 conv, or 3x3 stride-2 transposed conv when
    upsampling -> BN -> ReLU -> 1x1 expansion -> BN.
    skip (upsampling): 1x1 conv to cout -> BN -> max-unpooling with the encoder's indices.
    out = ReLU(main + skip).
    """

    def __init__(self, cin: int, cout: int, upsample: bool = False) -> None:
        super().__init__()
        mid = cout // 4
        self.upsample = upsample
        self.reduce = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), _bn(mid), nn.ReLU(inplace=True))
        self.middle = (
            nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1) if upsample else nn.Conv2d(mid, mid, 3, padding=1)
        )
        self.expand = nn.Sequential(_bn(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, cout, 1, bias=False), _bn(cout))
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), _bn(cout)) if upsample else None

    def forward(self, x: Tensor, indices: Tensor | None = None, size: torch.Size | None = None) -> Tensor:
        """(B, cin, h, w) -> (B, cout, h, w), or (B, cout, *size) when upsampling with the pool's indices."""
        y = self.reduce(x)
        if self.skip is None:
            return F.relu(self.expand(self.middle(y)) + x)
        assert indices is not None and size is not None
        y = self.middle(y, output_size=size)  # (B, mid, *size): 2h or 2h-1, as the encoder had
        skip = F.max_unpool2d(self.skip(x), indices, 2, 2, output_size=size)  # (B, cout, *size)
        return F.relu(self.expand(y) + skip)


def _section() -> list[EncoderBottleneck]:
    """Bottlenecks x.1-x.8 of stages 2 and 3 (128 channels, dropout 0.1)."""
    return [EncoderBottleneck(128, 128, 0.1, dilation=d, asymmetric=k) for d, k in SECTION]


class ENet(nn.Module):
    """Initial block (1/2) -> stage 1 (1/4, 64 ch) -> stages 2-3 (1/8, 128 ch) -> stages 4-5 (max-unpooling
    back to 1/2, 16 ch) -> 2x2 stride-2 transposed conv to the input size.

    Input (B, 3, H, W) RGB in 0..255 (normalized inside). Output dict: "out" = logits at the input
    resolution (ENet's native output), "aux" = [], "feat" = the 16-channel stage-5 output at 1/2 fed to
    the final transposed conv. Spatial dropout 0.01 in stage 1, 0.1 in stages 2-3.
    """

    aux_weights: tuple[float, ...] = ()

    def __init__(self, num_classes: int = 19) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.normalize = Normalize()
        self.initial = InitialBlock()
        self.stage1 = nn.ModuleList(
            [EncoderBottleneck(16, 64, 0.01, downsample=True)] + [EncoderBottleneck(64, 64, 0.01) for _ in range(4)]
        )
        # bottleneck2.0 (downsampling), then 2.1-2.8; stage 3 repeats 2.1-2.8
        self.stage2 = nn.ModuleList([EncoderBottleneck(64, 128, 0.1, downsample=True), *_section()])
        self.stage3 = nn.ModuleList(_section())
        self.stage4 = nn.ModuleList(
            [DecoderBottleneck(128, 64, upsample=True), DecoderBottleneck(64, 64), DecoderBottleneck(64, 64)]
        )
        self.stage5 = nn.ModuleList([DecoderBottleneck(64, 16, upsample=True), DecoderBottleneck(16, 16)])
        self.fullconv = nn.ConvTranspose2d(16, num_classes, 2, stride=2)

    def forward(self, x: Tensor) -> dict[str, Tensor | list[Tensor]]:
        size = x.shape[-2:]
        x = self.initial(self.normalize(x))  # (B, 16, H/2, W/2)
        size2 = x.shape[-2:]
        x, idx1 = self.stage1[0](x)  # (B, 64, H/4, W/4)
        for block in self.stage1[1:]:
            x, _ = block(x)
        size4 = x.shape[-2:]
        x, idx2 = self.stage2[0](x)  # (B, 128, H/8, W/8)
        for block in [*self.stage2[1:], *self.stage3]:
            x, _ = block(x)
        x = self.stage4[0](x, idx2, size4)  # (B, 64, H/4, W/4)
        for block in self.stage4[1:]:
            x = block(x)
        x = self.stage5[0](x, idx1, size2)  # (B, 16, H/2, W/2)
        feat = self.stage5[1](x)
        out = self.fullconv(feat)[..., : size[0], : size[1]]  # (B, C, H, W); odd H or W: crop the extra row/col
        return {"out": out, "aux": [], "feat": feat}

    def param_groups(self, lr: float) -> list[dict]:
        """One group at `lr`: ENet trains from scratch, with no backbone to treat apart."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]


def enet(num_classes: int = 19, pretrained: str | None = None) -> ENet:
    """ENet; `pretrained` is None or a local `.pth` full-model state dict (there is no ImageNet backbone)."""
    if pretrained == "imagenet":
        raise UserError("enet has no ImageNet-pretrained backbone; give a local .pth file or none")
    state = read_pretrained(pretrained, depth=0)  # None or a path here; depth only picks an ImageNet ResNet
    model = ENet(num_classes)
    load_pretrained(model, model, state, str(pretrained))
    return model
