"""Model contract, parametrized over every MODELS entry; discriminators; the profiler."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from uda_ray.errors import UserError
from uda_ray.models import MODELS
from uda_ray.models.discriminators import DISCRIMINATORS, DSCDiscriminator, FCDiscriminator
from uda_ray.models.profile import count_gflops, count_params, profile
from uda_ray.results.text import profile_report

H, W = 64, 128  # tiny input
STRIDES = {"enet": (1, 2)}  # (stride of "out", stride of "feat"); every other model has both at 1/8
FROZEN_BN_MODELS = [n for n in MODELS if "freeze_bn" in inspect.signature(MODELS[n]).parameters]


@pytest.fixture(scope="module")
def build() -> Callable[[str], nn.Module]:
    """Build each model once per test module (ResNet-101 init is the slow part)."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = MODELS[name](num_classes=19)
        return cache[name]

    return get


def _image(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, H, W) * 255  # RGB in 0..255, unnormalized


@pytest.mark.parametrize("name", list(MODELS))
def test_train_mode_outputs_and_aux_match_aux_weights(build, name: str) -> None:
    model = build(name).train()
    out = model(_image())
    s_out, s_feat = STRIDES.get(name, (8, 8))
    assert set(out) == {"out", "aux", "feat"}
    assert out["out"].shape == (2, 19, H // s_out, W // s_out)
    assert out["feat"].shape[0] == 2 and out["feat"].shape[-2:] == (H // s_feat, W // s_feat)
    assert isinstance(out["aux"], list) and len(out["aux"]) == len(model.aux_weights)
    for aux in out["aux"]:
        assert aux.shape[:2] == (2, 19) and aux.shape[-1] >= 1
    assert all(isinstance(w, float) for w in model.aux_weights)


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_mode_has_no_aux(build, name: str) -> None:
    model = build(name).eval()
    with torch.no_grad():
        out = model(_image(1))
    s_out, _ = STRIDES.get(name, (8, 8))
    assert out["out"].shape == (1, 19, H // s_out, W // s_out)
    assert out["aux"] == []
    assert torch.isfinite(out["out"]).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_input_is_normalized_inside_with_imagenet_stats(build, name: str) -> None:
    model = build(name)
    mean_image = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 4, 4) * 255
    assert torch.allclose(model.normalize(mean_image), torch.zeros(1, 3, 4, 4), atol=1e-6)
    assert not any(n.startswith("normalize") for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_param_groups_cover_every_trainable_parameter_once(build, name: str) -> None:
    model = build(name)
    groups = model.param_groups(1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(g["lr"] in (pytest.approx(1e-3), pytest.approx(1e-2)) for g in groups)


def test_deeplab_classifiers_get_ten_times_the_lr(build) -> None:
    model = build("deeplabv2_r101_ml")
    backbone, heads = model.param_groups(2.5e-4)
    assert backbone["lr"] == pytest.approx(2.5e-4) and heads["lr"] == pytest.approx(2.5e-3)
    head_ids = {id(p) for m in (model.classifier, model.aux_classifier) for p in m.parameters()}
    assert {id(p) for p in heads["params"]} == head_ids


def test_bisenet_has_one_group_at_lr(build) -> None:
    (group,) = build("bisenet_r18").param_groups(0.025)
    assert group["lr"] == 0.025


@pytest.mark.parametrize("name", FROZEN_BN_MODELS)
def test_frozen_bn_stays_frozen_after_train(build, name: str) -> None:
    model = build(name).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = [m.running_mean.clone() for m in bns]
    model(_image(1))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True))


def test_deeplab_bn_trains_when_not_frozen() -> None:
    model = MODELS["deeplabv2_r101"](freeze_bn=False).train()
    bn = model.backbone.bn1
    assert bn.training and bn.weight.requires_grad
    before = bn.running_mean.clone()
    model(_image(2))
    assert not torch.equal(before, bn.running_mean)


def test_backbone_pth_file_loads_into_bisenet_r18(tmp_path: Path) -> None:
    resnet = torchvision.models.resnet18(weights=None)  # includes an fc head, as torchvision files do
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = MODELS["bisenet_r18"](pretrained=str(path))
    assert torch.equal(model.backbone.layer3[1].conv2.weight, resnet.layer3[1].conv2.weight)
    assert torch.equal(model.backbone.bn1.running_var, resnet.bn1.running_var)


def test_full_model_state_dict_loads(tmp_path: Path) -> None:
    source = MODELS["bisenet_r18"]()
    path = tmp_path / "model.pth"
    torch.save({"model": source.state_dict()}, path)
    model = MODELS["bisenet_r18"](pretrained=str(path))
    assert torch.equal(model.ffm.fuse[0].weight, source.ffm.fuse[0].weight)
    assert torch.equal(model.backbone.conv1.weight, source.backbone.conv1.weight)


@pytest.mark.parametrize("name", list(MODELS))
def test_missing_pretrained_file_is_a_one_line_user_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / "nowhere.pth"
    with pytest.raises(UserError, match="nowhere.pth") as err:
        MODELS[name](pretrained=str(path))
    assert "\n" not in str(err.value)


def test_enet_parameter_count() -> None:
    assert count_params(MODELS["enet"](num_classes=19)) == 364_311  # the paper: 0.37 M


def test_enet_trains_at_batch_one() -> None:
    torch.manual_seed(0)
    model = MODELS["enet"]().train()
    out = model(_image(1))
    out["out"].logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_enet_output_has_the_input_size_when_odd() -> None:
    with torch.no_grad():
        out = MODELS["enet"]().eval()(torch.rand(1, 3, 45, 61) * 255)
    assert out["out"].shape == (1, 19, 45, 61)
    assert out["feat"].shape == (1, 16, 23, 31)


def test_enet_rejects_imagenet_weights_in_one_line() -> None:
    with pytest.raises(UserError, match="enet has no ImageNet-pretrained backbone") as err:
        MODELS["enet"](pretrained="imagenet")
    assert "\n" not in str(err.value)


def test_enet_full_model_state_dict_loads(tmp_path: Path) -> None:
    source = MODELS["enet"]()
    path = tmp_path / "enet.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = MODELS["enet"](pretrained=str(path))
    assert torch.equal(model.stage3[7].main[3].weight, source.stage3[7].main[3].weight)
    assert torch.equal(model.fullconv.weight, source.fullconv.weight)


def test_backbone_of_the_wrong_depth_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(UserError, match="does not fit"):
        MODELS["bisenet_r101"](pretrained=str(path))


@pytest.mark.parametrize(("name", "expected"), [("fc", 2_781_121), ("dsc", 191_364)])
def test_discriminator_parameter_counts(name: str, expected: int) -> None:
    assert count_params(DISCRIMINATORS[name](19)) == expected


@pytest.mark.parametrize("cls", [FCDiscriminator, DSCDiscriminator])
def test_discriminator_outputs_one_logit_map_at_1_32(cls: type[nn.Module]) -> None:
    out = cls(19)(torch.softmax(torch.randn(2, 19, H, W), dim=1))
    assert out.shape == (2, 1, H // 32, W // 32)


def test_dsc_discriminator_is_depthwise_separable() -> None:
    convs = [m for m in DSCDiscriminator(19).modules() if isinstance(m, nn.Conv2d)]
    depthwise, pointwise = convs[0::2], convs[1::2]
    assert all(c.groups == c.in_channels == c.out_channels and c.kernel_size == (4, 4) for c in depthwise)
    assert all(c.kernel_size == (1, 1) and c.groups == 1 for c in pointwise)


def test_count_gflops_of_one_conv_counts_a_multiply_add_as_two() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    macs = 8 * 16 * 16 * 3 * 3 * 3  # out channels * out pixels * (in channels * k * k)
    assert count_gflops(conv, (16, 16)) == pytest.approx(2 * macs / 1e9)
    assert count_gflops(conv, (16, 16), batch=2) == pytest.approx(4 * macs / 1e9)


def test_profile_measures_params_gflops_and_latency() -> None:
    result = profile("disc_dsc", size=(64, 64), device="cpu")
    assert result["params"] == 191_364
    assert result["gflops"] == pytest.approx(2.135425024 * (64 * 64) / (512 * 1024))
    assert result["latency_ms"] > 0 and result["fps"] == pytest.approx(1000 / result["latency_ms"])
    report = profile_report(result)
    assert "0.191 M" in report and "paper" not in report  # the DSC discriminator's paper gives no figures


def test_profile_report_sets_the_enet_papers_figures_beside_ours() -> None:
    ours = {"name": "enet", "size": (360, 640), "device": "cpu", "amp": False, "params": 364_000, "gflops": 3.45,
            "latency_ms": 20.0, "fps": 50.0}
    lines = profile_report(ours).splitlines()
    assert "0.364 M" in lines[1] and "3.45" in lines[2]
    assert "0.370 M params, 3.83 GFLOPs @ 360x640" in lines[5] and "arXiv:1606.02147" in lines[6]


def test_profile_rejects_unknown_names() -> None:
    with pytest.raises(UserError, match="bisenet_r18"):
        profile("resnet50")
