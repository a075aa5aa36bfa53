"""Class-wise pseudo-label thresholds, their generation on disk, and the self-training method using them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import NUM_CLASSES, TinySeg, make_batch
from uda_ray.config import OptimConfig
from uda_ray.methods.base import UDABatch
from uda_ray.methods.self_training import SelfTraining, SelfTrainingConfig
from uda_ray.pipelines.pseudo_labels import (
    apply_thresholds,
    class_thresholds,
    ensemble_probs,
    generate,
    label_path,
)

OPTIM = OptimConfig(name="sgd", lr=1e-2)


def hand_set() -> tuple[torch.Tensor, torch.Tensor]:
    conf = torch.tensor([0.2, 0.4, 0.6, 0.8, 0.95, 0.91, 0.95, 0.99, 0.7])
    pred = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 3])
    return conf, pred


def test_thresholds_median_per_class_cap_and_never_predicted():
    conf, pred = hand_set()
    thr = class_thresholds(conf, pred, 4, percentile=0.5, cap=0.9)
    # class 0: n=5, index round(2.5)=2 (half to even) -> 0.6; class 1: index round(1.5)=2 -> 0.99, capped;
    # class 2: never predicted -> cap; class 3: one pixel, index round(0.5)=0 -> 0.7
    torch.testing.assert_close(thr, torch.tensor([0.6, 0.9, 0.9, 0.7]))


def test_thresholds_fda_percentile_and_clipped_index():
    conf, pred = hand_set()
    thr = class_thresholds(conf, pred, 4, percentile=0.66, cap=0.9)
    # class 0: index round(3.3)=3 -> 0.8; class 3: round(0.66)=1, out of range in the originals: clipped to 0
    torch.testing.assert_close(thr, torch.tensor([0.8, 0.9, 0.9, 0.7]))


@pytest.mark.parametrize("percentile", [0.0, 0.3, 0.5, 0.66, 0.9])
def test_thresholds_match_the_numpy_formula_of_the_originals(percentile):
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(2000, generator=g) * 0.8 + 0.2
    pred = torch.randint(0, 4, (2000,), generator=g)
    thr = class_thresholds(conf, pred, 4, percentile=percentile, cap=0.9)
    for c in range(4):
        x = np.sort(conf[pred == c].numpy())
        expected = min(x[min(int(np.round(len(x) * percentile)), len(x) - 1)], np.float32(0.9))
        assert thr[c].item() == pytest.approx(float(expected), abs=0)


def test_apply_thresholds_masks_pixels_below_their_class_threshold():
    probs = torch.tensor([[0.7, 0.3], [0.45, 0.55], [0.6, 0.4], [0.2, 0.8]]).t().reshape(1, 2, 2, 2)
    lbl = apply_thresholds(probs, torch.tensor([0.65, 0.6]))
    # (0.7 -> class 0 kept), (0.55 < 0.6 -> 255), (0.6 < 0.65 -> 255), (0.8 -> class 1 kept)
    assert lbl.tolist() == [[[0, 255], [255, 1]]]


class TinyTarget(torch.utils.data.Dataset):
    def __init__(self, n: int = 3) -> None:
        self.items = []
        for i in range(n):
            b = make_batch(i, b=1)
            self.items.append({"img": b.tgt_img[0], "lbl": b.tgt_lbl[0],
                               "name": f"train/city{i % 2}/city{i % 2}_00000{i}_000019_leftImg8bit.png"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [TinySeg(), TinySeg()]


def test_label_path_follows_cityscapes_layout():
    assert str(label_path("train/aachen/aachen_000000_000019_leftImg8bit.png")) == \
        "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    with pytest.raises(ValueError):
        label_path("../x_leftImg8bit.png")


def test_generate_writes_loadable_pngs_and_manifest_matching_the_pure_functions(tmp_path):
    ms, data = models(), TinyTarget()
    manifest = generate(ms, data, tmp_path / "pl", percentile=0.66, cap=0.9, device="cpu",
                        source_desc={"runs": ["a", "b"]})
    assert json.loads((tmp_path / "pl" / "manifest.json").read_text()) == manifest
    assert manifest["model"] == {"runs": ["a", "b"]} and manifest["num_images"] == 3
    assert manifest["percentile"] == 0.66 and manifest["cap"] == 0.9
    probs = [ensemble_probs(ms, it["img"][None], tuple(it["lbl"].shape)) for it in data.items]  # (1, C, H, W)
    conf, pred = torch.cat(probs).max(dim=1)
    thr = class_thresholds(conf, pred, NUM_CLASSES, 0.66, 0.9)
    assert manifest["thresholds"] == [float(t) for t in thr]
    predicted = torch.bincount(pred.flatten(), minlength=NUM_CLASSES)
    assert manifest["pixels_predicted_per_class"] == predicted.tolist()
    for it, p in zip(data.items, probs):
        png = np.array(Image.open(tmp_path / "pl" / label_path(it["name"])))
        assert png.dtype == np.uint8 and png.shape == tuple(it["lbl"].shape)
        assert np.array_equal(png, apply_thresholds(p, thr)[0].numpy())
    pngs = [np.array(Image.open(tmp_path / "pl" / label_path(it["name"]))) for it in data.items]
    kept = sum(np.bincount(png.ravel(), minlength=256)[:NUM_CLASSES] for png in pngs)
    assert manifest["pixels_kept_per_class"] == kept.tolist()
    assert 0 < manifest["ignored_fraction"] < 1


def test_fixed_threshold_drops_every_pixel_below_it_in_every_class(tmp_path):
    """CPSL's confidence >= t: unlike percentile 1.0 capped at t, no class keeps its top pixel below t."""
    ms, data = models(), TinyTarget()
    probs = [ensemble_probs(ms, it["img"][None], tuple(it["lbl"].shape)) for it in data.items]  # (1, C, H, W)
    conf, pred = torch.cat(probs).max(dim=1)
    # a threshold above the best confidence of some predicted class, below the best of all
    tops = [float(conf[pred == c].max()) for c in pred.unique().tolist()]
    t = (min(tops) + max(tops)) / 2
    assert min(tops) < t <= float(conf.max())
    manifest = generate(ms, data, tmp_path / "pl", threshold=t)
    assert manifest["threshold"] == t and "percentile" not in manifest and manifest["thresholds"] == [t] * NUM_CLASSES
    kept = 0
    for it, p in zip(data.items, probs):
        png = torch.from_numpy(np.array(Image.open(tmp_path / "pl" / label_path(it["name"]))).astype(np.int64))
        c, k = p[0].max(dim=0)
        assert torch.equal(png, torch.where(c >= t, k, torch.full_like(k, 255)))
        kept += int((png != 255).sum())
    assert manifest["pixels_kept_per_class"] and sum(manifest["pixels_kept_per_class"]) == kept
    # the percentile-1.0 / cap-t rule it replaces keeps the top pixel of a class whose best confidence is < t
    capped = class_thresholds(conf, pred, NUM_CLASSES, 1.0, t)
    assert any(float(capped[c]) < t for c in pred.unique().tolist())
    with pytest.raises(ValueError):
        generate(ms, data, tmp_path / "bad", threshold=0.0)


