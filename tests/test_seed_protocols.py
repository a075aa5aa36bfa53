"""The protocol options the seed documents need: train.epochs, data.normalize, data.eval_label_size, seed 001's
metrics (test/miou18, test/acc_img), and seed 000's per-image median pseudo-label thresholds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.conftest import tiny_experiment
from uda_ray.build import build_experiment, build_model
from uda_ray.config import ModelConfig
from uda_ray.config_loader import load_raw
from uda_ray.errors import ConfigError
from uda_ray.metric_names import check_metric
from uda_ray.metrics import ConfusionMatrix, ImageAccuracy, miou18
from uda_ray.models.resnet import CAFFE_MEAN_BGR, CaffeNormalize, Normalize
from uda_ray.pipelines.pseudo_labels import check_threshold, image_median_thresholds, mask_below
from uda_ray.training.evaluate import evaluate, resize_labels

# -- data.normalize ----------------------------------------------------------------------------------


def test_caffe_bgr_is_bgr_minus_the_caffe_mean_without_std():
    rgb = torch.tensor([10.0, 20.0, 200.0]).view(1, 3, 1, 1)
    got = CaffeNormalize()(rgb).flatten().tolist()
    want = [200.0 - 104.00698793, 20.0 - 116.66876762, 10.0 - 122.67891434]  # B, G, R
    assert got == pytest.approx(want)
    assert CAFFE_MEAN_BGR == (104.00698793, 116.66876762, 122.67891434)


@pytest.mark.parametrize("name", ["bisenet_r18", "enet"])
def test_data_normalize_sets_the_models_input_normalization(name):
    assert isinstance(build_model(ModelConfig(name=name), "caffe_bgr").normalize, CaffeNormalize)
    assert isinstance(build_model(ModelConfig(name=name)).normalize, Normalize)  # default: today's


def test_unknown_normalization_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="data.normalize must be one of imagenet, caffe_bgr, got 'bgr'") as e:
        build_experiment(tiny_experiment(tmp_path, **{"data.normalize": "bgr"}))
    assert "\n" not in str(e.value)


# -- train.epochs ------------------------------------------------------------------------------------


def test_epoch_steps_round_up():
    from uda_ray.driver.prepare import epoch_steps

    assert epoch_steps(3, 10, 4) == 8  # 30 images / 4 a step = 7.5 -> 8
    assert epoch_steps(50, 24941, 4) == math.ceil(50 * 24941 / 4)
    assert epoch_steps(1, 3, 8) == 1


def _prepare(tmp_path, synth_root, drop_max_steps: bool = False, **over):
    from uda_ray.driver.prepare import prepare_experiment

    raw = tiny_experiment(synth_root, **over)
    if drop_max_steps:
        del raw["train"]["max_steps"]
    return prepare_experiment(raw, "tiny", tmp_path)


def test_epochs_give_max_steps_from_the_source_train_split_and_the_poly_horizon_follows(tmp_path, synth_root):
    from uda_ray.data.loading import splits_of
    from uda_ray.driver.prepare import prepare_experiment

    ready = _prepare(tmp_path, synth_root, drop_max_steps=True, **{"train.epochs": 2, "train.batch_size": 3})
    n = len(splits_of(ready.cfg.data).source_train)
    assert n > 0 and ready.cfg.train.max_steps == math.ceil(2 * n / 3)
    assert ready.cfg.poly_horizon == ready.cfg.train.max_steps
    assert ready.raw["train"]["max_steps"] == ready.cfg.train.max_steps
    again = prepare_experiment(ready.raw, "tiny", tmp_path)  # prepared again: max_steps agrees, kept
    assert again.cfg.train.max_steps == ready.cfg.train.max_steps


def test_epochs_of_target_only_count_the_target_train_split(tmp_path, synth_root):
    from uda_ray.data.loading import splits_of

    ready = _prepare(tmp_path, synth_root, drop_max_steps=True, **{"train.epochs": 1, "method": "target_only"})
    assert ready.cfg.train.max_steps == math.ceil(len(splits_of(ready.cfg.data).target_train) / 2)


def test_epoch_split_target_and_shorter(tmp_path, synth_root):
    from uda_ray.data.loading import splits_of

    over = {"train.epochs": 1, "data.source_val_fraction": 0.3}  # fewer source train images than target's
    tgt = _prepare(tmp_path, synth_root, drop_max_steps=True, **over, **{"train.epoch_split": "target"})
    sp = splits_of(tgt.cfg.data)
    assert len(sp.target_train) != len(sp.source_train)  # (else the test could not tell them apart)
    assert tgt.cfg.train.max_steps == math.ceil(len(sp.target_train) / 2)
    short = _prepare(tmp_path, synth_root, drop_max_steps=True, **over, **{"train.epoch_split": "shorter"})
    assert short.cfg.train.max_steps == math.ceil(min(len(sp.target_train), len(sp.source_train)) / 2)
    with pytest.raises(ConfigError, match="train.epoch_split must be one of source, target, shorter"):
        build_experiment(tiny_experiment(tmp_path, **{"train.epoch_split": "both"}))


def test_epochs_and_a_disagreeing_max_steps_are_one_line(tmp_path, synth_root):
    with pytest.raises(ConfigError, match=r"train.epochs 1 over \d+ train images \(train.epoch_split source\) at a "
                                          r"global batch of 2 is \d+ steps, but train.max_steps is 4") as e:
        _prepare(tmp_path, synth_root, **{"train.epochs": 1})
    assert "\n" not in str(e.value)


def test_a_childs_length_replaces_its_bases_other_length(tmp_path):
    (tmp_path / "base.yaml").write_text("name: b\ntrain: {max_steps: 20000, batch_size: 8}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {epochs: 50, batch_size: 4}\n")
    assert load_raw(tmp_path / "child.yaml")["train"] == {"batch_size": 4, "epochs": 50}
    (tmp_path / "b2.yaml").write_text("name: b\ntrain: {epochs: 50}\n")
    (tmp_path / "c3.yaml").write_text("base: b2.yaml\ntrain: {max_steps: 10}\n")
    assert load_raw(tmp_path / "c3.yaml")["train"] == {"max_steps": 10}


def test_epochs_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="train.epochs must be >= 1"):
        build_experiment(tiny_experiment(tmp_path, **{"train.epochs": 0}))


def test_a_sweep_refuses_searching_the_batch_size_of_an_epoch_run(tmp_path, synth_root):
    import yaml

    from uda_ray.search.space import load_space

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment(synth_root, **{"train.epochs": 1})))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "num_samples": 1, "params": {
        "train.batch_size": {"choice": [2, 4]}}}))
    with pytest.raises(ConfigError, match="train.batch_size cannot be searched with train.epochs"):
        load_space(tmp_path / "space.yaml")


# -- seed 001's metrics and data.eval_label_size -------------------------------------------------------


def test_miou18_is_the_mean_over_the_first_18_classes_with_absent_classes_as_zero():
    mat = torch.zeros(19, 19, dtype=torch.int64)
    mat[0, 0], mat[0, 1], mat[1, 1] = 3, 1, 2  # road: 3 / (3 + 1) = 0.75; sidewalk: 2 / (2 + 1) = 2/3
    mat[18, 18] = 5  # bicycle, perfect: left out of miou18
    want = (0.75 + 2 / 3) / 18  # 16 absent classes count 0 (seed 001's epsilon)
    assert miou18(mat) == pytest.approx(want, abs=1e-5)
    cm = ConfusionMatrix(19)
    cm.mat = mat
    out = cm.compute()
    assert out["miou18"] == pytest.approx(want, abs=1e-5)
    assert out["miou"] == pytest.approx((0.75 + 2 / 3 + 1.0) / 3)  # standard: classes present only


def test_acc_img_is_the_mean_of_per_image_accuracies_with_ignored_pixels_as_wrong():
    lbl = torch.tensor([[[0, 0], [1, 255]], [[2, 2], [2, 2]]])  # (2, 2, 2)
    pred = torch.tensor([[[0, 1], [1, 0]], [[2, 2], [2, 2]]])
    acc = ImageAccuracy()
    acc.update(pred, lbl)
    assert acc.compute() == pytest.approx((2 / 4 + 4 / 4) / 2)  # image 1: 2 right of 4 (255 counts, wrong)
    cm = ConfusionMatrix(19)
    cm.update(pred, lbl)
    assert cm.compute()["pixel_acc"] == pytest.approx(6 / 7)  # standard: pooled, 255 left out


class Constant(nn.Module):
    """Predicts class `c` everywhere at half the input size."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> dict:
        out = torch.zeros(x.shape[0], 19, x.shape[2] // 2, x.shape[3] // 2)
        out[:, self.c] = 1.0
        return {"out": out}


def test_eval_label_size_resizes_labels_nearest_and_evaluates_there():
    lbl = torch.zeros(1, 4, 8, dtype=torch.int64)
    lbl[:, :, 4:] = 1
    lbl[:, 0, 0] = 255
    small = resize_labels(lbl, (4, 2))  # (W, H)
    assert small.tolist() == [[[255, 0, 1, 1], [0, 0, 1, 1]]]
    loader = [{"img": torch.zeros(1, 3, 8, 16), "lbl": lbl}]
    full = evaluate(Constant(0), loader, 19, torch.device("cpu"))
    at = evaluate(Constant(0), loader, 19, torch.device("cpu"), label_size=(4, 2))
    assert full["pixel_acc"] == pytest.approx(15 / 31) and full["acc_img"] == pytest.approx(15 / 32)
    assert at["pixel_acc"] == pytest.approx(3 / 7) and at["acc_img"] == pytest.approx(3 / 8)


def test_seed_001_metrics_are_registered_test_metrics():
    assert check_metric("test/miou18") == "test/miou18"
    assert check_metric("test/acc_img") == "test/acc_img"


def test_eval_label_size_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="data.eval_label_size: both sides must be >= 8"):
        build_experiment(tiny_experiment(tmp_path, **{"data.eval_label_size": [4, 512]}))


