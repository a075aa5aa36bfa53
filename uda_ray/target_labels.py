"""Which labels a run trains on in the target domain: pseudo-labels, or (only when it says so) ground truth.

A UDA run never sees the target's labels. Methods that read target labels (`uses_target_labels`) read
pseudo-labels: `data.pseudo_from` (made by the run from a checkpoint) or `data.target_label_root` (a folder).
Without either, the dataset would fall back to the target's ground truth and the run would silently become an
oracle; so such a run is refused before any compute unless it says so:
    data.target_labels: ground_truth     the target's ground truth, on purpose (oracle ablations, e.g.
                                         contrastive learning "using GT")
`target_only` is the oracle by definition: ground truth unless given pseudo-labels.

A run trained on target ground truth is marked everywhere its numbers appear (the `target_ground_truth`
column of the tables, `best`, the sweep/run summaries, the HTML report, pipeline reports), and so is every run
that starts from one: a checkpoint (`train.init_from`, a teacher), pseudo-labels or an IntraDA ranking made
by a ground-truth-trained model carry the mark on (`data.target_gt_via` names the ancestor; set by uda_ray
when the references are resolved).

Torch-free at import (reading a checkpoint's config imports it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from uda_ray.errors import ConfigError

PSEUDO, GROUND_TRUTH = "pseudo", "ground_truth"
CHOICES = (PSEUDO, GROUND_TRUTH)
MARK = "TRAINED ON TARGET GROUND TRUTH"  # printed beside every such run: not a UDA result
SHORT_MARK = "target GT"


def check(cfg: Any, method_cls: type) -> None:
    """Refuse (ConfigError, one line) a run that would train on the target's ground truth without saying so,
    and contradictory settings. `cfg` is an ExperimentConfig, `method_cls` its METHODS entry."""
    d = cfg.data
    pseudo = d.pseudo_from or d.target_label_root
    if d.target_labels == GROUND_TRUTH:
        if not method_cls.uses_target_labels:
            raise ConfigError(f"data.target_labels: ground_truth: method {cfg.method} reads no target labels")
        if pseudo:
            raise ConfigError("data.target_labels: ground_truth contradicts the pseudo-labels given "
                              "(data.pseudo_from / data.target_label_root): keep one")
        return
    if method_cls.uses_target_labels and not pseudo and method_cls.default_target_labels != GROUND_TRUTH:
        raise ConfigError(
            f"method {cfg.method} trains on target labels and was given no pseudo-labels: set data.pseudo_from "
            "(a checkpoint, run:NAME or sweep:NAME) or data.target_label_root (a pseudo-label folder), or "
            "data.target_labels: ground_truth to train on the target's ground truth (an oracle, marked as such)")
    if _same_domain_labels(d):
        raise ConfigError(
            f"data.source is the target itself ({d.source} at {d.target_root}): the source labels would be the "
            "target's ground truth; give data.source_label_root (pseudo-labels) or data.ranking (IntraDA), or "
            "train method target_only (the oracle)")


def _same_domain_labels(d: Any) -> bool:
    """The source is the target dataset in the same folder, with its own (ground-truth) labels."""
    if d.source != d.target or d.ranking or d.source_label_root or not (d.source_root and d.target_root):
        return False
    return Path(d.source_root).expanduser().absolute() == Path(d.target_root).expanduser().absolute()


def trains_on_target_gt(exp: dict) -> bool:
    """Whether the resolved experiment `exp` (a plain dict: a run's config, a table's config_json) trained on
    the target's ground truth, itself or through what it started from."""
    d = exp.get("data") or {}
    if d.get("target_gt_via"):
        return True
    if d.get("pseudo_from") or d.get("target_label_root"):
        return False
    return exp.get("method") == "target_only" or d.get("target_labels") == GROUND_TRUTH


def row_marked(row: dict) -> bool:
    """A results-table row (trials, `best`) of a run trained on target ground truth. Tables written before the
    column existed are judged from their config_json."""
    if row.get("target_ground_truth") is not None:
        return bool(row["target_ground_truth"])
    cj = row.get("config_json")
    return bool(cj) and trains_on_target_gt(json.loads(cj))


# ------------------------------------------------------------------------------------------------
# lineage: runs that start from a ground-truth-trained model


def checkpoint_trained_on_target_gt(path: str | Path) -> bool:
    """A checkpoint (folder or state.pt) whose run trained on target ground truth (itself or its ancestors)."""
    from uda_ray.training.checkpoint import load_state

    p = Path(path)
    if not (p.is_file() or (p / "state.pt").is_file()):
        return False
    return trains_on_target_gt(load_state(p, mmap=True).get("config") or {})


def _folder_checkpoints(folder: str | Path) -> list[str]:
    """The checkpoints a pseudo-label folder or an IntraDA ranking folder was made from (its manifest.json)."""
    m = Path(folder) / "manifest.json"
    if not m.is_file():
        return []
    try:
        man = json.loads(m.read_text())
    except (OSError, ValueError):
        return []
    model = man.get("model") if isinstance(man.get("model"), dict) else {}
    cks = list(model.get("checkpoints") or []) + [man[k] for k in ("checkpoint",) if isinstance(man.get(k), str)]
    return [str(c) for c in cks]


def sources_of(raw: dict) -> list[str]:
    """Every model a (resolved) experiment dict starts from or learns from: init_from, pseudo_from, method_cfg
    checkpoints (teachers), and the models behind its pseudo-label and ranking folders."""
    data, train = raw.get("data") or {}, raw.get("train") or {}
    out = [train.get("init_from"), data.get("pseudo_from")]
    out += [v for k, v in (raw.get("method_cfg") or {}).items() if k.endswith("checkpoint") and isinstance(v, str)]
    for key in ("target_label_root", "source_label_root", "ranking"):
        if data.get(key):
            out += _folder_checkpoints(data[key])
    return [str(s) for s in out if s]


def inherited(raw: dict) -> str | None:
    """The first model `raw` starts from that was trained on target ground truth (its path), else None."""
    for src in sources_of(raw):
        if checkpoint_trained_on_target_gt(src):
            return src
    return None


def mark_inherited(raw: dict) -> dict:
    """`raw` with data.target_gt_via set when it starts from a ground-truth-trained model (driver side, after
    the references are resolved to paths)."""
    via = inherited(raw)
    if not via:
        return raw
    return {**raw, "data": {**(raw.get("data") or {}), "target_gt_via": via}}
