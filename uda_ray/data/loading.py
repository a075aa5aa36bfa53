"""From a DataConfig to batches: dataset roots (generating the synthetic benchmark on first use),
datasets with their transforms, and a step-indexed sampler.

The sampler makes the batch of step `s` a pure function of (seed, s, rank): resuming from a
checkpoint at step `s` replays exactly the same data and augmentations, with no iterator state to save,
and rank r of W workers with batch b draws exactly the slice [r*b, (r+1)*b) of the global batch that one
worker with batch W*b would draw.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from uda_ray.config import SYNTH_SHIFTS, DataConfig
from uda_ray.config_loader import to_dict
from uda_ray.data.datasets import DATASETS, has_labels, scans_once
from uda_ray.data.splits import Splits, make_splits
from uda_ray.data.transforms import PairTransform, eval_transform
from uda_ray.errors import ConfigError, DatasetError


def default_data_dir() -> Path:
    return Path(os.environ.get("UDA_RAY_DATA", "uda_ray_data")).absolute()


def synthetic_dir(cfg: DataConfig, data_dir: Path) -> Path:
    params = to_dict(cfg.synthetic)
    if params.get("version") == 1:  # version 1 keeps the folder it had before versions existed
        del params["version"]
    for name in SYNTH_SHIFTS:  # their default keeps the folder v2 had before they existed
        if params.get(name) == 1.0:
            del params[name]
    key = json.dumps(params, sort_keys=True) + f"|synthia={cfg.source == 'synthia'}"
    return data_dir / f"synth-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def prepare(cfg: DataConfig, data_dir: Path | None = None) -> DataConfig:
    """Driver side: make the roots absolute, generating the synthetic benchmark when it is asked for."""
    from uda_ray.data.synthetic import generate

    src, tgt = cfg.source_root, cfg.target_root
    if cfg.synthetic is not None and (src is None or tgt is None):
        s = cfg.synthetic
        out = synthetic_dir(cfg, data_dir or default_data_dir())
        generate(out, n_source=s.n_source, n_target=s.n_target, n_val=s.n_val, size=tuple(s.size),
                 seed=s.seed, synthia=cfg.source == "synthia", version=s.version,
                 colour_shift=s.colour_shift, layout_shift=s.layout_shift)
        src = src or str(out / cfg.source)  # the benchmark writes gta5/, cityscapes/ (and synthia/) layouts
        tgt = tgt or str(out / "cityscapes")
    if src is None and cfg.ranking:
        src = tgt  # IntraDA: the source is the easy part of the target train set
    return dataclasses.replace(
        cfg, source_root=_abs(src), target_root=_abs(tgt), target_label_root=_abs(cfg.target_label_root),
        source_label_root=_abs(cfg.source_label_root), ranking=_abs(cfg.ranking), cache_dir=_abs(cfg.cache_dir),
    )


def _abs(path: str | None) -> str | None:
    return str(Path(path).expanduser().absolute()) if path else None


RANKING_FILE = "ranking.txt"  # target train image names, easiest (lowest entropy) first


def ranking_split(ranking: Path, fraction: float) -> tuple[list[str], list[str]]:
    """(easy, hard) image names: the first floor(N * fraction) of the ranking, as IntraDA splits."""
    f = Path(ranking) / RANKING_FILE
    if not f.is_file():
        raise DatasetError(f"ranking folder {ranking} has no {RANKING_FILE}: expected an intrada_rank stage's output")
    names = [n for n in f.read_text().splitlines() if n]
    n_easy = int(len(names) * fraction)
    return names[:n_easy], names[n_easy:]


def names_of(ds: Dataset) -> list[str]:
    """Every item's "name" (its path relative to the dataset's image folder)."""
    return [img.relative_to(ds.image_dir).as_posix() for img, _ in ds.items]


def keep_only(ds: Dataset, names: list[str], what: str) -> Dataset:
    """`ds` restricted to the items named in `names` (dataset order): a split of it."""
    keep = set(names)
    ds.items = [it for it in ds.items if it[0].relative_to(ds.image_dir).as_posix() in keep]
    if not ds.items:
        raise DatasetError(f"the {what} split of {ds.root} is empty")
    return ds


def has_test_split(cfg: DataConfig) -> bool:
    """Whether the target has a labeled test split (test/... metrics): a val_split and labels."""
    return cfg.val_split is not None and has_labels(cfg.target, Path(cfg.target_root))


def _source_root(cfg: DataConfig) -> Path:
    return Path(cfg.source_root or (cfg.target_root if cfg.ranking else None))


def _source_labels(cfg: DataConfig) -> Path | None:
    return Path(cfg.ranking) if cfg.ranking else _path(cfg.source_label_root)


def splits_of(cfg: DataConfig) -> Splits:
    """The run's splits (uda_ray.data.splits) from the file names of its datasets. Roots must be resolved."""
    tgt_root = Path(cfg.target_root)
    target = names_of(DATASETS[cfg.target](tgt_root, "train", None, None, labels=False))
    test = names_of(DATASETS[cfg.target](tgt_root, cfg.val_split, None)) if has_test_split(cfg) else []
    if cfg.selection_labeled and not has_labels(cfg.target, tgt_root):
        raise ConfigError(f"data.selection_labeled={cfg.selection_labeled}: the target at {tgt_root} has no labels "
                          "(a labeled selection split needs gtFine/train)")
    kw = dict(source_val_fraction=cfg.source_val_fraction, target_holdout_fraction=cfg.target_holdout_fraction,
              selection_labeled=cfg.selection_labeled, seed=cfg.split_seed, held_out_max=cfg.held_out_max)
    if cfg.ranking:  # IntraDA: source = the easy target images, target = the hard ones, both minus held-out ones
        easy, hard = ranking_split(Path(cfg.ranking), cfg.easy_fraction)
        sp = make_splits(easy, target, test, **kw)
        held = set(sp.target_holdout) | set(sp.selection)
        sp = make_splits([n for n in easy if n not in held], target, test, **kw)
        return dataclasses.replace(sp, target_train=sorted(set(sp.target_train) & set(hard)))
    source = names_of(DATASETS[cfg.source](_source_root(cfg), "train", None, _source_labels(cfg)))
    return make_splits(source, target, test, **kw)


