"""The synthetic benchmark's scenes: one procedural street-scene distribution (road, sidewalk, skyline, cars,
people, two-wheelers, poles, trees, barriers) and its two renderings: a "game" source (flat saturated colours,
sharp edges) and a "real" target (another palette, colour temperature, illumination gradient, texture, blur,
sensor noise). uda_ray.data.synthetic writes them in the real datasets' layouts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from uda_ray.data.labels import IGNORE

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY,
 PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)

# "Real" (target) palette, one RGB per train id; muted, plausible colours.
REAL_PALETTE = np.array([
    (90, 88, 95), (165, 145, 155), (130, 100, 85), (185, 175, 140), (150, 120, 50), (60, 62, 70),
    (215, 160, 30), (225, 215, 60), (60, 110, 45), (150, 165, 90), (160, 195, 230), (185, 60, 70),
    (130, 50, 160), (40, 60, 150), (60, 150, 160), (30, 110, 90), (140, 190, 185), (210, 90, 200),
    (120, 40, 30)], dtype=np.float32)
# "Game" (source) palette: the real one with saturation x2, +15 brightness and a fixed per-class
# offset (uniform +-40), so the shift is partly global and partly class-specific.
GAME_PALETTE = np.array([
    (82, 85, 138), (204, 141, 157), (178, 85, 94), (254, 178, 164), (222, 116, 4), (102, 91, 77),
    (255, 178, 0), (255, 255, 0), (45, 189, 9), (150, 177, 68), (168, 218, 255), (255, 59, 84),
    (165, 37, 221), (0, 48, 245), (0, 224, 192), (0, 139, 107), (84, 234, 196), (234, 38, 222),
    (176, 27, 0)], dtype=np.float32)

Draw = Callable[[float, float, float], None]  # draws an object at (x, foot row, scale d)


class _Canvas:
    """An instance map: every drawn shape is an instance with a class, a shade and a colour jitter."""

    def __init__(self, w: int, h: int, rng: np.random.Generator):
        self.w, self.h, self.rng = w, h, rng
        self.inst = np.zeros((h, w), np.int32)
        self.cls: list[int] = [IGNORE]
        self.shade: list[float] = [1.0]
        self.jitter: list[np.ndarray] = [np.zeros(3)]
        self.color: list[tuple[float, ...] | None] = [(0.0, 0.0, 0.0)]

    def new(self, cls: int, shade: float | None = None, color: tuple[float, ...] | None = None) -> int:
        self.cls.append(cls)
        self.shade.append(self.rng.uniform(0.85, 1.12) if shade is None else shade)
        self.jitter.append(self.rng.uniform(-12, 12, 3))
        self.color.append(color)
        return len(self.cls) - 1

    def rect(self, i: int, x0: float, y0: float, x1: float, y1: float) -> None:
        xa, xb = max(round(x0), 0), min(round(x1), self.w)
        ya, yb = max(round(y0), 0), min(round(y1), self.h)
        if xa < xb and ya < yb:
            self.inst[ya:yb, xa:xb] = i

    def ellipse(self, i: int, cx: float, cy: float, rx: float, ry: float, hole: float = 0.0) -> None:
        """Filled ellipse; `hole` > 0 leaves an inner ellipse of that relative size (a ring)."""
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        xa, xb = max(int(cx - rx), 0), min(int(cx + rx) + 1, self.w)
        ya, yb = max(int(cy - ry), 0), min(int(cy + ry) + 1, self.h)
        if xa >= xb or ya >= yb:
            return
        yy, xx = np.ogrid[ya:yb, xa:xb]
        r2 = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2
        mask = (r2 <= 1.0) & (r2 >= hole * hole)
        self.inst[ya:yb, xa:xb][mask] = i

    def spans(self, i: int, y0: int, left: np.ndarray, right: np.ndarray) -> None:
        """Fill rows y0.. between per-row bounds [left, right)."""
        xs = np.arange(self.w)
        mask = (xs >= left[:, None]) & (xs < right[:, None])
        self.inst[y0:y0 + len(left)][mask] = i


def _vehicle(c: _Canvas, cls: int, x: float, yf: float, d: float, kind: str) -> None:
    """Cars, trucks, buses, trains; `d` = pixels between the foot row and the horizon (scale)."""
    rng = c.rng
    body = c.new(cls)
    dark = c.new(cls, shade=0.45)
    if kind == "car":
        w = d * (rng.uniform(1.2, 1.45) if rng.random() < 0.6 else rng.uniform(2.6, 3.2))
        c.rect(body, x - w / 2, yf - 0.6 * d, x + w / 2, yf - 0.12 * d)
        c.rect(body, x - 0.35 * w, yf - 1.05 * d, x + 0.35 * w, yf - 0.55 * d)
        c.rect(dark, x - 0.3 * w, yf - 1.0 * d, x + 0.3 * w, yf - 0.65 * d)  # windows
        for wx in (x - 0.33 * w, x + 0.33 * w):
            c.ellipse(dark, wx, yf - 0.13 * d, 0.13 * d, 0.13 * d)
        return
    if kind == "truck":
        w, h = d * rng.uniform(1.6, 1.9), d * rng.uniform(2.0, 2.4)
        c.rect(body, x - w / 2, yf - h, x + w / 2, yf - 0.15 * d)
        c.rect(c.new(cls, shade=0.75), x - w / 2, yf - h, x + w / 2, yf - h + 0.12 * d)
    elif kind == "bus":
        w, h = d * (rng.uniform(1.7, 1.9) if rng.random() < 0.4 else rng.uniform(4.0, 6.0)), 2.2 * d
        c.rect(body, x - w / 2, yf - h, x + w / 2, yf - 0.15 * d)
        c.rect(dark, x - w / 2 + 0.1 * d, yf - 0.85 * h, x + w / 2 - 0.1 * d, yf - 0.5 * h)
    else:  # train: long side view, a window band and a roof
        w, h = d * rng.uniform(6.0, 10.0), 2.6 * d
        c.rect(body, x - w / 2, yf - h, x + w / 2, yf - 0.1 * d)
        c.rect(c.new(cls, shade=0.7), x - w / 2, yf - h, x + w / 2, yf - 0.92 * h)
        for k in range(int(w / (0.9 * d)) + 1):
            wx = x - w / 2 + (k + 0.25) * 0.9 * d
            c.rect(dark, wx, yf - 0.8 * h, wx + 0.5 * d, yf - 0.55 * h)
        return
    for wx in (x - 0.35 * w, x + 0.35 * w):
        c.ellipse(dark, wx, yf - 0.15 * d, 0.16 * d, 0.16 * d)


def _person(c: _Canvas, cls: int, x: float, yf: float, d: float, seated: bool = False) -> None:
    h = d * c.rng.uniform(1.1, 1.35) * (0.62 if seated else 1.0)
    body = c.new(cls)
    legs = c.new(cls, shade=0.6)
    w = 0.28 * d
    if not seated:
        c.rect(legs, x - w / 2, yf - 0.48 * h, x - 0.04 * w, yf)
        c.rect(legs, x + 0.04 * w, yf - 0.48 * h, x + w / 2, yf)
        top = yf - 0.48 * h
    else:
        top = yf
    th = 0.52 * h if not seated else h * 0.8
    c.rect(body, x - w / 2, top - th * 0.8, x + w / 2, top)
    c.ellipse(c.new(cls, shade=1.15), x, top - th * 0.8 - 0.08 * d, 0.09 * d, 0.1 * d)


def _two_wheeler(c: _Canvas, cls: int, x: float, yf: float, d: float, ridden: bool) -> None:
    r = 0.2 * d if cls == MOTORCYCLE else 0.22 * d
    w = 0.85 * d
    part = c.new(cls)
    hole = 0.0 if cls == MOTORCYCLE else 0.65  # bicycle wheels are rings
    for wx in (x - w / 2 + r, x + w / 2 - r):
        c.ellipse(part, wx, yf - r, r, r, hole=hole)
    if cls == MOTORCYCLE:
        c.rect(c.new(cls, shade=0.7), x - w / 2 + r, yf - 2.4 * r, x + w / 2 - r, yf - 0.8 * r)
    else:
        c.rect(part, x - w / 2 + r, yf - 1.2 * r, x + w / 2 - r, yf - 0.9 * r)
        c.rect(part, x - 0.05 * d, yf - 2.2 * r, x + 0.04 * d, yf - r)
    if ridden:
        _person(c, RIDER, x, yf - 1.6 * r, d, seated=True)


def _pole(c: _Canvas, x: float, yf: float, d: float) -> None:
    rng = c.rng
    light = rng.random() < 0.6
    h, w = d * (rng.uniform(2.2, 3.0) if light else rng.uniform(3.0, 4.5)), max(1.2, 0.08 * d)
    c.rect(c.new(POLE), x - w / 2, yf - h, x + w / 2, yf)
    if light:  # traffic light: a housing with a lit lamp
        lw, lh = 0.35 * d, 0.85 * d
        c.rect(c.new(LIGHT), x - lw / 2, yf - h - lh * 0.3, x + lw / 2, yf - h + lh * 0.7)
        c.ellipse(c.new(LIGHT, shade=1.2), x, yf - h + lh * rng.choice([0.0, 0.2, 0.4]), 0.09 * d, 0.09 * d)
    if rng.random() < 0.5:  # traffic sign: a plate or a disc
        s, sy = 0.45 * d, yf - h * rng.uniform(0.55, 0.8)
        sign = c.new(SIGN)
        if rng.random() < 0.5:
            c.rect(sign, x - s / 2, sy - s / 2, x + s / 2, sy + s / 2)
        else:
            c.ellipse(sign, x, sy, s / 2, s / 2)


def _tree(c: _Canvas, x: float, yf: float, d: float) -> None:
    h = d * c.rng.uniform(3.0, 5.0)
    c.rect(c.new(VEGETATION, shade=0.6), x - 0.07 * d, yf - 0.5 * h, x + 0.07 * d, yf)
    r = 0.35 * h * c.rng.uniform(0.8, 1.1)
    c.ellipse(c.new(VEGETATION), x, yf - h + r, r, r * 1.05)


@dataclass(frozen=True)
class Fence:
    """A fence's shape: post spacing and post width, each max(pixels, fraction of the height); the rails'
    heights (fractions of the height from the top) and their thickness, max(pixels, fraction)."""

    step: tuple[float, float] = (2.0, 0.35)
    post: tuple[float, float] = (1.0, 0.12)
    rails: tuple[float, float] = (0.1, 0.55)
    rail: tuple[float, float] = (1.0, 0.12)


def _barrier(c: _Canvas, cls: int, x0: float, x1: float, yb: float, h: float, fence: Fence = Fence()) -> None:
    """A wall (solid, a coping) or a fence (posts and rails, see-through) standing on row `yb`."""
    i = c.new(cls)
    if cls == WALL:
        c.rect(i, x0, yb - h, x1, yb)
        c.rect(c.new(WALL, shade=0.75), x0, yb - h, x1, yb - 0.85 * h)
        return
    step, pw = max(fence.step[0], fence.step[1] * h), max(fence.post[0], fence.post[1] * h)
    for px in np.arange(x0, x1, step):
        c.rect(i, px, yb - h, px + pw, yb)
    for ry in fence.rails:
        c.rect(i, x0, yb - h + ry * h, x1, yb - h + ry * h + max(fence.rail[0], fence.rail[1] * h))


@dataclass
class _Ground:
    """The ground plane of a scene: per image row y0.. of the ground, t (0 at the horizon, 1 at the bottom),
    the road's left / right edges xl / xr and the sidewalk widths swl / swr beside them."""

    y0: int
    t: np.ndarray
    xl: np.ndarray
    xr: np.ndarray
    swl: np.ndarray
    swr: np.ndarray

    def road_x(self, rng: np.random.Generator, tt: float) -> float:
        """A column on the road at depth tt, away from its edges."""
        a, b = np.interp(tt, self.t, self.xl), np.interp(tt, self.t, self.xr)
        return rng.uniform(a + 0.1 * (b - a), b - 0.1 * (b - a))

    def side_x(self, rng: np.random.Generator, tt: float) -> float:
        """A column on the left or the right sidewalk at depth tt."""
        if rng.random() < 0.5:
            return rng.uniform(np.interp(tt, self.t, self.xl - self.swl), np.interp(tt, self.t, self.xl))
        return rng.uniform(np.interp(tt, self.t, self.xr), np.interp(tt, self.t, self.xr + self.swr))


