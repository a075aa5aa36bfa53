"""Pure loss functions. Shapes in comments; `logits` are pre-softmax, `probs` post-softmax."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from uda_ray.data.labels import IGNORE


def _no_half(x: Tensor) -> Tensor:
    return x.float() if x.dtype == torch.float16 else x


def self_information(probs: Tensor) -> Tensor:
    """ADVENT's weighted self-information map I(p) = -p * log2(p + 1e-30) / log2(C).

    probs (B, C, H, W) -> (B, C, H, W); summed over C it is the normalized entropy in [0, 1]. float16 probs
    (softmax under fp16 autocast on CPU) are computed in float32: float16 rounds the 1e-30 guard away, and a
    probability that underflowed to 0 gave 0 * log(0) = NaN.
    """
    probs = _no_half(probs)
    c = probs.shape[1]
    return -probs * torch.log2(probs + 1e-30) / math.log2(c)


def entropy_loss(probs: Tensor) -> Tensor:
    """ADVENT MinEnt loss: sum over (c, h, w) of I(p), averaged over pixels (and batch) -> in [0, 1]."""
    b, _, h, w = probs.shape
    return self_information(probs).sum() / (b * h * w)


def charbonnier_entropy(probs: Tensor, eta: float = 2.0) -> Tensor:
    """FDA's robust entropy: ent = -sum_c p log p / ln(C) per pixel; loss = mean((ent^2 + 1e-8) ** eta)."""
    probs = _no_half(probs)  # as in self_information
    c = probs.shape[1]
    ent = -(probs * torch.log(probs + 1e-30)).sum(1) / math.log(c)  # (B, H, W)
    return ((ent**2 + 1e-8) ** eta).mean()


def bce_domain(d_logits: Tensor, domain: float) -> Tensor:
    """BCE with logits against a constant domain label (source = 0, target = 1). d_logits (B, 1, h, w)."""
    return F.binary_cross_entropy_with_logits(d_logits, torch.full_like(d_logits, float(domain)))


def supcon_loss(feat_a: Tensor, feat_b: Tensor, lbl_a: Tensor, lbl_b: Tensor, temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) between two sets of pixel embeddings.

    feat_a (N, D), feat_b (M, D) L2-normalized here; lbl_a (N,), lbl_b (M,) pseudo-labels (255 ignored).
    Anchors: rows of feat_a; candidates: rows of feat_b; positives = same label. Anchors with no positive
    are skipped (the reference divides by zero there and returns NaN). Returns 0 if no anchor has one.
    """
    keep_a, keep_b = lbl_a != IGNORE, lbl_b != IGNORE
    fa, fb = F.normalize(feat_a[keep_a], dim=1), F.normalize(feat_b[keep_b], dim=1)
    la, lb = lbl_a[keep_a], lbl_b[keep_b]
    if fa.numel() == 0 or fb.numel() == 0:
        return feat_a.sum() * 0.0
    logits = fa @ fb.t() / temperature  # (N, M)
    pos = (la[:, None] == lb[None, :]).float()  # (N, M)
    n_pos = pos.sum(1)
    has_pos = n_pos > 0
    if not has_pos.any():
        return feat_a.sum() * 0.0
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    mean_log_prob_pos = (pos * log_prob).sum(1)[has_pos] / n_pos[has_pos]
    return -mean_log_prob_pos.mean()


def symmetric_ce(logits: Tensor, target: Tensor, alpha: float = 0.1, beta: float = 1.0) -> Tensor:
    """Symmetric CE (Wang et al. 2019): alpha * CE(p, y) + beta * RCE, RCE = -sum_c p_c log y_c with y clamped to
    [1e-4, 1], i.e. log 0 := log(1e-4) ~ -9.21 (the original code's clamp; the paper's analysis writes A = -4).

    logits (B, C, H, W), target (B, H, W) with 255 ignored.
    """
    keep = target != IGNORE
    if not keep.any():  # every pixel ignored: CE's mean over zero pixels would be NaN
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    probs = F.softmax(logits, 1).clamp(min=1e-7, max=1.0).permute(0, 2, 3, 1)[keep]  # (N, C)
    one_hot = F.one_hot(target[keep], logits.shape[1]).float().clamp(min=1e-4, max=1.0)
    rce = -(probs * torch.log(one_hot)).sum(1).mean()
    return alpha * ce + beta * rce


def kl_distill(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """KL(teacher || student) per pixel, averaged. F.kl_div must take LOG-probabilities as input: CPSL's
    original passes probabilities (a known bug, the logged loss goes negative); fixed here."""
    log_p = F.log_softmax(student_logits, 1)
    return F.kl_div(log_p, teacher_probs, reduction="none").sum(1).mean()
