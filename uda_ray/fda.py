"""Fourier Domain Adaptation's style transfer (Yang & Soatto, "FDA: Fourier Domain Adaptation for Semantic
Segmentation", CVPR 2020): swap the low-frequency amplitude of a source image for a target image's.

What the original computes (https://github.com/YanchaoYang/FDA, `utils/__init__.py`, `FDA_source_to_target`):
the full, two-sided H x W spectrum of each image (`torch.rfft(x, signal_ndim=2, onesided=False)`: a real-input
FFT, but with all frequencies returned), the target's amplitude written into the four b x b corner blocks of the
source's (`low_freq_mutate`), the source phase kept, and `torch.irfft(..., onesided=False)` back. The corner
blocks hold the frequencies f_h, f_w in {0..b-1} and {-b..-1}, i.e. [-b, b-1]: a window that is not closed
under negation (it holds -b, not +b), so the mixed spectrum is not Hermitian. The inverse assumes it is: a
complex-to-real FFT reads only the columns f_w = 0..W//2 (PyTorch narrows a two-sided input to them) and takes
the negative-f_w half as their conjugates. So the target amplitude written into the two right-hand blocks is
discarded, and the window in effect is lopsided: rows -b..b-1 for f_w = 1..b-1, rows -(b-1)..b for their
mirrors f_w = -(b-1)..-1, nothing at |f_w| = b; the f_w = 0 column holds both signs of f_h, and of it only the
Hermitian part survives (at f_h = +-b: the mean of the source coefficient and the swapped one; that is what
torch's C2R transform computes on the CPU, what it does with a non-Hermitian input is up to the FFT library).
Nor is the result the real part of the full inverse. The asymmetry is the one reported in
https://github.com/YanchaoYang/FDA/issues/40 (which reads the spectrum as one-sided; it is two-sided).

Ours: the window |f_h| <= b, |f_w| <= b, centred on the zero frequency and closed under negation. Both amplitudes
of a real image are even and the kept source phase is odd, so the mixed spectrum stays Hermitian and its inverse
is real: nothing is dropped. `fda_reference` states it on the full complex spectrum (`torch.fft.fft2`, an
`fftshift`-centred window, the real part of `ifft2`, whose imaginary part is then only float rounding).

`fda_source_to_target` computes the same thing with a fraction of the work, and is equivalent, not an
approximation: the spectrum of a real image is Hermitian, so a real FFT along the width (`rfft`, columns
f_w = 0..W//2) holds all of it; since the mixed spectrum is Hermitian too, `irfft` (which rebuilds the negative
columns as conjugates) inverts it exactly. Only the columns with |f_w| <= b change, so the FFT along the height is
taken, edited and inverted on those b + 1 columns only. `tests/test_fda.py` checks it against `fda_reference`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_DIMS = (-2, -1)


def window_half_size(h: int, w: int, beta: float) -> int:
    """b = floor(min(H, W) * beta), as in the original code: one square window for both axes (the paper writes
    its mask as [-beta H : beta H, -beta W : beta W], a rectangle)."""
    return math.floor(min(h, w) * beta)


def low_freq_window(h: int, w: int, beta: float, device: torch.device | str = "cpu") -> Tensor:
    """(H, W) bool mask, in the `fftshift` layout, of the frequencies whose amplitude is swapped.

    After `fftshift` the zero frequency sits at (H // 2, W // 2) for even AND odd sizes, and shifted index i
    holds frequency i - H // 2. The window is rows H//2 - b .. H//2 + b and cols W//2 - b .. W//2 + b, i.e.
    all frequencies with |f_h| <= b and |f_w| <= b: a set closed under (f_h, f_w) -> (-f_h, -f_w). Since
    beta < 0.5 gives b < min(H, W) / 2, the window never reaches row -H/2 (the Nyquist row of an even size,
    the one frequency without a negated partner in the shifted layout). Both amplitudes of a real image are
    even and the kept source phase is odd, so the mixed spectrum stays Hermitian and its inverse real.
    """
    b = window_half_size(h, w, beta)
    rows = (torch.arange(h, device=device) - h // 2).abs() <= b  # (H,)
    cols = (torch.arange(w, device=device) - w // 2).abs() <= b  # (W,)
    return rows[:, None] & cols[None, :]


def mixed_spectrum(src: Tensor, tgt: Tensor, beta: float) -> Tensor:
    """The unshifted complex spectrum (B, 3, H, W) of the stylized source: the target's amplitude inside the
    window, the source's outside; the source's phase everywhere. src (B, 3, H, W), tgt (B or 1, 3, H, W)."""
    h, w = src.shape[-2:]
    fs = torch.fft.fftshift(torch.fft.fft2(src), dim=_DIMS)  # (B, 3, H, W) complex, zero freq centred
    ft = torch.fft.fftshift(torch.fft.fft2(tgt), dim=_DIMS)  # (B or 1, 3, H, W)
    win = low_freq_window(h, w, beta, src.device)  # (H, W)
    swapped = torch.polar(ft.abs(), fs.angle())  # target amplitude, source phase; broadcasts over B
    return torch.fft.ifftshift(torch.where(win, swapped, fs), dim=_DIMS)


def _check(src: Tensor, tgt: Tensor, beta: float) -> None:
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"FDA beta must be in [0, 0.5), got {beta}")
    if src.dim() != 4 or tgt.dim() != 4 or tgt.shape[0] not in (1, src.shape[0]):
        raise ValueError(f"FDA needs src (B, 3, H, W) and tgt (B or 1, 3, H, W), got {tuple(src.shape)} "
                         f"and {tuple(tgt.shape)}")


def _float_pair(src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(src.dtype, torch.float32)  # FFT in float32 at least (half in, half out)
    x, y = src.to(dtype), tgt.to(dtype)
    if y.shape[-2:] != x.shape[-2:]:
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x, y


def fda_source_to_target(src: Tensor, tgt: Tensor, beta: float) -> Tensor:
    """Stylize `src` (B, 3, H, W) toward `tgt` (B or 1, 3, H', W'); images in 0..255 (before normalization).

    The target is resized (bilinear) to the source size if needed. Returns (B, 3, H, W) in src's dtype, not
    clamped (the original feeds the unclamped result to the network). beta == 0 returns `src` itself.

    Equal to `fda_reference` up to float rounding: with X = rfft(x) along the width, the 2-D spectrum's
    columns 0..W//2 are fft(X) along the height; the window |f_h| <= b, |f_w| <= b meets them in columns
    0..b (the columns -b..-1 are their conjugates, which irfft restores), so only those b + 1 columns go
    through the height FFT, the amplitude swap and its inverse; every other column of X is returned as is.
    """
    _check(src, tgt, beta)
    if beta == 0.0:
        return src
    x, y = _float_pair(src, tgt)
    h, w = x.shape[-2:]
    b = window_half_size(h, w, beta)
    xs = torch.fft.rfft(x, dim=-1)  # (B, 3, H, W // 2 + 1) complex
    ys = torch.fft.fft(xs[..., : b + 1], dim=-2)  # (B, 3, H, b + 1): the 2-D spectrum's columns 0..b
    yt = torch.fft.fft(torch.fft.rfft(y, dim=-1)[..., : b + 1], dim=-2)  # (B or 1, 3, H, b + 1)
    rows = (torch.arange(h, device=x.device) + h // 2) % h - h // 2  # frequency of each unshifted row
    win = (rows.abs() <= b)[:, None]  # (H, 1): |f_h| <= b (every kept column has |f_w| <= b)
    ys = torch.where(win, torch.polar(yt.abs(), ys.angle()), ys)  # target amplitude, source phase
    xs = torch.cat([torch.fft.ifft(ys, dim=-2), xs[..., b + 1:]], dim=-1)
    return torch.fft.irfft(xs, n=w, dim=-1).to(src.dtype)


def fda_reference(src: Tensor, tgt: Tensor, beta: float) -> Tensor:
    """`fda_source_to_target` on the full complex spectrum (`mixed_spectrum`, real part of `ifft2`)."""
    _check(src, tgt, beta)
    if beta == 0.0:
        return src
    x, y = _float_pair(src, tgt)
    out = torch.fft.ifft2(mixed_spectrum(x, y, beta))  # (B, 3, H, W) complex, imaginary part ~ 0
    return out.real.to(src.dtype)