@dataclass(frozen=True)
class Skyline:
    """The shape of the background band (fractions of the width / of the horizon's height; pixels)."""

    width: tuple[float, float] = (0.08, 0.3)  # a block's width
    kinds: tuple[float, float, float] = (0.6, 0.3, 0.1)  # P(building), P(tree), P(gap showing the sky)
    top: tuple[float, float] = (0.02, 0.8)  # a building's top
    window: tuple[float, float, float, float] = (5, 9, 6, 10)  # window spacing: x range, y range
    margin: float = 4  # no window this close to the block's right edge or the horizon
    tree: tuple[float, float] = (3.0, 1.6)  # a tree's diameter: max(minimum, width / divisor)


def skyline_band(c: _Canvas, rng: np.random.Generator, w: int, h: int, hy: float, p: Skyline) -> None:
    """The background band at the horizon: buildings (with windows), trees, gaps showing the sky."""
    x = -rng.uniform(0, 0.1) * w
    while x < w:
        bw = rng.uniform(*p.width) * w
        kind = rng.choice(3, p=list(p.kinds))
        if kind == 0:
            top, bot = rng.uniform(*p.top) * hy, hy + rng.uniform(0.0, 0.04) * h
            c.rect(c.new(BUILDING), x, top, x + bw, bot)
            win = c.new(BUILDING, shade=0.55)
            sx, sy = rng.uniform(*p.window[:2]), rng.uniform(*p.window[2:])
            for wy in np.arange(top + 3, hy - p.margin, sy):
                for wx in np.arange(x + 2, x + bw - p.margin, sx):
                    c.rect(win, wx, wy, wx + 0.5 * sx, wy + 0.5 * sy)
        elif kind == 1:
            _tree(c, x + bw / 2, hy + 1, max(p.tree[0], bw / p.tree[1]))
        x += bw * rng.uniform(0.85, 1.05)


