"""Pipeline actions: steps run on the driver between training stages, each from the best checkpoint(s) of
earlier stages (by the pipeline's `select`), writing into the stage's folder. Ray-free.

    intrada_rank       IntraDA's entropy ranking of the target train set, with argmax pseudo-labels
    pseudo_labels      class-wise thresholded pseudo-labels (one model or a mean-softmax ensemble)
    evaluate_ensemble  target-val mIoU of a mean-softmax ensemble (FDA-MBT)

(The `run:NAME` / `sweep:NAME` references an experiment may hold are resolved by
uda_ray.driver.prepare.resolve_refs.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from uda_ray.build import checkpoint_experiment, load_trained
from uda_ray.data.loading import target_dataset
from uda_ray.pipelines.pseudo_labels import from_checkpoints
from uda_ray.storage import layout


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
    from uda_ray.results.tables import ResultsWriter
    from uda_ray.training.evaluate import eval_loaders, evaluate_splits

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
    w = ResultsWriter.for_run(layout.results_dir(out), out.name, cfg.select)
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
