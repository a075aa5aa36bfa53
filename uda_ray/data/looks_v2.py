"""Benchmark v2's two renderings of a uda_ray.data.scenes_v2 scene. The "game" source: saturated per-class
colours, clean procedural textures (tiles, bricks), a clear sky, fixed exposure, sharp edges. The "real" target:
other per-class colours (several per class: grey cars, white or blue signs), per-class grain instead of the
game's patterns, and per image a random exposure, colour temperature, tone curve, cast shadows, depth fog,
vignetting, blur, sensor noise and JPEG-like block compression. docs/benchmark.md says why each is there.
"""

from __future__ import annotations

import numpy as np

from uda_ray.data.labels import IGNORE
from uda_ray.data.scenes import ROAD, SIDEWALK, SKY, TERRAIN, _blur, _Canvas, _smooth_noise

C = np.float32
# Per class (train id order), the colours an instance draws from: the game's saturated ones ...
SOURCE_COLORS: list[list[tuple[int, int, int]]] = [
    [(70, 70, 95)], [(205, 140, 160)], [(175, 90, 90), (150, 150, 180)], [(240, 200, 140)], [(230, 120, 0)],
    [(150, 150, 150)], [(255, 190, 0)], [(255, 255, 0)], [(40, 190, 10)], [(150, 185, 60)], [(110, 175, 255)],
    [(255, 60, 80)], [(170, 40, 220)], [(0, 50, 245), (230, 30, 30), (240, 220, 20)], [(0, 220, 190)],
    [(0, 140, 110)], [(80, 235, 200)], [(235, 40, 220)], [(180, 30, 0)],
]
# ... and the real ones: muted, with class-dependent changes of hue and lightness (silver game poles, dark
# real ones) and other modes (cars silver, navy or red; signs white or blue), so that no single affine map
# takes one palette to the other, while the target classes stay apart from each other.
TARGET_COLORS: list[list[tuple[int, int, int]]] = [
    [(100, 100, 110)], [(172, 160, 148)], [(192, 165, 128), (140, 118, 150)], [(160, 162, 108)],
    [(150, 108, 58)], [(66, 68, 78)], [(178, 146, 28)], [(236, 236, 242), (40, 80, 178)],
    [(70, 106, 44)], [(148, 128, 84)], [(186, 206, 228)], [(196, 60, 110)], [(212, 92, 176)],
    [(204, 204, 210), (40, 54, 116), (170, 30, 44)], [(70, 134, 146)], [(214, 110, 40)], [(116, 172, 150)],
    [(108, 56, 156)], [(88, 40, 18)],
]
# target per-class grain: (relative amplitude, noise cell in pixels); vegetation and terrain rough, sky smooth
TARGET_GRAIN = [(0.08, 2), (0.10, 4), (0.12, 4), (0.10, 2), (0.05, 2), (0.05, 2), (0.05, 2), (0.03, 2),
                (0.30, 2), (0.20, 2), (0.04, 16), (0.10, 2), (0.10, 2), (0.06, 8), (0.08, 8), (0.06, 8),
                (0.06, 8), (0.08, 2), (0.08, 2), (0.0, 2)]


def target_colors(shift: float = 1.0) -> list[list[tuple[float, float, float]]]:
    """The target palette at `shift` in [0, 1] (`data.synthetic.colour_shift`): each target colour moved that far
    from its class's game colour (mode i from game mode i mod the game's count) toward TARGET_COLORS. 1 (the
    default) is TARGET_COLORS itself; 0 keeps the game's colours, leaving texture, lighting, tone and sensor."""
    if shift == 1.0:
        return TARGET_COLORS
    out = []
    for src, tgt in zip(SOURCE_COLORS, TARGET_COLORS):
        game = [np.array(s, C) for s in src]
        out.append([tuple(game[i % len(game)] + shift * (np.array(col, C) - game[i % len(game)]))
                    for i, col in enumerate(tgt)])
    return out


def _instance_colors(c: _Canvas, colors: list[list[tuple[int, int, int]]], jitter: float) -> np.ndarray:
    """(N, 3) colour per instance: one of its class's colours, times its shade, plus its jitter."""
    out = np.zeros((len(c.cls), 3), C)
    for k, (cls, col) in enumerate(zip(c.cls, c.color)):
        if col is not None:
            out[k] = col
        elif cls != IGNORE:
            opts = colors[cls]
            out[k] = opts[int(c.rng.integers(len(opts)))]
    return out * np.array(c.shade, C)[:, None] + np.stack(c.jitter).astype(C) * jitter