def build_datasets(cfg: DataConfig, *, source: bool, target: bool, target_labels: bool, evaluation: bool = True,
                   splits: Splits | None = None) -> dict[str, Dataset]:
    """The datasets of a run, each restricted to its split (uda_ray.data.splits). Roots must be resolved.

    'src', 'tgt': the training splits a method needs. With `evaluation`: 'src_val' (labeled source
    holdout), 'holdout' (unlabeled target holdout for the validators), 'sel' (when data.selection_labeled)
    and 'test' (when the target has a labeled test split). Target train labels are loaded only for methods
    that use them (oracle, pseudo-labels); with `target_label_root` they come from that folder.
    Training items are uint8 (the loop converts them on its device); with `cache_dir` they are decoded once.
    """
    with scans_once():  # every folder listed once, however many of the datasets below read it
        return _build_datasets(cfg, source=source, target=target, target_labels=target_labels,
                               evaluation=evaluation, splits=splits)


def _build_datasets(cfg: DataConfig, *, source: bool, target: bool, target_labels: bool, evaluation: bool,
                    splits: Splits | None) -> dict[str, Dataset]:
    sp = splits or splits_of(cfg)
    ls = cfg.label_set
    out: dict[str, Dataset] = {}
    train_tf = dict(crop=cfg.crop_size, hflip=cfg.hflip, random_width=cfg.random_width, uint8=True)
    tgt_root = Path(cfg.target_root)

    def tf(resize: tuple[int, int] | None) -> Any:
        return input_transform(PairTransform(resize=resize, **train_tf), cfg)

    if source:
        out["src"] = keep_only(DATASETS[cfg.source](_source_root(cfg), "train", tf(cfg.source_size),
                                                    _source_labels(cfg), label_set=ls), sp.source_train,
                               "source train")
    if target:
        label_root = _path(cfg.target_label_root) if target_labels else None
        tgt = DATASETS[cfg.target](tgt_root, "train", tf(cfg.target_size), label_root, label_set=ls,
                                   labels=target_labels)
        out["tgt"] = keep_only(tgt, sp.target_train, "target train")
    if cfg.cache_dir:
        for key in ("src", "tgt"):
            if key in out:
                out[key].cache_dir = Path(cfg.cache_dir)
    if evaluation:
        eval_size = cfg.eval_size or cfg.target_size
        ev = input_transform(eval_transform(eval_size), cfg)
        if sp.test:
            out["test"] = DATASETS[cfg.target](tgt_root, cfg.val_split, ev, label_set=ls)
        # source val and the holdout are evaluated at the network's input size (labels resized, nearest):
        # selection signals, cheaper than the test split's full-resolution labels
        src_ev = input_transform(PairTransform(resize=cfg.source_size), cfg)
        out["src_val"] = keep_only(DATASETS[cfg.source](_source_root(cfg), "train", src_ev, _source_labels(cfg),
                                                        label_set=ls), sp.source_val, "source val")
        hold_ev = input_transform(PairTransform(resize=eval_size), cfg)
        out["holdout"] = keep_only(DATASETS[cfg.target](tgt_root, "train", hold_ev, None, label_set=ls, labels=False),
                                   sp.target_holdout, "target holdout")
        if sp.selection:
            out["sel"] = keep_only(DATASETS[cfg.target](tgt_root, "train", ev, label_set=ls), sp.selection,
                                   "selection")
    return out


