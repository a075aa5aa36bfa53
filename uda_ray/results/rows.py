"""The rows of the results tables: an `evals` row and its `class_iou` rows from one reported result, and a
`trials` row summarising a trial from its config and every evaluation so far (uda_ray.results.tables
stores them)."""

from __future__ import annotations

import json
import time
from typing import Any

from uda_ray.config_loader import flatten
from uda_ray.metric_names import REPORTED_PREFIXES, SCHEMA_VERSION
from uda_ray.target_labels import trains_on_target_gt

# on the first evaluation after the run restarted from a checkpoint (a dead worker, a resumed driver): the step
# it resumed from and how many restarts the run has had so far
RESTART_KEYS = ("resumed_from", "restarts")
# where rank 0 of the run trained for that evaluation: the Ray node's id and IP (absent outside Ray)
NODE_KEYS = ("node_id", "node_ip")


def versions() -> dict[str, str]:
    import torch

    import uda_ray

    out = {"uda_ray_version": uda_ray.__version__, "torch_version": torch.__version__}
    try:
        import ray

        out["ray_version"] = ray.__version__
    except ImportError:  # pragma: no cover
        out["ray_version"] = None
    return out


def eval_rows(sweep: str, trial_id: str, result: dict) -> tuple[dict, list[dict]]:
    """One `evals` row and the `class_iou` rows of one reported result."""
    step = int(result["step"])
    base = {"schema_version": SCHEMA_VERSION, "sweep": sweep, "trial_id": trial_id, "step": step}
    ev = dict(base)
    ious = []
    for k, v in result.items():
        if k.startswith("test/iou/"):
            ious.append({**base, "class_name": k[len("test/iou/"):], "iou": v})
        elif k.startswith(REPORTED_PREFIXES) or k in RESTART_KEYS or k in NODE_KEYS:
            ev[k] = v
    ev["checkpoint_path"] = result.get("checkpoint_path")
    ev["reported_at"] = time.time()
    return ev, ious


class TrialSummary:
    """Builds a `trials` row from the config and every eval reported so far."""

    def __init__(self, sweep: str, trial_id: str, experiment: dict, params: dict, metric: str, mode: str,
                 search_seed: int | None) -> None:
        self.row: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "sweep": sweep, "trial_id": trial_id, "status": "pending",
            "method": experiment["method"], "model": experiment["model"]["name"],
            "source": experiment["data"]["source"], "target": experiment["data"]["target"],
            "seed": experiment["seed"], "max_steps": experiment["train"]["max_steps"],
            "objective": metric, "mode": mode, "search_seed": search_seed,
            "params": json.dumps(params, sort_keys=True), "config_json": json.dumps(experiment),
            # trained on the target's ground truth (an oracle, not a UDA result): uda_ray.target_labels
            "target_ground_truth": trains_on_target_gt(experiment),
            **{f"config.{k}": v for k, v in flatten(experiment).items()},
            **versions(), "started_at": time.time(),
        }

    @staticmethod
    def from_row(row: dict) -> TrialSummary:
        s = TrialSummary.__new__(TrialSummary)
        s.row = dict(row)
        return s

    def update(self, evals: list[dict]) -> dict:
        """Recompute best / final values from all of this trial's eval rows."""
        metric, mode = self.row["objective"], self.row["mode"]
        evals = sorted(evals, key=lambda r: r["step"])
        scored = [r for r in evals if r.get(metric) is not None and r[metric] == r[metric]]
        if scored:
            best = (max if mode == "max" else min)(scored, key=lambda r: r[metric])
            last = evals[-1]
            self.row.update({
                "best_value": best[metric], "best_step": best["step"],
                "best_checkpoint": best.get("checkpoint_path"),
                "final_value": last.get(metric), "final_step": last["step"],
                "last_checkpoint": last.get("checkpoint_path"), "n_evals": len(evals),
                "wall_time_s": last.get("time/elapsed_s"),
            })
            for k in ("test/miou", "test/miou16", "test/miou13", "test/pixel_acc"):
                if k in best:
                    self.row[f"best_{k.replace('/', '_')}"] = best[k]
            for k in ("model/params", "model/gflops", "model/latency_ms", "model/fps"):
                if k in last:
                    self.row[k.replace("/", "_")] = last[k]
        restarted = [r for r in evals if r.get("restarts") is not None]
        self.row["restarts"] = max((int(r["restarts"]) for r in restarted), default=0)
        self.row["resumed_from"] = int(restarted[-1]["resumed_from"]) if restarted else None
        if evals:  # the node of the latest evaluation (each evaluation's is in `evals`)
            self.row.update({k: evals[-1].get(k) for k in NODE_KEYS})
        self.row["updated_at"] = time.time()
        return self.row
