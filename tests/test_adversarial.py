"""AdaptSegNet (adversarial), ADVENT (MinEnt, AdvEnt) and IntraDA's entropy ranking."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tests.conftest import NUM_CLASSES, TinySeg, make_batch
from uda_ray.config import OptimConfig
from uda_ray.config_loader import build
from uda_ray.errors import ConfigError
from uda_ray.losses import charbonnier_entropy, entropy_loss, self_information
from uda_ray.methods import METHODS
from uda_ray.methods.advent import AdvEnt, MinEnt, MinEntConfig
from uda_ray.methods.adversarial import Adversarial, AdversarialConfig, d_input_size
from uda_ray.methods.base import UDABatch
from uda_ray.methods.source_only import SourceOnly
from uda_ray.models.discriminators import DSCDiscriminator, FCDiscriminator
from uda_ray.pipelines.intrada_rank import pseudo_label_path, rank_by_entropy, read_split, write_split

OPTIM = OptimConfig(name="sgd", lr=1e-2, momentum=0.9, weight_decay=1e-4)


def make(cls: type, seed: int = 0, model: nn.Module | None = None, **cfg):
    torch.manual_seed(seed)
    model = model if model is not None else TinySeg()
    return cls(model, cls.Config(**cfg), OPTIM, num_classes=NUM_CLASSES)


def clone(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- entropy maps ---------------------------------------------------------------------------


def test_entropy_loss_is_one_for_uniform_and_zero_for_one_hot():
    uniform = torch.full((2, 4, 3, 5), 0.25)
    assert entropy_loss(uniform).item() == pytest.approx(1.0, abs=1e-6)
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 3, 5)), 4).permute(0, 3, 1, 2).float()
    assert entropy_loss(one_hot).item() == pytest.approx(0.0, abs=1e-6)


def test_entropies_of_float16_probabilities_with_exact_zeros_are_finite():
    """fp16 autocast on CPU leaves softmax in float16, where tiny probabilities underflow to 0 and the
    1e-30 guard rounds away: 0 * log(0) was NaN. Computed in float32 they equal the float32 values."""
    probs = F.softmax(torch.tensor([[0.0, 30.0, -30.0]]).half(), dim=1)[:, :, None, None]  # (1, 3, 1, 1)
    assert (probs == 0).any()
    for loss in (entropy_loss, charbonnier_entropy):
        assert torch.isfinite(loss(probs)) and loss(probs) == loss(probs.float())


def test_self_information_matches_a_two_class_hand_example():
    # two pixels: p = (0.25, 0.75) and (0.5, 0.5)
    probs = torch.tensor([[0.25, 0.5], [0.75, 0.5]]).reshape(1, 2, 1, 2)
    # log2(C) = 1: I = -p log2 p -> 0.25 * 2 = 0.5, 0.75 * log2(4/3) = 0.311278, 0.5, 0.5
    expected = torch.tensor([[0.5, 0.5], [0.75 * math.log2(4 / 3), 0.5]]).reshape(1, 2, 1, 2)
    torch.testing.assert_close(self_information(probs), expected)
    assert entropy_loss(probs).item() == pytest.approx((0.5 + 0.75 * math.log2(4 / 3) + 1.0) / 2, abs=1e-6)


# -- adversarial ----------------------------------------------------------------------------


def test_discriminator_step_leaves_segmenter_grads_and_params_untouched():
    m = make(Adversarial)
    _, src_maps, tgt_maps = m._segmenter_step(make_batch(0))
    seg = list(m.model_raw.parameters())
    params, grads = clone(seg), clone(p.grad for p in seg)
    d_before = clone(m.discs["main"].parameters())
    logs = m._discriminator_step(src_maps, tgt_maps)
    assert same(params, clone(seg)) and same(grads, clone(p.grad for p in seg))
    assert not same(d_before, clone(m.discs["main"].parameters()))
    assert set(logs) == {"loss/d_src", "loss/d_tgt"}


def test_segmenter_step_does_not_update_the_discriminator():
    m = make(Adversarial, multi_level=True)
    discs = [m.discs["main"], m.discs["aux"]]
    d_before = [clone(d.parameters()) for d in discs]
    seg_before = clone(m.model_raw.parameters())
    m._segmenter_step(make_batch(0))
    for d, before in zip(discs, d_before):
        assert same(before, clone(d.parameters()))
        assert all(p.grad is None and p.requires_grad for p in d.parameters())
    assert not same(seg_before, clone(m.model_raw.parameters()))


@pytest.mark.parametrize("cls, cfg", [(Adversarial, {"lambda_adv": 0.0}), (AdvEnt, {"lambda_adv": 0.0}),
                                      (MinEnt, {"lambda_ent": 0.0})])
def test_zero_adaptation_weight_gives_the_source_only_update(cls, cfg):
    ours, ref = make(cls, **cfg), make(SourceOnly)
    assert same(clone(ours.model_raw.parameters()), clone(ref.model_raw.parameters()))
    for step in range(2):
        ours.train_step(make_batch(step), step)
        ref.train_step(make_batch(step), step)
    assert same(clone(ours.model_raw.parameters()), clone(ref.model_raw.parameters()))


@pytest.mark.parametrize("name, d_cls", [("fc", FCDiscriminator), ("dsc", DSCDiscriminator)])
def test_both_discriminators_train(name, d_cls):
    m = make(Adversarial, discriminator=name)
    assert isinstance(m.discs["main"], d_cls)
    logs = m.train_step(make_batch(0), 0)
    assert set(logs) == {"loss/seg_src", "loss/adv", "loss/d_src", "loss/d_tgt"}
    assert all(torch.isfinite(v) for v in logs.values())


def test_multi_level_builds_two_discriminators_with_their_optimizers():
    m = make(Adversarial, multi_level=True)
    assert set(m.discs) == {"main", "aux"} and m.discs["main"] is not m.discs["aux"]
    assert len(m.optimizers) == 3  # segmenter + two D's, all under the poly schedule
    assert {"d_main", "opt_d_main", "d_aux", "opt_d_aux"} <= set(m.state_dict())
    logs = m.train_step(make_batch(0), 0)
    assert {"loss/adv_aux", "loss/d_src_aux", "loss/d_tgt_aux"} <= set(logs)


def test_single_level_has_one_discriminator_and_uses_the_model_aux_weights():
    m = make(Adversarial)
    assert set(m.discs) == {"main"} and len(m.optimizers) == 2
    assert m.seg_aux_weights == TinySeg.aux_weights
    assert make(Adversarial, lambda_seg_aux=0.1).seg_aux_weights == (0.1,)


def test_d_optimizer_defaults_are_adam_1e4():
    opt = make(Adversarial).d_opts["main"]
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["betas"] == (0.9, 0.99)


class NoAux(TinySeg):
    aux_weights = ()

    def forward(self, x: torch.Tensor) -> dict:
        return {**super().forward(x), "aux": []}


@pytest.mark.parametrize("cls", [Adversarial, AdvEnt, MinEnt])
def test_multi_level_without_aux_outputs_raises(cls):
    with pytest.raises(ConfigError, match="multi_level"):
        make(cls, model=NoAux(), multi_level=True)


@pytest.mark.parametrize("cfg_cls, kwargs", [
    (AdversarialConfig, {"discriminator": "patchgan"}),
    (AdversarialConfig, {"lambda_adv": -1e-3}),
    (AdversarialConfig, {"lambda_adv_aux": float("nan")}),
    (AdversarialConfig, {"lambda_seg_aux": -0.1}),
    (AdversarialConfig, {"d_optim": {"name": "adam"}}),
    (MinEntConfig, {"lambda_ent": -1.0}),
    (MinEntConfig, {"lambda_ent_aux": float("inf")}),
])
def test_bad_config_values_raise_config_error(cfg_cls, kwargs):
    with pytest.raises(ConfigError):
        cfg_cls(**kwargs)


def test_config_builds_from_yaml_dict_and_rejects_unknown_keys():
    cfg = build(AdversarialConfig, {"discriminator": "dsc", "d_optim": {"name": "rmsprop", "lr": 1e-3}})
    assert cfg.discriminator == "dsc" and cfg.d_optim.name == "rmsprop" and cfg.d_optim.lr == 1e-3
    with pytest.raises(ConfigError, match="lambda_advv"):
        build(AdversarialConfig, {"lambda_advv": 1e-3})
    with pytest.raises(ConfigError):
        build(AdversarialConfig, {"d_optim": {"name": "lbfgs"}})


def test_advent_discriminator_sees_self_information_of_the_adversarial_input():
    batch = make_batch(0)
    out = TinySeg().train()(batch.tgt_img)
    size = tuple(batch.tgt_img.shape[-2:])
    (p,) = make(Adversarial)._d_inputs(out, size)
    (i,) = make(AdvEnt)._d_inputs(out, size)
    torch.testing.assert_close(i, self_information(p))
    assert tuple(p.shape[-2:]) == d_input_size(size)  # the input size (tiny test inputs scaled up for D)
    torch.testing.assert_close(p.sum(1), torch.ones_like(p[:, 0]))  # AdaptSegNet's D sees probabilities


def test_discriminator_input_size_is_kept_for_real_inputs_and_scaled_up_for_tiny_ones():
    assert d_input_size((512, 1024)) == (512, 1024)
    assert d_input_size((16, 24)) == (32, 48)


def test_different_source_and_target_sizes_train_with_two_d_passes():
    src, tgt = make_batch(0, h=16, w=24), make_batch(1, h=32, w=40)
    m = make(AdvEnt)
    logs = m.train_step(UDABatch(src.src_img, src.src_lbl, tgt.tgt_img), 0)
    assert all(torch.isfinite(v) for v in logs.values())


def test_minent_multi_level_logs_the_aux_entropy():
    logs = make(MinEnt, multi_level=True).train_step(make_batch(0), 0)
    assert set(logs) == {"loss/seg_src", "loss/ent", "loss/ent_aux"}
    assert 0.0 <= logs["loss/ent"].item() <= 1.0


def test_methods_are_registered():
    assert METHODS["adversarial"] is Adversarial
    assert METHODS["advent"] is AdvEnt and METHODS["minent"] is MinEnt


# -- IntraDA --------------------------------------------------------------------------------


class Confident(nn.Module):
    """Fixed output: class `img[0, 0, 0] % C` wins by a margin = the image's mean green value / 10 (a larger
    margin is a more confident, lower-entropy prediction). Output at 1/2 resolution."""

    aux_weights = ()

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.c = num_classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> dict:
        b, _, h, w = x.shape
        cls = x[:, 0, 0, 0].long() % self.c  # (B,)
        margin = x[:, 1].mean((1, 2)) / 10  # (B,)
        logits = torch.nn.functional.one_hot(cls, self.c).float() * margin[:, None]  # (B, C)
        return {"out": logits[:, :, None, None].expand(b, self.c, h // 2, w // 2) + self.dummy, "aux": []}


def dataset(margins: list[float], classes: list[int] | None = None, lbl_hw=(16, 24)) -> list[dict]:
    items = []
    for k, m in enumerate(margins):
        img = torch.zeros(3, 8, 12)
        img[0] = float(classes[k] if classes else 1)
        img[1] = m * 10
        name = f"train/aachen/aachen_{k:06d}_000019_leftImg8bit.png"
        items.append({"img": img, "lbl": torch.zeros(lbl_hw, dtype=torch.int64), "name": name})
    return items


@pytest.mark.parametrize("lam, n_easy", [(0.67, 6), (0.5, 5), (1.0, 10), (0.0, 0)])
def test_split_sizes_follow_lambda_rounded_down(lam, n_easy):
    easy, hard, pseudo = rank_by_entropy(Confident(), dataset([1.0] * 10), lambda_=lam)
    assert len(easy) == n_easy and len(hard) == 10 - n_easy
    assert set(pseudo) == set(easy)
    assert sorted(easy + hard) == sorted(it["name"] for it in dataset([1.0] * 10))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_easy_split_is_the_most_confident_images_easiest_first(batch_size):
    margins = [0.5, 4.0, 1.0, 8.0, 2.0]  # larger margin = lower entropy
    items = dataset(margins)
    easy, hard, _ = rank_by_entropy(Confident(), items, lambda_=0.6, batch_size=batch_size)
    order = [items[k]["name"] for k in (3, 1, 4, 2, 0)]
    assert easy == order[:3] and hard == order[3:]


def test_pseudo_labels_are_argmax_train_ids_at_the_label_size():
    items = dataset([3.0, 2.0], classes=[2, 4], lbl_hw=(20, 30))
    easy, _, pseudo = rank_by_entropy(Confident(), items, lambda_=1.0)
    for it, cls in zip(items, (2, 4)):
        pl = pseudo[it["name"]]
        assert pl.dtype == np.uint8 and pl.shape == (20, 30) and (pl == cls).all()


def test_rare_class_normalization_promotes_images_showing_rare_classes():
    items = dataset([2.0, 2.0], classes=[0, 5])  # same entropy; image 1 predicts pole (a rare class)
    model = Confident(num_classes=19)
    plain, _, _ = rank_by_entropy(model, items, lambda_=0.5)
    normed, _, _ = rank_by_entropy(model, items, lambda_=0.5, normalize_rare=True)
    assert plain == [items[0]["name"]]  # a tie keeps dataset order
    assert normed == [items[1]["name"]]  # factor (11 - 1) / 11 + 0.5 < 1.5 (no rare class)


def test_bad_lambda_raises():
    with pytest.raises(ConfigError):
        rank_by_entropy(Confident(), dataset([1.0]), lambda_=1.5)


def test_write_split_round_trips_in_the_cityscapes_layout(tmp_path):
    items = dataset([1.0, 3.0, 2.0], classes=[1, 2, 3])
    easy, hard, pseudo = rank_by_entropy(Confident(), items, lambda_=0.67)
    out = write_split(tmp_path / "split", easy, hard, pseudo, lambda_=0.67, normalize_rare=False)
    assert read_split(out) == (easy, hard)
    for name in easy:
        stem = name.split("/")[-1].removesuffix("_leftImg8bit.png")
        path = out / "gtFine/train/aachen" / f"{stem}_gtFine_labelTrainIds.png"
        assert path == out / pseudo_label_path(name)
        back = np.array(Image.open(path))
        assert back.dtype == np.uint8 and np.array_equal(back, pseudo[name])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lambda"] == 0.67 and manifest["normalize_rare"] is False
    assert (manifest["n_easy"], manifest["n_hard"]) == (2, 1)


def test_write_split_rejects_missing_pseudo_labels_and_escaping_names(tmp_path):
    with pytest.raises(ValueError):
        write_split(tmp_path, ["train/a/a_leftImg8bit.png"], [], {})
    with pytest.raises(ValueError):
        pseudo_label_path("../etc/x_leftImg8bit.png")


def test_ranking_is_deterministic_and_restores_train_mode():
    model = Confident().train()
    items = dataset([1.0, 3.0, 2.0, 0.5])
    first = rank_by_entropy(model, items)
    second = rank_by_entropy(model, items)
    assert first[:2] == second[:2] and model.training
