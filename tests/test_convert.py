"""The Caffe-style DeepLab-v2 and `uda-ray convert-weights`, on checkpoints the tests write in the originals'
layout (AdaptSegNet model/deeplab*.py, ADVENT advent/model/deeplabv2.py parameter names); no downloads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from uda_ray.cli import main
from uda_ray.config import ConfigError
from uda_ray.errors import UserError
from uda_ray.models.convert import convert_state_dict
from uda_ray.models.deeplabv2 import CAFFE_MEAN_BGR, DeepLabV2, deeplabv2_r101
from uda_ray.models.resnet import load_pretrained, read_pretrained, resnet_stages

TINY = (1, 1, 1, 1)  # blocks per stage: real channel widths, few blocks, so the test stays small


# -- an independent model in the originals' layout (their names, their architecture) -------------------


class OrigBottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, stride=stride, bias=False)  # the stride on the 1x1 conv
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride=stride, bias=False),
                                        nn.BatchNorm2d(planes * 4)) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class OrigASPP(nn.Module):
    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(nn.Conv2d(cin, num_classes, 3, padding=r, dilation=r) for r in (6, 12, 18, 24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.conv2d_list)


class OrigDeepLab(nn.Module):
    """`heads`: {"layer5": 1024 or 2048 input channels, "layer6": ...} as in the original files."""

    def __init__(self, blocks: tuple[int, ...], heads: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, stride, dilation) in enumerate([(64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4)]):
            layer = []
            for b in range(blocks[i]):
                layer.append(OrigBottleneck(cin, planes, stride if b == 0 else 1, dilation, downsample=b == 0))
                cin = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        for name, (channels, classes) in heads.items():
            setattr(self, name, OrigASPP(channels, classes))
        self.heads = heads
        g = torch.Generator().manual_seed(0)
        for m in self.modules():  # non-trivial BatchNorm statistics, so a wrong mapping shows
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)

    def forward(self, bgr_centered: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.relu(self.bn1(self.conv1(bgr_centered)))
        x = nn.functional.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)
        f3 = self.layer3(self.layer2(self.layer1(x)))
        f4 = self.layer4(f3)
        return {name: getattr(self, name)(f4 if channels == 2048 else f3)
                for name, (channels, _) in self.heads.items()} | {"f4": f4}


def _caffe_input(rgb: torch.Tensor) -> torch.Tensor:
    return rgb[:, [2, 1, 0]] - torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)


def _orig_state(model: nn.Module, prefix: str = "", drop_counters: bool = False) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in model.state_dict().items()
            if not (drop_counters and k.endswith("num_batches_tracked"))}


@pytest.mark.parametrize("layout", ["advent_multi", "adaptsegnet_single_scale_prefix"])
def test_converted_checkpoint_computes_what_the_original_computes(layout):
    torch.manual_seed(0)
    if layout == "advent_multi":  # ADVENT: layer5 = aux on layer3, layer6 = main on layer4
        orig = OrigDeepLab(TINY, {"layer5": (1024, 7), "layer6": (2048, 7)}).eval()
        state, main_key, aux_key = _orig_state(orig), "layer6", "layer5"
    else:  # AdaptSegNet single-level deeplab.py: layer5 = the main head; an old file: no BN counters
        orig = OrigDeepLab(TINY, {"layer5": (2048, 7)}).eval()
        state, main_key, aux_key = _orig_state(orig, "Scale.", drop_counters=True), "layer5", None
    ours_state, summary = convert_state_dict(state, num_classes=7)
    assert summary["layout"] == "full model"
    ours = DeepLabV2(7, multi_level=aux_key is not None, freeze_bn=True, style="caffe", blocks=TINY)
    ours.load_state_dict(ours_state, strict=True)
    ours.train()  # freeze_bn: BatchNorm stays in eval mode, and the aux head is returned
    rgb = torch.rand(1, 3, 63, 95) * 255  # conv1 gives 32x48: the ceil-mode pool gives 17x25 (floor: 16x24)
    with torch.no_grad():
        want, got = orig(_caffe_input(rgb)), ours(rgb)
    torch.testing.assert_close(got["out"], want[main_key], rtol=1e-4, atol=1e-4)
    if aux_key:
        torch.testing.assert_close(got["aux"][0], want[aux_key], rtol=1e-4, atol=1e-4)


def test_the_init_file_loses_its_foreign_head_and_loads_into_the_backbone(tmp_path):
    """The originals' ImageNet init: `Scale.` prefix and a classifier for other classes (they drop it too)."""
    orig = OrigDeepLab(TINY, {"layer5": (2048, 21)}).eval()
    src, dst = tmp_path / "DeepLab_resnet_pretrained_init.pth", tmp_path / "converted.pth"
    torch.save(_orig_state(orig, "Scale."), src)
    assert main(["convert-weights", str(src), str(dst), "--num-classes", "19"]) == 0
    ours = DeepLabV2(19, style="caffe", blocks=TINY).eval()
    load_pretrained(ours, ours.backbone, read_pretrained(str(dst), 101), str(dst))
    rgb = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        f4 = resnet_stages(ours.backbone, ours.normalize(rgb))[3]
        torch.testing.assert_close(f4, orig(_caffe_input(rgb))["f4"], rtol=1e-4, atol=1e-4)


