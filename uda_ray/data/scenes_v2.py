"""Benchmark v2's scene layouts: the street-scene distribution of uda_ray.data.scenes with a label-distribution
shift between the domains (camera height, class frequencies, object depths) and every class drawn at a scale a
128x64 network input resolves (poles, lights, signs, fences and two-wheelers about twice v1's thickness).
uda_ray.data.looks_v2 renders them; docs/benchmark.md explains each difference and why it is there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from uda_ray.data.labels import IGNORE
from uda_ray.data.scenes import (
    BICYCLE,
    BUS,
    CAR,
    FENCE,
    LIGHT,
    MOTORCYCLE,
    PERSON,
    POLE,
    RIDER,
    SIGN,
    SKY,
    TERRAIN,
    TRAIN,
    TRUCK,
    WALL,
    Draw,
    Fence,
    Skyline,
    _barrier,
    _Canvas,
    _person,
    _road,
    _tree,
    _vehicle,
    skyline_band,
)


@dataclass(frozen=True)
class Layout:
    """One domain's scene statistics: horizon row range (fraction of H: the camera height and pitch), mean
    object counts, per-image probabilities of the rarer classes, and the nearest depth objects start at."""

    horizon: tuple[float, float]
    cars: float
    people: float
    poles: float
    trees: float
    p_truck: float
    p_bus: float
    p_train: float
    p_two_wheeler: float
    p_barrier: float
    min_depth: float


# The game camera rides higher (more road, smaller far objects) through car-dominated streets; the real one is
# lower, in denser streets with more pedestrians, riders, two-wheelers and street furniture.
SOURCE_LAYOUT = Layout(horizon=(0.28, 0.40), cars=3.0, people=1.2, poles=1.5, trees=0.8, p_truck=0.5,
                       p_bus=0.4, p_train=0.3, p_two_wheeler=0.45, p_barrier=0.6, min_depth=0.15)
TARGET_LAYOUT = Layout(horizon=(0.40, 0.52), cars=2.2, people=2.4, poles=2.4, trees=1.0, p_truck=0.6,
                       p_bus=0.5, p_train=0.3, p_two_wheeler=0.8, p_barrier=0.7, min_depth=0.25)


def target_layout(shift: float = 1.0) -> Layout:
    """The camera's layout at `shift` in [0, 1] (`data.synthetic.layout_shift`): every statistic moved that far
    from the game's toward TARGET_LAYOUT; 1 is TARGET_LAYOUT itself, 0 the game's camera and streets."""
    if shift == 1.0:
        return TARGET_LAYOUT
    mix = lambda a, b: a + shift * (b - a)  # noqa: E731
    values = {f.name: getattr(SOURCE_LAYOUT, f.name) for f in dataclasses.fields(Layout)}
    for name, src in values.items():
        tgt = getattr(TARGET_LAYOUT, name)
        values[name] = tuple(map(mix, src, tgt)) if isinstance(src, tuple) else mix(src, tgt)
    return Layout(**values)


def _pole(c: _Canvas, x: float, yf: float, d: float) -> None:
    """A pole (>= 8 px wide) carrying a traffic light, a sign, or both (>= 12 px across)."""
    rng = c.rng
    h, w = d * rng.uniform(2.2, 3.2), max(8.0, 0.25 * d)
    c.rect(c.new(POLE), x - w / 2, yf - h, x + w / 2, yf)
    kind = rng.choice(3)  # 0 light, 1 sign, 2 both
    if kind != 1:
        lw, lh = max(12.0, 0.7 * d), max(20.0, 1.2 * d)
        c.rect(c.new(LIGHT), x - lw / 2, yf - h - lh * 0.2, x + lw / 2, yf - h + lh * 0.8)
        c.ellipse(c.new(LIGHT, shade=1.3), x, yf - h + lh * rng.choice([0.1, 0.3, 0.5]), lw / 3, lw / 3)
    if kind != 0:
        s, sy = max(14.0, 0.9 * d), yf - h * rng.uniform(0.5, 0.75)
        sign = c.new(SIGN)
        if rng.random() < 0.5:
            c.rect(sign, x - s / 2, sy - s / 2, x + s / 2, sy + s / 2)
        else:
            c.ellipse(sign, x, sy, s / 2, s / 2)


def _two_wheeler(c: _Canvas, cls: int, x: float, yf: float, d: float, ridden: bool) -> None:
    """A motorcycle (solid wheels, a body) or a bicycle (thick ring wheels, a frame), 1.6x v1's size."""
    d = 1.6 * d
    r, w = 0.24 * d, 1.0 * d
    part = c.new(cls)
    for wx in (x - w / 2 + r, x + w / 2 - r):
        c.ellipse(part, wx, yf - r, r, r, hole=0.0 if cls == MOTORCYCLE else 0.45)
    if cls == MOTORCYCLE:
        c.rect(c.new(cls, shade=0.7), x - w / 2 + r, yf - 2.5 * r, x + w / 2 - r, yf - 0.7 * r)
    else:
        t = max(4.0, 0.4 * r)
        c.rect(part, x - w / 2 + r, yf - 1.3 * r - t / 2, x + w / 2 - r, yf - 1.3 * r + t / 2)
        c.rect(part, x - t / 2, yf - 2.4 * r, x + t / 2, yf - r)
    if ridden:
        _person(c, RIDER, x, yf - 1.7 * r, 0.9 * d, seated=True)


