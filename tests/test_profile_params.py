"""`uda-ray profile`'s second parameter count for BiSeNet: the one its PyTorch code (and the BiSeNet-R18 domain
adaptation reports built on it, 12.6 M) gives, with the context path's unused torchvision ResNet `fc`."""

from __future__ import annotations

import pytest
from torch import nn
from torchvision import models as tvm

from uda_ray.models import MODELS
from uda_ray.models.discriminators import DISCRIMINATORS
from uda_ray.models.profile import count_params, profile, unused_resnet_fc_params

RESNET18_FC = 512 * 1000 + 1000  # torchvision's ImageNet head: Linear(512, 1000) weight + bias
RESNET101_FC = 2048 * 1000 + 1000


def test_bisenet_r18_counted_as_its_paper_code_counts_it_is_the_published_12_6_m():
    model = MODELS["bisenet_r18"](num_classes=19)
    assert unused_resnet_fc_params(model) == RESNET18_FC == 513_000
    ours = count_params(model)
    assert ours == 12_067_904  # no fc: 12.07 M
    assert ours + RESNET18_FC == 12_580_904
    assert round((ours + RESNET18_FC) / 1e6, 1) == 12.6  # the reports' "12.6 M"


def test_the_head_counted_is_exactly_what_our_backbone_leaves_out_of_torchvisions_resnet():
    model = MODELS["bisenet_r18"](num_classes=19)
    full = count_params(tvm.resnet18(weights=None))  # what BiSeNet's code stores in its context path
    assert full - count_params(model.backbone) == unused_resnet_fc_params(model)


def test_bisenet_r101_counts_the_wider_resnet101_head():
    assert unused_resnet_fc_params(MODELS["bisenet_r101"](num_classes=19)) == RESNET101_FC


def test_a_backbone_that_kept_its_fc_adds_nothing():
    model = MODELS["bisenet_r18"](num_classes=19)
    model.backbone.fc = nn.Linear(512, 1000)
    assert unused_resnet_fc_params(model) == 0


@pytest.mark.parametrize("model", [MODELS["enet"](num_classes=19), DISCRIMINATORS["fc"](19)])
def test_models_without_a_resnet_context_path_get_no_second_count(model):
    assert unused_resnet_fc_params(model) is None


def test_profile_reports_both_counts_for_bisenet_and_one_for_others():
    result = profile("bisenet_r18", size=(64, 128))
    assert result["params"] == 12_067_904
    assert result["params_with_resnet_fc"] == 12_580_904
    assert "513,000" in result["params_with_resnet_fc_note"]
    assert "https://github.com/ooooverflow/BiSeNet" in result["params_with_resnet_fc_note"]
    other = profile("disc_dsc", size=(64, 64))
    assert "params_with_resnet_fc" not in other and "params_with_resnet_fc_note" not in other
