"""Built-in synthetic domain-shift benchmark: procedural street scenes (uda_ray.data.scenes) written in the GTA5,
Cityscapes and SYNTHIA layouts, deterministically and atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from uda_ray.config import SYNTH_SHIFTS
from uda_ray.data import looks_v2, scenes_v2
from uda_ray.data.labels import TRAIN_TO_CITYSCAPES_ID, TRAIN_TO_SYNTHIA_ID
from uda_ray.data.scenes import render, scene
from uda_ray.errors import DatasetError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
VERSIONS = (1, 2)  # the scene distributions and renderings: 1 uda_ray.data.scenes, 2 scenes_v2 + looks_v2
TRAIN_CITIES = ("synthburg", "pixelton", "voxelheim")
VAL_CITIES = ("rastria", "meshville")

# train id -> label id written to disk; IGNORE -> 0 (unlabeled).

_CS_LUT = np.zeros(256, np.uint8)
_SYN_LUT = np.zeros(256, np.uint16)
for _t in range(19):
    _CS_LUT[_t] = TRAIN_TO_CITYSCAPES_ID[_t]
    _SYN_LUT[_t] = TRAIN_TO_SYNTHIA_ID[_t]


def write_png16(path: Path, arr: np.ndarray) -> None:
    """Write an (H, W, 3) uint16 array as a 16-bit RGB PNG (Pillow cannot)."""
    h, w, ch = arr.shape
    raw = np.zeros((h, 1 + w * ch * 2), np.uint8)  # filter byte 0 + big-endian samples per row
    raw[:, 1:] = arr.astype(">u2").view(np.uint8).reshape(h, -1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    idat = zlib.compress(raw.tobytes(), 6)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _sample(seed: int, stream: int, idx: int, size: tuple[int, int], real: bool, ego: bool, version: int = 1,
            colour_shift: float = 1.0, layout_shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, stream, idx])
    if version == 1:
        return render(scene(rng, size[0], size[1], ego), real, rng)
    canvas, hy = scenes_v2.scene(rng, size[0], size[1], scenes_v2.target_layout(layout_shift) if real else
                                 scenes_v2.SOURCE_LAYOUT, ego)
    if real:
        return looks_v2.render_target(canvas, hy, colour_shift)
    return looks_v2.render_source(canvas, hy)


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, compress_level=1)


def _write_all(tmp: Path, p: dict) -> None:
    seed, size, v = p["seed"], tuple(p["size"]), p.get("version", 1)
    shifts = {k: p.get(k, 1.0) for k in SYNTH_SHIFTS}
    for i in range(p["n_source"]):
        img, lbl = _sample(seed, 0, i, size, real=False, ego=False, version=v)
        _save(tmp / "gta5" / "images" / f"{i + 1:05d}.png", img)
        _save(tmp / "gta5" / "labels" / f"{i + 1:05d}.png", _CS_LUT[lbl])
    targets = (("train", p["n_target"], 1, TRAIN_CITIES), ("val", p["n_val"], 2, VAL_CITIES))
    for split, n, stream, cities in targets:
        for i in range(n):
            img, lbl = _sample(seed, stream, i, size, real=True, ego=True, version=v, **shifts)
            city = cities[i * len(cities) // n]
            stem = f"{city}/{city}_000000_{i:06d}"
            _save(tmp / "cityscapes" / "leftImg8bit" / split / f"{stem}_leftImg8bit.png", img)
            _save(tmp / "cityscapes" / "gtFine" / split / f"{stem}_gtFine_labelIds.png", _CS_LUT[lbl])
    if p["synthia"]:
        (tmp / "synthia" / "GT" / "LABELS").mkdir(parents=True)
        for i in range(p["n_source"]):
            img, lbl = _sample(seed, 3, i, size, real=False, ego=False, version=v)
            _save(tmp / "synthia" / "RGB" / f"{i:07d}.png", img)
            gt = np.zeros(lbl.shape + (3,), np.uint16)
            gt[..., 0] = _SYN_LUT[lbl]
            write_png16(tmp / "synthia" / "GT" / "LABELS" / f"{i:07d}.png", gt)


def _existing(out: Path, params: dict) -> Path | None:
    """`out` if it already holds this benchmark; None if absent or empty; DatasetError otherwise."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    try:
        have = json.loads((out / "MANIFEST.json").read_text())["params"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DatasetError(f"{out} exists but is not a synthetic benchmark (no valid MANIFEST.json)"
                           ) from None
    # a set written with synthia=True also serves a request without it
    same = {**have, "synthia": None} == {**params, "synthia": None}
    if not same or (params["synthia"] and not have.get("synthia")):
        raise DatasetError(f"synthetic benchmark at {out} was generated with {have}, not {params}")
    return out


def generate(out: Path, n_source: int = 200, n_target: int = 200, n_val: int = 50,
             size: tuple[int, int] = (256, 128), seed: int = 0, synthia: bool = False, version: int = 1,
             colour_shift: float = 1.0, layout_shift: float = 1.0) -> Path:
    """Write the benchmark under `out` (size is (W, H)) atomically; reuse it if already there. `version` picks
    the scenes and renderings (VERSIONS); version 1 writes the same bytes and manifest as before versions.
    `colour_shift` (version 2 only, in [0, 1]): how far the target's class colours move from the game's
    (uda_ray.data.looks_v2.target_colors); `layout_shift` (likewise): how far the target's camera and street
    statistics move from the game's (uda_ray.data.scenes_v2.target_layout); 1, their default, is left out of
    the manifest."""
    out = Path(out)
    params = {"n_source": int(n_source), "n_target": int(n_target), "n_val": int(n_val),
              "size": [int(size[0]), int(size[1])], "seed": int(seed), "synthia": bool(synthia)}
    if version not in VERSIONS:
        raise DatasetError(f"synthetic benchmark at {out}: version must be one of {VERSIONS}, got {version!r}")
    if version != 1:  # absent for version 1, so a version-1 folder written before versions is reused
        params["version"] = int(version)
    for name, value in zip(SYNTH_SHIFTS, (colour_shift, layout_shift)):
        if not 0.0 <= float(value) <= 1.0 or (version == 1 and value != 1.0):
            raise DatasetError(f"synthetic benchmark at {out}: {name} must be in [0, 1] and needs version 2, "
                               f"got {value!r} (version {version})")
        if value != 1.0:  # absent at its default, so version-2 folders written before it are reused
            params[name] = float(value)
    if min(params["n_source"], params["n_target"], params["n_val"], *params["size"]) < 1:
        raise DatasetError(f"synthetic benchmark at {out}: counts and size must be positive, got {params}")
    if _existing(out, params) is not None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    try:
        _write_all(tmp, params)
        manifest = {"format": "uda_ray synthetic benchmark", "version": FORMAT_VERSION, "params": params}
        (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: keep its copy if it matches
            if _existing(out, params) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("synthetic benchmark written to %s in %.1f s", out, time.perf_counter() - start)
    return out
