"""Protocol fidelity: the shipped paper experiments follow their originals' schedules and geometries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TinySeg, load_shipped, tiny_experiment
from uda_ray.build import build_experiment, load_experiment
from uda_ray.config import ConfigError, OptimConfig
from uda_ray.methods.adversarial import Adversarial, AdversarialConfig
from uda_ray.training.loop import fit
from uda_ray.training.optim import set_lr
from uda_ray.training.sessions import LocalSession

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
def _load(name: str, overrides: dict | None = None):
    """A shipped experiment (uda_ray.build.load_experiment, stage inputs stood in for as tests.conftest does)."""
    return load_shipped(load_experiment, EXPERIMENTS / f"{name}.yaml", overrides)

# -- schedule horizon -------------------------------------------------------------------------------


def _adversarial(optim: OptimConfig, d_optim: OptimConfig) -> Adversarial:
    cfg = AdversarialConfig(multi_level=True, d_optim=d_optim)
    return Adversarial(TinySeg(), cfg, optim, num_classes=5)


def test_poly_horizon_sets_the_lr_of_segmenter_and_discriminators():
    seg = OptimConfig(name="sgd", lr=2.5e-4, poly_horizon=250_000)
    m = _adversarial(seg, OptimConfig(name="adam", lr=1e-4))
    for opt in m.optimizers:
        set_lr(opt, 120_000, 250_000)
    factor = (1 - 120_000 / 250_000) ** 0.9  # ~0.555: ADVENT's lr at its early stop
    assert m.opt.param_groups[0]["lr"] == pytest.approx(2.5e-4 * factor)
    assert m.opt.param_groups[1]["lr"] == pytest.approx(2.5e-3 * factor)  # classifier x10
    for d_opt in m.d_opts.values():
        assert d_opt.param_groups[0]["lr"] == pytest.approx(1e-4 * factor)


def test_a_discriminator_horizon_of_its_own_overrides_the_run_horizon():
    m = _adversarial(OptimConfig(lr=1.0), OptimConfig(name="adam", lr=1.0, poly_horizon=10, poly_power=1.0))
    for opt in m.optimizers:
        set_lr(opt, 5, 100)
    assert m.d_opts["main"].param_groups[0]["lr"] == pytest.approx(0.5)  # 1 - 5/10
    assert m.opt.param_groups[0]["lr"] == pytest.approx(0.95 ** 0.9)  # 1 - 5/100, the run's horizon


def test_a_horizon_shorter_than_the_run_is_rejected(synth_root):
    with pytest.raises(ConfigError, match="poly_horizon"):
        build_experiment(tiny_experiment(synth_root, **{"optim.poly_horizon": 3}))


def test_the_loop_decays_over_the_horizon_not_the_run_length(tmp_path, synth_root):
    cfg = build_experiment(tiny_experiment(synth_root, **{"optim.poly_horizon": 10, "optim.lr": 0.01,
                                                          "train.max_steps": 2, "train.eval_every": 2}))
    s = LocalSession(tmp_path / "run")
    fit(cfg, s)
    # the last step (index 1) ran at lr0 * (1 - 1/10)^0.9; with the run length as horizon it would be 0.5^0.9
    assert s.reports[-1]["train/lr"] == pytest.approx(0.01 * 0.9 ** 0.9)


# The originals' schedules: (steps actually run, poly horizon). ADVENT advent/domain_adaptation/config.py
# (MAX_ITERS 250000, EARLY_STOP 120000; IntraDA's intrada.yml keeps them), AdaptSegNet
# train_gta2cityscapes_multi.py (NUM_STEPS 250000, NUM_STEPS_STOP 150000), FDA options/train_options.py
# (--num-steps 150000, --num-steps-stop 100000), CPSL parser_train.py (--train_iters 90000, the poly schedule
# over the same 90000). The BiSeNet / ENet experiments follow seeds without an original: horizon = run length.
PAPER_SCHEDULES = {
    "gta5_to_cityscapes_deeplabv2_advent": (120_000, 250_000),
    "gta5_to_cityscapes_deeplabv2_minent": (120_000, 250_000),
    "gta5_to_cityscapes_deeplabv2_intrada": (120_000, 250_000),
    "gta5_to_cityscapes_deeplabv2_adaptsegnet": (150_000, 250_000),
    "gta5_to_cityscapes_deeplabv2_fda": (100_000, 150_000),
    "gta5_to_cityscapes_deeplabv2_cpsl": (90_000, 90_000),
    "gta5_to_cityscapes_deeplabv2_cpsl_distill": (90_000, 90_000),
    "synthia_to_cityscapes_deeplabv2_advent": (120_000, 250_000),
    "synthia_to_cityscapes_deeplabv2_cpsl": (90_000, 90_000),
    "synthia_to_cityscapes_deeplabv2_cpsl_distill": (90_000, 90_000),
    "gta5_to_cityscapes_bisenet_r18_adversarial_fc": (20_000, 20_000),
    "gta5_to_cityscapes_bisenet_r18_adversarial_dsc": (20_000, 20_000),
    "gta5_to_cityscapes_bisenet_r18_fda": (20_000, 20_000),
    "gta5_to_cityscapes_bisenet_r18_mpl": (20_000, 20_000),
    "gta5_to_cityscapes_bisenet_r18_self_training": (20_000, 20_000),
    "gta5_to_cityscapes_enet_minent": (20_000, 20_000),
    "gta5_to_cityscapes_enet_contrastive": (20_000, 20_000),
    # Singh & Gerem's slides: model 1 "DeepLabV2 trained for 100k iterations" (model 2: no schedule given, the same)
    "gta5_to_cityscapes_deeplabv2_minent_gray_singh": (100_000, 100_000),
    "gta5_to_cityscapes_deeplabv2_contrastive_singh": (100_000, 100_000),
    "gta5_to_cityscapes_enet_fda_singh": (20_000, 20_000),
}
# Counted in epochs (train.epochs): Bianco, Isola Quezada & Zizzari and Montressori, Rosini & Vanderputten
# train 50 epochs (the slides; trainUnsupervised.py / MPL.py --num_epochs 50), poly over them.
EPOCH_SCHEDULES = {n: 50 for n in (
    "cityscapes_bisenet_r18_target_only_bianco", "gta5_to_cityscapes_bisenet_r18_adversarial_fc_bianco",
    "gta5_to_cityscapes_bisenet_r18_adversarial_dsc_bianco", "gta5_to_cityscapes_bisenet_r18_fda_bianco",
    "gta5_to_cityscapes_bisenet_r101_adversarial_dsc_montressori",
    "gta5_to_cityscapes_bisenet_r101_adversarial_fc_montressori",
    "gta5_to_cityscapes_bisenet_r101_self_training_montressori", "gta5_to_cityscapes_bisenet_r101_mpl_montressori")}


def test_every_paper_experiment_has_a_pinned_schedule():
    shipped = {p.stem for p in EXPERIMENTS.glob("*.yaml") if not p.stem.startswith("synthetic")}
    assert shipped == set(PAPER_SCHEDULES) | set(EPOCH_SCHEDULES)


# How often the originals evaluate or snapshot (the checkpoints their reported best is picked from): ADVENT
# SAVE_PRED_EVERY 2000, AdaptSegNet SAVE_PRED_EVERY 5000, FDA --save-pred-every 2500, CPSL --val_interval 1000.
PAPER_EVAL_EVERY = {"advent": 2000, "minent": 2000, "intrada": 2000, "adaptsegnet": 5000, "fda": 2500,
                    "cpsl": 1000, "cpsl_distill": 1000, "minent_gray_singh": 2000, "contrastive_singh": 2000}


@pytest.mark.parametrize("name", sorted(n for n in PAPER_SCHEDULES if "deeplabv2" in n))
def test_paper_experiments_evaluate_as_often_as_the_originals_snapshot(name):
    cfg = _load(name)
    assert cfg.train.eval_every == PAPER_EVAL_EVERY[name.split("deeplabv2_")[1]]


@pytest.mark.parametrize("name", sorted(PAPER_SCHEDULES))
def test_paper_experiments_follow_the_originals_schedule(name):
    cfg = _load(name)
    steps, horizon = PAPER_SCHEDULES[name]
    assert (cfg.train.max_steps, cfg.poly_horizon) == (steps, horizon)
    d_optim = getattr(cfg.method_cfg, "d_optim", None)
    if d_optim is not None:  # the discriminators decay over the segmenter's horizon
        assert d_optim.poly_horizon is None


@pytest.mark.parametrize("name", sorted(EPOCH_SCHEDULES))
def test_report_experiments_run_the_reports_epochs(name):
    cfg = _load(name)
    assert cfg.train.epochs == EPOCH_SCHEDULES[name]
    assert cfg.train.batch_size == 4  # both reports' batch


# -- geometry -----------------------------------------------------------------------------------------
# (W, H) sizes: source resize, target resize, random width range, random crop, val input. The originals:
# ADVENT config.py / AdaptSegNet train_gta2cityscapes_multi.py: GTA5 1280x720, SYNTHIA 1280x760, Cityscapes
# 1024x512, no crop, val at 1024x512. IntraDA intrada.yml: the easy split (Cityscapes) at 1024x512. FDA
# data/__init__.py: GTA5 1280x720 cropped to 1024x512, Cityscapes 1024x512, val at 1344x576. CPSL (ProDA's
# loader): both at 2048x1024 (SYNTHIA 1280x760), random width 2200 x U(0.5, 1.5), crop 896x512, val 2048x1024.
# Random mirroring: none in ADVENT / AdaptSegNet (--random-mirror off) / FDA / IntraDA, p 0.5 in CPSL. Image
# resizing: bicubic in ADVENT (base_dataset.get_image), AdaptSegNet and FDA (their datasets), bilinear in CPSL.
# The BiSeNet / ENet experiments follow the seeds: GTA5 1280x720, Cityscapes 1024x512, no crop (flips: ours).
GTA, SYN, CS, FULL = (1280, 720), (1280, 760), (1024, 512), (2048, 1024)
ADVENT_GTA = dict(source=GTA, target=CS, random_width=None, crop=None, val=CS, hflip=False, filter="bicubic")
ADVENT_SYN = dict(ADVENT_GTA, source=SYN)
INTRADA = dict(ADVENT_GTA, source=CS)
FDA = dict(source=GTA, target=CS, random_width=None, crop=CS, val=(1344, 576), hflip=False, filter="bicubic")
CPSL_GTA = dict(source=FULL, target=FULL, random_width=(1100, 3300), crop=(896, 512), val=FULL, hflip=True,
                filter="bilinear")
CPSL_SYN = dict(CPSL_GTA, source=SYN)
SEED = dict(ADVENT_GTA, hflip=True, filter="bilinear")  # the project defaults; the seeds do not say
# Bianco, Isola Quezada & Zizzari (Project1's dataset code): both domains resized bicubically to 1024x512, no crop,
# no flip, val at 1024x512. Montressori, Rosini & Vanderputten: GTA5 1280x720, Cityscapes 1024x512, the same.
BIANCO = dict(ADVENT_GTA, source=CS)
MONTRESSORI = ADVENT_GTA
PAPER_GEOMETRY = {
    "gta5_to_cityscapes_deeplabv2_advent": ADVENT_GTA,
    "gta5_to_cityscapes_deeplabv2_minent": ADVENT_GTA,
    "gta5_to_cityscapes_deeplabv2_adaptsegnet": ADVENT_GTA,
    "gta5_to_cityscapes_deeplabv2_intrada": INTRADA,
    "gta5_to_cityscapes_deeplabv2_fda": FDA,
    "gta5_to_cityscapes_deeplabv2_cpsl": CPSL_GTA,
    "gta5_to_cityscapes_deeplabv2_cpsl_distill": CPSL_GTA,
    "synthia_to_cityscapes_deeplabv2_advent": ADVENT_SYN,
    "synthia_to_cityscapes_deeplabv2_cpsl": CPSL_SYN,
    "synthia_to_cityscapes_deeplabv2_cpsl_distill": CPSL_SYN,
    "gta5_to_cityscapes_bisenet_r18_adversarial_fc": SEED,
    "gta5_to_cityscapes_bisenet_r18_adversarial_dsc": SEED,
    "gta5_to_cityscapes_bisenet_r18_fda": SEED,
    "gta5_to_cityscapes_bisenet_r18_mpl": SEED,
    "gta5_to_cityscapes_bisenet_r18_self_training": SEED,
    "gta5_to_cityscapes_enet_minent": SEED,
    "gta5_to_cityscapes_enet_contrastive": SEED,
    "gta5_to_cityscapes_deeplabv2_minent_gray_singh": ADVENT_GTA,
    "gta5_to_cityscapes_deeplabv2_contrastive_singh": ADVENT_GTA,
    "gta5_to_cityscapes_enet_fda_singh": SEED,
    "cityscapes_bisenet_r18_target_only_bianco": BIANCO,
    "gta5_to_cityscapes_bisenet_r18_adversarial_fc_bianco": BIANCO,
    "gta5_to_cityscapes_bisenet_r18_adversarial_dsc_bianco": BIANCO,
    "gta5_to_cityscapes_bisenet_r18_fda_bianco": BIANCO,
    "gta5_to_cityscapes_bisenet_r101_adversarial_dsc_montressori": MONTRESSORI,
    "gta5_to_cityscapes_bisenet_r101_adversarial_fc_montressori": MONTRESSORI,
    "gta5_to_cityscapes_bisenet_r101_self_training_montressori": MONTRESSORI,
    "gta5_to_cityscapes_bisenet_r101_mpl_montressori": MONTRESSORI,
}
# Every stage of the paper pipelines: a training stage's geometry, or for an action stage (pseudo-labels,
# ranking: made from target train images at the `from` run's data.target_size) that input size.
PIPELINE_GEOMETRY = {
    "gta5_to_cityscapes_intrada": {"inter": ADVENT_GTA, "rank": CS, "intra": INTRADA},
    "gta5_to_cityscapes_fda_mbt": {"fda_b01": FDA, "fda_b05": FDA, "fda_b09": FDA, "mbt": (1344, 576),
                                   "mbt_pl": CS, "mbt_st": FDA},
    "gta5_to_cityscapes_cpsl": {"warmup": ADVENT_GTA, "stage1": CPSL_GTA, "pl1": FULL, "stage2": CPSL_GTA,
                                "pl2": FULL, "stage3": CPSL_GTA},
    "synthia_to_cityscapes_cpsl": {"warmup": ADVENT_SYN, "stage1": CPSL_SYN, "pl1": FULL, "stage2": CPSL_SYN,
                                   "pl2": FULL, "stage3": CPSL_SYN},
    "gta5_to_cityscapes_self_training": {"adv": SEED, "pl": CS, "st": SEED},
    "gta5_to_cityscapes_contrastive": {"m1": SEED, "pl": CS, "m2": SEED},
    "gta5_to_cityscapes_intrada_norm": {"inter": ADVENT_GTA, "rank": CS, "intra": INTRADA},
    "gta5_to_cityscapes_advent_minent_ensemble": {"minent": ADVENT_GTA, "advent": ADVENT_GTA, "ensemble": CS},
    "gta5_to_cityscapes_deeplabv2_contrastive_singh": {"m1": ADVENT_GTA, "pl": CS, "m2": ADVENT_GTA},
    "gta5_to_cityscapes_deeplabv2_pseudo_ce_singh": {"m1": ADVENT_GTA, "pl": CS, "m2": ADVENT_GTA},
    "gta5_to_cityscapes_self_training_montressori": {"adv": MONTRESSORI, "pl": CS, "st": MONTRESSORI},
    "gta5_to_cityscapes_mpl_montressori": {"adv": MONTRESSORI, "pl": CS, "st": MONTRESSORI, "mpl": MONTRESSORI},
}


def _geometry(cfg) -> dict:
    d = cfg.data
    return dict(source=d.source_size, target=d.target_size, random_width=d.random_width, crop=d.crop_size,
                val=d.eval_size or d.target_size, hflip=d.hflip, filter=d.resize_filter)


def test_every_paper_experiment_and_pipeline_has_a_geometry_row():
    assert set(PAPER_GEOMETRY) == set(PAPER_SCHEDULES) | set(EPOCH_SCHEDULES)
    shipped = {p.stem for p in (EXPERIMENTS / "pipelines").glob("*.yaml") if not p.stem.startswith("synthetic")}
    assert shipped == set(PIPELINE_GEOMETRY)


@pytest.mark.parametrize("name", sorted(PAPER_SCHEDULES))
def test_synthia_paper_experiments_train_the_16_class_protocol(name):
    """ADVENT and CPSL train SYNTHIA -> Cityscapes with 16 classes; everything else with the 19."""
    cfg = _load(name)
    expected = ("synthia16", 16) if name.startswith("synthia_") else ("cityscapes19", 19)
    assert (cfg.data.label_set, cfg.model.num_classes) == expected


@pytest.mark.parametrize("name", sorted(n for n in PAPER_SCHEDULES if "deeplabv2" in n))
def test_batchnorm_is_frozen_as_in_each_original(name):
    """ADVENT / AdaptSegNet / FDA / IntraDA (batch 1) freeze BatchNorm; CPSL trains it (batch 4, SyncBN)."""
    cfg = _load(name)
    assert cfg.model.kwargs["freeze_bn"] is ("cpsl" not in name)


@pytest.mark.parametrize("name", sorted(PAPER_GEOMETRY))
def test_paper_experiments_follow_the_originals_geometry(name):
    assert _geometry(_load(name)) == PAPER_GEOMETRY[name]


@pytest.mark.parametrize("name", sorted(PIPELINE_GEOMETRY))
def test_every_pipeline_stage_follows_the_originals_geometry(name):
    from uda_ray.pipelines.runner import load_pipeline

    pipe = load_pipeline(EXPERIMENTS / "pipelines" / f"{name}.yaml")
    resolved = {}
    for st in pipe.cfg.stages:
        if st.action is None:
            resolved[st.name] = _geometry(load_shipped(load_experiment, pipe.experiment_path(st),
                                                       {**pipe.cfg.set, **st.set}))
        else:
            kind, args = st.action
            src = args["from"] if isinstance(args["from"], str) else args["from"][0]
            key = "val" if kind == "evaluate_ensemble" else "target"
            resolved[st.name] = resolved[src][key]
    assert resolved == PIPELINE_GEOMETRY[name]


def test_random_width_rescales_keeping_the_aspect_then_crops():
    import numpy as np
    from PIL import Image

    from uda_ray.data.transforms import PairTransform

    img = Image.new("RGB", (40, 20))
    lbl = np.zeros((20, 40), np.uint8)
    tf = PairTransform(resize=(64, 32), random_width=(80, 120))
    widths = set()
    for seed in range(20):
        x, y = tf(img, lbl, np.random.default_rng(seed))
        h, w = x.shape[-2:]
        assert 80 <= w <= 120 and h == w // 2 and tuple(y.shape) == (h, w)
        widths.add(w)
    assert len(widths) > 5  # random, not fixed
    x, _ = PairTransform(resize=(64, 32), random_width=(80, 120), crop=(30, 20))(img, lbl, np.random.default_rng(0))
    assert tuple(x.shape[-2:]) == (20, 30)


# -- the 16-class SYNTHIA protocol ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthia_root(tmp_path_factory):
    from uda_ray.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthia") / "bench", n_source=4, n_target=4, n_val=2, size=(64, 32),
                    seed=0, synthia=True)


def test_synthia16_maps_every_split_to_16_classes_and_ignores_terrain_truck_train(synthia_root):
    from uda_ray.data.datasets import DATASETS
    from uda_ray.data.labels import MIOU16_CLASSES

    to16 = {t: k for k, t in enumerate(MIOU16_CLASSES)}
    dropped = 0
    for name, root, split in [("synthia", "synthia", "train"), ("cityscapes", "cityscapes", "train"),
                              ("cityscapes", "cityscapes", "val")]:
        ds19 = DATASETS[name](synthia_root / root, split, None)
        ds16 = DATASETS[name](synthia_root / root, split, None, label_set="synthia16")
        for i in range(len(ds19)):
            a, b = ds19[i]["lbl"], ds16[i]["lbl"]
            expected = a.clone().apply_(lambda t: to16.get(t, 255))
            assert torch.equal(b, expected)
            assert int(b[b != 255].max()) <= 15
            dropped += int(((a == 9) | (a == 14) | (a == 16)).sum())
    assert dropped > 0  # the benchmark has terrain / truck / train pixels, and they became 255


def test_a_16_class_confusion_matrix_reports_miou16_and_miou13():
    from uda_ray.data.labels import SYNTHIA16_CLASSES
    from uda_ray.metrics import metrics_from_confusion

    mat = torch.diag(torch.arange(1, 17)) + 1  # every class: some hits, some confusion
    m = metrics_from_confusion(mat)
    iou = torch.tensor([m[f"iou/{c}"] for c in SYNTHIA16_CLASSES])
    assert m["miou16"] == m["miou"] == pytest.approx(iou.mean().item())
    keep13 = [c for c in SYNTHIA16_CLASSES if c not in ("wall", "fence", "pole")]
    assert m["miou13"] == pytest.approx(sum(m[f"iou/{c}"] for c in keep13) / 13)
    assert "iou/terrain" not in m and "iou/truck" not in m and "iou/train" not in m


def test_synthia16_needs_a_16_class_model(synth_root):
    with pytest.raises(ConfigError, match="num_classes: 16"):
        build_experiment(tiny_experiment(synth_root, **{"data.label_set": "synthia16"}))
    with pytest.raises(ConfigError, match="label_set"):
        build_experiment(tiny_experiment(synth_root, **{"data.label_set": "cityscapes16"}))


def test_synthia16_trains_a_16_output_model_and_records_the_protocol(tmp_path, synthia_root):
    import yaml

    cfg = build_experiment(tiny_experiment(synthia_root, **{
        "data.source": "synthia", "data.source_root": str(synthia_root / "synthia"),
        "data.target_root": str(synthia_root / "cityscapes"), "data.label_set": "synthia16",
        "model.num_classes": 16, "train.max_steps": 2}))
    s = LocalSession(tmp_path / "run")
    last = fit(cfg, s)
    assert last["test/miou16"] == last["test/miou"] and "test/miou13" in last
    assert "test/iou/terrain" not in last and "test/iou/road" in last
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["label_set"] == "synthia16" and saved["model"]["num_classes"] == 16


def test_markdown_report_names_each_runs_label_protocol(tmp_path):
    from uda_ray.results.markdown import markdown_report
    from uda_ray.results.tables import ResultsWriter

    def write(run: str, label_set: str | None) -> None:
        data = {"source": "synthia", "target": "cityscapes", **({"label_set": label_set} if label_set else {})}
        exp = {"seed": 0, "method": "m", "model": {"name": "x"}, "data": data, "train": {"max_steps": 2}}
        w = ResultsWriter(tmp_path / run / "results", "s", "test/miou", "max", 0)
        w.result(run, exp, {}, {"step": 2, "test/miou": 0.3, "test/pixel_acc": 0.7})

    write("a", "synthia16")
    write("b", None)  # a table written before data.label_set existed: the 19-class protocol
    md = markdown_report("t", [("a", tmp_path / "a"), ("b", tmp_path / "b")])
    assert "Label protocol (data.label_set): a: synthia16, b: cityscapes19." in md
    assert "synthia16 for every run." in markdown_report("t", [("a", tmp_path / "a")])


def test_a_pipeline_pseudo_label_stage_takes_a_fixed_threshold(tmp_path, synth_root):
    from uda_ray.pipelines.actions import ACTIONS
    from uda_ray.training.checkpoint import best_checkpoint_in

    fit(build_experiment(tiny_experiment(synth_root, **{"train.max_steps": 2})), LocalSession(tmp_path / "run"))
    manifest = ACTIONS["pseudo_labels"]([best_checkpoint_in(tmp_path / "run")], tmp_path / "pl", threshold=0.5,
                                        flip=True)
    assert manifest["threshold"] == 0.5 and manifest["thresholds"] == [0.5] * 19 and manifest["model"]["flip"]


def test_resize_filter_reaches_every_dataset_transform(synth_root):
    import numpy as np
    from PIL import Image

    from uda_ray.data.loading import build_datasets, prepare, target_dataset

    cfg = build_experiment(tiny_experiment(synth_root, **{"data.resize_filter": "bicubic", "data.hflip": False,
                                                          "data.source_size": [40, 20], "data.target_size": [40, 20]}))
    data = prepare(cfg.data)
    ds = build_datasets(data, source=True, target=True, target_labels=False)
    for d in (*ds.values(), target_dataset(data)):
        assert getattr(d.transform, "inner", d.transform).filter == "bicubic"
    with Image.open(ds["src"].items[0][0]) as im:
        rgb = im.convert("RGB")
        bicubic = np.asarray(rgb.resize((40, 20), Image.Resampling.BICUBIC))
        bilinear = np.asarray(rgb.resize((40, 20), Image.Resampling.BILINEAR))
    assert not np.array_equal(bicubic, bilinear)
    got = np.asarray(ds["src"][(0, 0)]["img"]).transpose(1, 2, 0)  # (H, W, 3)
    np.testing.assert_array_equal(got.astype(np.uint8), bicubic)


# -- CPSL's network ------------------------------------------------------------------------------------------


def test_proda_head_has_cpsl_s_structure():
    from uda_ray.models.deeplabv2 import ProDAClassifier

    head = ProDAClassifier(2048, 19)
    # five branches to 256 (1x1, four dilated 3x3) with GroupNorm; SE 1280 -> 80 -> 1280; 3x3 fuse to 256 with
    # GroupNorm; 1x1 classifier without bias
    expected = (2048 * 256 + 256 + 512) + 4 * (2048 * 256 * 9 + 256 + 512) + (1280 * 80 + 80 + 80 * 1280 + 1280) \
        + (1280 * 256 * 9 + 256 + 512) + 256 * 19
    assert sum(p.numel() for p in head.parameters()) == expected
    head.eval()
    logits, feat = head(torch.randn(2, 2048, 5, 7))
    assert logits.shape == (2, 19, 5, 7) and feat.shape == (2, 256, 5, 7)
    with pytest.raises(ConfigError, match="single-level"):
        from uda_ray.models.deeplabv2 import deeplabv2_r101_ml

        deeplabv2_r101_ml(head="proda")


@pytest.mark.parametrize("name", ["gta5_to_cityscapes_cpsl", "synthia_to_cityscapes_cpsl"])
def test_cpsl_stages_share_one_network_so_each_can_start_from_the_last(name):
    from uda_ray.pipelines.runner import load_pipeline

    pipe = load_pipeline(EXPERIMENTS / "pipelines" / f"{name}.yaml")
    nets = {}
    for st in pipe.cfg.stages:
        if st.action is None:
            cfg = load_experiment(pipe.experiment_path(st), {**pipe.cfg.set, **st.set})
            nets[st.name] = (cfg.model.name, cfg.model.num_classes, cfg.model.kwargs.get("head"))
    assert set(nets.values()) == {("deeplabv2_r101", 16 if name.startswith("synthia") else 19, "proda")}
