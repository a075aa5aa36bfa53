"""Stages: runs that start from what earlier runs left (best checkpoints, rankings, pseudo-labels).

Ray-free. References an experiment may hold in `train.init_from`:
    run:NAME     the best checkpoint (by val/miou) of the `uda-ray train` run NAME under the storage root
    sweep:NAME   the best checkpoint of the best trial of sweep NAME (from its Parquet tables)
    a path       a checkpoint folder (holding state.pt) or a state.pt file
Actions (run on the driver, between training stages):
    intrada_rank IntraDA's entropy ranking of the target train set, with argmax pseudo-labels
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from uda_ray.config import ExperimentConfig, build_experiment
from uda_ray.errors import UserError

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"


def checkpoints_in(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run: Ray Train's checkpoint_step_* or LocalSession's checkpoints/step_*."""
    run_dir = Path(run_dir)
    return sorted(run_dir.glob("checkpoint_step_*")) + sorted((run_dir / "checkpoints").glob("step_*"))


def best_checkpoint_in(run_dir: Path, metric: str = "val/miou", mode: str = "max") -> Path:
    found = []
    for ck in checkpoints_in(run_dir):
        m = ck / METRICS_FILE
        if m.is_file():
            v = json.loads(m.read_text()).get(metric)
            if v is not None and v == v:
                found.append((v, ck))
    if not found:
        raise UserError(f"no evaluated checkpoint under {run_dir}")
    return (max if mode == "max" else min)(found, key=lambda x: x[0])[1]


def latest_metrics(run_dir: Path) -> dict | None:
    cks = [c for c in checkpoints_in(run_dir) if (c / METRICS_FILE).is_file()]
    return json.loads((cks[-1] / METRICS_FILE).read_text()) if cks else None


def resolve_ref(ref: str, storage: Path) -> str:
    """`run:NAME` / `sweep:NAME` -> an absolute checkpoint folder; paths are checked and made absolute."""
    if ref.startswith("run:"):
        return str(best_checkpoint_in(Path(storage) / "runs" / ref[4:]))
    if ref.startswith("sweep:"):
        from uda_ray.results import best_trials

        name = ref[6:]
        rows = best_trials(Path(storage) / name / "results", top=1)
        if not rows or not rows[0].get("rank_checkpoint"):
            raise UserError(f"{ref}: sweep '{name}' under {storage} has no evaluated trial with a checkpoint")
        return rows[0]["rank_checkpoint"]
    p = Path(ref).expanduser().absolute()
    if not (p.is_file() or (p / "state.pt").is_file()):
        raise UserError(f"train.init_from: {ref} is neither a checkpoint folder (with state.pt) nor a file")
    return str(p)


def resolve_refs(raw: dict, storage: Path) -> dict:
    """The experiment dict with its references (train.init_from) resolved against the storage root."""
    ref = (raw.get("train") or {}).get("init_from")
    if not ref:
        return raw
    return {**raw, "train": {**raw["train"], "init_from": resolve_ref(ref, storage)}}


def checkpoint_experiment(checkpoint: Path) -> tuple[ExperimentConfig, dict]:
    """The experiment a checkpoint was trained with, and its state."""
    p = Path(checkpoint)
    state = torch.load(p / "state.pt" if p.is_dir() else p, map_location="cpu", weights_only=False)
    return build_experiment(state["config"], str(checkpoint)), state


def intrada_rank(checkpoint: Path, out: Path, lambda_: float = 0.67, normalize_rare: bool = False,
                 device: str = "cpu") -> dict[str, Any]:
    """IntraDA step 2: rank the target train images of the checkpoint's experiment by entropy (easiest
    first) and write ranking.txt, easy/hard split files for `lambda_`, and argmax pseudo-labels of EVERY
    image (so `data.easy_fraction` can be searched later without ranking again)."""
    from uda_ray.data.datasets import DATASETS
    from uda_ray.data.loading import RANKING_FILE
    from uda_ray.data.transforms import eval_transform
    from uda_ray.methods.intrada import rank_by_entropy, write_split
    from uda_ray.train import build_model

    cfg, state = checkpoint_experiment(checkpoint)
    model = build_model(cfg.model)
    model.load_state_dict(state["method"]["model"])
    model.to(device)
    ds = DATASETS[cfg.data.target](Path(cfg.data.target_root), "train", eval_transform(cfg.data.target_size))
    ranked, _, pseudo = rank_by_entropy(model, ds, lambda_=1.0, normalize_rare=normalize_rare, device=device)
    n_easy = int(len(ranked) * lambda_)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RANKING_FILE).write_text("".join(f"{n}\n" for n in ranked))
    # manifest.json is written last: its presence marks a complete stage
    write_split(out, ranked[:n_easy], ranked[n_easy:], pseudo, lambda_=lambda_, normalize_rare=normalize_rare)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(checkpoint=str(checkpoint), target_root=cfg.data.target_root)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


ACTIONS = {"intrada_rank": intrada_rank}
