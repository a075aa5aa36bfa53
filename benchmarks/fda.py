"""FDA amplitude swap on a batch: uda_ray's half-spectrum version vs a per-image NumPy reference.

    python benchmarks/fda.py [--batch 8] [--height 512] [--width 1024] [--beta 0.01] [--repeats 5]

The reference is the straightforward implementation, one image at a time in NumPy (complex128 `fft2`, the
`fftshift`-centred window |f_h| <= b, |f_w| <= b, target amplitude with source phase, real part of `ifft2`):
the same math as `uda_ray.fda.fda_reference` (full complex spectrum, torch) and `fda_source_to_target`
(real FFT, only the b + 1 changed columns through the height FFT), which are also timed. Prints the times
(minimum of interleaved repetitions) and the speed-ups, and the largest difference between the outputs.
"""

from __future__ import annotations

import numpy as np
import torch
from _common import best_of, parse, parser, print_table

from uda_ray.fda import fda_reference, fda_source_to_target, window_half_size


def numpy_fda(src: np.ndarray, tgt: np.ndarray, beta: float) -> np.ndarray:
    """Per image: (B, 3, H, W) float -> (B, 3, H, W) float64."""
    out = np.empty(src.shape, dtype=np.float64)
    h, w = src.shape[-2:]
    b = window_half_size(h, w, beta)
    rows = np.abs(np.arange(h) - h // 2) <= b
    cols = np.abs(np.arange(w) - w // 2) <= b
    win = rows[:, None] & cols[None, :]
    for i in range(src.shape[0]):
        fs = np.fft.fftshift(np.fft.fft2(src[i]), axes=(-2, -1))
        ft = np.fft.fftshift(np.fft.fft2(tgt[i]), axes=(-2, -1))
        mixed = np.where(win, np.abs(ft) * np.exp(1j * np.angle(fs)), fs)
        out[i] = np.fft.ifft2(np.fft.ifftshift(mixed, axes=(-2, -1))).real
    return out


def main() -> None:
    ap = parser(__doc__, repeats=5, image=(8, 512, 1024))
    ap.add_argument("--beta", type=float, default=0.01)
    a = parse(ap)
    g = torch.Generator().manual_seed(0)
    src = torch.rand(a.batch, 3, a.height, a.width, generator=g) * 255
    tgt = torch.rand(a.batch, 3, a.height, a.width, generator=g) * 255
    src_np, tgt_np = src.numpy(), tgt.numpy()
    fast = fda_source_to_target(src, tgt, a.beta)
    diff_ref = (fast - fda_reference(src, tgt, a.beta)).abs().max().item()
    diff_np = np.abs(fast.numpy() - numpy_fda(src_np, tgt_np, a.beta)).max()
    print(f"FDA, batch {a.batch} at {a.height}x{a.width}, beta {a.beta}, float32, "
          f"{torch.get_num_threads()} torch threads; max |difference| to the references: "
          f"{diff_ref:.2e} (torch full spectrum), {diff_np:.2e} (NumPy)")
    best = best_of({
        "numpy per image (complex128 fft2)": lambda: numpy_fda(src_np, tgt_np, a.beta),
        "torch full spectrum (fda_reference)": lambda: fda_reference(src, tgt, a.beta),
        "uda_ray fda_source_to_target": lambda: fda_source_to_target(src, tgt, a.beta),
    }, repeats=a.repeats)
    print_table(best, "numpy per image (complex128 fft2)")


if __name__ == "__main__":
    main()
