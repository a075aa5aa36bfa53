"""Validators that estimate target accuracy from more than one softmax: ATC, DEV, MixVal, EnsV, adapted to pixels
(pure functions, no Ray; the evaluation pass that feeds them is uda_ray.training.evaluate, EnsV's pool pass
uda_ray.selection.ensv).

    atc      Garg et al., "Leveraging Unlabeled Data to Predict Out-of-Distribution Performance", ICLR 2022:
             a threshold t on a confidence score, fitted on labeled source-validation pixels so that the
             fraction of pixels scoring above t equals their accuracy; the predicted target pixel accuracy is
             the fraction of held-out target pixels above t. Score: negative entropy (ATC-NE, the paper's
             better variant). Higher is better.
    dev      You et al., "Towards Accurate Model Selection in Deep Unsupervised Domain Adaptation", ICML 2019:
             the source-validation loss importance-weighted by a domain classifier's density ratio
             w = p_t / p_s, with a control variate. Lower is better.
    mixval   Hu et al., "Mixed Samples as Probes for Unsupervised Model Selection in Domain Adaptation",
             NeurIPS 2023: the model's accuracy on mixes of two held-out target images against the dominant
             image's pseudo-label, on pixels where the two pseudo-labels agree (intra-class probes) and where
             they differ (inter-class probes). Higher is better.
    ensv     Hu et al., "Towards Reliable Model Selection for Unsupervised Domain Adaptation: An Empirical
             Study and A Certified Baseline", NeurIPS 2024 Datasets & Benchmarks: each candidate's agreement
             (pixel accuracy) with the argmax of the pool's mean softmax. Needs the whole pool. Higher is better.
"""

from __future__ import annotations

import math

import torch

MIX_LAMBDA = 0.55  # MixVal's mix ratio: the dominant image keeps 55 % (Hu et al. 2023)
DEV_MAX_DIM = 256  # DEV's features are projected (seeded Gaussian) to at most this many dimensions
_CLIP = 1e-6  # the domain classifier's probabilities are clipped to [clip, 1 - clip]: finite weights


def neg_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(N, C) softmax -> (N,) -H(p) in nats: ATC's confidence score."""
    p = probs.double()
    return (p * (p + 1e-12).log()).sum(-1)


def atc_threshold(src_scores: torch.Tensor, src_correct: torch.Tensor) -> float:
    """t with mean(src_scores > t) = k / n, k = round(n * accuracy): the (n - k)-th smallest score (k = n: -inf,
    every pixel above; k = 0: the largest score, none above). Ties at t count as below."""
    n = src_scores.numel()
    if n == 0:
        raise ValueError("atc needs labeled source pixels")
    k = int(round(float(src_correct.double().mean()) * n))
    if k >= n:
        return -math.inf
    return float(src_scores.double().sort().values[n - k - 1])


def atc(src_scores: torch.Tensor, src_correct: torch.Tensor, tgt_scores: torch.Tensor) -> float:
    """Predicted target pixel accuracy: the fraction of target scores strictly above atc_threshold."""
    return float((tgt_scores.double() > atc_threshold(src_scores, src_correct)).double().mean())


def dev_from_weights(loss: torch.Tensor, w: torch.Tensor) -> float:
    """DEV = mean(L) + eta * mean(w) - eta with L = w * loss (the weighted loss of each source pixel) and the
    control variate eta = -Cov(L, w) / Var(w), both with n - 1 (You et al. 2019, Algorithm 1; eta = 0 when w is
    constant to rounding)."""
    loss, w = loss.double(), w.double()
    weighted = w * loss
    var = w.var(unbiased=True) if w.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    if var <= 1e-12 * float(w.mean()) ** 2:  # constant up to rounding: the control variate is 0/0
        return float(weighted.mean())
    cov = ((weighted - weighted.mean()) * (w - w.mean())).sum() / (w.numel() - 1)
    eta = -cov / var
    return float(weighted.mean() + eta * w.mean() - eta)


