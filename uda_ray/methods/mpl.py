"""Per-pixel Meta Pseudo Labels (Pham et al., "Meta Pseudo Labels", CVPR 2021), adapted to UDA segmentation:
labeled data = source frames, unlabeled data = target frames. The official code is classification-only; the
per-pixel design below is ours.

One step:
 1. the teacher labels the target pixels: y_hat = argmax (or a sample) of its softmax, (B, H, W);
 2. the student takes one step on CE(student(tgt), y_hat) + student_source_weight * CE(student(src), y_src);
    its CE (main head) on a HELD-OUT source batch (other images than src, drawn by the loop from its own
    stream) is measured before (ce_old) and after (ce_new) that step, with the student in eval mode;
 3. reward = (ce_old - ce_new) - baseline, baseline = moving average of the raw ce_old - ce_new;
 4. the teacher steps on CE_teacher(src, y_src) + reward * CE(teacher(tgt), y_hat) (+ lambda_uda * UDA).

Sign convention (the known source of confusion), derived: the teacher wants to lower the student's source loss
after the step, L(T) = CE_src(theta_S'(T)). A first-order Taylor expansion around the student's step gives
ce_new ~= ce_old - lr_S * g_src . g_tgt(y_hat), so the paper's h = g_src . g_tgt(y_hat) is proportional to
ce_old - ce_new = the student's IMPROVEMENT. With y_hat drawn from the teacher, the score-function estimate
of dL/dT is -(ce_old - ce_new - baseline) * d log p_T(y_hat) / dT = reward * d CE(T(tgt), y_hat) / dT: the
surrogate to minimize is reward * CE(teacher(tgt), y_hat). A positive reward (the labels helped) lowers that
CE, i.e. RAISES the teacher's probability of the labels that produced it; a negative reward lowers it.
(Writing h = ce_new - ce_old instead and plugged into "+ h * CE" it would reinforce labels that hurt the
student.)

Choices (ours, documented): the teacher is a fresh `model_factory()` loaded with the student's initial
weights (a copy: UDA starts from an ImageNet or source-trained init, so the teacher's first labels are as
good as the student's); teacher optimizer = the experiment's kind with `teacher_lr` (None: the student's lr),
under the loop's poly schedule; student_source_weight 1.0 (the student learns from pseudo-labels
AND source labels; the paper's student learns from the teacher only: 0.0). With source CE in the student's
step the student improves on source every step; the moving-average baseline removes that drift from the
reward. The reward's measurement (our choice): on the student's own training batch, the reward would also
credit the step for fitting those very images (its source CE term lowers their CE), and a second train-mode
forward would update BatchNorm's running statistics once more per step. A held-out batch measures what the
teacher's labels did for the student on labeled data it did not just train on, and eval mode makes both
measuring forwards side-effect free (BatchNorm uses, and keeps, its running statistics), so ce_old - ce_new is
the step's effect alone. The baseline starts at 0 and is the average BEFORE this step's update. Under DDP the
held-out CEs are all-reduced (sum and pixel count), so the reward is the global one on every worker.
Mixed precision (`train.amp`): the two held-out CEs are measured in float32 (autocast off) whatever the step's
precision: their difference is the whole signal, and inside the step's autocast region the second forward
would see the student's weights as cast before its update (autocast caches the casts). Under fp16 each of
student and teacher has its own GradScaler; when the student's update is skipped (inf/NaN gradients after
scaling), ce_new = ce_old says nothing about the labels: that step's reward is 0 (the teacher's MPL term drops
out; its source CE still trains it) and the baseline is not updated.
eval_model() is the student.

The variant of Montressori, Rosini & Vanderputten's real-time DA project (github.com/micolrosini/Real-Time-Domain-
Adaptation-in-Image-Segmentation, MPL.py), beside the default above: `teacher_from` (a checkpoint: a folder,
state.pt, `run:NAME` or `sweep:NAME`) initializes the teacher with that run's segmenter ("a pretrained network
aimed at creating the pseudo labels"); `fresh_student` keeps the student at the model's own initialization
(their student is a new BiSeNet, ImageNet backbone) instead of starting it from the teacher's weights; and
`lambda_adv` > 0 adds their discriminator term to the student's step: lambda_adv * BCE(D(softmax(student on
target)), source) with D (`discriminator`: fc or dsc, Adam `d_optim`) trained on the student's detached source
(0) and target (1) softmaxes, each half-weighted (blocks.OutputAdversary, as the adversarial method). What stays
ours: the reward (theirs is stud_lr * CE_tgt * CE_src scaled by an epoch schedule, not the student's
improvement), and their teacher's own adversarial term (weight 1, a second D trained on the student's outputs),
left out.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.data.labels import IGNORE
from uda_ray.errors import ConfigError
from uda_ray.fda import fda_source_to_target
from uda_ray.methods.base import Method, UDABatch, backward_first_then_last, seg_loss, sync_grads, upsample
from uda_ray.methods.blocks import (
    OutputAdversary,
    check_discriminator,
    check_weight,
    d_optim_default,
    is_distributed,
)
from uda_ray.training.checkpoint import load_weights
from uda_ray.training.optim import OptimConfig, build_optimizer


@dataclass(frozen=True)
class MPLConfig:
    teacher_lr: float | None = None  # teacher optimizer lr; None = the experiment's optim.lr
    ema_rate: float = 0.99  # reward baseline: b <- rate * b + (1 - rate) * raw reward (the paper's 0.99)
    hard_labels: str = "argmax"  # "argmax" | "sample" (one draw per pixel from the teacher's softmax)
    student_source_weight: float = 1.0  # source CE in the student's step (0.0 = the paper's student)
    lambda_uda: float = 0.0  # teacher consistency (UDA) term; off by default
    uda_beta: float = 0.01  # its strong view: the target stylized toward the source batch (FDA)
    uda_threshold: float = 0.9  # its confidence mask on the teacher's plain-target softmax
    # the real-time DA project's MPL (module docstring): the teacher from an earlier run's checkpoint (a folder,
    # state.pt, run:NAME, sweep:NAME; its segmenter), a fresh student, the student's discriminator term
    teacher_from: str | None = None  # None: the teacher starts as a copy of the student
    fresh_student: bool = False  # with teacher_from: the student keeps the model's init, not the teacher's weights
    lambda_adv: float = 0.0  # the student's adversarial term; 0 = off (no discriminator)
    discriminator: str = "fc"  # "fc" (AdaptSegNet) | "dsc" (depthwise-separable)
    d_optim: OptimConfig = field(default_factory=d_optim_default)  # Adam 1e-4, betas (0.9, 0.99)

    def __post_init__(self) -> None:
        check_weight("lambda_adv", self.lambda_adv)
        check_discriminator(self.discriminator)
        if self.teacher_from is not None and not self.teacher_from:
            raise ConfigError("method_cfg.teacher_from must be a checkpoint (folder, file, run:NAME, sweep:NAME) "
                              "or null")
        if self.fresh_student and self.teacher_from is None:
            raise ConfigError("method_cfg.fresh_student needs method_cfg.teacher_from (without it the teacher "
                              "starts as a copy of the student)")
        if self.teacher_lr is not None and not self.teacher_lr > 0:
            raise ConfigError(f"method_cfg.teacher_lr must be > 0, got {self.teacher_lr}")
        if not 0.0 <= self.ema_rate < 1.0:
            raise ConfigError(f"method_cfg.ema_rate must be in [0, 1), got {self.ema_rate}")
        if self.hard_labels not in ("argmax", "sample"):
            raise ConfigError(f"method_cfg.hard_labels must be 'argmax' or 'sample', "
                              f"got '{self.hard_labels}'")
        for name in ("student_source_weight", "lambda_uda"):
            if not getattr(self, name) >= 0.0:
                raise ConfigError(f"method_cfg.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.uda_beta < 0.5:
            raise ConfigError(f"method_cfg.uda_beta must be in [0, 0.5), got {self.uda_beta}")
        if not 0.0 <= self.uda_threshold <= 1.0:
            raise ConfigError(f"method_cfg.uda_threshold must be in [0, 1], got {self.uda_threshold}")


class MovingAverage:
    """A scalar exponential moving average with a state_dict (checkpointed like a module)."""

    def __init__(self, rate: float) -> None:
        self.rate, self.value = rate, 0.0

    def update(self, x: float) -> None:
        self.value = self.rate * self.value + (1.0 - self.rate) * x

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def mpl_teacher_term(t_logits: Tensor, pseudo: Tensor, reward: Tensor | float) -> Tensor:
    """reward * CE(t_logits (B, C, H, W), pseudo (B, H, W)): minimizing it with reward > 0 raises the
    teacher's probability of `pseudo`, with reward < 0 lowers it (derivation in the module docstring)."""
    return reward * F.cross_entropy(t_logits, pseudo, ignore_index=IGNORE)