def test_full_resnet101_layout_maps_onto_the_caffe_deeplab_exactly():
    orig = OrigDeepLab((3, 4, 23, 3), {"layer5": (1024, 19), "layer6": (2048, 19)})
    state, summary = convert_state_dict(_orig_state(orig, "module."), num_classes=19)
    assert summary["classifiers"] == {"layer5": "aux_classifier", "layer6": "classifier"}
    ours = DeepLabV2(19, multi_level=True, style="caffe")
    own = ours.state_dict()
    assert set(state) == set(own) and all(state[k].shape == own[k].shape for k in own)


def test_convert_weights_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    assert main(["convert-weights", str(bad), str(tmp_path / "out.pth")]) == 2
    assert not (tmp_path / "out.pth").exists()
    assert "not in the AdaptSegNet / ADVENT DeepLab-v2 layout" in capsys.readouterr().err
    good = tmp_path / "good.pth"
    torch.save(_orig_state(OrigDeepLab(TINY, {})), good)
    (tmp_path / "taken.pth").write_bytes(b"x")
    assert main(["convert-weights", str(good), str(tmp_path / "taken.pth")]) == 2
    assert (tmp_path / "taken.pth").read_bytes() == b"x"


def test_caffe_style_refuses_torchvision_imagenet_weights():
    with pytest.raises(ConfigError, match="convert-weights"):
        deeplabv2_r101(pretrained="imagenet", style="caffe")
    with pytest.raises(ConfigError, match="style"):
        DeepLabV2(19, style="pytorch")


def test_convert_weights_is_in_the_python_api(tmp_path):
    import uda_ray

    src = tmp_path / "advent.pth"
    torch.save(_orig_state(OrigDeepLab(TINY, {"layer5": (1024, 19), "layer6": (2048, 19)})), src)
    s = uda_ray.convert_weights(src, tmp_path / "out.pth", num_classes=19)
    assert s["classifiers"] == {"layer5": "aux_classifier", "layer6": "classifier"} and s["layout"] == "full model"
    assert (tmp_path / "out.pth").is_file()


# -- CPSL (lslrh/CPSL models/deeplabv2.py: ResNet101 with ProDA's Classifier_Module2, optional bn_pretrain) ------