# -- seed 000's per-image median thresholds --------------------------------------------------------------


def test_image_median_thresholds_per_class_within_the_image():
    conf = torch.tensor([[0.2, 0.4, 0.6, 0.95], [0.99, 0.97, 0.3, 0.5]])
    pred = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 2]])
    thr = image_median_thresholds(conf, pred, 4, cap=0.9)
    # class 0: median of (0.2, 0.4, 0.6) = 0.4; class 1: median (0.95, 0.97, 0.99) = 0.97 -> capped 0.9;
    # class 2: lower median of (0.3, 0.5) = 0.3 (torch.median); class 3 absent: the cap
    assert thr.tolist() == pytest.approx([0.4, 0.9, 0.3, 0.9])
    assert mask_below(conf, pred, thr).tolist() == [[255, 0, 0, 1], [1, 1, 2, 2]]


def test_image_median_differs_from_the_class_wise_rule_over_the_set():
    from uda_ray.pipelines.pseudo_labels import class_thresholds

    conf = torch.tensor([[0.2, 0.3], [0.8, 0.9]])  # two images' confidences, class 0 everywhere
    pred = torch.zeros(2, 2, dtype=torch.int64)
    per_image = [image_median_thresholds(conf[i], pred[i], 1)[0].item() for i in range(2)]
    assert per_image == pytest.approx([0.2, 0.8])
    assert class_thresholds(conf, pred, 1)[0].item() == pytest.approx(0.8)  # one threshold for both


