"""Pieces shared by the segmenters: torchvision ResNet backbones, input normalization, weight loading."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tvm

from uda_ray.config import NORMALIZATIONS
from uda_ray.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)  # the originals' IMG_MEAN (AdaptSegNet, ADVENT)

# depth -> (torchvision builder, ImageNet weights used for pretrained="imagenet")
RESNETS = {
    18: (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    101: (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1),
}


class Normalize(nn.Module):
    """RGB in 0..255 -> (x / 255 - mean) / std with the ImageNet statistics (non-persistent buffers)."""

    mean: Tensor
    std: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x / 255.0 - self.mean) / self.std  # (B, 3, H, W)


class CaffeNormalize(nn.Module):
    """RGB in 0..255 -> BGR minus the Caffe mean, no std division (the input the originals' DeepLab weights
    expect, and what the BiSeNet code of the AdaptSegNet-derived student projects feeds: `image[:, :, ::-1]`
    then `image -= IMG_MEAN`)."""

    mean: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x.flip(1) - self.mean  # (B, 3, H, W): RGB -> BGR


def set_input_normalization(model: nn.Module, name: str) -> nn.Module:
    """`data.normalize` applied to a segmenter (in place; returned): "imagenet" keeps the model's own input
    normalization (ImageNet mean/std; a caffe-style DeepLab keeps its Caffe mean, a proda-style its RGB / 255,
    which their weights need), "caffe_bgr" replaces it by `CaffeNormalize`. Every model normalizes inside its
    forward (its `normalize` module), so the choice reaches every place an image enters it: training,
    evaluation, pseudo-labels, the IntraDA ranking; FDA swaps spectra of the 0..255 images before that, as the
    original does."""
    if name not in NORMALIZATIONS:
        raise ValueError(f"unknown input normalization {name!r} (valid: {', '.join(NORMALIZATIONS)})")
    if name == "caffe_bgr":
        if not isinstance(getattr(model, "normalize", None), nn.Module):
            raise UserError(f"data.normalize: caffe_bgr needs a model with a `normalize` module "
                            f"({type(model).__name__} has none)")
        model.normalize = CaffeNormalize()
    return model


def resnet(depth: int, dilate: tuple[bool, bool, bool] = (False, False, False)) -> tvm.ResNet:
    """A randomly initialised torchvision ResNet without its head (`fc`, `avgpool` -> Identity).

    Its state-dict keys are torchvision's minus `fc.*`, so torchvision checkpoints load into it.
    `dilate` is torchvision's `replace_stride_with_dilation` for layer2..layer4.
    """
    builder, _ = RESNETS[depth]
    net = builder(weights=None, replace_stride_with_dilation=list(dilate))
    net.fc = nn.Identity()
    net.avgpool = nn.Identity()
    return net


def resnet_stages(net: tvm.ResNet, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalized (B, 3, H, W) -> outputs of layer1..layer4 (strides 4, 8, 16, 32 without dilation)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))  # (B, 64, H/4, W/4)
    f1 = net.layer1(x)
    f2 = net.layer2(f1)
    f3 = net.layer3(f2)
    f4 = net.layer4(f3)
    return f1, f2, f3, f4


def read_pretrained(pretrained: str | None, depth: int) -> dict[str, Tensor] | None:
    """Resolve `pretrained` to a state dict (before the model is built, so a bad path fails fast).

    None: random init. "imagenet": torchvision's ImageNet ResNet-`depth` weights (downloads them
    unless cached). Otherwise a path to a `.pth` file holding either a torchvision ResNet state dict
    (keys like `layer1.0.conv1.weight`) or a full-model state dict (keys like
    `backbone.layer1.0.conv1.weight`), optionally wrapped under "state_dict" / "model" and with
    DDP's "module." prefix.
    """
    if pretrained is None:
        return None
    if pretrained == "imagenet":
        return RESNETS[depth][1].get_state_dict(progress=False)
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise UserError(f"pretrained weights file not found: {path}")
    try:
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise UserError(f"{path}: cannot be read as a state dict ({type(err).__name__})") from err


def load_pretrained(
    model: nn.Module, backbone: nn.Module, state: dict[str, Tensor] | None, source: str
) -> None:
    """Load a `read_pretrained` result in place: into `backbone` if it has torchvision ResNet keys
    (its `fc.*` head is dropped), else into the whole `model`. A mismatch -> one-line UserError."""
    if state is None:
        return
    _load(backbone if "conv1.weight" in state else model, state, source)


def _unwrap(obj: object) -> dict[str, Tensor]:
    """A checkpoint object -> a flat name -> tensor dict."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError("not a dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Strict load (ignoring a torchvision `fc.*` head); a mismatch -> one-line UserError."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        first = (missing + unexpected + shapes)[0]
        raise UserError(
            f"{source}: does not fit {type(module).__name__} ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(shapes)} wrongly shaped keys, e.g. {first!r})"
        )
    module.load_state_dict(state, strict=True)