class OrigSEBlock(nn.Module):
    def __init__(self, n: int, r: int = 16) -> None:
        super().__init__()
        self.se = nn.Sequential(nn.Linear(n, n // r), nn.ReLU(), nn.Linear(n // r, n), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.se(x.mean(dim=(2, 3)))[:, :, None, None]


class OrigClassifierModule2(nn.Module):
    """Their names: conv2d_list.<i> = (conv, GroupNorm, ReLU); bottleneck = (SEBlock, conv, GroupNorm);
    head = (Dropout2d, 1x1 conv without bias)."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(cin, 256, 1), nn.GroupNorm(32, 256), nn.ReLU())]
            + [nn.Sequential(nn.Conv2d(cin, 256, 3, padding=r, dilation=r), nn.GroupNorm(32, 256), nn.ReLU())
               for r in (6, 12, 18, 24)])
        self.bottleneck = nn.Sequential(OrigSEBlock(1280), nn.Conv2d(1280, 256, 3, padding=1),
                                        nn.GroupNorm(32, 256))
        self.head = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bottleneck(torch.cat([b(x) for b in self.conv2d_list], dim=1)))


class OrigCPSL(OrigDeepLab):
    def __init__(self, blocks: tuple[int, ...], num_classes: int, bn_clr: bool) -> None:
        super().__init__(blocks, {})
        self.layer5 = OrigClassifierModule2(2048, num_classes)
        self.bn_pretrain = nn.BatchNorm2d(2048) if bn_clr else None
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # every head tensor random (GroupNorm's too), so a swapped mapping shows
            for name, p in self.named_parameters():
                if name.startswith("layer5"):
                    p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.5) + (p.dim() == 1))
            if bn_clr:
                self.bn_pretrain.running_mean.copy_(torch.randn(2048, generator=g) * 0.1)
                self.bn_pretrain.running_var.copy_(torch.rand(2048, generator=g) + 0.5)
                self.bn_pretrain.weight.copy_(torch.rand(2048, generator=g) + 0.5)

    def forward(self, rgb01: torch.Tensor) -> dict[str, torch.Tensor]:  # CPSL's input: RGB / 255
        f4 = super().forward(rgb01)["f4"]
        return {"out": self.layer5(self.bn_pretrain(f4) if self.bn_pretrain is not None else f4)}


def _cpsl_pkl(orig: nn.Module, path, prefix: str = "") -> None:
    """As CPSL's train.py validation() saves it (numpy best_iou, a prototypes tensor, the discriminator too)."""
    import numpy as np

    torch.save({"ResNet101": {"model_state": _orig_state(orig, prefix),
                              "prototypes_ema": torch.zeros(3, 256, requires_grad=True)},
                "FCDiscriminator": {"model_state": {"conv1.weight": torch.zeros(2, 2)}},
                "iter": 1000, "best_iou": np.float64(55.7)}, path)


@pytest.mark.parametrize("bn_clr", [False, True])
def test_cpsl_checkpoint_computes_what_cpsl_computes(bn_clr, tmp_path):
    torch.manual_seed(0)
    orig = OrigCPSL(TINY, 3, bn_clr).eval()
    src, dst = tmp_path / "from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl", tmp_path / "ours.pth"
    _cpsl_pkl(orig, src, prefix="module." if bn_clr else "")
    assert main(["convert-weights", str(src), str(dst), "--num-classes", "3"]) == 0
    ours = DeepLabV2(3, freeze_bn=False, style="proda", head="proda", blocks=TINY, bn_clr=bn_clr).eval()
    ours.load_state_dict(torch.load(dst, weights_only=True), strict=True)
    rgb = torch.rand(1, 3, 63, 95) * 255
    with torch.no_grad():
        torch.testing.assert_close(ours(rgb)["out"], orig(rgb / 255)["out"], rtol=1e-4, atol=1e-4)


def test_cpsl_layout_maps_onto_the_full_proda_deeplab_exactly():
    state, summary = convert_state_dict(_orig_state(OrigCPSL((3, 4, 23, 3), 19, True)), num_classes=19)
    assert summary["layout"] == "cpsl" and summary["kwargs"] == {"style": "proda", "head": "proda", "bn_clr": True}
    own = DeepLabV2(19, style="proda", head="proda", bn_clr=True).state_dict()
    assert set(state) == set(own) and all(state[k].shape == own[k].shape for k in own)


def test_cpsl_refusals_are_one_line(tmp_path, capsys):
    state = _orig_state(OrigCPSL(TINY, 3, False))
    no_se = {k.replace("bottleneck.0.se.", "bottleneck.9."): v for k, v in state.items()}  # use_se=False-like
    with pytest.raises(UserError, match="not in CPSL's DeepLab-v2 layout"):
        convert_state_dict(no_se)
    with pytest.raises(UserError, match="of its 29 tensors"):
        convert_state_dict({k: v for k, v in state.items() if "conv2d_list.4" not in k})
    with pytest.raises(UserError, match="3 classes, not 19"):
        convert_state_dict(state, num_classes=19)
    src = tmp_path / "bad.pkl"
    torch.save({"ResNet101": {"prototypes_ema": torch.zeros(1)}}, src)
    assert main(["convert-weights", str(src), str(tmp_path / "out.pth")]) == 2
    assert "holds no 'model_state'" in capsys.readouterr().err and not (tmp_path / "out.pth").exists()


def test_evaluate_reads_a_cpsl_pkl_and_names_the_settings_it_needs(tmp_path):
    from types import SimpleNamespace

    from uda_ray.driver.evaluate import _weights_state

    src = tmp_path / "stage3.pkl"
    _cpsl_pkl(OrigCPSL(TINY, 3, True), src)
    cfg = SimpleNamespace(model=SimpleNamespace(num_classes=3, kwargs={"head": "proda", "style": "proda"}))
    with pytest.raises(UserError, match="--set model.kwargs.bn_clr=true$"):
        _weights_state(cfg, src)
    cfg.model.kwargs["bn_clr"] = True
    state = _weights_state(cfg, src)
    DeepLabV2(3, style="proda", head="proda", blocks=TINY, bn_clr=True).load_state_dict(state, strict=True)
