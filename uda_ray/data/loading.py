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
import os
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from uda_ray.config import DataConfig, to_dict
from uda_ray.data.datasets import DATASETS
from uda_ray.data.transforms import PairTransform, eval_transform


def default_data_dir() -> Path:
    return Path(os.environ.get("UDA_RAY_DATA", "uda_ray_data")).absolute()


def synthetic_dir(cfg: DataConfig, data_dir: Path) -> Path:
    key = json.dumps(to_dict(cfg.synthetic), sort_keys=True) + f"|synthia={cfg.source == 'synthia'}"
    return data_dir / f"synth-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def prepare(cfg: DataConfig, data_dir: Path | None = None) -> DataConfig:
    """Driver side: make the roots absolute, generating the synthetic benchmark when it is asked for."""
    from uda_ray.data.synthetic import generate

    src, tgt = cfg.source_root, cfg.target_root
    if cfg.synthetic is not None and (src is None or tgt is None):
        s = cfg.synthetic
        out = synthetic_dir(cfg, data_dir or default_data_dir())
        generate(out, n_source=s.n_source, n_target=s.n_target, n_val=s.n_val, size=tuple(s.size),
                 seed=s.seed, synthia=cfg.source == "synthia")
        src = src or str(out / ("synthia" if cfg.source == "synthia" else "gta5"))
        tgt = tgt or str(out / "cityscapes")
    lbl = cfg.target_label_root
    return dataclasses.replace(
        cfg,
        source_root=str(Path(src).expanduser().absolute()),
        target_root=str(Path(tgt).expanduser().absolute()),
        target_label_root=str(Path(lbl).expanduser().absolute()) if lbl else None,
    )


def build_datasets(cfg: DataConfig, *, source: bool, target: bool, target_labels: bool) -> dict[str, Dataset]:
    """The datasets a method needs: 'src', 'tgt' (train split), 'val' (always). Roots must be resolved.

    Target train labels are loaded only for methods that use them (oracle, pseudo-labels); with
    `target_label_root` the target labels come from that pseudo-label folder.
    """
    out: dict[str, Dataset] = {}
    train_tf = dict(crop=cfg.crop_size, hflip=cfg.hflip)
    if source:
        out["src"] = DATASETS[cfg.source](Path(cfg.source_root), "train",
                                          PairTransform(resize=cfg.source_size, **train_tf))
    if target:
        label_root = Path(cfg.target_label_root) if (target_labels and cfg.target_label_root) else None
        out["tgt"] = DATASETS[cfg.target](Path(cfg.target_root), "train",
                                          PairTransform(resize=cfg.target_size, **train_tf), label_root)
    out["val"] = DATASETS[cfg.target](Path(cfg.target_root), cfg.val_split,
                                      eval_transform(cfg.target_size))
    return out


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


def train_loader(ds: Dataset, batch_size: int, *, rank: int, world_size: int, seed: int, start_step: int,
                 stream: int, workers: int) -> Iterator[dict]:
    sampler = StepBatches(len(ds), batch_size, rank=rank, world_size=world_size, seed=seed,
                          start_step=start_step, stream=stream)
    return iter(DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                           persistent_workers=workers > 0))


def val_loader(ds: Dataset, batch_size: int, *, rank: int, world_size: int, workers: int) -> DataLoader:
    """This rank's shard (rank, rank + W, ...) of the validation set; shards are summed by all_reduce."""
    idx = list(range(rank, len(ds), world_size))
    return DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch_size, shuffle=False, num_workers=workers)