def _source_texture(lbl: np.ndarray) -> np.ndarray:
    """(H, W) multiplier: the game's clean patterns, sidewalk tiles and brick courses."""
    h, w = lbl.shape
    yy, xx = np.mgrid[0:h, 0:w]
    tex = np.ones((h, w), C)
    tiles = (yy % 8 == 0) | (xx % 8 == 0)
    tex[(lbl == SIDEWALK) & tiles] = 0.75
    bricks = (yy % 4 == 0) | ((xx + 4 * ((yy // 4) % 2)) % 8 == 0)
    tex[np.isin(lbl, (2, 3)) & bricks] = 0.85  # building, wall
    return tex


def render_source(c: _Canvas, hy: float) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 game image and (H, W) uint8 train-id label."""
    cls = np.array(c.cls, np.int64)
    lbl = np.where(cls == IGNORE, IGNORE, cls).astype(np.uint8)[c.inst]
    img = _instance_colors(c, SOURCE_COLORS, 1.0)[c.inst]  # (H, W, 3)
    img *= _source_texture(lbl)[..., None]
    h = lbl.shape[0]
    sky = (0.75 + 0.35 * np.clip(np.arange(h, dtype=C) / max(hy, 1.0), 0, 1))[:, None]  # darker zenith
    img[lbl == SKY] *= np.broadcast_to(sky, lbl.shape)[lbl == SKY][:, None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), lbl


def _depth_weight(c: _Canvas, lbl: np.ndarray, hy: float) -> np.ndarray:
    """(H, W) in [0, 1]: 1 at the horizon and beyond (sky, skyline), 0 at the bottom row. The ground by its
    own row, an object by its lowest row (where it stands)."""
    h, w = lbl.shape
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
    foot = np.zeros(len(c.cls), np.int64)
    np.maximum.at(foot, c.inst.ravel(), rows.ravel())
    row = np.where(np.isin(lbl, (ROAD, SIDEWALK, TERRAIN)), rows, foot[c.inst])
    near = np.clip((row + 0.5 - hy) / (h - hy), 0, 1)
    return np.where(lbl == SKY, 1.0, (1 - near) ** 1.5).astype(C)


def _dct_matrix(n: int = 8) -> np.ndarray:
    k = np.arange(n)
    m = np.cos(np.pi * (2 * k[None] + 1) * k[:, None] / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m.astype(C)


def _jpeg_like(img: np.ndarray, q: float) -> np.ndarray:
    """JPEG's losses without a codec (so the bytes do not depend on libjpeg): YCbCr, 2x2 chroma averaging,
    8x8 DCT blocks quantized with steps growing with frequency (luma q, chroma 2q)."""
    h, w, _ = img.shape
    ph, pw = -h % 8, -w % 8
    x = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge")
    m = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]], C)
    ycc = x @ m.T  # (H', W', 3)
    hh, ww = ycc.shape[:2]
    for ch in (1, 2):
        sub = ycc[..., ch].reshape(hh // 2, 2, ww // 2, 2).mean((1, 3))
        ycc[..., ch] = np.repeat(np.repeat(sub, 2, 0), 2, 1)
    d = _dct_matrix()
    steps = 1 + 0.6 * (np.arange(8)[:, None] + np.arange(8)[None])
    for ch, scale in ((0, 1.0), (1, 2.0), (2, 2.0)):
        blocks = ycc[..., ch].reshape(hh // 8, 8, ww // 8, 8)
        coef = np.einsum("ij,ajbk,lk->aibl", d, blocks, d)
        qs = (q * scale * steps).astype(C)[None, :, None, :]
        coef = np.rint(coef / qs) * qs
        ycc[..., ch] = np.einsum("ji,ajbk,kl->aibl", d, coef, d).reshape(hh, ww)
    return (ycc @ np.linalg.inv(m).T.astype(C))[:h, :w]


def _lighting(img: np.ndarray, c: _Canvas, lbl: np.ndarray, hy: float) -> np.ndarray:
    """Per image: cast shadows on everything below the horizon (sunny days), depth fog, exposure and colour
    temperature, a vignette."""
    rng = c.rng
    h, w = lbl.shape
    if rng.random() < 0.6:  # sunny: soft-edged shadow blobs of buildings and trees
        blobs = _smooth_noise(rng, w, h, 24)
        shadow = np.clip((blobs - 0.3) * 2.5, 0, 1) * (np.arange(h)[:, None] > hy)
        img = img * (1 - rng.uniform(0.35, 0.55) * shadow)[..., None]
    fog = rng.uniform(0.0, 0.6) * _depth_weight(c, lbl, hy)
    haze = np.array([200, 202, 205], C) * rng.uniform(0.8, 1.05)
    img = img * (1 - fog[..., None]) + haze * fog[..., None]
    k = rng.uniform(-0.15, 0.2)  # warm (> 0) or cool (< 0) light
    img = img * np.array([1 + k, 1.0, 1 - k], C) * rng.uniform(0.7, 1.2)
    yy, xx = np.mgrid[0:h, 0:w].astype(C)
    r2 = ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) * 2
    return img * (1 - rng.uniform(0.1, 0.35) * r2)[..., None]


def _tone(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A per-image tone curve: gamma, then an S-curve blended in."""
    x = np.clip(img / 255, 0, 1) ** rng.uniform(0.75, 1.35)
    s = rng.uniform(0.0, 0.8)
    return 255 * ((1 - s) * x + s * x * x * (3 - 2 * x))


def render_target(c: _Canvas, hy: float, colour_shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 camera image and (H, W) uint8 train-id label; `colour_shift`: see target_colors."""
    rng = c.rng
    cls = np.array(c.cls, np.int64)
    lbl = np.where(cls == IGNORE, IGNORE, cls).astype(np.uint8)[c.inst]
    h, w = lbl.shape
    img = _instance_colors(c, target_colors(colour_shift), 0.8)[c.inst]  # (H, W, 3)
    ids = np.minimum(lbl, 19)
    amp = np.array([a for a, _ in TARGET_GRAIN], C)[ids]
    grain = np.zeros((h, w), C)
    for cell in (2, 4, 8, 16):
        grain += np.where(np.array([s for _, s in TARGET_GRAIN])[ids] == cell, _smooth_noise(rng, w, h, cell), 0)
    img *= (1 + amp * grain)[..., None]
    img = _tone(_lighting(img, c, lbl, hy), rng)
    for _ in range(int(rng.integers(1, 3))):
        img = _blur(img)
    img = img + rng.normal(0, rng.uniform(2, 7), img.shape).astype(C)
    img = _jpeg_like(np.clip(img, 0, 255).astype(C), rng.uniform(3, 10))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), lbl
