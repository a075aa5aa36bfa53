"""Write a PNG grid of synthetic benchmark samples: per row one scene pair, source image | source label |
target image | target label, for benchmark v1 and v2 (docs/benchmark.md); and print v2's per-class pixel
frequencies in each domain.

    python benchmarks/benchmark_figure.py [--out docs/figures/synthetic_benchmark.png] [--rows 4] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from uda_ray.data.labels import CLASSES, IGNORE
from uda_ray.data.synthetic import _sample
from uda_ray.results.figures import CITYSCAPES_PALETTE

SIZE = (256, 128)  # (W, H) the shipped experiments generate
LUT = np.zeros((256, 3), np.uint8)
LUT[:19] = CITYSCAPES_PALETTE
LUT[IGNORE] = 0


def _row(version: int, seed: int, i: int) -> np.ndarray:
    """(H, 4W + 3 gaps, 3): source image, its label, target image, its label (the first train images)."""
    src, src_lbl = _sample(seed, 0, i, SIZE, real=False, ego=False, version=version)
    tgt, tgt_lbl = _sample(seed, 1, i, SIZE, real=True, ego=True, version=version)
    gap = np.full((SIZE[1], 4, 3), 255, np.uint8)
    return np.concatenate([src, gap, LUT[src_lbl], gap, tgt, gap, LUT[tgt_lbl]], axis=1)


def _frequencies(version: int, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class fraction of labeled pixels over n source and n target train scenes."""
    out = []
    for stream, real in ((0, False), (1, True)):
        counts = np.zeros(256, np.int64)
        for i in range(n):
            counts += np.bincount(_sample(seed, stream, i, SIZE, real, real, version)[1].ravel(), minlength=256)
        out.append(counts[:19] / counts[:19].sum())
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/figures/synthetic_benchmark.png")
    ap.add_argument("--rows", type=int, default=4, help="scene pairs per version")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--freq-images", type=int, default=50, help="scenes per domain for the class frequencies")
    a = ap.parse_args()
    band = np.full((10, 4 * SIZE[0] + 12, 3), 255, np.uint8)
    parts = []
    for version in (2, 1):
        for i in range(a.rows):
            parts += [_row(version, a.seed, i), band[:4]]
        parts.append(np.zeros_like(band))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(parts[:-1])).save(a.out)
    print(f"wrote {a.out}: rows 1-{a.rows} v2, then {a.rows} rows v1 (source | label | target | label)")
    src, tgt = _frequencies(2, a.seed, a.freq_images)
    print(f"v2 labeled-pixel share (%) over {a.freq_images} scenes per domain: class source target")
    for k, name in enumerate(CLASSES):
        print(f"  {name:14s} {100 * src[k]:6.2f} {100 * tgt[k]:6.2f}")


if __name__ == "__main__":
    main()