def test_threshold_choices_are_checked(tmp_path):
    check_threshold("image_median")
    check_threshold(0.95)
    with pytest.raises(ValueError, match="image_median"):
        check_threshold("median")
    with pytest.raises(ConfigError, match="data.pseudo_threshold must be one of class_percentile, image_median"):
        build_experiment(tiny_experiment(tmp_path, **{"data.pseudo_threshold": "median"}))


def test_pipeline_action_threshold_takes_image_median_and_refuses_other_words():
    from uda_ray.checks import action_args
    from uda_ray.pipelines.pseudo_labels import from_checkpoints

    assert action_args("pseudo_labels", from_checkpoints, {"from": "a", "threshold": "image_median"},
                       "p.yaml")["threshold"] == "image_median"
    assert action_args("pseudo_labels", from_checkpoints, {"from": "a", "threshold": 0.95}, "p")["threshold"] == 0.95
    with pytest.raises(ConfigError, match="'pseudo_labels.threshold' must be a number or one of 'image_median', "
                                          "got 'median'"):
        action_args("pseudo_labels", from_checkpoints, {"from": "a", "threshold": "median"}, "p.yaml")


def test_image_median_pseudo_labels_written_from_a_model(tmp_path):
    from uda_ray.pipelines.pseudo_labels import generate

    class Fixed(nn.Module):  # two images: confidences of class 0 rising left to right
        def forward(self, x: torch.Tensor) -> dict:
            w = x.shape[-1]
            p0 = torch.linspace(0.5, 0.99, w).view(1, 1, 1, w).expand(x.shape[0], 1, x.shape[2], w)
            return {"out": torch.log(torch.cat([p0, 1 - p0], dim=1))}

    ds = [{"img": torch.zeros(3, 2, 4), "lbl": torch.zeros(2, 4), "name": f"train/c/c_00000{i}_000019_leftImg8bit.png"}
          for i in range(2)]
    man = generate([Fixed()], ds, tmp_path / "pl", threshold="image_median")
    assert man["threshold"] == "image_median" and man["thresholds"] is None
    assert man["pixels_kept_per_class"][0] == 2 * 2 * 3  # per image: the lower median drops the lowest column


