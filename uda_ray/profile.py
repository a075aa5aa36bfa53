"""Model complexity: parameters, GFLOPs, latency; and a report beside the seed's published figures."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from uda_ray.errors import UserError
from uda_ray.models import MODELS
from uda_ray.models.discriminators import DISCRIMINATORS

# The seed's figures, and where ours (measured with this module) meet them.
SEED_FIGURES: dict[str, dict] = {
    "bisenet_r18": {
        "params": 12.6e6,
        "gflops": 51.4,
        "size": (512, 1024),  # inferred: the only usual size where ours come within 1%
        "note": "params: ours + the 513,000 of ResNet-18's unused 1000-way fc, which the seed's model keeps, "
        "= 12.58 M; GFLOPs: ours 50.89 at 512x1024 (-1%; 720x960: 67.3, 1024x2048: 203.6), the 0.5 left "
        "being about the element-wise ops (BN, ReLU, adds, upsampling) FlopCounterMode skips",
    },
    "disc_fc": {
        "params": 2.78e6,
        "gflops": 30.9,
        "size": (512, 1024),
        "note": "matches at 512x1024: 30.88 conv FLOPs + 0.03 for bias adds and LeakyReLU (1 each) = 30.91",
    },
    "disc_dsc": {
        "params": 191e3,
        "gflops": 2.17,
        "size": (512, 1024),
        "note": "matches at 512x1024: 2.135 conv FLOPs + 0.038 for bias adds and LeakyReLU (1 each) = 2.173",
    },
    # Not the seed's own figures: the ENet paper's (Paszke et al. 2016, Table 3, FLOPs for a 3x640x360
    # input; its abstract's "75x less FLOPs, 79x less parameters" than SegNet are these ratios).
    "enet": {
        "params": 0.37e6,
        "gflops": 3.83,
        "size": (360, 640),
        "note": "ENet paper's figures. Ours: 0.364 M params for 19 classes (0.373 M if BN running statistics "
        "were counted, a guess at the gap); 3.45 GFLOPs at 360x640 (-10%), BN, PReLU, adds and (un)pooling "
        "not being counted by FlopCounterMode; 7.84 at 512x1024, 2.59 at 360x480",
    },
}


def count_params(model: nn.Module) -> int:
    """All parameters, trainable or frozen."""
    return sum(p.numel() for p in model.parameters())


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def count_gflops(
    model: nn.Module, size: tuple[int, int] = (512, 1024), batch: int = 1, in_channels: int = 3
) -> float:
    """GFLOPs of one eval-mode forward on a (batch, in_channels, H, W) input.

    Counted by `torch.utils.flop_counter.FlopCounterMode`: one multiply-add = 2 FLOPs; only
    convolutions, matmuls and attention are counted, not element-wise ops (BN, activations,
    bias adds, pooling, interpolation).
    """
    was_training = model.training
    model.eval()
    x = torch.rand(batch, in_channels, *size, device=_device(model)) * 255
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    size: tuple[int, int] = (512, 1024),
    device: str = "cpu",
    amp: bool = False,
    warmup: int = 3,
    iters: int = 10,
    in_channels: int = 3,
) -> dict[str, float]:
    """Mean eval-mode latency of a batch-1 forward on `device` (moves the model there).

    amp: autocast to float16 on CUDA, bfloat16 on CPU. Returns {"latency_ms", "fps"}.
    """
    dev = torch.device(device)
    was_training = model.training
    model.to(dev).eval()
    x = torch.rand(1, in_channels, *size, device=dev) * 255
    autocast = (
        torch.autocast(dev.type, dtype=torch.float16 if dev.type == "cuda" else torch.bfloat16)
        if amp
        else nullcontext()
    )
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with autocast:
        for _ in range(warmup):
            model(x)
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync()
    latency_ms = (time.perf_counter() - start) * 1000 / iters
    model.train(was_training)
    return {"latency_ms": latency_ms, "fps": 1000.0 / latency_ms}


def profile(
    name: str,
    size: tuple[int, int] = (512, 1024),
    device: str = "cpu",
    amp: bool = False,
    num_classes: int = 19,
) -> dict:
    """Params, GFLOPs and latency of a randomly initialised MODELS entry or "disc_fc" / "disc_dsc"."""
    if name.startswith("disc_") and name[5:] in DISCRIMINATORS:
        model, in_channels = DISCRIMINATORS[name[5:]](num_classes), num_classes  # D sees (B, C, H, W) maps
    elif name in MODELS:
        model, in_channels = MODELS[name](num_classes=num_classes), 3
    else:
        valid = ", ".join([*MODELS, *(f"disc_{d}" for d in DISCRIMINATORS)])
        raise UserError(f"unknown model {name!r}; valid: {valid}")
    result = {
        "name": name,
        "size": tuple(size),
        "device": device,
        "amp": amp,
        "params": count_params(model),
        "gflops": count_gflops(model, size, in_channels=in_channels),
    }
    result.update(measure_latency(model, size, device, amp, in_channels=in_channels))
    return result


def format_report(result: dict) -> str:
    """A few human-readable lines for a `profile` result, with the seed's figures where known."""
    h, w = result["size"]
    lines = [
        f"{result['name']} @ {h}x{w} on {result['device']}{' (amp)' if result['amp'] else ''}",
        f"  params   {result['params'] / 1e6:10.3f} M",
        f"  GFLOPs   {result['gflops']:10.2f}   (FlopCounterMode: multiply-add = 2 FLOPs)",
        f"  latency  {result['latency_ms']:10.1f} ms",
        f"  fps      {result['fps']:10.1f}",
    ]
    seed = SEED_FIGURES.get(result["name"])
    if seed is not None:
        sh, sw = seed["size"]
        lines.append(
            f"  seed     {seed['params'] / 1e6:10.3f} M params, {seed['gflops']:.2f} GFLOPs @ {sh}x{sw}"
        )
        lines.append(f"  note     {seed['note']}")
    return "\n".join(lines)


PROFILE_CACHE = "model_profiles.json"


def measured_once(cache_file: Path, key: dict, measure: Callable[[], dict]) -> dict:
    """`measure()`'s result for `key`, measured once and kept in `cache_file` (JSON {key: result}).

    For the trials of a sweep: every trial of one model at one input size on one kind of device reports the
    same params, GFLOPs and latency, measured by whichever trial got there first, instead of each trial
    spending its start-up on it. Concurrent trials serialize on an advisory lock next to the file (the others
    wait, then read); the file is replaced atomically."""
    import fcntl
    import json
    import os

    cache_file = Path(cache_file)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    k = json.dumps(key, sort_keys=True)
    with open(cache_file.with_name(cache_file.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        except ValueError:  # a damaged cache is measured again
            cache = {}
        if k not in cache:
            cache[k] = measure()
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, cache_file)
        return dict(cache[k])


def device_key(device: torch.device) -> dict:
    """What a latency depends on besides the model and the input size."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "threads": torch.get_num_threads()}
