"""Shared fixtures: a tiny segmenter following the model contract, tiny UDA batches."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from uda_ray.methods.base import UDABatch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(1)

NUM_CLASSES = 5


class TinySeg(nn.Module):
    """Two convs, a main and an aux classifier at 1/2 resolution; GroupNorm so DDP steps match exactly."""

    aux_weights = (0.4,)

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.GroupNorm(2, 8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
        self.cls = nn.Conv2d(8, num_classes, 1)
        self.aux = nn.Conv2d(8, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict:
        feat = self.body(x / 255.0 - 0.5)  # (B, 8, H/2, W/2)
        return {"out": self.cls(feat), "aux": [self.aux(feat)] if self.training else [], "feat": feat}

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.body.parameters()), "lr": lr},
                {"params": list(self.cls.parameters()) + list(self.aux.parameters()), "lr": 10 * lr}]


def make_batch(seed: int = 0, b: int = 2, h: int = 16, w: int = 24, num_classes: int = NUM_CLASSES) -> UDABatch:
    g = torch.Generator().manual_seed(seed)
    lbl = torch.randint(0, num_classes, (b, h, w), generator=g)
    lbl[:, :2] = 255
    tlbl = torch.randint(0, num_classes, (b, h, w), generator=g)
    # colour encodes class a little, so learning is possible
    src = torch.rand(b, 3, h, w, generator=g) * 60 + lbl.clamp(max=num_classes).unsqueeze(1) * 30.0
    tgt = torch.rand(b, 3, h, w, generator=g) * 60 + tlbl.unsqueeze(1) * 25.0 + 20
    hlbl = torch.randint(0, num_classes, (b, h, w), generator=g)  # a second, held-out source batch
    held = torch.rand(b, 3, h, w, generator=g) * 60 + hlbl.unsqueeze(1) * 30.0
    return UDABatch(src_img=src, src_lbl=lbl, tgt_img=tgt, tgt_lbl=tlbl, src_img_held=held, src_lbl_held=hlbl)


@pytest.fixture
def tiny_model() -> TinySeg:
    torch.manual_seed(0)
    return TinySeg()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> os.PathLike:
    """A tiny synthetic benchmark (GTA5 + Cityscapes layouts), generated once per test session."""
    from uda_ray.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synth") / "bench", n_source=12, n_target=12, n_val=4,
                    size=(64, 32), seed=0)


def tiny_experiment(root, **over) -> dict:
    """A raw experiment dict on the tiny benchmark, small enough for a few CPU steps per test."""
    raw = {
        "name": "tiny", "seed": 0,
        "data": {"source": "gta5", "target": "cityscapes", "source_root": str(root / "gta5"),
                 "target_root": str(root / "cityscapes"), "source_size": [64, 32], "target_size": [64, 32]},
        "model": {"name": "bisenet_r18", "num_classes": 19},
        "optim": {"name": "sgd", "lr": 0.01},
        "train": {"max_steps": 4, "eval_every": 2, "batch_size": 2, "profile": False},
        "method": "source_only",
    }
    from uda_ray.config_loader import apply_overrides

    return apply_overrides(raw, over)


@pytest.fixture
def narrow_discriminators(monkeypatch):
    """AdaptSegNet's FC discriminator at ndf 8 instead of 64: float16 convolution backward on CPU has no fast
    kernel (3 s a step at full width here); the step's logic is the same."""
    import functools

    from uda_ray.methods import blocks
    from uda_ray.models.discriminators import FCDiscriminator

    monkeypatch.setitem(blocks.DISCRIMINATORS, "fc", functools.partial(FCDiscriminator, ndf=8))


def fit_full_then_resumed(cfg, tmp_path, step: int = 2):
    """Fit `cfg` in-process ("full"), then a second run ("part") that has only the full run's checkpoint at
    `step` and resumes from it. Returns both LocalSessions."""
    import shutil

    from uda_ray.training.loop import fit
    from uda_ray.training.sessions import LocalSession

    full = LocalSession(tmp_path / "full")
    fit(cfg, full)
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    name = f"step_{step:07d}"
    shutil.copytree(tmp_path / "full" / "checkpoints" / name, part / name)
    resumed = LocalSession(tmp_path / "part")
    fit(cfg, resumed)
    return full, resumed


# What a pipeline (or the user's --set) gives a stage experiment that cannot run alone: the refusal it meets
# without it (uda_ray.target_labels), and a stand-in value for loading it.
STAGE_INPUTS = {"no pseudo-labels": {"data.target_label_root": "/pipeline/pseudo_labels"},
                "is the target itself": {"data.ranking": "/pipeline/ranking"},
                "needs method_cfg.teacher_from": {"method_cfg.teacher_from": "/pipeline/teacher"}}


def load_shipped(load, path, overrides: dict | None = None):
    """`load(path, overrides)` (load_experiment or load_space) of a shipped file; a stage experiment that needs
    pseudo-labels or an IntraDA ranking from its pipeline must be refused alone, and is loaded with a
    stand-in for that input."""
    from uda_ray.errors import ConfigError

    overrides = dict(overrides or {})
    try:
        return load(path, overrides)
    except ConfigError as e:
        needed = [v for k, v in STAGE_INPUTS.items() if k in str(e)]
        if not needed:
            raise
        return load(path, {**overrides, **needed[0]})
