"""Evaluate-only (`uda-ray evaluate`): a trained segmenter evaluated under an experiment's protocol, the same
evaluation the training loop runs (uda_ray.training.evaluate: `eval_loaders`, `evaluate_splits`): the target
test split (mIoU, pixel accuracy, per-class IoU), source val, the labeled selection split when configured, and
the label-free validators on the held-out target images.

The segmenter comes from a uda_ray checkpoint (a folder holding state.pt, or the file) under the experiment
stored in it, with `--set` overrides of its data and evaluation settings (`data.*`, `train.eval_batch_size`);
or from a weights file (a state_dict of the whole segmenter, e.g. a published model after
`uda-ray convert-weights`) under an experiment file (`--experiment`, any override). A plan (every check,
nothing written) and its execution; in-process, Ray-free.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from uda_ray.config import experiment_dict
from uda_ray.driver.prepare import overrides_dict
from uda_ray.errors import UserError
from uda_ray.storage import layout
from uda_ray.target_labels import trains_on_target_gt

progress = logging.getLogger("uda_ray.training.progress")
WEIGHTS = ("model", "teacher")
CHECKPOINT_KEYS = ("data.", "train.eval_batch_size")  # what --set may change under a checkpoint's experiment


@dataclasses.dataclass
class EvaluatePlan:
    cfg: Any  # the ExperimentConfig of the protocol (data not resolved yet)
    model: Any  # the segmenter with the weights to evaluate (cpu)
    source: str  # what is evaluated, for the printed header
    step: int | None  # the checkpoint's step (None for a weights file)
    root: Path  # storage root (where a synthetic benchmark would be generated)
    device: str
    out: Path | None


def plan_evaluate(path: str | os.PathLike, *, experiment: str | os.PathLike | None = None,
                  overrides: Mapping[str, Any] | Iterable[str] = (), weights: str = "model", device: str = "cpu",
                  storage: str | os.PathLike | None = None, out: str | os.PathLike | None = None) -> EvaluatePlan:
    """Every check of an evaluation (uda_ray.api.evaluate's arguments), nothing written: the checkpoint or
    weights file, the overrides, the device, the output file."""
    from uda_ray.checks import output_file

    if weights not in WEIGHTS:
        raise UserError(f"--weights {weights}: expected one of {', '.join(WEIGHTS)}")
    _check_device(device)
    root = layout.root(storage)
    out_file = output_file(out, "--out") if out else None
    ov = overrides_dict(overrides)
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{path}: no such file or folder")
    if experiment is None:
        cfg, model, step = _from_checkpoint(p, ov, weights)
    else:
        if weights != "model":
            raise UserError("--weights teacher: a weights file holds one segmenter; --weights applies to checkpoints")
        cfg, step = _from_weights(p, experiment, ov), None
        model = _segmenter_from_file(cfg, p)
    return EvaluatePlan(cfg, model, str(p), step, root, device, out_file)


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: expected cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here")


def _from_checkpoint(p: Path, ov: dict, weights: str) -> tuple[Any, Any, int | None]:
    """A uda_ray checkpoint's experiment (with the overrides) and its segmenter with the chosen weights."""
    from uda_ray.build import build_experiment, build_model
    from uda_ray.config_loader import apply_overrides
    from uda_ray.training.checkpoint import load_state

    for k in ov:
        if not (k.startswith(CHECKPOINT_KEYS[0]) or k == CHECKPOINT_KEYS[1]):
            raise UserError(f"--set {k}: a checkpoint is evaluated under its own experiment; only data.* and "
                            f"train.eval_batch_size can be changed (or give --experiment with a weights file)")
    state = load_state(p)
    if not isinstance(state.get("config"), dict):
        raise UserError(f"{p}: not a uda_ray checkpoint (no experiment config in it)")
    cfg = build_experiment(apply_overrides(state["config"], ov), f"{p} (its experiment)")
    if weights not in state["method"]:
        raise UserError(f"{p}: the {cfg.method} checkpoint has no '{weights}' weights")
    model = build_model(dataclasses.replace(cfg.model, pretrained=None), cfg.data.normalize)
    try:
        model.load_state_dict(state["method"][weights])
    except RuntimeError as e:
        raise UserError(f"{p}: its '{weights}' weights do not fit {cfg.model.name} "
                        f"({str(e).strip().splitlines()[0][:200]})") from None
    return cfg, model, state.get("step")


def _from_weights(p: Path, experiment: str | os.PathLike, ov: dict) -> Any:
    """The experiment file's config (with the overrides) as the protocol of a weights file."""
    from uda_ray.build import build_experiment, experiment_raw

    if not Path(experiment).is_file():
        raise UserError(f"--experiment {experiment}: no such file")
    if not p.is_file():
        raise UserError(f"{p}: not a file (with --experiment, give a weights file: a state_dict of the segmenter)")
    return build_experiment(experiment_raw(experiment, ov), str(experiment))


def _segmenter_from_file(cfg: Any, p: Path) -> Any:
    """The experiment's segmenter with a weights file's state_dict, loaded strictly (as model.pretrained loads
    a full-model file; torchvision backbone weights alone are refused: they hold no trained head)."""
    from uda_ray.build import build_model
    from uda_ray.models.resnet import load_pretrained

    state = _weights_state(cfg, p)
    if "conv1.weight" in state:
        raise UserError(f"{p}: holds backbone weights only (torchvision ResNet keys), not a trained segmenter")
    model = build_model(dataclasses.replace(cfg.model, pretrained=None), cfg.data.normalize)
    load_pretrained(model, model, state, str(p))
    return model


_MODEL_DEFAULTS = {"style": "torchvision", "head": "aspp", "bn_clr": False}  # deeplabv2_r101's


def _weights_state(cfg: Any, p: Path) -> dict:
    """A weights file's state dict: ours, or CPSL's released .pkl converted in memory (as `uda-ray
    convert-weights` would), whose network the experiment must build (style / head / bn_clr, one line if not)."""
    from uda_ray.models.convert import convert_cpsl_state_dict, is_cpsl, read_original

    state = read_original(p)
    if not is_cpsl(state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    ours, summary = convert_cpsl_state_dict(state, cfg.model.num_classes)
    have = {**_MODEL_DEFAULTS, **dict(cfg.model.kwargs or {})}
    want = {**_MODEL_DEFAULTS, **summary["kwargs"]}
    wrong = [f"model.kwargs.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in want.items()
             if have[k] != v]
    if wrong:
        raise UserError(f"{p}: a CPSL checkpoint; evaluate it with " + " ".join(f"--set {w}" for w in wrong))
    return ours


def evaluate(plan: EvaluatePlan) -> dict:
    """Run a planned evaluation: {"source", "step", "weights" ..., "metrics": {name: value}}; written to
    `plan.out` as JSON when given."""
    import torch

    from uda_ray.data.loading import build_datasets, prepare
    from uda_ray.training.evaluate import eval_loaders, evaluate_splits

    cfg = plan.cfg
    data = prepare(cfg.data, layout.data_dir(plan.root))
    cfg = dataclasses.replace(cfg, data=data)
    ds = build_datasets(data, source=False, target=False, target_labels=False, evaluation=True)
    if "test" not in ds:
        progress.info(f"the target at {data.target_root} has no labeled test split: test metrics are absent")
    device = torch.device(plan.device)
    model = plan.model.to(device).eval()
    progress.info(f"evaluating {plan.source} ({cfg.method}/{cfg.model.name}) on {data.target_root}")
    metrics = evaluate_splits(model, eval_loaders(ds, cfg, 0, 1), cfg, device)
    result = {"source": plan.source, "step": plan.step, "experiment": cfg.name, "method": cfg.method,
              "model": cfg.model.name, "target_root": data.target_root,
              "target_ground_truth": trains_on_target_gt(experiment_dict(cfg)),
              "metrics": {k: _plain(v) for k, v in metrics.items()}}
    if plan.out:
        plan.out.write_text(json.dumps(result, indent=2))
    return result


def _plain(v: Any) -> Any:
    v = float(v)
    return None if math.isnan(v) else v
