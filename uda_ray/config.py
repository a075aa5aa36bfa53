"""Experiment configs: the frozen dataclasses of an experiment (data, model, optimizer, training) and their checks.

Built from YAML by the strict loader (uda_ray.config_loader); the method's own hyperparameters are validated
against its Config (uda_ray.build).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from uda_ray import target_labels as target_labels_rule
from uda_ray.config_loader import to_dict
from uda_ray.errors import ConfigError
from uda_ray.metric_names import DEFAULT_SELECTION, check_metric
from uda_ray.training.optim import OptimConfig

# --------------------------------------------------------------------------------------------
# Config dataclasses


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the built-in synthetic benchmark, generated on first use."""

    n_source: int = 200
    n_target: int = 200
    n_val: int = 50
    size: tuple[int, int] = (256, 128)  # (W, H) of the written images and labels
    seed: int = 0
    # 1: the original benchmark (palette and texture shift; the results of the project's history were measured
    # on it); 2: class-conditional appearance, layout, lighting and sensor shift (docs/benchmark.md), the default
    version: int = 2
    # version 2 only: how far the target's class colours move from the game's, in [0, 1] (docs/benchmark.md);
    # unset: V2_SHIFT_DEFAULTS (version 1 has no such shift: 1.0, its only value)
    colour_shift: float | None = None
    # version 2 only: how far the target's camera and street statistics move from the game's, in [0, 1]
    layout_shift: float | None = None

    def __post_init__(self) -> None:
        _check(min(self.n_source, self.n_target, self.n_val) >= 1, "data.synthetic: image counts must be >= 1")
        _check(min(self.size) >= 16, "data.synthetic.size: both sides must be >= 16")
        _check(self.version in (1, 2), f"data.synthetic.version must be 1 or 2, got {self.version!r}")
        for name in SYNTH_SHIFTS:
            value = getattr(self, name)
            if value is None:  # the version's default, written out so every run's stored config names it
                value = synth_shift_default(self.version, name)
                object.__setattr__(self, name, value)
            _check(0.0 <= value <= 1.0, f"data.synthetic.{name} must be in [0, 1], got {value}")
            _check(self.version == 2 or value == 1.0, f"data.synthetic.{name} needs version: 2")


SYNTH_SHIFTS = ("colour_shift", "layout_shift")  # SynthConfig's version-2 shift strengths, each in [0, 1]
# their defaults: the setting under which v2's criteria are measured (docs/benchmark.md, the warm-start protocol);
# 1.0 / 1.0 is the full shift of v2's design
V2_SHIFT_DEFAULTS = {"colour_shift": 0.5, "layout_shift": 0.0}


def synth_shift_default(version: int, name: str) -> float:
    """A shift's value when none is given: V2_SHIFT_DEFAULTS for version 2; 1.0 (no such shift) for version 1."""
    return V2_SHIFT_DEFAULTS[name] if version == 2 else 1.0


PSEUDO_THRESHOLDS = ("class_percentile", "image_median")  # data.pseudo_threshold
NORMALIZATIONS = ("imagenet", "caffe_bgr")  # data.normalize (uda_ray.models.resnet.set_input_normalization)