# v2's fences: posts and rails each >= 6 px, so the 128x64 input resolves them
FENCE_V2 = Fence(step=(16.0, 0.6), post=(6.0, 0.22), rails=(0.05, 0.5), rail=(6.0, 0.2))


# v2's background band: wider blocks, bigger windows and trees than v1's (no thin barriers in front)
SKYLINE_V2 = Skyline(width=(0.1, 0.35), kinds=(0.65, 0.25, 0.1), top=(0.0, 0.7), window=(7, 12, 8, 13), margin=5,
                     tree=(4.0, 1.5))


def _objects(c: _Canvas, rng: np.random.Generator, lay: Layout) -> list[tuple[float, Draw, bool]]:
    """The scene's objects as (depth tt in [0, 1], draw function, on the road?); large vehicles stay far (they
    would fill the frame), thin and small classes come no farther than the layout's min_depth."""
    placed: list[tuple[float, Draw, bool]] = []
    near = lambda hi: rng.uniform(lay.min_depth, hi)  # noqa: E731
    for _ in range(rng.poisson(lay.cars)):
        placed.append((rng.uniform(0.15, 0.65), lambda x, y, d: _vehicle(c, CAR, x, y, d, "car"), True))
    for cls, kind, p in ((TRUCK, "truck", lay.p_truck), (BUS, "bus", lay.p_bus), (TRAIN, "train", lay.p_train)):
        if rng.random() < p:
            placed.append((rng.uniform(0.15, 0.5),
                           lambda x, y, d, cls=cls, kind=kind: _vehicle(c, cls, x, y, d, kind), True))
    for cls in (MOTORCYCLE, BICYCLE):
        if rng.random() < lay.p_two_wheeler:
            ridden = rng.random() < 0.8
            placed.append((near(0.85), lambda x, y, d, cls=cls, r=ridden: _two_wheeler(c, cls, x, y, d, r), True))
    for _ in range(rng.poisson(lay.people)):
        crossing = rng.random() < 0.2
        placed.append((near(0.95), lambda x, y, d: _person(c, PERSON, x, y, 1.5 * d), crossing))
    for _ in range(1 + rng.poisson(lay.poles)):
        placed.append((near(0.95), lambda x, y, d: _pole(c, x, y, d), False))
    for _ in range(rng.poisson(lay.trees)):
        placed.append((near(0.7), lambda x, y, d: _tree(c, x, y, d), False))
    for cls in (WALL, FENCE):
        if rng.random() < lay.p_barrier:
            placed.append((near(0.7), lambda x, y, d, cls=cls: _barrier(
                c, cls, x - 2.0 * d, x + 2.0 * d, y, max(24.0, 1.2 * d), FENCE_V2), False))
    if rng.random() < 0.25:  # unlabeled clutter (bins, boxes)
        col = tuple(rng.uniform(60, 200, 3))
        placed.append((near(0.8), lambda x, y, d: c.rect(
            c.new(IGNORE, color=col), x - 0.3 * d, y - 0.6 * d, x + 0.3 * d, y), False))
    return placed


def scene(rng: np.random.Generator, w: int, h: int, lay: Layout, ego: bool) -> tuple[_Canvas, float]:
    """Draw one street scene with the statistics `lay`, far to near; returns it and its horizon row."""
    c = _Canvas(w, h, rng)
    hy = h * rng.uniform(*lay.horizon)
    vx = w * rng.uniform(0.35, 0.65)
    c.rect(c.new(SKY), 0, 0, w, h)
    c.rect(c.new(TERRAIN), 0, int(np.ceil(hy)), w, h)
    skyline_band(c, rng, w, h, hy, SKYLINE_V2)
    ground = _road(c, rng, w, h, hy, vx)
    for tt, draw, on_road in sorted(_objects(c, rng, lay), key=lambda o: o[0]):
        yf = hy + tt * (h - hy)
        draw(ground.road_x(rng, tt) if on_road else ground.side_x(rng, tt), yf, max(yf - hy, 4.0))
    if ego:  # Cityscapes-like ego-vehicle hood at the bottom, unlabeled
        c.ellipse(c.new(IGNORE, color=(28, 28, 32)), w / 2, h * 1.2, 0.75 * w, 0.28 * h)
    return c, hy