def _skyline(c: _Canvas, rng: np.random.Generator, w: int, h: int, hy: float) -> None:
    """The background band (buildings, trees, sky) and, in front of it, a wall or a fence at random."""
    skyline_band(c, rng, w, h, hy, Skyline())
    for cls in (WALL, FENCE):
        if rng.random() < 0.5:
            x0 = rng.uniform(-0.1, 0.7) * w
            _barrier(c, cls, x0, x0 + rng.uniform(0.15, 0.5) * w, hy + 0.02 * h, rng.uniform(0.05, 0.12) * h)


def _road(c: _Canvas, rng: np.random.Generator, w: int, h: int, hy: float, vx: float) -> _Ground:
    """The ground: a road trapezoid towards the vanishing point, sidewalks beside it, a dashed centre line
    (the terrain beyond is already drawn)."""
    y0 = int(np.ceil(hy))
    t = (np.arange(y0, h) + 0.5 - hy) / (h - hy)  # 0 at the horizon, 1 at the bottom row
    xl, xr = vx + (rng.uniform(-0.2, 0.25) * w - vx) * t, vx + (rng.uniform(0.75, 1.2) * w - vx) * t
    swl, swr = rng.uniform(0.15, 0.45) * w * t, rng.uniform(0.15, 0.45) * w * t
    c.spans(c.new(SIDEWALK), y0, xl - swl, xl)
    c.spans(c.new(SIDEWALK), y0, xr, xr + swr)
    c.spans(c.new(ROAD), y0, xl, xr)
    xc, lw = (xl + xr) / 2, 0.012 * w * t + 0.3
    dash = (np.floor(10 * np.sqrt(t)) % 2 == 0)
    c.spans(c.new(ROAD, shade=1.6), y0, np.where(dash, xc - lw, 0), np.where(dash, xc + lw, 0))
    return _Ground(y0, t, xl, xr, swl, swr)