@dataclass(frozen=True)
class DataConfig:
    source: str = "gta5"
    target: str = "cityscapes"
    source_root: str | None = None  # default with `synthetic`: <data dir>/synth-<hash>/<layout>
    target_root: str | None = None
    synthetic: SynthConfig | None = None  # set: generate the built-in benchmark into the roots
    source_size: tuple[int, int] | None = None  # (W, H) resize of source images, None = as stored
    target_size: tuple[int, int] | None = None  # (W, H) resize of target train and val images
    crop_size: tuple[int, int] | None = None  # (W, H) random crop after resize (train only)
    # Train only, source and target: after the resize, rescale each image to a random width uniform in
    # [lo, hi], aspect kept, before the crop (CPSL / ProDA's RandomSized: width 2200 * U(0.5, 1.5)).
    random_width: tuple[int, int] | None = None
    # the image resize filter (labels: nearest). AdaptSegNet, ADVENT, IntraDA and FDA resize images bicubically
    resize_filter: str = "bilinear"
    eval_size: tuple[int, int] | None = None  # (W, H) input of target val images; None = target_size
    hflip: bool = True
    grayscale: bool = False  # feed every image (source, target, val) as 3-channel grayscale
    # the model's input normalization, wherever an image enters a model (uda_ray.models.resnet.
    # set_input_normalization): "imagenet" (the model's own: ImageNet mean/std) or "caffe_bgr" (BGR, 0..255
    # minus the Caffe mean, no std: the ADVENT / AdaptSegNet / seed BiSeNet code)
    normalize: str = "imagenet"
    # (W, H): evaluate labeled splits with the labels resized (nearest) to this size and the logits upsampled
    # to it (github.com/isola-quezada-98/Project1 evaluates Cityscapes val at 1024x512); None: labels as stored
    eval_label_size: tuple[int, int] | None = None
    target_label_root: str | None = None  # pseudo-label folder (trainIds) replacing target labels
    # What a method that reads target labels trains on (uda_ray.target_labels): "pseudo" (pseudo_from or
    # target_label_root; a run with neither is refused) or "ground_truth" (the target's own labels: an oracle
    # ablation, marked in every output). target_only is the oracle: ground truth unless given pseudo-labels.
    target_labels: str = target_labels_rule.PSEUDO
    # set by uda_ray, not by hand: the checkpoint this run starts or learns from that was trained on target
    # ground truth (directly or through its own ancestors), so this run is marked too
    target_gt_via: str | None = None
    source_label_root: str | None = None  # pseudo-label folder (trainIds) replacing source labels
    # Pseudo-labels made by the run itself (rank 0, on the training device, before training) from this
    # checkpoint (a folder, `run:NAME`, `sweep:NAME`): class-wise thresholds at `pseudo_percentile` of the
    # confidences of each predicted class, capped at `pseudo_cap` — so a sweep can search both.
    pseudo_from: str | None = None
    pseudo_percentile: float = 0.5
    pseudo_cap: float = 0.9
    pseudo_stylize_beta: float | None = None  # predict on target images FDA-stylized toward the source
    # the thresholds' rule: "class_percentile" (above: one threshold per class over the whole target train set,
    # BDL / FDA-MBT) or "image_median" (createpseudolabels.py of the real-time DA project, micolrosini/Real-Time-Domain-
    # Adaptation-in-Image-Segmentation on GitHub: per image, per class predicted in it,
    # the median confidence of that class's pixels in that image, capped at pseudo_cap; pseudo_percentile unused)
    pseudo_threshold: str = "class_percentile"
    # IntraDA: a ranking folder (an `intrada_rank` stage). The source becomes the easiest `easy_fraction` of
    # the target train set with the ranking's pseudo-labels, the target its hard rest.
    ranking: str | None = None
    easy_fraction: float = 0.67
    val_split: str | None = "val"  # the target TEST split (test/... metrics); null or an unlabeled target: none
    # Splits that keep the test split out of selection (uda_ray.data.splits), by seeded hash of file names:
    source_val_fraction: float = 0.05  # of the source set, held out (labeled): src_val/... metrics
    target_holdout_fraction: float = 0.05  # of target train, held out unlabeled: the uv/... validators
    # at most this many images in each of those two (evaluated at every evaluation). 40 keeps an evaluation
    # within ~22% of the test split's cost on GTA5 -> Cityscapes by input pixels (docs/selection.md)
    held_out_max: int = 40
    selection_labeled: int = 0  # N labeled target TRAIN images for sel/miou (few-labels protocol); 0 = none
    split_seed: int = 0  # the splits' seed (separate from `seed`, so reruns with other seeds share splits)
    validator_pixels: int = 64  # pixels per held-out image sampled for uv/snd and uv/bnm (seeded)
    # "cityscapes19": the 19 Cityscapes classes. "synthia16": SYNTHIA -> Cityscapes as ADVENT and CPSL train it,
    # a model with 16 outputs (model.num_classes 16), terrain / truck / train pixels ignored in every split;
    # its mIoU is the mIoU-16 (test/miou16 = test/miou), test/miou13 the 13-class subset.
    label_set: str = "cityscapes19"
    # DataLoader processes per data stream (source, target, evaluation); -1 = from the CPUs a Ray Train worker
    # owns: (floor(train.cpus_per_worker) - 1) split over the training streams, 0 (in-process) on one CPU
    loader_workers: int = -1
    # A folder where training images and labels are decoded once, at training resolution (after the resize),
    # into uint8 .npy files read memory-mapped afterwards (crop + flip per step). Skips PNG decoding from the
    # second epoch on; costs H x W x 4 bytes per image (GTA5 at 1280x720: 3.7 MB). None = decode every time.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        from uda_ray.data.datasets import DATASETS

        for key in ("source", "target"):
            name = getattr(self, key)
            _check(name in DATASETS, f"data.{key}: unknown dataset '{name}' (valid: {', '.join(DATASETS)})")
        _check(
            self.synthetic is not None or (self.target_root and (self.source_root or self.ranking)),
            "data: give source_root and target_root, or `synthetic` to use the built-in benchmark",
        )
        for key in ("source_size", "target_size", "crop_size", "eval_size", "random_width", "eval_label_size"):
            v = getattr(self, key)
            _check(v is None or min(v) >= 8, f"data.{key}: both sides must be >= 8")
        _check(self.resize_filter in ("bilinear", "bicubic"),
               f"data.resize_filter must be 'bilinear' or 'bicubic', got '{self.resize_filter}'")
        _check(self.random_width is None or self.random_width[0] <= self.random_width[1],
               "data.random_width: [lo, hi] with lo <= hi")
        from uda_ray.data.labels import LABEL_SETS

        _check(self.label_set in LABEL_SETS,
               f"data.label_set: unknown '{self.label_set}' (valid: {', '.join(LABEL_SETS)})")
        _check(self.loader_workers >= -1, "data.loader_workers must be >= 0, or -1 (from train.cpus_per_worker)")
        _check(self.source != "frames", "data.source: a `frames` folder has no labels; the source needs them")
        for key in ("source_val_fraction", "target_holdout_fraction"):
            v = getattr(self, key)
            _check(0.0 < v < 1.0, f"data.{key} must be in (0, 1), got {v}")
        _check(self.selection_labeled >= 0, f"data.selection_labeled must be >= 0, got {self.selection_labeled}")
        _check(self.validator_pixels >= 2, "data.validator_pixels must be >= 2")
        _check(self.held_out_max >= 1, "data.held_out_max must be >= 1")
        _check(0.0 < self.easy_fraction < 1.0, "data.easy_fraction must be in (0, 1)")
        _check(0.0 <= self.pseudo_percentile <= 1.0, "data.pseudo_percentile must be in [0, 1]")
        _check(0.0 < self.pseudo_cap <= 1.0, "data.pseudo_cap must be in (0, 1]")
        _check(self.pseudo_threshold in PSEUDO_THRESHOLDS, f"data.pseudo_threshold must be one of "
               f"{', '.join(PSEUDO_THRESHOLDS)}, got {self.pseudo_threshold!r}")
        _check(self.normalize in NORMALIZATIONS,
               f"data.normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        _check(self.target_labels in target_labels_rule.CHOICES,
               f"data.target_labels must be 'pseudo' or 'ground_truth', got {self.target_labels!r}")
        _check(not (self.pseudo_from and self.target_label_root),
               "data: give pseudo_from (labels made by the run) or target_label_root (a folder), not both")
        _check(self.ranking is None or self.source == self.target,
               "data.ranking: the source is the easy target split, so data.source must equal data.target")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "bisenet_r18"
    num_classes: int = 19
    pretrained: str | None = None  # None, "imagenet", or a path to a local .pth file
    kwargs: dict = field(default_factory=dict)  # extra builder arguments, e.g. {freeze_bn: true}

    def __post_init__(self) -> None:  # the name is checked against MODELS by uda_ray.build
        _check(self.num_classes >= 2, "model.num_classes must be >= 2")


