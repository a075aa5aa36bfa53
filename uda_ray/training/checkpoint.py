"""The checkpoint format: file names, saving and (safe) loading, the RNG state, finding a run's checkpoints.

A checkpoint is a folder holding
    state.pt       {"method": the method's state_dict, "step": int, "rng": [per-rank RNG state],
                    "config": the resolved experiment (plain dict), "metrics": the evaluation at that step}
    metrics.json   the same metrics, readable without loading the weights.
Everything in state.pt is tensors and plain Python data (numpy's RNG state is stored as a tensor and ints),
so it is always read with `torch.load(..., weights_only=True)`: a file whose unpickling would run code is
refused instead of executed.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from uda_ray.errors import UserError
from uda_ray.metric_names import DEFAULT_SELECTION, mode_of, upgrade_row

if TYPE_CHECKING:  # torch is imported by the functions that read or write states: finding checkpoints needs none
    import torch

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"


# -- RNG state ------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The torch, numpy, python (and CUDA) RNG states, as tensors and plain Python data only."""
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)),
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next): plain data
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    import torch

    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- save / load ----------------------------------------------------------------------------------


def _plain(v: Any) -> Any:
    """numpy / torch scalars -> Python numbers (metrics stay loadable with weights_only and JSON-writable)."""
    if isinstance(v, np.generic) or hasattr(v, "item") and type(v).__module__.startswith("torch"):
        return v.item()
    return v


def save_checkpoint(path: Path, *, method_state: dict, step: int, rng: list[dict], config: dict,
                    metrics: dict[str, Any]) -> None:
    """Write state.pt and metrics.json into the folder `path` (created)."""
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    metrics = {k: _plain(v) for k, v in metrics.items()}
    torch.save({"method": method_state, "step": step, "rng": rng, "config": config, "metrics": metrics},
               path / STATE_FILE)
    (path / METRICS_FILE).write_text(json.dumps(metrics))  # read without loading the weights


def state_file(path: str | Path) -> Path:
    """A checkpoint folder's state.pt, or the file itself."""
    p = Path(path)
    return p / STATE_FILE if p.is_dir() else p


def load_state(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> dict:
    """A checkpoint's state (folder or file), loaded with weights_only=True. A file that is not a checkpoint
    of tensors and plain data (e.g. a pickle that would run code when loaded) raises UserError, one line.
    mmap=True maps the tensors instead of reading them (a cheap check of a large checkpoint)."""
    import torch

    f = state_file(path)
    if not f.is_file():
        raise UserError(f"{path}: no checkpoint there (expected a folder holding {STATE_FILE}, or the file)")
    try:
        mmap = mmap and zipfile.is_zipfile(f)  # torch.save's format; anything else is read (and refused) plainly
        state = torch.load(f, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{f}: refused to load: not a checkpoint of tensors and plain data ({first[:200]})"
                        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("method"), dict):
        raise UserError(f"{f}: not a uda_ray checkpoint (no 'method' state)")
    return state


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """A run's segmenter weights (the checkpoint's ["method"]["model"]) into `model` (a stage's start)."""
    state = load_state(path)
    if "model" not in state["method"]:
        raise UserError(f"{path}: the checkpoint holds no segmenter ('model') weights")
    model.load_state_dict(state["method"]["model"])


# -- a run's checkpoints --------------------------------------------------------------------------


def checkpoints_in(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run: Ray Train's checkpoint_step_* or LocalSession's checkpoints/step_*."""
    run_dir = Path(run_dir)
    return sorted(run_dir.glob("checkpoint_step_*")) + sorted((run_dir / "checkpoints").glob("step_*"))


def checkpoint_kept(path: str | Path | None) -> bool:
    """Whether a checkpoint folder recorded in a results table is still on disk: Ray Train keeps only the
    `train.keep_checkpoints` best by the run's selection metric (and the latest), so a step that another
    metric ranks first may have lost its weights."""
    return bool(path) and (Path(path) / STATE_FILE).is_file()


def run_select(run_dir: Path) -> str:
    """The selection metric a run was trained with (its config.yaml's `select`), else the default."""
    import yaml

    p = Path(run_dir) / "config.yaml"
    sel = (yaml.safe_load(p.read_text()) or {}).get("select") if p.is_file() else None
    return sel or DEFAULT_SELECTION


def best_checkpoint_in(run_dir: Path, metric: str | None = None, mode: str | None = None) -> Path:
    """The checkpoint folder of a run with the best `metric` (from metrics.json; NaN and missing skipped).
    Default: the run's own selection metric (`select`), in its mode."""
    metric = metric or run_select(run_dir)
    mode = mode or mode_of(metric)
    found = []
    for ck in checkpoints_in(run_dir):
        m = ck / METRICS_FILE
        if m.is_file():
            v = upgrade_row(json.loads(m.read_text())).get(metric)
            if isinstance(v, (int, float)) and not math.isnan(v):
                found.append((v, ck))
    if not found:
        raise UserError(f"no evaluated checkpoint under {run_dir} (none reports {metric})")
    return (max if mode == "max" else min)(found, key=lambda x: x[0])[1]


def latest_metrics(run_dir: Path) -> dict | None:
    """The metrics of a run's last checkpoint, or None."""
    cks = [c for c in checkpoints_in(run_dir) if (c / METRICS_FILE).is_file()]
    return upgrade_row(json.loads((cks[-1] / METRICS_FILE).read_text())) if cks else None
