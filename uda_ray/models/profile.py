"""Model complexity: parameters, GFLOPs, latency (`uda_ray.results.text.profile_report` prints them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models as tvm

from uda_ray.errors import UserError
from uda_ray.models import MODELS
from uda_ray.models.bisenet import BiSeNet
from uda_ray.models.discriminators import DISCRIMINATORS
from uda_ray.models.resnet import RESNETS


def count_params(model: nn.Module) -> int:
    """All parameters, trainable or frozen."""
    return sum(p.numel() for p in model.parameters())


def unused_resnet_fc_params(model: nn.Module) -> int | None:
    """Parameters of the ImageNet classifier (`fc`) that BiSeNet's PyTorch code keeps, unused, in its context
    path; None for a model that is not a BiSeNet on a torchvision ResNet.

    That code (https://github.com/ooooverflow/BiSeNet, `model/build_contextpath.py`, which the BiSeNet-R18
    domain-adaptation reports build on) stores the whole `torchvision.models.resnet18()` as a submodule and uses
    its layers but not its 1000-way `fc`, which is still counted among the model's parameters: ResNet-18's
    512 * 1000 + 1000 = 513,000, hence their 12.6 M for BiSeNet-R18. Ours drops that head (`uda_ray.models.resnet
    .resnet` replaces it with Identity). The count is taken from the head torchvision builds for this depth (on
    the meta device: no memory, no weights), checked against the width of the backbone's last stage.
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(model, BiSeNet) or not isinstance(backbone, tvm.ResNet):
        return None
    if isinstance(backbone.fc, nn.Linear):  # a backbone that kept its head: already in count_params
        return 0
    builder, _ = RESNETS[model.depth]
    with torch.device("meta"):
        fc = builder(weights=None).fc  # nn.Linear(512 * expansion, 1000)
    last = backbone.layer4[-1]
    width = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features  # layer4's output channels
    if fc.in_features != width:
        raise AssertionError(f"torchvision's ResNet-{model.depth} fc takes {fc.in_features} features, "
                             f"the backbone's layer4 gives {width}")
    return sum(p.numel() for p in fc.parameters())


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
    """Params, GFLOPs and latency of a randomly initialised MODELS entry or "disc_fc" / "disc_dsc".

    For a BiSeNet on a torchvision ResNet also "params_with_resnet_fc": the parameters as BiSeNet's PyTorch code
    counts them, i.e. with its context path's unused ImageNet `fc` (`unused_resnet_fc_params`; BiSeNet-R18:
    about 12.58 M beside our 12.07 M), and "params_with_resnet_fc_note", a line saying so."""
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
    fc = unused_resnet_fc_params(model)
    if fc:
        result["params_with_resnet_fc"] = result["params"] + fc
        result["params_with_resnet_fc_note"] = (
            f"as BiSeNet's PyTorch code (https://github.com/ooooverflow/BiSeNet) counts them: with the unused "
            f"ImageNet fc head of its ResNet-{model.depth} context path ({fc:,} parameters)")
    result.update(measure_latency(model, size, device, amp, in_channels=in_channels))
    return result


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
