"""Stages: runs that start from what earlier runs left (best checkpoints, rankings, pseudo-labels).

Ray-free. References an experiment may hold in `train.init_from`:
    run:NAME     the best checkpoint of the `uda-ray train` run NAME under the storage root, by the run's
                 selection metric (its `select`)
    sweep:NAME   the best checkpoint of the best trial of sweep NAME by the sweep's objective (its tables)
    a path       a checkpoint folder (holding state.pt) or a state.pt file
Actions (run on the driver, between training stages), each from the best checkpoint(s) of earlier stages:
    intrada_rank       IntraDA's entropy ranking of the target train set, with argmax pseudo-labels
    pseudo_labels      class-wise thresholded pseudo-labels (one model or a mean-softmax ensemble)
    evaluate_ensemble  target-val mIoU of a mean-softmax ensemble (FDA-MBT)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from uda_ray.build import checkpoint_experiment, load_trained
from uda_ray.data.loading import target_dataset
from uda_ray.errors import UserError
from uda_ray.pipelines.pseudo_labels import from_checkpoints
from uda_ray.training.checkpoint import STATE_FILE, best_checkpoint_in, load_state

log = logging.getLogger(__name__)


def resolve_ref(ref: str, storage: Path) -> str:
    """`run:NAME` / `sweep:NAME` -> an absolute checkpoint folder; paths are checked and made absolute."""
    if ref.startswith("run:"):
        return str(best_checkpoint_in(Path(storage) / "runs" / ref[4:]))
    if ref.startswith("sweep:"):
        from uda_ray.results.tables import best_trials

        name = ref[6:]
        rows = best_trials(Path(storage) / name / "results", top=1)
        if not rows or not rows[0].get("kept_checkpoint"):
            raise UserError(f"{ref}: sweep '{name}' under {storage} has no evaluated trial with a checkpoint")
        if not rows[0]["rank_checkpoint_kept"]:
            from uda_ray.results.text import not_kept_note

            log.warning("%s: %s; starting from that one", ref, not_kept_note(rows[0]))
        return rows[0]["kept_checkpoint"]
    p = Path(ref).expanduser().absolute()
    if not (p.is_file() or (p / STATE_FILE).is_file()):
        raise UserError(f"train.init_from: {ref} is neither a checkpoint folder (with state.pt) nor a file")
    load_state(p, mmap=True)  # refuses, on the driver and before any run starts, a file that is not safe to load
    return str(p)


def resolve_refs(raw: dict, storage: Path) -> dict:
    """The experiment dict with every `run:NAME` / `sweep:NAME` value (train.init_from, data.pseudo_from,
    method_cfg.teacher_checkpoint, ...) resolved to a checkpoint folder, and train.init_from checked; marked
    (data.target_gt_via) when a model it starts from was trained on target ground truth."""
    from uda_ray.target_labels import MARK, mark_inherited

    out = mark_inherited(_resolve(raw, storage))
    via = (out.get("data") or {}).get("target_gt_via")
    if via and via != (raw.get("data") or {}).get("target_gt_via"):
        log.warning("%s: starts from %s, which was trained on target ground truth: marked %s",
                    raw.get("name", "experiment"), via, MARK)
    return out


def _resolve(raw: Any, storage: Path) -> Any:
    if isinstance(raw, dict):
        out = {k: _resolve(v, storage) for k, v in raw.items()}
        init = (out.get("train") or {}).get("init_from") if isinstance(out.get("train"), dict) else None
        if init:
            out["train"] = {**out["train"], "init_from": resolve_ref(init, storage)}
        return out
    if isinstance(raw, list):
        return [_resolve(v, storage) for v in raw]
    if isinstance(raw, str) and raw.startswith(("run:", "sweep:")):
        return resolve_ref(raw, storage)
    return raw


class Ensemble(torch.nn.Module):
    """Mean softmax of several segmenters (FDA-MBT's evaluation); "out" holds its log (so its argmax and
    softmax are those of the mean)."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> dict:
        probs = torch.stack([m(x)["out"].softmax(1) for m in self.models]).mean(0)  # (B, C, h, w)
        return {"out": probs.clamp_min(1e-12).log(), "aux": [], "feat": probs}  # log: softmax(out) = probs


def evaluate_ensemble(checkpoints: list[Path], out: Path, device: str = "cpu") -> dict[str, Any]:
    """Evaluate the mean-softmax ensemble of the checkpoints on the target val split; results tables and
    manifest.json under `out`."""
    from uda_ray.config import experiment_dict
    from uda_ray.data.loading import build_datasets
    from uda_ray.metric_names import mode_of
    from uda_ray.results.tables import ResultsWriter
    from uda_ray.training.loop import eval_loaders, evaluate_splits

    loaded = [load_trained(c, device) for c in checkpoints]
    cfg = loaded[0][0]
    ens = Ensemble([m for _, m in loaded])
    ds = build_datasets(cfg.data, source=False, target=False, target_labels=False)
    loaders = eval_loaders(ds, cfg, 0, 1)
    ev = evaluate_splits(ens, loaders, cfg, torch.device(device))
    metrics = {"step": max(checkpoint_experiment(c)[1]["step"] for c in checkpoints), **ev}
    out = Path(out)
    exp = experiment_dict(cfg)
    exp["method"] = f"ensemble({len(checkpoints)})"
    from uda_ray.target_labels import checkpoint_trained_on_target_gt

    via = next((str(c) for c in checkpoints if checkpoint_trained_on_target_gt(c)), None)
    if via:  # a member saw the target's labels: so does the ensemble
        exp["data"] = {**exp["data"], "target_gt_via": via}
    w = ResultsWriter(out / "results", out.name, cfg.select, mode_of(cfg.select), None)
    w.result(out.name, exp, {"checkpoints": [str(c) for c in checkpoints]}, metrics)
    w.end(out.name, exp, {}, "completed")
    manifest = {"checkpoints": [str(c) for c in checkpoints],
                **{k: v for k, v in metrics.items() if k in ("test/miou", cfg.select)}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def intrada_rank(checkpoints: list[Path], out: Path, lambda_: float = 0.67, normalize_rare: bool = False,
                 device: str = "cpu") -> dict[str, Any]:
    """IntraDA step 2: rank the target train images of the checkpoint's experiment by entropy (easiest
    first) and write ranking.txt, easy/hard split files for `lambda_`, and argmax pseudo-labels of EVERY
    image (so `data.easy_fraction` can be searched later without ranking again)."""
    from uda_ray.data.loading import RANKING_FILE
    from uda_ray.pipelines.intrada_rank import rank_by_entropy, write_split

    (checkpoint,) = checkpoints
    cfg, model = load_trained(checkpoint, device)
    ds = target_dataset(cfg.data)
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


ACTIONS = {"intrada_rank": intrada_rank, "pseudo_labels": from_checkpoints,
           "evaluate_ensemble": evaluate_ensemble}
