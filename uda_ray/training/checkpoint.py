"""The checkpoint format: file names, saving and (safe) loading, the RNG state; where a run's checkpoints live
(their folder names, decided here only), finding, persisting and pruning them, and the cleanup of folders that a
killed writer left behind.

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
import os
import pickle
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from uda_ray.errors import UserError
from uda_ray.metric_names import DEFAULT_SELECTION, mode_of, upgrade_row
from uda_ray.storage import store

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


# -- where a run's checkpoints live ---------------------------------------------------------------

# <run>/checkpoint_step_NNNNNNN (the step, 7 digits): how Ray Train names them here, and the inline launcher too
CHECKPOINT_PREFIX = "checkpoint_step_"
LOCAL_CHECKPOINTS = "checkpoints"  # LocalSession's (one process, no Ray): <run>/checkpoints/step_NNNNNNN
CKPT_TMP_PREFIX = "uda_ray_ckpt_"  # + the writer's pid + "_": a checkpoint being written, in the temp dir


def checkpoint_dir_name(step: int) -> str:
    """The folder of a run's checkpoint of `step`, under the run's folder (Ray Train's and the inline path's)."""
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def local_checkpoint_dir(run_dir: Path, step: int) -> Path:
    """LocalSession's checkpoint folder of `step`."""
    return Path(run_dir) / LOCAL_CHECKPOINTS / f"step_{step:07d}"


def local_checkpoints(run_dir: Path) -> list[Path]:
    """LocalSession's checkpoint folders of a run, by step."""
    return sorted((Path(run_dir) / LOCAL_CHECKPOINTS).glob("step_*"))


def checkpoints_in(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run: Ray Train's checkpoint_step_* or LocalSession's checkpoints/step_*. Under a
    storage URI's staging folder, those of the store are brought down first (uda_ray.storage.store)."""
    store.pull(run_dir, skip=lambda rel: not rel.startswith((CHECKPOINT_PREFIX, LOCAL_CHECKPOINTS + "/")))
    return sorted(Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")) + local_checkpoints(run_dir)


def checkpoint_kept(path: str | Path | None) -> bool:
    """Whether a checkpoint folder recorded in a results table is still on disk: Ray Train keeps only the
    `train.keep_checkpoints` best by the run's selection metric (and the latest), so a step that another
    metric ranks first may have lost its weights. Under a storage URI: on this machine, or in the store."""
    return bool(path) and ((Path(path) / STATE_FILE).is_file() or store.in_store(Path(path) / STATE_FILE))


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


# -- persisting, pruning, cleaning up --------------------------------------------------------------


def _step_of(ck: Path) -> int:
    return int(ck.name[len(CHECKPOINT_PREFIX):])


def _ckpt_score(ck: Path, metric: str, mode: str) -> float:
    """A checkpoint's selection metric from its metrics.json, signed so that higher is better (-inf: none)."""
    try:
        v = json.loads((ck / METRICS_FILE).read_text()).get(metric)
    except (OSError, json.JSONDecodeError):
        return -math.inf
    if not isinstance(v, (int, float)) or v != v:
        return -math.inf
    return float(v) if mode == "max" else -float(v)


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run folder (checkpoint_step_*, each holding its state), by step."""
    found = [p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def prune_checkpoints(run_dir: Path, keep: int, metric: str, mode: str) -> list[Path]:
    """Delete all but the `keep` best checkpoints by `metric` (ties: the later one) and the latest, as Ray
    Train's CheckpointConfig(num_to_keep, checkpoint_score_attribute, checkpoint_score_order) keeps them.
    Returns the deleted folders."""
    cks = run_checkpoints(run_dir)
    if len(cks) <= keep:
        return []
    ranked = sorted(cks, key=lambda c: (_ckpt_score(c, metric, mode), _step_of(c)), reverse=True)
    kept = set(ranked[:keep]) | {cks[-1]}
    gone = [c for c in cks if c not in kept]
    for c in gone:
        shutil.rmtree(c, ignore_errors=True)
    return gone


def persist_checkpoint(src: Path, run_dir: Path, step: int) -> Path:
    """Copy the checkpoint folder `src` into the run folder as its checkpoint of `step` (replacing one there):
    copied into `.<name>.<pid>.tmp`, then renamed, so a crash leaves a temporary folder (see
    remove_unfinished_copies), never a partial checkpoint. Returns the checkpoint's folder."""
    run_dir = Path(run_dir)
    dest = run_dir / checkpoint_dir_name(step)
    tmp = run_dir / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def remove_unfinished_copies(run_dir: Path) -> None:
    """Remove the temporary copies that persist_checkpoint calls of a dead attempt left unfinished."""
    for tmp in Path(run_dir).glob(f".{CHECKPOINT_PREFIX}*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def new_writing_dir() -> Path:
    """A new folder in the temp dir to write a checkpoint into, named by this process's pid, so that the folder
    of a writer killed mid-write can be told apart (remove_orphaned_checkpoint_folders)."""
    return Path(tempfile.mkdtemp(prefix=f"{CKPT_TMP_PREFIX}{os.getpid()}_"))


def remove_orphaned_checkpoint_folders(tmp_dir: str | None = None) -> list[Path]:
    """Remove the checkpoint folders a writer killed mid-write left in the temp dir: those named by a pid that
    no longer runs on this host (a folder whose pid was reused stays until that process ends too). Returns them."""
    removed = []
    for d in Path(tmp_dir or tempfile.gettempdir()).glob(f"{CKPT_TMP_PREFIX}*_*"):
        pid = d.name[len(CKPT_TMP_PREFIX):].split("_", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    """Whether the process `pid` runs on this host (another user's process counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