def _objects(c: _Canvas, rng: np.random.Generator) -> list[tuple[float, Draw, bool]]:
    """The scene's objects as (depth tt in [0, 1], draw function, on the road?): vehicles, two-wheelers,
    pedestrians (a few crossing), poles, trees, barriers, unlabeled clutter."""
    placed: list[tuple[float, Draw, bool]] = []
    for _ in range(rng.poisson(2.2)):
        placed.append((rng.uniform(0.08, 0.7), lambda x, y, d: _vehicle(c, CAR, x, y, d, "car"), True))
    for cls, kind, p in ((TRUCK, "truck", 0.35), (BUS, "bus", 0.3), (TRAIN, "train", 0.2)):
        if rng.random() < p:
            placed.append((rng.uniform(0.08, 0.45),
                           lambda x, y, d, cls=cls, kind=kind: _vehicle(c, cls, x, y, d, kind), True))
    for cls, p in ((MOTORCYCLE, 0.35), (BICYCLE, 0.4)):
        if rng.random() < p:
            ridden = rng.random() < 0.75
            placed.append((rng.uniform(0.1, 0.8),
                           lambda x, y, d, cls=cls, r=ridden: _two_wheeler(c, cls, x, y, d, r), True))
    for _ in range(rng.poisson(1.8)):  # pedestrians, a few of them crossing the road
        crossing = rng.random() < 0.2
        placed.append((rng.uniform(0.1, 0.9), lambda x, y, d: _person(c, PERSON, x, y, d), crossing))
    for _ in range(1 + rng.poisson(1.3)):
        placed.append((rng.uniform(0.1, 0.95), lambda x, y, d: _pole(c, x, y, d), False))
    for _ in range(rng.poisson(0.8)):
        placed.append((rng.uniform(0.1, 0.7), lambda x, y, d: _tree(c, x, y, d), False))
    if rng.random() < 0.25:
        placed.append((rng.uniform(0.2, 0.8), lambda x, y, d: _barrier(
            c, FENCE if rng.random() < 0.5 else WALL, x - 1.5 * d, x + 1.5 * d, y, 0.8 * d), False))
    if rng.random() < 0.25:  # unlabeled clutter (bins, boxes)
        col = tuple(rng.uniform(60, 200, 3))
        placed.append((rng.uniform(0.1, 0.8), lambda x, y, d: c.rect(
            c.new(IGNORE, color=col), x - 0.3 * d, y - 0.6 * d, x + 0.3 * d, y), False))
    return placed