def test_flip_averaged_predictions_are_the_mean_of_the_image_and_its_mirror():
    from uda_ray.pipelines.pseudo_labels import FlipAveraged

    (m,) = models()[:1]
    m.eval()
    img = torch.rand(1, 3, 8, 12) * 255
    with torch.no_grad():
        p = torch.softmax(m(img)["out"], 1)
        q = torch.softmax(m(img.flip(-1))["out"], 1).flip(-1)
        got = ensemble_probs([FlipAveraged(m)], img)
    torch.testing.assert_close(got, (p + q) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, p)  # the mirror image really enters


def test_generate_is_deterministic_and_replaces_atomically(tmp_path):
    a = generate(models(), TinyTarget(), tmp_path / "a", percentile=0.5, device="cpu")
    b = generate(models(), TinyTarget(), tmp_path / "b", percentile=0.5, device="cpu")
    assert a == b
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 3
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    generate(models(), TinyTarget(2), tmp_path / "a", percentile=0.5, device="cpu")  # replaces the folder
    assert len(list((tmp_path / "a").rglob("*.png"))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folders left


def test_self_training_with_adversarial_term_builds_and_trains_a_discriminator():
    torch.manual_seed(0)
    m = SelfTraining(TinySeg(), SelfTrainingConfig(lambda_adv=1e-3, lambda_ent=1e-3), OPTIM,
                     num_classes=NUM_CLASSES)
    assert len(m.optimizers) == 2 and "d_main" in m.state_dict()
    d_before = [p.detach().clone() for p in m.discs["main"].parameters()]
    batch = make_batch(0, h=64, w=64)
    logs = m.train_step(batch, 0)
    assert {"loss/seg_src", "loss/seg_tgt", "loss/ent", "loss/adv", "loss/d_src", "loss/d_tgt"} <= set(logs)
    assert all(torch.isfinite(v) for v in logs.values())
    assert any(not torch.equal(a, b) for a, b in zip(d_before, m.discs["main"].parameters()))


def test_self_training_without_adversarial_term_has_no_discriminator_and_survives_all_ignored_labels():
    torch.manual_seed(0)
    m = SelfTraining(TinySeg(), SelfTrainingConfig(), OPTIM, num_classes=NUM_CLASSES)
    assert len(m.optimizers) == 1 and set(m.state_dict()) == {"model", "opt"}
    b = make_batch(0)
    logs = m.train_step(UDABatch(b.src_img, b.src_lbl, b.tgt_img, torch.full_like(b.tgt_lbl, 255)), 0)
    assert logs["loss/seg_tgt"].item() == 0.0 and torch.isfinite(logs["loss/seg_src"])
    with pytest.raises(ValueError):
        m.train_step(UDABatch(b.src_img, b.src_lbl, b.tgt_img, None), 1)


def test_self_training_with_fda_beta_trains_on_stylized_source():
    import torch

    from tests.conftest import NUM_CLASSES, TinySeg, make_batch
    from uda_ray.config import OptimConfig
    from uda_ray.methods.self_training import SelfTraining, SelfTrainingConfig

    def loss(beta: float) -> float:
        torch.manual_seed(0)
        m = SelfTraining(TinySeg(), SelfTrainingConfig(fda_beta=beta), OptimConfig(lr=1e-2), num_classes=NUM_CLASSES)
        return m.train_step(make_batch(0, h=32, w=32), 0)["loss/seg_src"].item()

    assert loss(0.0) != loss(0.2)  # the source CE sees other (stylized) images
