"""Run a method's steps on 2 gloo workers (spawned processes) and compare with one process on the same
global batch. Functions passed in must be module-level (spawn pickles them by reference)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import make_batch
from uda_ray.methods.base import UDABatch

DDP = torch.nn.parallel.DistributedDataParallel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_slices(make: Callable, collect: Callable, rank: int, world: int, steps: int = 1, batch: int = 4) -> Any:
    """`make(wrap)` builds the method; each worker steps on its slice of the same global batches; returns
    `collect(method)` (tensors to compare)."""
    m = make((lambda mod: DDP(mod)) if world > 1 else None)
    per = batch // world
    sl = slice(rank * per, (rank + 1) * per)
    for step in range(steps):
        full = make_batch(step, b=batch)
        m.train_step(UDABatch(full.src_img[sl], full.src_lbl[sl], full.tgt_img[sl], full.tgt_lbl[sl],
                              full.src_img_held[sl], full.src_lbl_held[sl]), step)
    return [t.detach().clone() for t in collect(m)]


def _entry(rank: int, world: int, port: int, args: tuple, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = train_slices(*args[:2], rank, world, *args[2:])
        if rank == 0:
            out["result"] = result
    finally:
        dist.destroy_process_group()


def assert_ddp_matches_one_worker(make: Callable, collect: Callable, steps: int = 1, world: int = 2,
                                  atol: float = 1e-6) -> None:
    """Rank 0 of `world` DDP workers ends with the same tensors as one process on the global batch."""
    one = train_slices(make, collect, 0, 1, steps)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_entry, args=(world, free_port(), (make, collect, steps), out), nprocs=world,
                           start_method="spawn", join=True)
        many = out["result"]
    assert len(one) == len(many)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)
