"""An experiment made ready to run: the one path from a raw experiment to the config that a single run, a
sweep's base, a pipeline stage or a seed rerun is trained with (`prepare_experiment`):

    1. references resolved: `run:NAME` / `sweep:NAME` -> the checkpoint folder they name (a run's best
       checkpoint by its own `select`; a sweep's best trial's by its objective), train.init_from checked,
       and the mark inherited from a model that was trained on target ground truth
    2. validated: the strict loader and the registries (uda_ray.build), then the experiment's checks (default
       uda_ray.checks.experiment: the model built with its pretrained weights, init_from); nothing has
       been written so far
    3. data resolved: dataset roots made absolute, the synthetic benchmark generated on first use (under
       uda_ray.storage.layout.data_dir), the datasets loaded and split as configured, and the selection
       metric computable (a target without test labels cannot rank by a test metric)
    4. built again with the resolved roots: the prepared config

A sweep's base with `train.launcher: replay` trains nothing and reads no data: step 3 is its curve source
instead (a recorded sweep's folder made absolute and checked to hold evaluations). Anything but a sweep
refuses launcher replay.

Also the Ray address of a call (`cluster_address`). Ray-free; torch is imported when a function needs it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from uda_ray.errors import UserError
from uda_ray.storage import layout

log = logging.getLogger(__name__)
progress = logging.getLogger("uda_ray.training.progress")
OWN = "own"  # prepare_experiment(select=OWN): the experiment's own selection metric


@dataclasses.dataclass(frozen=True)
class Prepared:
    raw: dict  # the raw experiment, references and dataset roots resolved
    cfg: Any  # the ExperimentConfig built from it


def prepare_experiment(raw: dict, source: str, root: Path, *, select: str | None = OWN,
                       check: Callable[[dict, Any], None] | None = None, replay: bool = False) -> Prepared:
    """`raw` ready to run under the storage root `root` (the steps in the module's docstring). `select`: the
    metric that must be computable on the data (default the experiment's own `select`; None: none).
    `check(raw, cfg)` validates before the data are resolved (default: checks.experiment). `replay`: whether
    `train.launcher: replay` may be used (a sweep's base)."""
    from uda_ray import checks
    from uda_ray.build import build_experiment

    raw = resolve_refs(raw, root)
    cfg = build_experiment(raw, source)
    if check is None:
        checks.experiment(cfg, source)
    else:
        check(raw, cfg)
    if cfg.train.launcher == "replay":
        if not replay:
            raise UserError(f"{source}: train.launcher: replay replays learning curves in sweeps only; "
                            "give inline, ray_train or auto to train")
        raw = _replay_source_resolved(raw, cfg)
        return Prepared(raw, build_experiment(raw, source))
    data = resolve_data(cfg.data, root, cfg.select if select == OWN else select)
    raw = resolve_epochs(with_data(raw, data), cfg, data, source)
    return Prepared(raw, build_experiment(raw, source))


def overrides_dict(overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    """{"optim.lr": 1e-3} or ["optim.lr=1e-3", ...] (the CLI's --set) -> a dict of dotted overrides."""
    from uda_ray.config_loader import parse_set

    if isinstance(overrides, Mapping):
        return dict(overrides)
    return parse_set(list(overrides))


def cluster_address(address: str | None, meta: dict | None = None) -> str | None:
    """The Ray address of a call: `address`, else $RAY_ADDRESS, else the one a sweep recorded (`meta`); checked
    reachable (one line if not). None: a local cluster."""
    from uda_ray.search.cluster import check_address

    address = address or os.environ.get("RAY_ADDRESS") or (meta or {}).get("address")
    check_address(address)
    return address


# ------------------------------------------------------------------------------------------------
# references


def resolve_ref(ref: str, storage: Path, key: str = "train.init_from") -> str:
    """`run:NAME` / `sweep:NAME` -> an absolute checkpoint folder; paths are checked and made absolute (`key`
    names the setting in the error)."""
    from uda_ray.training.checkpoint import STATE_FILE, best_checkpoint_in, load_state

    if layout.is_reference(ref):
        kind, name, folder = layout.reference(storage, ref)
        if kind == "run" and not folder.is_dir():
            raise UserError(f"{key}: {ref}: no run '{name}' under {storage}; train it first "
                            f"(uda-ray train EXPERIMENT.yaml --name {name})")
        return str(best_checkpoint_in(folder)) if kind == "run" else _best_of_sweep(ref, name, folder, storage)
    p = Path(ref).expanduser().absolute()
    if not (p.is_file() or (p / STATE_FILE).is_file()):
        raise UserError(f"{key}: {ref} is neither a checkpoint folder (with state.pt) nor a file")
    load_state(p, mmap=True)  # refuses, on the driver and before any run starts, a file that is not safe to load
    return str(p)


def _best_of_sweep(ref: str, name: str, folder: Path, storage: Path) -> str:
    """The kept checkpoint of the best trial of a sweep by its objective (the nearest kept step to its best)."""
    from uda_ray.results.queries import best_trials

    rows = best_trials(layout.results_dir(folder), top=1)
    if not rows or not rows[0].get("kept_checkpoint"):
        raise UserError(f"{ref}: sweep '{name}' under {storage} has no evaluated trial with a checkpoint")
    if not rows[0]["rank_checkpoint_kept"]:
        from uda_ray.results.text import not_kept_note

        log.warning("%s: %s; starting from that one", ref, not_kept_note(rows[0]))
    return rows[0]["kept_checkpoint"]


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


CHECKPOINT_SETTINGS = (("train", "init_from"), ("method_cfg", "teacher_from"))  # paths checked like references


def _resolve(raw: Any, storage: Path) -> Any:
    if isinstance(raw, dict):
        out = {k: _resolve(v, storage) for k, v in raw.items()}
        for section, key in CHECKPOINT_SETTINGS:  # checked (and made absolute) before any run starts
            value = out[section].get(key) if isinstance(out.get(section), dict) else None
            if isinstance(value, str) and value:
                out[section] = {**out[section], key: resolve_ref(value, storage, f"{section}.{key}")}
        return out
    if isinstance(raw, list):
        return [_resolve(v, storage) for v in raw]
    if layout.is_reference(raw):
        return resolve_ref(raw, storage)
    return raw


def _replay_source_resolved(raw: dict, cfg: Any) -> dict:
    """The experiment with a recorded replay source made absolute (the trials may run in another folder),
    checked to hold evaluations."""
    from uda_ray.training.replay import SYNTHETIC, check_source, recorded_results_dir

    rp = cfg.train.replay_source
    check_source(rp)
    if rp.source == SYNTHETIC:
        return raw
    train = dict(raw.get("train") or {})
    train["replay"] = {**(train.get("replay") or {}), "source": str(recorded_results_dir(rp.source))}
    return {**raw, "train": train}


# ------------------------------------------------------------------------------------------------
# data


def resolve_data(data: Any, root: Path, select: str | None = None) -> Any:
    """Dataset roots resolved (the synthetic benchmark generated on first use under layout.data_dir), checked to
    load and split as configured, and checked to allow computing the selection metric `select`: a DataConfig
    with absolute roots."""
    from uda_ray.data.loading import build_datasets, has_test_split, prepare, synthetic_dir
    from uda_ray.metric_names import DEFAULT_SELECTION, needs_test_labels

    data_dir = layout.data_dir(root)
    if data.synthetic is not None and not (data.source_root and data.target_root):
        where = synthetic_dir(data, data_dir)
        if not (where / "MANIFEST.json").is_file():
            progress.info(f"generating the synthetic benchmark in {where} ...")
    data = prepare(data, data_dir)
    build_datasets(data, source=True, target=True, target_labels=bool(data.target_label_root))
    if not has_test_split(data):
        if select and needs_test_labels(select):
            raise UserError(f"{select} needs target test labels, and the target at {data.target_root} has none "
                            f"(select a label-free metric, e.g. {DEFAULT_SELECTION})")
        progress.info(f"the target at {data.target_root} has no labeled test split: test metrics are absent")
    return data


def epoch_steps(epochs: int, images: int, global_batch: int) -> int:
    """Steps of `epochs` passes over `images` at `global_batch` images a step: ceil(epochs * images / batch)."""
    return max(1, -(-epochs * images // global_batch))


def resolve_epochs(raw: dict, cfg: Any, data: Any, source: str) -> dict:
    """With train.epochs: the raw experiment with train.max_steps = epoch_steps(epochs, images of the split
    an epoch passes over (train.epoch_split), batch_size * num_workers). A max_steps in the raw experiment
    (the file, its base or an override) that disagrees is one line; one that agrees is kept (a prepared
    experiment prepared again)."""
    from uda_ray.data.loading import splits_of
    from uda_ray.errors import ConfigError
    from uda_ray.methods import METHODS

    tc = cfg.train
    if tc.epochs is None:
        return raw
    sp = splits_of(data)
    split = tc.epoch_split if METHODS[cfg.method].uses_source else "target"
    counts = {"source": len(sp.source_train), "target": len(sp.target_train)}
    counts["shorter"] = min(counts.values())
    images = counts[split]
    batch = tc.batch_size * tc.num_workers
    steps = epoch_steps(tc.epochs, images, batch)
    given = (raw.get("train") or {}).get("max_steps")
    if given is not None and given != steps:
        raise ConfigError(f"{source}: train.epochs {tc.epochs} over {images} train images (train.epoch_split "
                          f"{split}) at a global batch of {batch} is {steps} steps, but train.max_steps is {given}: "
                          "give one of them (an override: --set train.epochs=null)")
    progress.info(f"train.epochs {tc.epochs}: {steps} steps ({images} {split} images, global batch {batch})")
    return {**raw, "train": {**(raw.get("train") or {}), "max_steps": steps}}


def raw_of(cfg: Any) -> dict:
    """A built experiment as a raw dict to prepare (again): `experiment_dict`, without the train.max_steps
    default that the loader filled in beside train.epochs (the epochs give the length; uda_ray.config_loader.
    given_keys tells a given max_steps from a default)."""
    from uda_ray.config import experiment_dict
    from uda_ray.config_loader import given_keys

    raw = experiment_dict(cfg)
    given = given_keys(cfg.train)
    if cfg.train.epochs is not None and given is not None and "max_steps" not in given:
        raw["train"].pop("max_steps")
    return raw


def with_data(raw: dict, data: Any) -> dict:
    """The raw experiment with the resolved dataset roots."""
    raw = dict(raw)
    raw["data"] = {**raw.get("data", {}), "source_root": data.source_root, "target_root": data.target_root,
                   "target_label_root": data.target_label_root}
    return raw