class _Grayscale:
    """Wraps a paired transform: the image becomes 3-channel grayscale first (labels untouched)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, img: Any, lbl: Any, rng: Any = None) -> Any:
        return self.inner(img.convert("L").convert("RGB"), lbl, rng)

    def prepare(self, img: Any, lbl: Any) -> Any:
        return self.inner.prepare(img.convert("L").convert("RGB"), lbl)

    def augment(self, img: Any, lbl: Any, rng: Any) -> Any:
        return self.inner.augment(img, lbl, rng)

    def cache_key(self) -> str:
        return self.inner.cache_key() + "|grayscale"

    @property
    def cacheable(self) -> bool:
        return self.inner.cacheable


def input_transform(tf: Any, cfg: DataConfig) -> Any:
    """The dataset transform with the experiment's input options (resize filter, grayscale) applied."""
    if isinstance(tf, PairTransform):
        tf.filter = cfg.resize_filter
    return _Grayscale(tf) if cfg.grayscale else tf


def target_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """The target dataset's `split` with the evaluation transform (no crop, no flip) at the run's input size:
    data.target_size for train (pseudo-labels, rankings), data.eval_size (else target_size) for the val split."""
    size = cfg.target_size if split == "train" else (cfg.eval_size or cfg.target_size)
    tf = input_transform(eval_transform(size), cfg)
    return DATASETS[cfg.target](Path(cfg.target_root), split, tf, label_set=cfg.label_set, labels=split != "train")


def _path(p: str | None) -> Path | None:
    return Path(p) if p else None


class StepBatches(Sampler[list[tuple[int, int]]]):
    """Yields, for steps start, start+1, ..., this rank's list of (index, augmentation seed)."""

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0, stream: int = 0) -> None:
        self.n, self.b, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.start_step, self.stream = seed, start_step, stream
        self._perm_epoch, self._perm = -1, torch.empty(0)

    def _index(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(hash((self.seed, self.stream, epoch)) & 0x7FFFFFFF)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return int(self._perm[pos])

    def batch(self, step: int) -> list[tuple[int, int]]:
        first = step * self.b * self.world + self.rank * self.b  # position in the global sequence
        return [(self._index(first + i), hash((self.seed, self.stream, step, first + i)) & 0x7FFFFFFF)
                for i in range(self.b)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs it for len()
        return 2**62


def resolve_loader_workers(loader_workers: int, cpus_per_worker: float, streams: int) -> int:
    """DataLoader processes per stream: `loader_workers`, or with -1 the CPUs a training worker owns beyond
    its own main process, split over its `streams` training data streams."""
    if loader_workers >= 0:
        return loader_workers
    return max(0, math.floor(cpus_per_worker) - 1) // max(1, streams)


def train_loader(ds: Dataset, batch_size: int, *, rank: int, world_size: int, seed: int, start_step: int,
                 stream: int, workers: int, pin_memory: bool = False) -> Iterator[dict]:
    """Batches for steps start_step, start_step + 1, ... (persistent worker processes, pinned memory on a
    GPU so that the copies to it can be asynchronous)."""
    sampler = StepBatches(len(ds), batch_size, rank=rank, world_size=world_size, seed=seed,
                          start_step=start_step, stream=stream)
    return iter(DataLoader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                           persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None))


def val_loader(ds: Dataset, batch_size: int, *, rank: int, world_size: int, workers: int) -> DataLoader:
    """This rank's shard (rank, rank + W, ...) of the validation set; shards are summed by all_reduce."""
    idx = list(range(rank, len(ds), world_size))
    return DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch_size, shuffle=False, num_workers=workers)
