"""CPSL stages 2 and 3 (Li et al., "Class-Balanced Pixel-Level Self-Labeling for Domain Adaptive Semantic
Segmentation", CVPR 2022; original: github.com/lslrh/CPSL, `step_distillation`): knowledge distillation into a
fresh student.

The student (the segmenter given to the constructor, freshly initialized; the original starts it from a SimCLR
ImageNet model) learns from
- CE on the target pseudo-labels of the previous stage (`batch.tgt_lbl`: the loop loads a pseudo-label folder,
  confidence >= 0.95 in the original, made by a separate pseudo-label stage),
- lambda_kd * KL(teacher || student) per pixel, the teacher frozen (eval mode, not in the optimizer),
- lambda_src * source CE (the original always adds its loss_GTA),
student and teacher both on the target's photometric strong view (the original's --S_pseudo 1 feeds both the
RandAugment view; its geometric ops are left out here, the loop's crop/flip already applies to the labels).
The teacher comes from `teacher_checkpoint` (a run's checkpoint folder or state.pt): by default (teacher_key
"model") its segmenter ["method"]["model"], the stage-1 STUDENT, as the original: its stage-2 command passes
the stage-1 best_model.pkl as --resume_path, the teacher is built from checkpoint['ResNet101']['model_state']
(models/adaptation_modelv2.py), and train.py's `validation` saves there only the nets in model.nets, i.e. the
student BaseNet (the EMA model BaseNet_ema is never saved). The stage-2 pseudo-labels come from the same
student (generate_pseudo_label.py loads that checkpoint into BaseNet). teacher_key "teacher" takes the
checkpoint's EMA teacher ["method"]["teacher"] instead when it has one (our option, not the original's).
Without a checkpoint, the teacher is a copy of the student at the first step (after the loop's `init_from`).
Stage 3 = this method again with the stage-2 checkpoint as teacher (its student, "model").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.errors import ConfigError
from uda_ray.losses import kl_distill
from uda_ray.methods.base import Method, UDABatch, backward_first_then_last, seg_loss, upsample
from uda_ray.methods.blocks import GeneratorState, global_rand, photometric, pseudo_label_loss
from uda_ray.training.checkpoint import STATE_FILE, load_state
from uda_ray.training.optim import OptimConfig


@dataclass(frozen=True)
class CPSLDistillConfig:  # sources: the original's README stage-2/3 commands and parser_train.py
    teacher_checkpoint: str | None = None  # checkpoint folder or state.pt; None: copy of the initial student
    teacher_key: str = "model"  # "model": its segmenter (the original); "teacher": its EMA teacher if any
    lambda_kd: float = 1.0  # --distillation 1
    lambda_src: float = 1.0  # source CE (loss_GTA, weight 1 in step_distillation)
    strong_aug: bool = True  # --S_pseudo 1: student and teacher see the strong view
    seed: int = 0  # the strong-view generator

    def __post_init__(self) -> None:
        if self.teacher_key not in ("teacher", "model"):
            raise ConfigError(f"method_cfg.teacher_key must be 'teacher' or 'model', "
                              f"got '{self.teacher_key}'")
        for name in ("lambda_kd", "lambda_src"):
            if not getattr(self, name) >= 0.0:
                raise ConfigError(f"method_cfg.{name} must be >= 0, got {getattr(self, name)}")
        if self.teacher_checkpoint is not None and not self.teacher_checkpoint:
            raise ConfigError("method_cfg.teacher_checkpoint must be a path or null")


def load_teacher_state(path: str | Path, key: str = "model") -> dict[str, Tensor]:
    """The teacher's segmenter state dict from a checkpoint folder (holding state.pt) or file."""
    p = Path(path)
    f = p / STATE_FILE if p.is_dir() else p
    if not f.is_file():
        raise ConfigError(f"method_cfg.teacher_checkpoint: no checkpoint at {p}")
    state = load_state(f)
    method = state.get("method", {}) if isinstance(state, dict) else {}
    if key == "teacher" and "teacher" in method:
        return method["teacher"]
    if "model" not in method:
        raise ConfigError(f"method_cfg.teacher_checkpoint: {f} holds no ['method']['model'] state")
    return method["model"]