def domain_weights(src_feat: torch.Tensor, tgt_feat: torch.Tensor, seed: int = 0, iters: int = 25) -> torch.Tensor:
    """(n_s,) density ratios w = p_t(x) / p_s(x) of the source pixels, from an L2-regularized logistic regression
    (penalty 0.5 |beta|^2, the bias unpenalized: scikit-learn's default C = 1) that tells source (0) from target (1)
    features, fitted by Newton's method in float64: w = (n_s / n_t) * d / (1 - d), d = P(target | x) clipped.
    Features are standardized over both sets; more than DEV_MAX_DIM dimensions are first projected by a Gaussian
    matrix seeded by `seed`. Deterministic: the same inputs give the same weights."""
    x = torch.cat([src_feat, tgt_feat]).double()
    n_s, n_t = src_feat.shape[0], tgt_feat.shape[0]
    if x.shape[1] > DEV_MAX_DIM:
        g = torch.Generator().manual_seed(seed)
        x = x @ (torch.randn(x.shape[1], DEV_MAX_DIM, generator=g, dtype=torch.float64) / math.sqrt(DEV_MAX_DIM))
    x = (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-8)
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)  # bias column
    y = torch.cat([torch.zeros(n_s), torch.ones(n_t)]).double()
    reg = torch.ones(x.shape[1], dtype=torch.float64)
    reg[-1] = 0.0  # the bias is not penalized
    beta = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(x @ beta)
        grad = x.T @ (p - y) + reg * beta
        hess = (x * (p * (1 - p)).unsqueeze(1)).T @ x + torch.diag(reg) + 1e-9 * torch.eye(x.shape[1])
        step = torch.linalg.solve(hess, grad)
        beta = beta - step
        if float(step.abs().max()) < 1e-10:
            break
    d = torch.sigmoid(x[:n_s] @ beta).clamp(_CLIP, 1 - _CLIP)
    return (n_s / n_t) * d / (1 - d)


def dev(src_feat: torch.Tensor, src_loss: torch.Tensor, tgt_feat: torch.Tensor, seed: int = 0) -> float:
    """DEV of source pixels (features (n_s, D), losses (n_s,)) against target pixels (features (n_t, D))."""
    return dev_from_weights(src_loss, domain_weights(src_feat, tgt_feat, seed))


def mix(img: torch.Tensor, partner: torch.Tensor, lam: float = MIX_LAMBDA) -> torch.Tensor:
    """lam * img + (1 - lam) * partner: img is the dominant sample."""
    return lam * img.float() + (1 - lam) * partner.float()


def mixval_counts(pred_mix: torch.Tensor, label: torch.Tensor, partner_label: torch.Tensor) -> torch.Tensor:
    """Per-pixel MixVal probes: pred_mix, label (the dominant image's pseudo-label), partner_label, all (..., h, w)
    int. Returns [intra correct, intra pixels, inter correct, inter pixels] as float64: intra-class pixels are
    those where the two pseudo-labels agree, inter-class where they differ; correct = pred_mix == label."""
    intra = label == partner_label
    ok = pred_mix == label
    return torch.tensor([float((ok & intra).sum()), float(intra.sum()), float((ok & ~intra).sum()),
                         float((~intra).sum())], dtype=torch.float64)


def mixval_scores(counts: torch.Tensor) -> dict[str, float]:
    """uv/mixval_intra, uv/mixval_inter (accuracies; absent without such pixels) and uv/mixval: their mean
    (whichever exist)."""
    out = {}
    if counts[1] > 0:
        out["uv/mixval_intra"] = float(counts[0] / counts[1])
    if counts[3] > 0:
        out["uv/mixval_inter"] = float(counts[2] / counts[3])
    if out:
        out["uv/mixval"] = sum(out.values()) / len(out)
    return out


def ensv(member_preds: torch.Tensor, probs_sum: torch.Tensor) -> torch.Tensor:
    """EnsV of each pool member: member_preds (M, ...) int argmax maps, probs_sum (C, ...) the sum (or mean) of
    the members' softmax maps. Returns (M,) float64: the fraction of pixels where a member's argmax equals the
    ensemble's (ties in the ensemble: the lowest class index, torch's argmax)."""
    ens = probs_sum.argmax(0)
    return (member_preds == ens.unsqueeze(0)).reshape(member_preds.shape[0], -1).double().mean(1)