def test_a_pipeline_stage_of_epochs_is_done_at_its_computed_steps(tmp_path, synth_root):
    import yaml

    from uda_ray.driver.prepare import prepare_experiment, raw_of
    from uda_ray.pipelines.runner import load_pipeline, run_pipeline
    from uda_ray.training.loop import fit
    from uda_ray.training.sessions import LocalSession

    raw = tiny_experiment(synth_root, **{"train.epochs": 1, "train.batch_size": 4})
    del raw["train"]["max_steps"]
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"name": "p", "stages": [{"name": "a", "experiment": "e.yaml"}]}))
    store = tmp_path / "store"

    def prepare(cfg):
        return prepare_experiment(raw_of(cfg), cfg.name, store).cfg  # as `uda-ray pipeline` prepares a stage

    runs = []

    def run(cfg, storage, name):
        runs.append(cfg.train.max_steps)
        return fit(cfg, LocalSession(storage / name))

    run_pipeline(load_pipeline(tmp_path / "p.yaml"), store, run, prepare, log=lambda m: None)
    assert len(runs) == 1 and runs[0] < 1000  # the default max_steps would be 1000
    run_pipeline(load_pipeline(tmp_path / "p.yaml"), store, run, prepare, log=lambda m: None)
    assert len(runs) == 1  # done at its own steps: skipped
    stage = load_pipeline(tmp_path / "p.yaml", {"train.max_steps": 2})  # an explicit, disagreeing length
    with pytest.raises(ConfigError, match="but train.max_steps is 2"):
        run_pipeline(stage, tmp_path / "store2", run, prepare, log=lambda m: None)


def test_caffe_bgr_reaches_every_model_a_run_builds_and_loads(tmp_path):
    from uda_ray.build import build_method, load_trained
    from uda_ray.config import experiment_dict

    cfg = build_experiment(tiny_experiment(tmp_path, **{"data.normalize": "caffe_bgr", "method": "mpl"}))
    m = build_method(cfg, None, "cpu")
    assert isinstance(m.model_raw.normalize, CaffeNormalize) and isinstance(m.teacher_raw.normalize, CaffeNormalize)
    path = tmp_path / "state.pt"
    torch.save({"config": experiment_dict(cfg), "method": {"model": m.model_raw.state_dict()}, "step": 1}, path)
    _, model = load_trained(path)  # pseudo-labels, the IntraDA ranking and ensembles load models this way
    assert isinstance(model.normalize, CaffeNormalize)


def test_fda_swap_on_0_255_then_caffe_mean_equals_the_originals_order():
    """FDA's code swaps the spectra of the 0..255 (BGR) images, then subtracts the mean; the swap is per channel,
    so swapping RGB images and then reversing the channels (the model's CaffeNormalize) gives the same input."""
    from uda_ray.fda import fda_source_to_target

    g = torch.Generator().manual_seed(0)
    src, tgt = torch.rand(1, 3, 32, 48, generator=g) * 255, torch.rand(1, 3, 32, 48, generator=g) * 255
    ours = CaffeNormalize()(fda_source_to_target(src, tgt, 0.1))
    mean = torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    original = fda_source_to_target(src.flip(1), tgt.flip(1), 0.1) - mean  # BGR, swapped, then the mean
    torch.testing.assert_close(ours, original, atol=1e-3, rtol=0)
