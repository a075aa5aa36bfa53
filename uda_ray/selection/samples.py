"""Seeded per-image pixel samples and running sums for the validators that combine passes (ATC, DEV, MixVal in
uda_ray.selection.estimators), gathered over DDP ranks so that every rank computes what one process would.
Plain PyTorch, no Ray."""

from __future__ import annotations

import torch

from uda_ray.selection.validators import pixel_sample


class PixelSamples:
    """Named tensors sampled at the same pixels of each image, keyed by the image's stable integer key. After
    `reduce()` (all ranks' samples gathered) `cat(name)` concatenates them in key order: the same rows, in the
    same order, whatever the number of ranks or the batching."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, torch.Tensor]]] = []

    def add(self, key: int, **tensors: torch.Tensor) -> None:
        self.rows.append((int(key), {k: v.detach().cpu() for k, v in tensors.items()}))

    def reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.rows)
            self.rows = [r for g in gathered for r in g]

    def __len__(self) -> int:
        return sum(next(iter(t.values())).shape[0] for _, t in self.rows if t)

    def cat(self, name: str) -> torch.Tensor:
        return torch.cat([t[name] for _, t in sorted(self.rows, key=lambda r: r[0])])


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU tensor summed over the DDP ranks (itself when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, t)
        return sum(gathered[1:], gathered[0].clone())
    return t


def gather_dict(d: dict) -> dict:
    """The union of every DDP rank's dict (itself when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, d)
        return {k: v for g in gathered for k, v in g.items()}
    return d


def sample_positions(valid: torch.Tensor, k: int, seed: int, key: int) -> torch.Tensor:
    """Flat indices of up to k pixels of one (H, W) map among its `valid` ones (bool), a function of
    (seed, key, the valid mask) only (uda_ray.selection.validators.pixel_sample over the valid pixels)."""
    idx = valid.flatten().nonzero().squeeze(1).cpu()
    return idx[pixel_sample(idx.numel(), k, seed, key)]


def at_positions(maps: torch.Tensor, flat: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(D, h, w) map read at flat pixel indices of an (H, W) grid, nearest (h, w) position -> (k, D)."""
    h_full, w_full = size_hw
    y, x = flat // w_full, flat % w_full
    yy, xx = (y * maps.shape[1]) // h_full, (x * maps.shape[2]) // w_full
    return maps[:, yy.to(maps.device), xx.to(maps.device)].T
