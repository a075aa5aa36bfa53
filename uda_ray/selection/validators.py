"""Label-free validators: scores of a model's predictions on unlabeled target data (pure functions, no Ray).

Each takes softmax predictions `probs` of shape (N, C) — rows are pixels — and returns a float. Their use
for model selection in unsupervised domain adaptation, and how well each tracks target accuracy, is studied
by Saito et al., "Tune it the right way: unsupervised validation of domain adaptation via soft neighborhood
density", ICCV 2021, and Musgrave et al., "Three new validators and a large-scale benchmark ranking for
unsupervised domain adaptation", 2022.

    mean_entropy       mean prediction entropy / log C, in [0, 1]; lower = more confident
    information_max    entropy of the mean prediction minus mean entropy, both / log C; higher = confident
                       and diverse (Shi & Sha, ICML 2012; the IM validator of Musgrave et al.)
    snd                soft neighbourhood density (Saito et al.): mean entropy of each sample's softmax
                       over its cosine similarities to the others / temperature (0.05, as in the paper);
                       higher = denser neighbourhoods
    bnm                nuclear norm of the (N, C) prediction matrix / N (Cui et al., "Towards
                       discriminability and diversity: batch nuclear-norm maximization under label
                       insufficient situations", CVPR 2020); higher = confident and diverse

SND and BNM depend on N: compare them only between evaluations of the same sample size (uda_ray samples a
fixed, seeded number of pixels per held-out image, see `pixel_sample`).
"""

from __future__ import annotations

import math

import torch

SND_TEMPERATURE = 0.05  # Saito et al. 2021, section 4
_EPS = 1e-12


def _entropy_rows(p: torch.Tensor) -> torch.Tensor:
    return -(p * (p + _EPS).log()).sum(-1)


def mean_entropy(probs: torch.Tensor) -> float:
    """Mean over rows of H(p) / log C."""
    p = probs.double()
    return float(_entropy_rows(p).mean() / math.log(p.shape[1]))


def information_max(probs: torch.Tensor) -> float:
    """H(mean_i p_i) / log C - mean_i H(p_i) / log C."""
    p = probs.double()
    return float((_entropy_rows(p.mean(0)) - _entropy_rows(p).mean()) / math.log(p.shape[1]))


def snd(probs: torch.Tensor, temperature: float = SND_TEMPERATURE) -> float:
    """Soft neighbourhood density: rows L2-normalized, S = X X^T / temperature with the diagonal excluded,
    softmax over each row's neighbours, entropy of each row (nats), averaged. Needs N >= 2."""
    x = torch.nn.functional.normalize(probs.double(), dim=1)
    n = x.shape[0]
    if n < 2:
        raise ValueError("snd needs at least two samples")
    sim = x @ x.T / temperature
    sim.fill_diagonal_(float("-inf"))  # a sample is not its own neighbour
    return float(_entropy_rows(sim.softmax(1)).mean())


def bnm(probs: torch.Tensor) -> float:
    """Batch nuclear norm: sum of the singular values of the (N, C) matrix, divided by N."""
    p = probs.double()
    return float(torch.linalg.svdvals(p).sum() / p.shape[0])


class ValidatorAccumulator:
    """Streams (B, C, h, w) softmax maps of held-out target images: entropy and IM over every pixel
    (running sums), SND and BNM on a seeded sample of `pixels_per_image` pixels of each image.

    Under DDP each rank sees a shard of the images: `reduce()` sums the running sums over ranks and gathers
    the pixel samples (in image order), so every rank computes the same values as one process would."""

    def __init__(self, num_classes: int, pixels_per_image: int = 64, seed: int = 0) -> None:
        self.c, self.k, self.seed = num_classes, pixels_per_image, seed
        self.ent_sum = 0.0
        self.prob_sum = torch.zeros(num_classes, dtype=torch.float64)
        self.count = 0
        self.samples: list[tuple[int, torch.Tensor]] = []  # (image index, (k, C))

    def update(self, probs: torch.Tensor, indices: list[int]) -> None:
        """probs: (B, C, h, w) softmax; indices: each image's index in the held-out split."""
        p = probs.detach().double().permute(0, 2, 3, 1).reshape(probs.shape[0], -1, probs.shape[1]).cpu()
        self.ent_sum += float(_entropy_rows(p).sum())
        self.prob_sum += p.sum((0, 1))
        self.count += p.shape[0] * p.shape[1]
        for img, idx in zip(p, indices):
            self.samples.append((int(idx), img[pixel_sample(img.shape[0], self.k, self.seed, int(idx))]))

    def reduce(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        t = torch.cat([torch.tensor([self.ent_sum, float(self.count)], dtype=torch.float64), self.prob_sum])
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (t, self.samples))
        t = sum(g[0] for g in gathered)
        self.ent_sum, self.count, self.prob_sum = float(t[0]), int(t[1]), t[2:]
        self.samples = [s for g in gathered for s in g[1]]

    def compute(self) -> dict[str, float]:
        """uv/entropy, uv/im (all pixels), uv/snd, uv/bnm (the pixel sample); {} when nothing was seen."""
        if not self.count:
            return {}
        log_c = math.log(self.c)
        mean_ent = self.ent_sum / self.count / log_c
        out = {"uv/entropy": mean_ent,
               "uv/im": float(_entropy_rows(self.prob_sum / self.count)) / log_c - mean_ent}
        sample = torch.cat([s for _, s in sorted(self.samples, key=lambda s: s[0])])
        if sample.shape[0] >= 2:
            out["uv/snd"] = snd(sample)
            out["uv/bnm"] = bnm(sample)
        return out


def pixel_sample(n_pixels: int, k: int, seed: int, index: int) -> torch.Tensor:
    """k distinct pixel indices of image `index` (all of them when k >= n_pixels), a function of
    (seed, index) only: the same pixels at every evaluation, on any number of workers."""
    if k >= n_pixels:
        return torch.arange(n_pixels)
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) & 0x7FFFFFFF)
    return torch.randperm(n_pixels, generator=g)[:k]