def global_ce(logits: Tensor, lbl: Tensor) -> Tensor:
    """Mean CE (255 ignored) of logits (B, C, h, w) upsampled to lbl (B, H, W), over all workers' pixels."""
    ce = F.cross_entropy(upsample(logits, tuple(lbl.shape[-2:])), lbl, ignore_index=IGNORE, reduction="sum")
    stats = torch.stack([ce.float(), (lbl != IGNORE).sum().float()])  # (2,) sum, count
    if is_distributed():
        dist.all_reduce(stats)
    return stats[0] / stats[1].clamp(min=1.0)


class MPL(Method):
    """Meta Pseudo Labels, per pixel: the teacher is rewarded by the student's source improvement."""

    Config = MPLConfig
    uses_held_out_source = True

    def weights_loaded(self) -> None:
        """`train.init_from` was loaded into the student after construction: without `teacher_from` the teacher
        starts as a copy of the student, so it takes those weights too (it kept the initialization before)."""
        if self.cfg.teacher_from is None:
            self.teacher_raw.load_state_dict(self.model_raw.state_dict())

    def __init__(self, model: nn.Module, cfg: MPLConfig, optim: OptimConfig, **kwargs: Any) -> None:
        super().__init__(model, cfg, optim, **kwargs)
        teacher = self.model_factory() if self.model_factory is not None else copy.deepcopy(self.model_raw)
        if cfg.teacher_from is not None:
            load_weights(teacher, cfg.teacher_from)  # the checkpoint's segmenter
            if not cfg.fresh_student:
                self.model_raw.load_state_dict(teacher.state_dict())  # the student starts as the teacher
        else:
            teacher.load_state_dict(self.model_raw.state_dict())  # start as a copy of the student
        self.teacher_raw = teacher.to(self.device)
        self.teacher = self.wrap(self.teacher_raw)
        t_optim = dataclasses.replace(optim, lr=cfg.teacher_lr or optim.lr)
        has_groups = hasattr(teacher, "param_groups")
        groups = teacher.param_groups(t_optim.lr) if has_groups else teacher.parameters()
        self.t_opt = build_optimizer(groups, t_optim)
        self.optimizers.append(self.t_opt)
        self.baseline = MovingAverage(cfg.ema_rate)
        self.adversary: OutputAdversary | None = None  # the student's discriminator (lambda_adv > 0)
        if cfg.lambda_adv > 0:
            self.adversary = OutputAdversary(
                cfg.discriminator, self.num_classes, multi_level=False, lambda_adv=cfg.lambda_adv,
                lambda_adv_aux=0.0, d_optim=cfg.d_optim, wrap=self.wrap, device=self.device, scaling=self.scaling)
            self.optimizers.extend(self.adversary.optimizers)

    def _pseudo_labels(self, t_logits: Tensor) -> Tensor:
        """(B, C, H, W) detached teacher logits -> (B, H, W) int64 hard labels."""
        if self.cfg.hard_labels == "argmax":
            return t_logits.argmax(dim=1)
        flat = F.softmax(t_logits.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, t_logits.shape[1])
        return torch.multinomial(flat, 1).view(t_logits.shape[0], *t_logits.shape[2:])

    @torch.no_grad()
    def _held_out_ce(self, batch: UDABatch) -> Tensor:
        """Global CE of the student (main head, eval mode: BatchNorm's running statistics, none updated) on the
        held-out source batch, in float32 even under `train.amp` (autocast off). Under autocast, ce_new's forward
        would reuse the low-precision weight copies autocast cached before the student's step (the cache
        lives as long as the step's autocast region): the old student, a reward of about 0. And the reward
        is a difference of two CEs one small step apart, which 11 (float16) or 8 (bfloat16) significant bits
        of weights would blur."""
        was_training = self.model_raw.training
        self.model_raw.eval()
        try:
            with torch.autocast(self.device.type, enabled=False):
                return global_ce(self.model_raw(batch.src_img_held)["out"], batch.src_lbl_held)
        finally:
            self.model_raw.train(was_training)

    def _student_step(self, batch: UDABatch, pseudo: Tensor) -> tuple[Tensor, Tensor, bool, dict[str, Tensor]]:
        """One student update (and, with lambda_adv, its discriminator's); returns (ce_old, ce_new, applied,
        logs): global held-out source CEs before and after it, and whether the update was applied (False:
        skipped by fp16 loss scaling)."""
        if batch.src_img_held is None or batch.src_lbl_held is None:
            raise ValueError("mpl measures its reward on a held-out source batch (UDABatch.src_img_held / "
                             "src_lbl_held; the training loop supplies it)")
        w, adv = self.cfg.student_source_weight, self.adversary
        ce_old = self._held_out_ce(batch)
        self.opt.zero_grad(set_to_none=True)
        logs: dict[str, Tensor] = {}
        src_maps: list[Tensor] = []  # D's detached inputs (with lambda_adv)
        tgt_maps: list[Tensor] = []

        def target_loss() -> Tensor:
            out = self.model(batch.tgt_img)
            loss = seg_loss(out, pseudo, self.aux_weights)
            logs["loss/seg_tgt_student"] = loss.detach()
            if adv is not None:
                with adv.frozen():
                    loss = adv.add_fooling_terms(loss, out, tuple(batch.tgt_img.shape[-2:]), logs, tgt_maps)
            return loss

        if w > 0:
            def source_loss() -> Tensor:
                out = self.model(batch.src_img)
                if adv is not None:
                    src_maps.extend(m.detach() for m in adv.inputs(out, tuple(batch.src_img.shape[-2:])))
                loss = seg_loss(out, batch.src_lbl, self.aux_weights)
                logs["loss/seg_src_student"] = loss.detach()
                return w * loss

            backward_first_then_last(self.model, target_loss, source_loss, self.backward)
        else:
            self.backward(target_loss())  # pseudo-label CE reaches every head (aux included)
            if adv is not None:  # D's source input without a source CE: one more forward, no graph
                with torch.no_grad():
                    src_maps.extend(adv.inputs(self.model(batch.src_img), tuple(batch.src_img.shape[-2:])))
        applied = self.scaling.step_applied(self.opt)
        ce_new = self._held_out_ce(batch)  # same batch, same (eval) mode: the difference is the step's effect
        if adv is not None:
            logs.update(adv.train_discriminators(src_maps, tgt_maps))
        return ce_old, ce_new, applied, logs

    def train_step(self, batch: UDABatch, step: int) -> dict[str, Tensor]:
        """Logged: loss/seg_src_teacher, loss/seg_tgt_student, loss/seg_src_student (if weighted), loss/mpl
        (teacher CE on its own labels), loss/uda (if on), loss/adv, loss/d_src, loss/d_tgt (with lambda_adv),
        mpl/ce_old, mpl/ce_new, mpl/reward_raw (= ce_old - ce_new), mpl/baseline (before its update), mpl/reward
        (= raw - baseline)."""
        cfg = self.cfg
        self.model.train()
        self.teacher.train()
        self.t_opt.zero_grad(set_to_none=True)
        size = tuple(batch.tgt_img.shape[-2:])
        with sync_grads(self.teacher, last=False):  # its graph waits for the reward; the synced pass is last
            t_tgt = upsample(self.teacher(batch.tgt_img)["out"], size)  # (B, C, H, W)
        pseudo = self._pseudo_labels(t_tgt.detach())  # (B, H, W)

        ce_old, ce_new, applied, logs = self._student_step(batch, pseudo)
        raw = (ce_old - ce_new).detach()
        baseline = self.baseline.value
        if applied:
            reward = raw - baseline  # > 0: the student improved more than usual -> reinforce y_hat
            self.baseline.update(float(raw))
        else:  # fp16 skipped the student's update: no evidence about y_hat, and the baseline keeps its value
            reward = torch.zeros_like(raw)

        def teacher_target_loss() -> Tensor:
            with torch.no_grad():
                logs["loss/mpl"] = F.cross_entropy(t_tgt, pseudo)  # the teacher's CE on its own labels
            loss = mpl_teacher_term(t_tgt, pseudo, reward)
            if cfg.lambda_uda > 0:
                uda = self._uda_loss(batch, t_tgt.detach())
                logs["loss/uda"] = uda.detach()
                loss = loss + cfg.lambda_uda * uda
            return loss

        def teacher_source_loss() -> Tensor:
            loss = seg_loss(self.teacher(batch.src_img), batch.src_lbl, self.aux_weights)
            logs["loss/seg_src_teacher"] = loss.detach()
            return loss

        backward_first_then_last(self.teacher, teacher_target_loss, teacher_source_loss,
                                 lambda loss: self.backward(loss, self.t_opt))
        self.step(self.t_opt)
        logs.update({"mpl/ce_old": ce_old.detach(), "mpl/ce_new": ce_new.detach(), "mpl/reward_raw": raw,
                     "mpl/baseline": torch.tensor(baseline), "mpl/reward": reward})
        if self.scaling.enabled:
            logs["mpl/student_skipped"] = torch.tensor(float(not applied))
        return logs

    def _uda_loss(self, batch: UDABatch, t_tgt: Tensor) -> Tensor:
        """Teacher consistency: CE of the teacher on the FDA-stylized target against its own confident
        (>= uda_threshold) softmax on the plain target; masked pixels count as 0 in the mean (as UDA)."""
        probs = F.softmax(t_tgt, dim=1)  # (B, C, H, W), detached
        mask = (probs.max(dim=1).values >= self.cfg.uda_threshold).float()  # (B, H, W)
        strong = fda_source_to_target(batch.tgt_img, batch.src_img, self.cfg.uda_beta)  # (B, 3, H, W)
        log_q = F.log_softmax(upsample(self.teacher(strong)["out"], tuple(t_tgt.shape[-2:])), dim=1)
        return (-(probs * log_q).sum(dim=1) * mask).mean()

    def stateful(self) -> dict[str, Any]:
        adv = self.adversary.stateful() if self.adversary is not None else {}  # D and its optimizer
        return {**super().stateful(), "teacher": self.teacher_raw, "opt_teacher": self.t_opt,
                "reward_baseline": self.baseline, **adv}