class Started(nn.Module):
    """A checkpointed flag: has the first step run (and the teacher been set)?"""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("flag", torch.zeros((), dtype=torch.bool))


class CPSLDistill(Method):
    """CPSL stages 2/3: target pseudo-label CE + KL distillation from a frozen teacher + source CE."""

    Config = CPSLDistillConfig
    uses_target = True
    uses_target_labels = True

    def __init__(self, model: nn.Module, cfg: CPSLDistillConfig, optim: OptimConfig, **kwargs: Any) -> None:
        super().__init__(model, cfg, optim, **kwargs)
        teacher = self.model_factory() if self.model_factory is not None else copy.deepcopy(self.model_raw)
        self.teacher_raw = teacher.to(self.device).requires_grad_(False).eval()
        self.started = Started().to(self.device)
        if cfg.teacher_checkpoint is not None:
            self.teacher_raw.load_state_dict(load_teacher_state(cfg.teacher_checkpoint, cfg.teacher_key))
            self.started.flag.fill_(True)
        self.rng = GeneratorState(cfg.seed)

    def train_step(self, batch: UDABatch, step: int) -> dict[str, Tensor]:
        """Logged (unweighted): loss/seg_tgt (pseudo-label CE), loss/kd (per-pixel KL), loss/seg_src."""
        cfg = self.cfg
        if not bool(self.started.flag):  # no checkpoint: the teacher is the student as the run starts
            self.teacher_raw.load_state_dict(self.model_raw.state_dict())
            self.started.flag.fill_(True)
        if batch.tgt_lbl is None:
            raise ValueError("cpsl_distill needs pseudo-labels as target labels (data.target_label_root)")
        self.model.train()
        self.teacher_raw.eval()
        self.opt.zero_grad(set_to_none=True)
        tgt = batch.tgt_img
        if cfg.strong_aug:  # draws for the global batch, this worker's slice (exact under DDP)
            tgt = photometric(tgt, global_rand(self.rng.gen, tgt.shape[0], 5).to(tgt.device))
        with torch.no_grad():
            t_logits = self.teacher_raw(tgt)["out"]  # (B, C, h, w)
        logs: dict[str, Tensor] = {}

        def target_loss() -> Tensor:
            out = self.model(tgt)
            s_logits = out["out"]  # (B, C, h, w)
            t_probs = F.softmax(upsample(t_logits, tuple(s_logits.shape[-2:])), dim=1)
            ce = pseudo_label_loss(out, batch.tgt_lbl, self.aux_weights)
            # KL with LOG-probabilities as input: the original passes F.softmax(student) to F.kl_div, a known
            # bug (its logged loss goes negative); fixed in kl_distill. The original also averages over the
            # classes (its mask covers (B, C, h, w)): the per-pixel KL is weighted lambda_kd / C.
            kd = kl_distill(s_logits, t_probs)
            logs["loss/seg_tgt"], logs["loss/kd"] = ce.detach(), kd.detach()
            return ce + cfg.lambda_kd / self.num_classes * kd

        if cfg.lambda_src > 0:
            def source_loss() -> Tensor:
                loss = seg_loss(self.model(batch.src_img), batch.src_lbl, self.aux_weights)
                logs["loss/seg_src"] = loss.detach()
                return cfg.lambda_src * loss

            backward_first_then_last(self.model, target_loss, source_loss, self.backward)
        else:
            self.backward(target_loss())  # pseudo_label_loss reaches every head (aux included)
        self.step()
        return logs

    def stateful(self) -> dict[str, Any]:
        return {**super().stateful(), "teacher": self.teacher_raw, "started": self.started, "rng": self.rng}