def scene(rng: np.random.Generator, w: int, h: int, ego: bool) -> _Canvas:
    """Draw one street scene, far to near (near objects occlude far ones)."""
    c = _Canvas(w, h, rng)
    hy = h * rng.uniform(0.36, 0.5)  # horizon row
    vx = w * rng.uniform(0.35, 0.65)  # vanishing point column
    c.rect(c.new(SKY), 0, 0, w, h)
    c.rect(c.new(TERRAIN), 0, int(np.ceil(hy)), w, h)
    _skyline(c, rng, w, h, hy)
    ground = _road(c, rng, w, h, hy, vx)
    for tt, draw, on_road in sorted(_objects(c, rng), key=lambda o: o[0]):
        yf = hy + tt * (h - hy)
        draw(ground.road_x(rng, tt) if on_road else ground.side_x(rng, tt), yf, max(yf - hy, 4.0))
    if ego:  # Cityscapes-like ego-vehicle hood at the bottom, unlabeled
        c.ellipse(c.new(IGNORE, color=(28, 28, 32)), w / 2, h * 1.22, 0.75 * w, 0.3 * h)
    return c


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cell: int) -> np.ndarray:
    """(H, W) float32 ~N(0,1)-ish noise that varies over about `cell` pixels."""
    coarse = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BILINEAR))


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur of an (H, W, 3) float image, edge-padded."""
    p = np.pad(img, ((1, 1), (0, 0), (0, 0)), mode="edge")
    img = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    p = np.pad(img, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4


def render(c: _Canvas, real: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (H, W, 3) uint8 image and (H, W) uint8 train-id label (IGNORE = unlabeled)."""
    cls = np.array(c.cls, np.int64)
    palette = np.concatenate([REAL_PALETTE if real else GAME_PALETTE, np.zeros((1, 3), np.float32)])
    base = palette[np.minimum(cls, 19)]
    for k, col in enumerate(c.color):
        if col is not None:
            base[k] = col
    table = base * np.array(c.shade, np.float32)[:, None] + np.stack(c.jitter) * (0.8 if real else 1.0)
    lbl = np.where(cls == IGNORE, IGNORE, cls).astype(np.uint8)[c.inst]
    img = table.astype(np.float32)[c.inst]  # (H, W, 3)
    if real:
        h, w = c.inst.shape
        img *= (1 + 0.10 * _smooth_noise(rng, w, h, 4) + 0.08 * _smooth_noise(rng, w, h, 32))[..., None]
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = (np.cos(ang) * (xx / w - 0.5) + np.sin(ang) * (yy / h - 0.5)) * 2
        img *= (1 + rng.uniform(0.1, 0.3) * ramp)[..., None] * rng.uniform(0.85, 1.05)
        k = rng.uniform(0.04, 0.14)  # warm colour temperature
        img *= np.array([1 + k, 1.0, 1 - k], np.float32)
        for _ in range(int(rng.integers(1, 3))):
            img = _blur(img)
        img += rng.normal(0, rng.uniform(2, 6), img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), lbl