LAUNCHERS = ("auto", "ray_train", "inline", "replay")
EPOCH_SPLITS = ("source", "target", "shorter")  # train.epoch_split
REPLAY_MATCH = ("params", "index")


@dataclass(frozen=True)
class ReplayConfig:
    """What a `train.launcher: replay` trial reports instead of training (uda_ray.training.replay): a learning
    curve read from a recorded sweep's `evals` table, or a seeded synthetic one. For measuring the sweep driver
    (benchmarks/driver_scale.py) and for trying a search space or scheduler without a GPU."""

    # "synthetic", or a recorded sweep: its folder, its results/ folder or its evals.parquet
    source: str = "synthetic"
    # a recorded source: "params" (the recorded trial nearest to the trial's sampled parameters) or "index"
    # (the trial's index in the sweep, modulo the recorded trials)
    match: str = "params"
    seed: int = 0  # the synthetic curves' seed
    seconds_per_eval: float = 0.0  # slept before each reported evaluation (a stand-in for training time)

    def __post_init__(self) -> None:
        _check(bool(self.source), "train.replay.source: 'synthetic' or the folder of a recorded sweep")
        _check(self.match in REPLAY_MATCH,
               f"train.replay.match must be one of {', '.join(REPLAY_MATCH)}, got {self.match!r}")
        _check(self.seconds_per_eval >= 0, "train.replay.seconds_per_eval must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    # The run's length in epochs of its training set (the source train split; the target train split for a method
    # without source, target_only), as the BiSeNet UDA projects count it (e.g. 50 epochs):
    # max_steps = ceil(epochs * images / global batch),
    # computed when the data are resolved (uda_ray.driver.prepare.resolve_epochs); the poly horizon follows.
    # A max_steps given beside it must agree (one line otherwise); None: max_steps is the length.
    epochs: int | None = None
    # what one epoch passes over: "source" (the source train split; the target's for a method without source),
    # "target" (the target train split), "shorter" (the smaller of the two: a loop over zip(source, target), as
    # the real-time DA project's trainUnsupervised.py and MPL.py iterate)
    epoch_split: str = "source"
    eval_every: int = 100
    batch_size: int = 8  # per worker; the global batch is batch_size * num_workers
    num_workers: int = 1  # training processes (DDP workers under Ray Train)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    eval_batch_size: int = 2
    keep_checkpoints: int = 2  # the best k by the run's selection metric (`select`); the latest is kept too
    init_from: str | None = None  # a checkpoint dir/file, or `run:NAME` / `sweep:NAME` (their best checkpoint)
    profile: bool = True  # params / GFLOPs / latency of the eval model into the results
    # a run whose Ray Train worker dies (OOM-killer, lost node, crash) restarts from its latest checkpoint
    # up to this many times; the restarts are counted in the results tables
    max_failures: int = 2
    # how a sweep trial runs `fit`: "inline" in the Tune trial's own process (one worker, no Ray Train controller
    # or worker group: seconds less start-up per trial), "ray_train" as a Ray Train TorchTrainer (DDP), "auto"
    # inline for num_workers == 1 and ray_train otherwise; "replay" trains nothing: the trial reports a recorded
    # or synthetic learning curve (`replay`) through the sweep's real driver path (scale runs, dry runs)
    launcher: str = "auto"
    replay: ReplayConfig | None = None  # launcher replay: where its curves come from (None: synthetic, seed 0)
    # GPU-oriented options, off by default (they change the numbers): mixed precision of every forward and
    # backward pass of a step, discriminators included ("off" | "bf16" | "fp16"; fp16 with one gradient scaler per
    # optimizer), channels-last memory format and torch.compile of the segmenter
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        _check(self.amp in ("off", "bf16", "fp16"), f"train.amp must be 'off', 'bf16' or 'fp16', got {self.amp!r}")
        _check(self.max_steps >= 1, "train.max_steps must be >= 1")
        _check(self.epochs is None or self.epochs >= 1, f"train.epochs must be >= 1 (or null), got {self.epochs}")
        _check(self.epoch_split in EPOCH_SPLITS,
               f"train.epoch_split must be one of {', '.join(EPOCH_SPLITS)}, got {self.epoch_split!r}")
        _check(1 <= self.eval_every, "train.eval_every must be >= 1")
        _check(self.batch_size >= 1 and self.eval_batch_size >= 1, "train batch sizes must be >= 1")
        _check(self.num_workers >= 1, "train.num_workers must be >= 1")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker must be > 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _check(self.max_failures >= 0, "train.max_failures must be >= 0")
        _check(self.launcher in LAUNCHERS,
               f"train.launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        _check(self.launcher != "inline" or self.num_workers == 1,
               f"train.launcher: inline runs one process; train.num_workers: {self.num_workers} needs "
               "launcher: ray_train (or auto)")
        _check(self.launcher != "replay" or self.num_workers == 1,
               f"train.launcher: replay runs one process per trial; train.num_workers: {self.num_workers} must be 1")
        _check(self.replay is None or self.launcher == "replay",
               f"train.replay is read by launcher: replay only (train.launcher is {self.launcher!r})")

    @property
    def inline(self) -> bool:
        """Whether the trial's work runs in the Tune trial's own process (launcher inline or replay, or auto with
        one worker)."""
        return self.launcher in ("inline", "replay") or (self.launcher == "auto" and self.num_workers == 1)

    @property
    def replay_source(self) -> ReplayConfig:
        """The replay settings of launcher replay (the defaults when `replay` is not given)."""
        return self.replay or ReplayConfig()


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: str = "source_only"
    method_cfg: Any = None  # an instance of METHODS[method].Config (uda_ray.build.build_experiment)
    # The metric that ranks this run's checkpoints (kept checkpoints, `run:NAME`, `@stage:best`); any name of
    # uda_ray.metric_names, default label-free.
    select: str = DEFAULT_SELECTION

    def __post_init__(self) -> None:
        object.__setattr__(self, "select", check_metric(self.select, "select", per_run=True))
        _check(self.select != "sel/miou" or self.data.selection_labeled > 0,
               "select: sel/miou needs a labeled selection split (data.selection_labeled > 0)")
        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name)),
               f"name '{self.name}' must be letters, digits, '_', '.', '-'")
        from uda_ray.data.labels import LABEL_SETS

        n = LABEL_SETS[self.data.label_set]
        _check(self.data.label_set == "cityscapes19" or self.model.num_classes == n,
               f"data.label_set {self.data.label_set} trains a {n}-class model: set model.num_classes: {n}")
        h = self.optim.poly_horizon
        _check(h is None or h >= self.train.max_steps,
               f"optim.poly_horizon ({h}) must be >= train.max_steps ({self.train.max_steps}): "
               "the lr would reach 0 before the run ends")

    @property
    def poly_horizon(self) -> int:
        """The segmenter's schedule horizon (the default of every other optimizer of the run)."""
        return self.optim.poly_horizon or self.train.max_steps


# --------------------------------------------------------------------------------------------
# Experiments (validation against the method and model registries: uda_ray.build)


def experiment_dict(cfg: ExperimentConfig) -> dict:
    """The resolved config as a plain dict (saved beside every run, flattened into the tables)."""
    return to_dict(cfg)
