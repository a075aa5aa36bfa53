"""CPSL stage 1 (Li et al., "Class-Balanced Pixel-Level Self-Labeling for Domain Adaptive Semantic
Segmentation", CVPR 2022; original code github.com/lslrh/CPSL, built on ProDA, Zhang et al. CVPR 2021).

One step, from a warm-up segmenter (`train.init_from`; copied into the EMA teacher at the first step):
- source CE;
- soft pseudo-labels (the frozen warm-up model's softmax, as the original's offline `lpsoft` files; or the EMA
  teacher's), rectified by the teacher's pixel-to-EMA-prototype similarity, CutMix'ed with source boxes;
  symmetric CE of the student on them;
- self-labeling: Sinkhorn-Knopp assignments of sampled teacher pixels (plus a FIFO queue), class marginal =
  the running pseudo-label class histogram (distribution alignment); CE of softmax(f . c / T) to them. As in
  the original, f are teacher features, so this loss trains the learnable prototypes c (at 5x lr);
- prototype consistency: KL between the teacher's (plain target) and the student's (photometric strong view)
  pixel-to-EMA-prototype distributions;
- queue pixel contrast of student features against the teacher-feature queue (steps without CutMix only).
Ours (documented): pixel features = L2-normalized projection head on the model's "feat" (EMA copy for the
teacher; the original used its 256-d decoder feature directly); the teacher runs in eval mode (exact under
DDP); prototypes start as the first class means of teacher features (the original precomputes them over the
target set, calc_prototype.py), unseen classes at random unit vectors; the queue is used while partially
filled (the original waits until full). Under DDP, sampled pixels are all-gathered (identical queue and
Sinkhorn on every worker), counts and class sums all-reduced, random draws made for the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_ray.data.labels import IGNORE
from uda_ray.errors import ConfigError
from uda_ray.losses import kl_distill, symmetric_ce
from uda_ray.methods.base import Method, UDABatch, backward_first_then_last, seg_loss, upsample
from uda_ray.methods.blocks import (
    GeneratorState,
    all_gather_cat,
    all_reduce_,
    ema_update,
    feature_channels,
    frozen_copy,
    global_rand,
    photometric,
    projection_head,
    world_rank,
)
from uda_ray.training.optim import OptimConfig

MIN_PIXELS = 10  # a class mean needs >= 10 pixels (ProDA's calculate_mean_vector)


@dataclass(frozen=True)
class CPSLConfig:  # sources: the original's parser_train.py and README stage-1 command
    ema: float = 0.999  # EMA teacher and EMA prototypes (hard-coded 0.999)
    proj_dim: int = 256  # pixel feature size (the original's 256-d decoder feature)
    temperature: float = 0.08  # --temperature: cosine / T for prototype softmaxes and the contrast
    sinkhorn_eps: float = 0.05  # --epsilon
    sinkhorn_iters: int = 3  # --sinkhorn_iterations
    pixels_per_image: int = 256  # --fbs: teacher pixels per image for Sinkhorn / queue, anchors for contrast
    lambda_sl: float = 0.1  # --SL_lambda
    lambda_proto: float = 5.0  # --proto_consistW 5 in the README (parser default 1)
    sce_alpha: float = 0.1  # --rce_alpha (--rce on in the README); alpha=1, beta=0 gives plain CE
    sce_beta: float = 1.0  # --rce_beta
    queue_size: int = 65536  # --queue_length
    lambda_contrast: float = 1e-3  # --contrast_lambda
    cutmix_p: float = 0.5  # hard-coded `random.random() < 0.5`
    pl_threshold: float = 0.0  # --train_thred: rectified confidence below it -> 255 (0: keep all)
    proto_lr_mult: float = 5.0  # the prototypes' lr = 5 x lr (the original's optimizer groups)
    soft_labels: str = "warmup"  # "warmup": frozen copy of the initial model; "teacher": the EMA teacher
    seed: int = 0  # the method's generator (CutMix, strong view, pixel sampling, unseen prototypes)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"method_cfg.ema must be in [0, 1), got {self.ema}")
        for name in ("proj_dim", "sinkhorn_iters", "pixels_per_image", "queue_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"method_cfg.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("temperature", "sinkhorn_eps", "proto_lr_mult"):
            if not getattr(self, name) > 0.0:
                raise ConfigError(f"method_cfg.{name} must be > 0, got {getattr(self, name)}")
        for name in ("lambda_sl", "lambda_proto", "sce_alpha", "sce_beta", "lambda_contrast"):
            if not getattr(self, name) >= 0.0:
                raise ConfigError(f"method_cfg.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("cutmix_p", "pl_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"method_cfg.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.soft_labels not in ("warmup", "teacher"):
            raise ConfigError(f"method_cfg.soft_labels must be 'warmup' or 'teacher', "
                              f"got '{self.soft_labels}'")


# -- pure pieces -----------------------------------------------------------------------------------
@torch.no_grad()
def sinkhorn(scores: Tensor, eps: float, iters: int, class_marginal: Tensor) -> Tensor:
    """Sinkhorn-Knopp with distribution alignment (SwAV's solver with CPSL's class marginal).

    scores (N, C) -> Q (N, C): Q ~ exp(scores / eps), rescaled so that each row (pixel) sums to 1 and the
    class totals Q.sum(0) / N approach class_marginal (C,) (exact in the limit; the last scaling is the
    pixels', as in the original). In float32 whatever the scores' dtype: under fp16 autocast the first total
    (N * C terms up to 1) overflows float16's 65504 and every assignment becomes NaN; bfloat16 totals keep 8 bits.
    """
    scores = scores.float()
    q = torch.exp((scores - scores.max()) / eps).t()  # (C, N); the shift cancels in the normalizations
    n = q.shape[1]
    marginal = (class_marginal / class_marginal.sum()).to(q)[:, None]  # (C, 1)
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(1, keepdim=True).clamp_min(1e-30) * marginal  # class c's total -> marginal[c]
        q = q / q.sum(0, keepdim=True).clamp_min(1e-30) / n  # each pixel's total -> 1 / N
    return (q * n).t()


def proto_scores(z: Tensor, protos: Tensor) -> Tensor:
    """Cosine similarities: z (B, D, h, w) L2-normalized, protos (C, D) -> (B, C, h, w)."""
    return torch.einsum("bdhw,cd->bchw", z, F.normalize(protos, dim=1))


def rectify(soft: Tensor, z: Tensor, protos: Tensor, temperature: float) -> Tensor:
    """Pseudo-label rectification (ProDA / CPSL): soft (B, C, h, w) pseudo-label probabilities times the
    prototype weights softmax_c(z . c / T), renormalized over C -> (B, C, h, w) probabilities."""
    rect = F.softmax(proto_scores(z, protos) / temperature, dim=1) * soft
    return rect / rect.sum(1, keepdim=True).clamp_min(1e-12)


def hard_labels(probs: Tensor, threshold: float) -> Tensor:
    """(B, C, ...) -> (B, ...) argmax, 255 where the max probability is below threshold."""
    conf, lbl = probs.max(1)
    return lbl.masked_fill(conf < threshold, IGNORE)


def queue_contrastive_loss(anchors: Tensor, labels: Tensor, queue: Tensor, queue_lbl: Tensor,
                           temperature: float) -> Tensor:
    """Pixel contrast against a queue (the original's `contrastive`): each positive against all negatives.

    anchors (N, D), queue (M, D) L2-normalized; labels (N,), queue_lbl (M,) with 255 ignored. Per anchor:
    -mean_{p in pos} log(e^{l_p} / (e^{l_p} + sum_{n in neg} e^{l_n})), l = a . q / T. Anchors without a
    positive are skipped (the original counts them as 0 in the mean); 0 (with a gradient) if none has one.
    """
    keep, qkeep = labels != IGNORE, queue_lbl != IGNORE
    a, la, qf, ql = anchors[keep], labels[keep], queue[qkeep], queue_lbl[qkeep]
    pos = (la[:, None] == ql[None, :]).float()  # (N, M)
    n_pos = pos.sum(1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return anchors.sum() * 0.0
    logits = a @ qf.t() / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()  # (N, M)
    exp = logits.exp()
    neg = (exp * (1.0 - pos)).sum(1, keepdim=True)  # (N, 1)
    log_prob = logits - torch.log(exp + neg)
    return -((pos * log_prob).sum(1)[has_pos] / n_pos[has_pos]).mean()


def cutmix_box(h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box of half the image area with a random aspect ratio, inside the image (the
    original's rand_bbox, from French et al.'s semi-supervised CutMix: area 0.5, height share 0.5 ** U)."""
    y_share = 0.5 ** float(torch.rand((), generator=gen))  # in [0.5, 1]
    bh, bw = max(1, round(h * y_share)), max(1, round(w * 0.5 / y_share))
    y0 = int(torch.randint(0, h - bh + 1, (), generator=gen))
    x0 = int(torch.randint(0, w - bw + 1, (), generator=gen))
    return y0, y0 + bh, x0, x0 + bw


def paste_box(dst: Tensor, src: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    """dst with src's box pasted: images (B, 3, H, W) or labels (B, H, W)."""
    y0, y1, x0, x1 = box
    out = dst.clone()
    out[..., y0:y1, x0:x1] = src[..., y0:y1, x0:x1]
    return out


def take(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, K', h, w), idx (B, K) flat pixel indices -> (B, K, K')."""
    return x.flatten(2).gather(2, idx[:, None].expand(-1, x.shape[1], -1)).transpose(1, 2)


# -- stateful pieces -------------------------------------------------------------------------------
class Prototypes(nn.Module):
    """Learnable class prototypes (C, D) (trained by the self-labeling loss, as the original), their EMA,
    which classes have been initialized, the running pseudo-label class histogram (Sinkhorn's marginal)."""

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(init.clone())
        self.register_buffer("ema", init.clone())
        self.register_buffer("seen", torch.zeros(init.shape[0], dtype=torch.bool))
        self.register_buffer("class_counts", torch.zeros(init.shape[0], dtype=torch.float64))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))  # teacher copied from student

    def forward(self, z: Tensor) -> Tensor:
        """z (N, D) L2-normalized -> cosine scores (N, C)."""
        return z @ F.normalize(self.weight, dim=1).t()


class FeatureQueue(nn.Module):
    """FIFO ring buffer of teacher pixels: features (Q, D), normalized logits (Q, C), labels (Q,)."""

    def __init__(self, size: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("feat", torch.zeros(size, dim))
        self.register_buffer("logit", torch.zeros(size, num_classes))
        self.register_buffer("label", torch.full((size,), IGNORE, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def push(self, feat: Tensor, logit: Tensor, label: Tensor) -> None:
        size = self.feat.shape[0]
        feat, logit, label = feat[-size:], logit[-size:], label[-size:]  # (n, ...) newest last
        idx = (int(self.ptr) + torch.arange(feat.shape[0], device=feat.device)) % size
        self.feat[idx], self.logit[idx] = feat.to(self.feat.dtype), logit.to(self.logit.dtype)  # float32 under amp
        self.label[idx] = label
        self.ptr.fill_((int(self.ptr) + feat.shape[0]) % size)
        self.count.fill_(min(int(self.count) + feat.shape[0], size))

    def filled(self) -> tuple[Tensor, Tensor, Tensor]:
        n = int(self.count)
        return self.feat[:n], self.logit[:n], self.label[:n]  # a ring fills from index 0


@dataclass
class TeacherView:
    """What the teacher gives one step: logits (B, C, h, w), L2-normalized features z (B, D, h, w), hard
    pseudo-labels at the logits' size (B, h, w) and at the input size (B, H, W), and (h, w)."""

    logits: Tensor
    z: Tensor
    pl_small: Tensor
    pl: Tensor
    size: tuple[int, int]


class CPSL(Method):
    """CPSL stage 1: rectified, CutMix'ed pseudo-labels + Sinkhorn self-labeling + prototype consistency +
    queue contrast, with an EMA teacher."""

    Config = CPSLConfig
    uses_target = True

    def __init__(self, model: nn.Module, cfg: CPSLConfig, optim: OptimConfig, **kwargs: Any) -> None:
        super().__init__(model, cfg, optim, **kwargs)
        c, d = self.num_classes, cfg.proj_dim
        self.rng = GeneratorState(cfg.seed)
        self.head_raw = projection_head(feature_channels(self.model_raw, self.device), d).to(self.device)
        self.head = self.wrap(self.head_raw)
        init = F.normalize(torch.randn(c, d, generator=self.rng.gen), dim=1)  # replaced when a class is seen
        self.proto_raw = Prototypes(init).to(self.device)
        self.proto = self.wrap(self.proto_raw)
        # the head beside the classifier (10x lr); the prototypes at the original's 5x
        groups = ((list(self.head_raw.parameters()), 10.0), ([self.proto_raw.weight], cfg.proto_lr_mult))
        for params, mult in groups:
            lr = mult * optim.lr
            self.opt.add_param_group({"params": params, "lr": lr, "initial_lr": lr,
                                      "poly_power": optim.poly_power, "poly_horizon": optim.poly_horizon})
        self.teacher_raw = frozen_copy(self.model_raw)
        self.head_ema = frozen_copy(self.head_raw)
        self.warmup_raw = frozen_copy(self.model_raw) if cfg.soft_labels == "warmup" else None
        self.queue = FeatureQueue(cfg.queue_size, d, c).to(self.device)

    def _start(self) -> None:
        """First step: the teacher (and warm-up copy) take the student's weights (init_from is loaded)."""
        self.teacher_raw.load_state_dict(self.model_raw.state_dict())
        self.head_ema.load_state_dict(self.head_raw.state_dict())
        if self.warmup_raw is not None:
            self.warmup_raw.load_state_dict(self.model_raw.state_dict())
        self.proto_raw.started.fill_(True)

    @staticmethod
    def _embed(head: nn.Module, feat: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, F, h', w') model features -> (B, D, h, w) L2-normalized pixel features at the logits' size."""
        z = head(feat)
        if tuple(z.shape[-2:]) != size:
            z = F.interpolate(z, size=size, mode="bilinear", align_corners=True)
        return F.normalize(z, dim=1)

    @torch.no_grad()
    def _update_stats(self, soft: Tensor, z: Tensor) -> None:
        """Global class histogram of the soft labels' argmax (Sinkhorn's marginal; the original's offline
        class_distribution.npy) and, for classes not yet seen, prototypes = mean teacher feature. In float32
        under `train.amp` too: float16 counts are exact only up to 2048 and overflow at 65504 (a class can cover
        more pixels than that in one global batch), and autocast would run the matmul of the sums in float16."""
        p = self.proto_raw
        onehot = F.one_hot(soft.argmax(1).flatten(), self.num_classes).float()  # (N, C)
        counts = all_reduce_(onehot.sum(0))  # (C,)
        p.class_counts += counts.double()
        if bool(p.seen.all()):
            return
        with torch.autocast(z.device.type, enabled=False):
            sums = all_reduce_(onehot.t() @ z.float().permute(0, 2, 3, 1).flatten(0, 2))  # (C, D)
        new = ~p.seen & (counts >= MIN_PIXELS)
        if bool(new.any()):
            means = F.normalize(sums[new] / counts[new, None], dim=1).to(p.weight.dtype)  # float32 under amp
            p.weight.data[new], p.ema[new] = means, means
            p.seen |= new

    @torch.no_grad()
    def _sinkhorn_targets(self, z_all: Tensor, lg_all: Tensor, b: int) -> tuple[Tensor, Tensor]:
        """Assignments of this worker's sampled pixels from Sinkhorn over queue + all workers' pixels, scored
        by prototype cosine (z_all (G, K, D)) and by the normalized teacher logits (lg_all (G, K, C))."""
        cfg, rank = self.cfg, world_rank()[1]
        marginal = self.proto_raw.class_counts / self.proto_raw.class_counts.sum()
        q_feat, q_logit, _ = self.queue.filled()
        protos = F.normalize(self.proto_raw.weight, dim=1)  # the original scores its queue un-normalized
        g, k = z_all.shape[:2]
        out = []
        for scores in (torch.cat([q_feat, z_all.flatten(0, 1)]) @ protos.t(),
                       torch.cat([q_logit, lg_all.flatten(0, 1)])):  # (M + G * K, C) each
            q = sinkhorn(scores, cfg.sinkhorn_eps, cfg.sinkhorn_iters, marginal)[-g * k:]  # (G * K, C)
            out.append(q.view(g, k, -1)[rank * b:(rank + 1) * b].flatten(0, 1))  # (B * K, C)
        return out[0], out[1]

    @torch.no_grad()
    def _teacher_view(self, tgt_img: Tensor) -> TeacherView:
        """The teacher on the plain (weak) target, in eval mode: its logits and features, the soft labels
        (warm-up model or teacher) rectified by the EMA prototypes, their hard labels at both resolutions."""
        cfg = self.cfg
        t_out = self.teacher_raw(tgt_img)
        logits = t_out["out"]  # (B, C, h, w)
        size = (logits.shape[-2], logits.shape[-1])
        z = self._embed(self.head_ema, t_out["feat"], size)  # (B, D, h, w)
        soft = logits if self.warmup_raw is None else self.warmup_raw(tgt_img)["out"]
        soft = F.softmax(upsample(soft, size), dim=1)  # (B, C, h, w)
        self._update_stats(soft, z)
        rect = rectify(soft, z, self.proto_raw.ema, cfg.temperature)  # (B, C, h, w)
        pl_small = hard_labels(rect, cfg.pl_threshold)  # (B, h, w): queue and contrast labels
        pl = hard_labels(upsample(rect, tuple(tgt_img.shape[-2:])), cfg.pl_threshold)  # (B, H, W): CE labels
        return TeacherView(logits, z, pl_small, pl, size)

    def _cutmix(self, batch: UDABatch, pl: Tensor) -> tuple[Tensor, Tensor, bool]:
        """With p = cutmix_p (one draw per step, as the original): a source box pasted into the target image
        and its labels into the pseudo-labels. Returns (target input, its labels, mixed?)."""
        gen = self.rng.gen
        mix = bool(torch.rand((), generator=gen) < self.cfg.cutmix_p)
        if not mix:
            return batch.tgt_img, pl, False
        box = cutmix_box(*batch.tgt_img.shape[-2:], gen)
        return paste_box(batch.tgt_img, batch.src_img, box), paste_box(pl, batch.src_lbl, box), True

    def _sample_pixels(self, t: TeacherView) -> Tensor:
        """(B, K) random pixel indices at the logits' resolution, drawn for the global batch."""
        b, n = t.logits.shape[0], t.size[0] * t.size[1]
        k = min(self.cfg.pixels_per_image, n)
        return global_rand(self.rng.gen, b, n).topk(k, dim=1).indices.to(t.logits.device)

    @torch.no_grad()
    def _self_labeling_targets(self, t: TeacherView, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Sinkhorn assignments of this worker's sampled teacher pixels (all workers' pixels and the queue take
        part); the sampled pixels then enter the queue. Returns (q_feat, q_logit), each (B * K, C)."""
        lg_all = all_gather_cat(take(F.normalize(t.logits, dim=1), idx))  # (G, K, C)
        z_all = all_gather_cat(take(t.z, idx))  # (G, K, D)
        lb_all = all_gather_cat(t.pl_small.flatten(1).gather(1, idx))  # (G, K)
        q_feat, q_logit = self._sinkhorn_targets(z_all, lg_all, t.logits.shape[0])
        self.queue.push(z_all.flatten(0, 1), lg_all.flatten(0, 1), lb_all.flatten())
        return q_feat, q_logit

    def _cts_term(self, out: dict[str, Any], pl: Tensor, b: int, logs: dict[str, Tensor]) -> Tensor:
        """Symmetric CE of every head (aux weighted) on the (CutMix'ed) pseudo-labels (B, H, W)."""
        if not bool((pl != IGNORE).any()):  # every pixel below pl_threshold: nothing to learn (mean would be NaN)
            return 0.0 * out["out"].sum()
        cfg, size = self.cfg, tuple(pl.shape[-2:])
        heads = zip((1.0, *self.aux_weights), [out["out"], *(out.get("aux") or [])])
        cts = sum(w * symmetric_ce(upsample(lg[:b], size), pl, cfg.sce_alpha, cfg.sce_beta) for w, lg in heads)
        logs["loss/cts"] = cts.detach()
        return cts

    def _proto_consistency_term(self, z_strong: Tensor, t: TeacherView, logs: dict[str, Tensor]) -> Tensor:
        """KL between the teacher's and the student's (strong view) pixel-to-EMA-prototype distributions; the
        original averages its KL over classes too (mean over (B, C, h, w)): weight lambda_proto / C."""
        ema, tau = self.proto_raw.ema, self.cfg.temperature
        cons = kl_distill(proto_scores(z_strong, ema) / tau, F.softmax(proto_scores(t.z, ema) / tau, 1))
        logs["loss/proto_consist"] = cons.detach()
        return self.cfg.lambda_proto / self.num_classes * cons

    def _self_labeling_term(self, t: TeacherView, idx: Tensor, q: tuple[Tensor, Tensor],
                            logs: dict[str, Tensor]) -> Tensor:
        """CE of softmax(f . c / T) of the sampled TEACHER features to their Sinkhorn assignments: as in the
        original, this trains the learnable prototypes c."""
        logp = F.log_softmax(self.proto(take(t.z, idx).flatten(0, 1)) / self.cfg.temperature, dim=1)  # (B*K, C)
        sl = -(q[0] * logp).sum(1).mean() - (q[1] * logp).sum(1).mean()
        logs["loss/sl"] = sl.detach()
        return self.cfg.lambda_sl * sl

    def _contrast_term(self, z_tgt: Tensor, t: TeacherView, idx_c: Tensor, logs: dict[str, Tensor]) -> Tensor:
        """Pixel contrast of student features against the teacher-feature queue, per image then averaged over
        the images (exact under DDP)."""
        anchors = take(z_tgt, idx_c)  # (B, K, D)
        labels = t.pl_small.flatten(1).gather(1, idx_c)  # (B, K)
        qf, _, ql = self.queue.filled()
        con = torch.stack([queue_contrastive_loss(anchors[i], labels[i], qf, ql, self.cfg.temperature)
                           for i in range(len(anchors))]).mean()
        logs["loss/contrast"] = con.detach()
        return self.cfg.lambda_contrast * con

    @torch.no_grad()
    def _ema_updates(self) -> None:
        """Teacher, its projection head and the EMA prototypes follow the student."""
        rate = self.cfg.ema
        ema_update(self.teacher_raw, self.model_raw, rate)
        ema_update(self.head_ema, self.head_raw, rate)
        self.proto_raw.ema.mul_(rate).add_(self.proto_raw.weight, alpha=1.0 - rate)

    def train_step(self, batch: UDABatch, step: int) -> dict[str, Tensor]:
        """Logged (unweighted): loss/seg_src, loss/cts (symmetric CE on rectified pseudo-labels), loss/sl,
        loss/proto_consist (per-pixel KL), loss/contrast (steps without CutMix), cpsl/cutmix, cpsl/queue."""
        cfg, b = self.cfg, batch.tgt_img.shape[0]
        if not bool(self.proto_raw.started):
            self._start()
        self.model.train()
        self.head.train()
        self.opt.zero_grad(set_to_none=True)
        t = self._teacher_view(batch.tgt_img)
        tgt_in, pl, mix = self._cutmix(batch, t.pl)
        strong = photometric(batch.tgt_img, global_rand(self.rng.gen, b, 5).to(batch.tgt_img.device))  # (B, 3, H, W)
        idx = self._sample_pixels(t)  # (B, K) teacher pixels for Sinkhorn and the queue
        q = self._self_labeling_targets(t, idx)
        idx_c = None if mix else self._sample_pixels(t)  # contrast anchors
        logs: dict[str, Tensor] = {"cpsl/cutmix": torch.tensor(float(mix)),
                                   "cpsl/queue": self.queue.count.detach().float().cpu()}

        def target_loss() -> Tensor:
            out = self.model(torch.cat([tgt_in, strong]))  # (2B, ...): the CutMix'ed target, the strong view
            z = self._embed(self.head, out["feat"], t.size)  # (2B, D, h, w)
            loss = 0.0 * z.sum()  # the head always receives a gradient (DDP)
            loss = loss + self._cts_term(out, pl, b, logs)
            if cfg.lambda_proto > 0:
                loss = loss + self._proto_consistency_term(z[b:], t, logs)
            if cfg.lambda_sl > 0:
                loss = loss + self._self_labeling_term(t, idx, q, logs)
            if idx_c is not None and cfg.lambda_contrast > 0:
                loss = loss + self._contrast_term(z[:b], t, idx_c, logs)
            return loss

        def source_loss() -> Tensor:
            loss = seg_loss(self.model(batch.src_img), batch.src_lbl, self.aux_weights)
            logs["loss/seg_src"] = loss.detach()
            return loss

        backward_first_then_last(self.model, target_loss, source_loss, self.backward)
        self.step()
        self._ema_updates()
        return logs

    def stateful(self) -> dict[str, Any]:
        state = {**super().stateful(), "teacher": self.teacher_raw, "head": self.head_raw,
                 "head_ema": self.head_ema, "prototypes": self.proto_raw, "queue": self.queue,
                 "rng": self.rng}
        if self.warmup_raw is not None:
            state["warmup"] = self.warmup_raw
        return state
