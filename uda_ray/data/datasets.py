"""GTA5, Cityscapes and SYNTHIA-RAND-CITYSCAPES segmentation datasets (labels as train ids, 255 = ignore)."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_png, read_file

from uda_ray.data.labels import CITYSCAPES_LUT, IGNORE, LABEL_SETS, SYNTHIA_LUT, label_set_lut
from uda_ray.data.transforms import to_tensors
from uda_ray.errors import DatasetError

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image, np.ndarray, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]

GTA5_LAYOUT = "a GTA5 layout images/NNNNN.png + labels/NNNNN.png"
CITYSCAPES_LAYOUT = ("a Cityscapes layout leftImg8bit/{split}/CITY/*_leftImg8bit.png"
                     " + gtFine/{split}/CITY/*_gtFine_labelIds.png")
SYNTHIA_LAYOUT = "a SYNTHIA-RAND-CITYSCAPES layout RGB/NNNNNNN.png + GT/LABELS/NNNNNNN.png"
CITYSCAPES_SUFFIX = "_leftImg8bit.png"
PSEUDO_SUFFIX = "_gtFine_labelTrainIds.png"


def pseudo_label_relpath(name: str) -> PurePosixPath:
    """Where the train-id pseudo-label of the image `name` (a dataset item's "name") lives, relative to a
    pseudo-label folder: Cityscapes "train/CITY/X_leftImg8bit.png" -> "gtFine/train/CITY/X_gtFine_labelTrainIds.png"
    (the layout the pseudo-label and IntraDA stages write); flat layouts (GTA5, SYNTHIA) -> the name itself."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.name:
        raise ValueError(f"image name must be a relative path inside the dataset, got {name!r}")
    if p.name.endswith(CITYSCAPES_SUFFIX):
        return PurePosixPath("gtFine", *p.parent.parts, p.name.removesuffix(CITYSCAPES_SUFFIX) + PSEUDO_SUFFIX)
    return p


def pseudo_label_path(label_root: Path, name: str) -> Path:
    """The pseudo-label file of image `name` under `label_root` (see pseudo_label_relpath)."""
    return Path(label_root) / pseudo_label_relpath(name)


# Listing a dataset folder globs its images and checks each label file (GTA5: ~25,000 stat calls). A run builds
# several datasets over the same folders (the splits, the training splits, source val, the target holdout):
# inside `scans_once()` each folder is listed once and its list shared.
_SCANS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("uda_ray_dataset_scans", default=None)


@contextlib.contextmanager
def scans_once() -> Iterator[dict]:
    """Within this block, datasets built over the same folder (same split, labels, label root) reuse one
    listing of it. Nested blocks share the outermost one's listings."""
    memo = _SCANS.get()
    if memo is not None:
        yield memo
        return
    memo = {}
    token = _SCANS.set(memo)
    try:
        yield memo
    finally:
        _SCANS.reset(token)


def _scanned(key: tuple, scan: Callable[[], list]) -> list:
    """scan() (a folder's item list), or its earlier result inside `scans_once()`; a fresh list either way."""
    memo = _SCANS.get()
    if memo is None:
        return scan()
    if key not in memo:
        memo[key] = scan()
    return list(memo[key])


def _require_dir(root: Path, sub: str, layout: str) -> Path:
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist: expected {layout}")
    path = root / sub
    if not path.is_dir():
        raise DatasetError(f"dataset folder {root} has no {sub}/ folder: expected {layout}")
    return path


def _with_pseudo(layout: str, label_root: Path | None) -> str:
    return layout if label_root is None else f"{layout}, with train-id pseudo-labels under {label_root}"


def _read_8bit(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("L", "P"):
            raise DatasetError(f"label {path} is not an 8-bit single-channel PNG (mode {im.mode})")
        return np.asarray(im)


def _read_synthia(path: Path) -> np.ndarray:
    """The first stored channel of a (16-bit, multi-channel) SYNTHIA label PNG."""
    try:
        with warnings.catch_warnings():  # torchvision >= 0.29 flags its image codecs as deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            t = decode_png(read_file(str(path)), mode=ImageReadMode.UNCHANGED)  # (C, H, W)
    except RuntimeError as e:
        raise DatasetError(f"cannot decode SYNTHIA label {path}: {e}") from None
    return t[0].to(torch.int32).numpy()


class SegDataset(Dataset):
    """Image/label pairs. `dataset[i]` or `dataset[(i, aug_seed)]` -> {"img", "lbl", "name"}.

    "name" is the image path relative to the image folder (`images/`, `RGB/`, `leftImg8bit/`), as in the
    originals' list files: "00001.png", "train/CITY/CITY_000000_000001_leftImg8bit.png".
    """

    def __init__(self, root: Path, image_dir: Path, items: list[tuple[Path, Path]],
                 transform: Transform | None, read_raw: Callable[[Path], np.ndarray], lut: np.ndarray,
                 train_ids: bool, layout: str, label_set: str = "cityscapes19"):
        if not items:
            raise DatasetError(f"dataset folder {root} has no image/label pairs: expected {layout}")
        self.root, self.image_dir, self.items, self.transform = root, image_dir, items, transform
        # label_set "synthia16": the 19 train ids mapped to 16 classes (terrain, truck, train -> 255); pseudo-label
        # folders (train_ids) are in the model's own class ids already
        to_set = label_set_lut(label_set)
        self.num_classes = LABEL_SETS[label_set]
        self._read_raw, self._lut, self._train_ids = read_raw, (lut if to_set is None else to_set[lut]), train_ids
        self.cache_dir: Path | None = None  # see `decoded`

    def __len__(self) -> int:
        return len(self.items)

    def label(self, path: Path) -> np.ndarray:
        """(H, W) uint8 train ids, IGNORE = 255."""
        if self._train_ids:  # pseudo-labels: train ids already; anything out of range -> ignore
            raw = _read_8bit(path)
            return np.where(raw < self.num_classes, raw, IGNORE).astype(np.uint8)
        return self._lut[self._read_raw(path)]

    def _read(self, index: int) -> tuple[Image.Image, np.ndarray]:
        img_path, lbl_path = self.items[index]
        try:
            with Image.open(img_path) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise DatasetError(f"cannot read image {img_path}: {e}") from None
        # images without labels (unlabeled target data) get an all-ignore label, so batches keep one shape
        if lbl_path is None:
            return img, np.full((img.height, img.width), IGNORE, np.uint8)
        return img, self.label(lbl_path)

    def decoded(self, index: int) -> np.ndarray:
        """(H, W, 4) uint8, memory-mapped: the transform's `prepare` output (resized image, label as the 4th
        channel), decoded once into `cache_dir` and read from there afterwards.

        The file's name hashes the image and label paths with their sizes and modification times, the
        transform's `cache_key()` and the label mapping, so a changed file or setting is decoded again.
        Written to a temporary name, then renamed: concurrent trials may fill the same cache."""
        img_path, lbl_path = self.items[index]
        st_i = img_path.stat()
        st_l = lbl_path.stat() if lbl_path is not None else None  # unlabeled: an all-ignore label
        key = "|".join(map(str, (img_path, st_i.st_size, st_i.st_mtime_ns, lbl_path, st_l and st_l.st_size,
                                 st_l and st_l.st_mtime_ns, self.transform.cache_key(), self._train_ids,
                                 hashlib.sha1(self._lut.tobytes()).hexdigest())))
        digest = hashlib.sha1(key.encode()).hexdigest()
        path = Path(self.cache_dir) / digest[:2] / f"{digest}.npy"
        if not path.is_file():
            x, y = self.transform.prepare(*self._read(index))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, np.concatenate([x, y[..., None]], axis=-1))
            os.replace(tmp, path)
        return np.load(path, mmap_mode="r")

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        img_path = self.items[index][0]
        if self.cache_dir is not None and getattr(self.transform, "cacheable", False):
            arr = self.decoded(index)  # (H, W, 4) uint8
            x, y = self.transform.augment(arr[..., :3], arr[..., 3], np.random.default_rng(seed))
        else:
            img, lbl = self._read(index)
            if self.transform is None:
                x, y = to_tensors(img, lbl)
            else:
                x, y = self.transform(img, lbl, np.random.default_rng(seed))
        return {"img": x, "lbl": y, "name": img_path.relative_to(self.image_dir).as_posix()}


def _pairs(root: Path, images: list[Path], label_of: Callable[[Path], Path]) -> list[tuple[Path, Path]]:
    """Keep the images whose label file exists (GTA5 lists ids with missing files)."""
    items = [(p, label_of(p)) for p in images]
    kept = [(p, q) for p, q in items if q.is_file()]
    if len(kept) < len(items):
        log.info("%s: skipped %d of %d images without a label", root, len(items) - len(kept), len(items))
    return kept


def _flat(root: Path, img_sub: str, lbl_sub: str, label_root: Path | None, layout: str
          ) -> list[tuple[Path, Path]]:
    return _scanned(("flat", str(root), img_sub, lbl_sub, str(label_root)),
                    lambda: _scan_flat(root, img_sub, lbl_sub, label_root, layout))


def _scan_flat(root: Path, img_sub: str, lbl_sub: str, label_root: Path | None, layout: str
               ) -> list[tuple[Path, Path]]:
    img_dir = _require_dir(root, img_sub, layout)
    if label_root is None:
        lbl_dir = _require_dir(root, lbl_sub, layout)
    elif not Path(label_root).is_dir():
        raise DatasetError(f"pseudo-label folder {label_root} does not exist")
    images = sorted(img_dir.glob("*.png"))
    if label_root is None:
        return _pairs(root, images, lambda p: lbl_dir / p.name)
    return _pairs(root, images, lambda p: pseudo_label_path(Path(label_root), p.name))


class GTA5(SegDataset):
    """GTA5: images/NNNNN.png + labels/NNNNN.png (Cityscapes label ids); `label_root`: train-id PNGs."""

    def __init__(self, root: Path, transform: Transform | None = None, label_root: Path | None = None,
                 label_set: str = "cityscapes19"):
        root = Path(root)
        items = _flat(root, "images", "labels", label_root, GTA5_LAYOUT)
        super().__init__(root, root / "images", items, transform, _read_8bit, CITYSCAPES_LUT,
                         label_root is not None, _with_pseudo(GTA5_LAYOUT, label_root), label_set)


class Synthia(SegDataset):
    """SYNTHIA-RAND-CITYSCAPES: RGB/*.png + GT/LABELS/*.png (16-bit, class id in the first channel)."""

    def __init__(self, root: Path, transform: Transform | None = None, label_root: Path | None = None,
                 label_set: str = "cityscapes19"):
        root = Path(root)
        items = _flat(root, "RGB", "GT/LABELS", label_root, SYNTHIA_LAYOUT)
        super().__init__(root, root / "RGB", items, transform, _read_synthia, SYNTHIA_LUT,
                         label_root is not None, _with_pseudo(SYNTHIA_LAYOUT, label_root), label_set)


class Cityscapes(SegDataset):
    """A Cityscapes split; `label_root`: train-id pseudo-labels in the gtFine layout (only those kept);
    `labels=False`: the images only (no gtFine/ needed; labels come back all-ignore)."""

    def __init__(self, root: Path, split: str, transform: Transform | None = None,
                 label_root: Path | None = None, label_set: str = "cityscapes19", labels: bool = True):
        root = Path(root)
        layout = CITYSCAPES_LAYOUT.format(split=split)
        items = _scanned(("cityscapes", str(root), split, labels, str(label_root)),
                         lambda: self._scan(root, split, label_root, labels, layout))
        super().__init__(root, root / "leftImg8bit", items, transform, _read_8bit, CITYSCAPES_LUT,
                         labels and label_root is not None, _with_pseudo(layout, label_root) if labels else layout,
                         label_set)

    @staticmethod
    def _scan(root: Path, split: str, label_root: Path | None, labels: bool, layout: str) -> list:
        img_dir = _require_dir(root, f"leftImg8bit/{split}", layout)
        images = sorted(img_dir.glob(f"*/*{CITYSCAPES_SUFFIX}"))
        if not labels:
            if not images:
                raise DatasetError(f"dataset folder {root} has no images: expected {layout}")
            return [(p, None) for p in images]
        if label_root is None:
            _require_dir(root, f"gtFine/{split}", layout)

            def label_of(p: Path) -> Path:
                stem = p.name.removesuffix(CITYSCAPES_SUFFIX)
                return root / "gtFine" / split / p.parent.name / f"{stem}_gtFine_labelIds.png"
        else:
            if not Path(label_root).is_dir():
                raise DatasetError(f"pseudo-label folder {label_root} does not exist")

            def label_of(p: Path) -> Path:
                return pseudo_label_path(Path(label_root), p.relative_to(root / "leftImg8bit").as_posix())
        return _pairs(root, images, label_of)


def has_labels(name: str, root: Path) -> bool:
    """Whether a target dataset folder carries ground-truth labels (a Cityscapes layout with gtFine/);
    `frames` never does."""
    if name == "frames":
        return False
    if name == "cityscapes":
        return (Path(root) / "gtFine").is_dir()
    return True


FRAMES_LAYOUT = "a folder of images (*.png, *.jpg, *.jpeg), no labels"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")


class Frames(SegDataset):
    """A flat folder of unlabeled images (e.g. frames from one's own cameras): an unlabeled target domain.
    Names are the file names; labels come back all-ignore."""

    def __init__(self, root: Path, transform: Transform | None = None, label_set: str = "cityscapes19"):
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset folder {root} does not exist: expected {FRAMES_LAYOUT}")
        images = _scanned(("frames", str(root)), lambda: sorted(
            p for p in root.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file()))
        if not images:
            raise DatasetError(f"dataset folder {root} has no images: expected {FRAMES_LAYOUT}")
        super().__init__(root, root, [(p, None) for p in images], transform, _read_8bit, CITYSCAPES_LUT, False,
                         FRAMES_LAYOUT, label_set)


def _frames(root: Path, split: str, transform: Transform | None, label_root: Path | None = None,
            label_set: str = "cityscapes19", labels: bool = False) -> SegDataset:
    _train_only("frames", split)
    if label_root is not None:  # pseudo-labels of the frames (self-training on an unlabeled target)
        images = [p for p, _ in Frames(root).items]
        items = _pairs(Path(root), images, lambda p: pseudo_label_path(Path(label_root), p.name))
        return SegDataset(Path(root), Path(root), items, transform, _read_8bit, CITYSCAPES_LUT, True,
                          _with_pseudo(FRAMES_LAYOUT, label_root), label_set)
    if labels:
        raise DatasetError(f"dataset folder {root} is a `frames` folder: it has no labels")
    return Frames(root, transform, label_set)


def _train_only(name: str, split: str) -> None:
    if split != "train":
        raise DatasetError(f"dataset {name} has only a 'train' split, not {split!r}")


def _gta5(root: Path, split: str, transform: Transform | None, label_root: Path | None = None,
          label_set: str = "cityscapes19", labels: bool = True) -> GTA5:
    _train_only("gta5", split)
    return GTA5(root, transform, label_root, label_set)


def _synthia(root: Path, split: str, transform: Transform | None, label_root: Path | None = None,
             label_set: str = "cityscapes19", labels: bool = True) -> Synthia:
    _train_only("synthia", split)
    return Synthia(root, transform, label_root, label_set)


# name -> (root, split, transform, label_root=None, label_set=..., labels=True) -> dataset
DATASETS: dict[str, Callable[..., SegDataset]] = {
    "gta5": _gta5,
    "cityscapes": Cityscapes,
    "synthia": _synthia,
    "frames": _frames,
}
