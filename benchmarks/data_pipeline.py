"""Training data pipeline on GTA5-sized PNG pairs: uda_ray's dataset vs a PIL baseline.

    python benchmarks/data_pipeline.py [--images 4] [--repeats 3] [--dir DIR]

Writes `--images` GTA5-sized (1914x1052) RGB PNGs with 8-bit label PNGs in the GTA5 layout (into a temporary
folder, or `--dir`), then times one sample (decode + resize to 1280x720 + random 1024x512 crop + random
flip, image and label), one thread, as one DataLoader worker process does it:

- baseline: PIL in the style of torchvision's segmentation reference (references/segmentation: PIL decode,
  PIL resize/crop/flip, PILToTensor, float32 image and int64 label);
- uda_ray, decoding every time (`data.cache_dir` unset): uint8 image and label out (the loop converts on
  its device);
- uda_ray with the decoded-once cache (`data.cache_dir`): the resized uint8 arrays memory-mapped, only the
  crop read and copied. Its one-time cost (decoding and writing each image once) is printed too.

Per sample times are the minimum over the repetitions of the mean over the images.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import best_of, parse, parser, print_table
from PIL import Image

from uda_ray.data.datasets import GTA5
from uda_ray.data.labels import CITYSCAPES_LUT
from uda_ray.data.transforms import PairTransform

SIZE, RESIZE, CROP = (1914, 1052), (1280, 720), (1024, 512)  # (W, H)


def write_pairs(root: Path, n: int) -> None:
    """GTA5-like PNGs: smooth colour fields with texture noise (a few MB each, like GTA5's ~4.7 MB)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    w, h = SIZE
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(1, n + 1):
        base = np.stack([128 + 100 * np.sin(xx / (50 + 20 * c + i) + yy / (80 + 10 * c)) for c in range(3)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        lbl = (((xx // 97 + yy // 61 + i) % 34).astype(np.uint8))  # Cityscapes label ids
        Image.fromarray(img).save(root / "images" / f"{i:05d}.png")
        Image.fromarray(lbl).save(root / "labels" / f"{i:05d}.png")


def baseline_sample(img_path: Path, lbl_path: Path, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision-reference style, PIL throughout: decode, resize, crop, flip, PILToTensor, float/int64."""
    img = Image.open(img_path).convert("RGB")
    lbl = Image.open(lbl_path)
    img = img.resize(RESIZE, Image.Resampling.BILINEAR)
    lbl = lbl.resize(RESIZE, Image.Resampling.NEAREST)
    cw, ch = CROP
    top, left = int(rng.integers(0, RESIZE[1] - ch + 1)), int(rng.integers(0, RESIZE[0] - cw + 1))
    img, lbl = img.crop((left, top, left + cw, top + ch)), lbl.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img, lbl = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), lbl.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).to(torch.float32)  # PILToTensor + ToDtype(float32)
    y = torch.from_numpy(CITYSCAPES_LUT[np.array(lbl)]).to(torch.int64)
    return x, y


def main() -> None:
    ap = parser(__doc__, repeats=3)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the PNGs (default: a temporary folder)")
    a = parse(ap)
    torch.set_num_threads(1)  # one DataLoader worker's view
    with tempfile.TemporaryDirectory(prefix="uda_ray_bench_") as tmp:
        root = (a.dir or Path(tmp)) / "gta5"
        write_pairs(root, a.images)
        mb = np.mean([p.stat().st_size for p in (root / "images").glob("*.png")]) / 1e6
        tf = PairTransform(resize=RESIZE, crop=CROP, hflip=True, uint8=True)
        plain, cached = GTA5(root, tf), GTA5(root, tf)
        cached.cache_dir = Path(tmp) / "cache"
        n = len(plain)
        t0 = time.perf_counter()
        for i in range(n):
            cached.decoded(i)
        build = (time.perf_counter() - t0) / n

        def over_images(fn):  # noqa: ANN001, ANN202
            def run() -> None:
                for i in range(n):
                    fn(i)
            return run

        items = plain.items
        best = best_of({
            "PIL baseline (torchvision reference style)":
                over_images(lambda i: baseline_sample(*items[i], np.random.default_rng(i))),
            "uda_ray, decoding every time": over_images(lambda i: plain[(i, i)]),
            "uda_ray, decoded-once cache": over_images(lambda i: cached[(i, i)]),
        }, repeats=a.repeats)
        print(f"{n} GTA5-sized pairs ({SIZE[0]}x{SIZE[1]}, image PNGs {mb:.1f} MB on average), resize "
              f"{RESIZE[0]}x{RESIZE[1]}, crop {CROP[0]}x{CROP[1]}, flip; one thread; per sample:")
        print_table({k: v / n for k, v in best.items()}, "PIL baseline (torchvision reference style)")
        print(f"  one-time cache fill: {build * 1000:.1f} ms per image "
              f"({RESIZE[0] * RESIZE[1] * 4 / 1e6:.1f} MB per image on disk)")


if __name__ == "__main__":
    main()
