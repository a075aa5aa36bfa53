"""Label maps, paired transforms and dataset folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uda_ray.data.datasets import DATASETS, GTA5, Cityscapes, Synthia, pseudo_label_path
from uda_ray.data.labels import TRAIN_TO_CITYSCAPES_ID
from uda_ray.data.synthetic import write_png16
from uda_ray.data.transforms import PairTransform, eval_transform
from uda_ray.errors import DatasetError

# 19 well-separated colours: the class of a pixel can be read back from its colour.
LEVELS = (0, 120, 240)
PALETTE = np.array([(r, g, b) for r in LEVELS for g in LEVELS for b in LEVELS][:19], np.uint8)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _gta5(root: Path, n: int = 3, missing: tuple[int, ...] = ()) -> Path:
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        _png(root / "images" / f"{i:05d}.png", np.full((6, 8, 3), i, np.uint8))
        if i not in missing:
            _png(root / "labels" / f"{i:05d}.png", np.full((6, 8), 7, np.uint8))
    return root


def _blocks(seed: int, h: int = 48, w: int = 80, block: int = 8) -> np.ndarray:
    """(H, W) uint8 label of random classes in block x block tiles."""
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 19, (h // block, w // block))
    return np.kron(tiles, np.ones((block, block), int)).astype(np.uint8)


def _decode(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) colours -> (H, W) class of the nearest palette colour."""
    d = (img.permute(1, 2, 0)[:, :, None, :] - torch.from_numpy(PALETTE).float()).norm(dim=-1)
    return d.argmin(-1)


def test_gta5_label_ids_map_to_train_ids(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "00001.png", np.zeros((2, 3, 3), np.uint8))
    _png(tmp_path / "labels" / "00001.png", np.array([[7, 33, 0], [8, 26, 34]], np.uint8))
    lbl = GTA5(tmp_path)[0]["lbl"]
    assert lbl.tolist() == [[0, 18, 255], [1, 13, 255]]


def test_synthia_first_channel_maps_to_train_ids(tmp_path: Path) -> None:
    _png(tmp_path / "RGB" / "0000000.png", np.zeros((2, 3, 3), np.uint8))
    gt = np.zeros((2, 3, 3), np.uint16)
    gt[..., 0] = [[3, 1, 0], [8, 11, 300]]
    gt[..., 1] = 999  # instance channel, must be ignored
    (tmp_path / "GT" / "LABELS").mkdir(parents=True)
    write_png16(tmp_path / "GT" / "LABELS" / "0000000.png", gt)
    assert Synthia(tmp_path)[0]["lbl"].tolist() == [[0, 10, 255], [13, 18, 255]]


@pytest.mark.parametrize("seed", range(6))
def test_transform_keeps_image_and_label_aligned(seed: int) -> None:
    lbl = _blocks(seed)
    img = Image.fromarray(PALETTE[lbl])
    x, y = PairTransform(resize=(40, 24), crop=(32, 16), hflip=True)(img, lbl, np.random.default_rng(seed))
    assert x.shape == (3, 16, 32) and y.shape == (16, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.max() > 200  # 0..255, not normalized
    agree = (_decode(x) == y).float().mean().item()
    assert agree > 0.9
    # the check itself is sharp: flipping the label alone breaks the agreement
    assert (_decode(x) == y.flip(-1)).float().mean().item() < 0.5


def test_transform_flips_and_crops_vary_with_the_seed_and_repeat_for_it() -> None:
    lbl = _blocks(0)
    img = Image.fromarray(PALETTE[lbl])
    t = PairTransform(resize=None, crop=(40, 24), hflip=True)
    outs = [t(img, lbl, np.random.default_rng(s)) for s in range(12)]
    again = t(img, lbl, np.random.default_rng(3))
    assert torch.equal(outs[3][0], again[0]) and torch.equal(outs[3][1], again[1])
    assert len({o[1].numpy().tobytes() for o in outs}) > 6  # different crops / flips
    flipped = 0
    for x, y in outs:  # every output is an exact window of the label or of its mirror image
        windows = [lbl, lbl[:, ::-1]]
        hits = [any(np.array_equal(y.numpy(), w[r:r + 24, c:c + 40]) for r in range(25) for c in range(41))
                for w in windows]
        assert any(hits)
        flipped += hits[1] and not hits[0]
        assert (_decode(x) == y).all()
    assert 0 < flipped < len(outs)


def test_crop_larger_than_image_pads_label_with_ignore_and_image_with_zero() -> None:
    lbl = np.full((10, 12), 3, np.uint8)
    x, y = PairTransform(crop=(16, 14))(Image.fromarray(PALETTE[lbl]), lbl, np.random.default_rng(0))
    assert y.shape == (14, 16) and (y[10:] == 255).all() and (y[:, 12:] == 255).all()
    assert (y[:10, :12] == 3).all() and (x[:, 10:] == 0).all() and (x[:, :10, :12] > 0).any()


def test_resize_uses_nearest_for_labels() -> None:
    lbl = _blocks(1)
    _, y = PairTransform(resize=(33, 17))(Image.fromarray(PALETTE[lbl]), lbl, np.random.default_rng(0))
    assert y.shape == (17, 33) and set(y.unique().tolist()) <= set(np.unique(lbl).tolist())


def test_eval_transform_resizes_image_only() -> None:
    lbl = _blocks(2)
    x, y = eval_transform((40, 24))(Image.fromarray(PALETTE[lbl]), lbl)
    assert x.shape == (3, 24, 40) and y.shape == (48, 80) and torch.equal(y, torch.from_numpy(lbl).long())


def test_dataset_item_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    root = tmp_path / "gta5"
    (root / "images").mkdir(parents=True)
    lbl = _blocks(3)
    _png(root / "images" / "00001.png", PALETTE[lbl])
    ids = np.array([TRAIN_TO_CITYSCAPES_ID[t] for t in range(19)], np.uint8)
    _png(root / "labels" / "00001.png", ids[lbl])
    ds = GTA5(root, PairTransform(crop=(32, 32), hflip=True))
    a, b, c = ds[(0, 5)], ds[(0, 5)], ds[0]
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["lbl"], b["lbl"])
    assert torch.equal(c["lbl"], ds[(0, 0)]["lbl"])  # an int key means augmentation seed 0
    assert any(not torch.equal(a["lbl"], ds[(0, s)]["lbl"]) for s in range(6, 12))
    assert (_decode(a["img"]) == a["lbl"]).all() and a["name"] == "00001.png"


def test_gta5_skips_images_without_label(tmp_path: Path) -> None:
    ds = GTA5(_gta5(tmp_path, n=4, missing=(2, 4)))
    assert len(ds) == 2 and [ds[i]["name"] for i in range(2)] == ["00001.png", "00003.png"]


@pytest.mark.parametrize("make, ctor, needle", [
    (lambda p: None, lambda p: GTA5(p), "does not exist"),
    (lambda p: (p / "images").mkdir(parents=True), lambda p: GTA5(p), "no labels/ folder"),
    (lambda p: [(p / d).mkdir(parents=True) for d in ("images", "labels")], lambda p: GTA5(p),
     "no image/label pairs"),
    (lambda p: _gta5(p, missing=(1, 2, 3)), lambda p: GTA5(p), "no image/label pairs"),
    (lambda p: (p / "leftImg8bit" / "train").mkdir(parents=True), lambda p: Cityscapes(p, "train"),
     "no gtFine/train/ folder"),
    (lambda p: (p / "leftImg8bit" / "train").mkdir(parents=True), lambda p: Cityscapes(p, "val"),
     "no leftImg8bit/val/ folder"),
    (lambda p: (p / "RGB").mkdir(parents=True), lambda p: Synthia(p), "no GT/LABELS/ folder"),
])
def test_bad_folders_raise_one_line_naming_the_path(tmp_path: Path, make, ctor, needle: str) -> None:
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DatasetError) as err:
        ctor(root)
    msg = str(err.value)
    assert str(root) in msg and needle in msg and "expected a" in msg and "\n" not in msg


def test_malformed_label_raises_naming_the_file(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "00001.png", np.zeros((4, 4, 3), np.uint8))
    _png(tmp_path / "labels" / "00001.png", np.zeros((4, 4, 3), np.uint8))  # RGB, not an id map
    with pytest.raises(DatasetError, match="00001.png"):
        GTA5(tmp_path)[0]


def test_source_datasets_have_only_a_train_split(tmp_path: Path) -> None:
    root = _gta5(tmp_path / "gta5")
    assert len(DATASETS["gta5"](root, "train", None)) == 3
    with pytest.raises(DatasetError, match="val"):
        DATASETS["gta5"](root, "val", None)


def test_cityscapes_pseudo_labels_are_train_ids_and_select_images(tmp_path: Path) -> None:
    root, pseudo = tmp_path / "cs", tmp_path / "pseudo"
    for i in range(3):
        stem = f"town/town_000000_{i:06d}"
        _png(root / "leftImg8bit" / "train" / f"{stem}_leftImg8bit.png", np.zeros((2, 2, 3), np.uint8))
        _png(root / "gtFine" / "train" / f"{stem}_gtFine_labelIds.png", np.full((2, 2), 26, np.uint8))
    full = Cityscapes(root, "train")
    assert len(full) == 3 and (full[0]["lbl"] == 13).all()
    name = full[1]["name"]
    assert name == "train/town/town_000000_000001_leftImg8bit.png"  # relative to leftImg8bit/
    target = pseudo_label_path(pseudo, name)
    assert target == pseudo / "gtFine/train/town/town_000000_000001_gtFine_labelTrainIds.png"
    assert pseudo_label_path(pseudo, "00007.png") == pseudo / "00007.png"  # flat layouts
    _png(target, np.array([[0, 18], [255, 40]], np.uint8))
    ds = DATASETS["cityscapes"](root, "train", None, pseudo)
    assert len(ds) == 1 and ds[0]["name"] == name and ds[0]["lbl"].tolist() == [[0, 18], [255, 255]]


def _gta5_pair(root: Path, n: int = 2) -> Path:
    ids = np.array([TRAIN_TO_CITYSCAPES_ID[t] for t in range(19)], np.uint8)
    for i in range(1, n + 1):
        lbl = _blocks(10 + i, h=40, w=56)
        _png(root / "images" / f"{i:05d}.png", PALETTE[lbl])
        _png(root / "labels" / f"{i:05d}.png", ids[lbl])
    return root


@pytest.mark.parametrize("grayscale", [False, True])
def test_uint8_items_hold_the_float_items_values(tmp_path: Path, grayscale: bool) -> None:
    from uda_ray.data.loading import _Grayscale

    def tf(uint8: bool) -> object:
        t = PairTransform(resize=(50, 36), crop=(32, 24), hflip=True, uint8=uint8)
        return _Grayscale(t) if grayscale else t

    root = _gta5_pair(tmp_path / "gta5")
    f, u = GTA5(root, tf(False)), GTA5(root, tf(True))
    for key in [(0, 1), (1, 2), (0, 3)]:
        a, b = f[key], u[key]
        assert b["img"].dtype == torch.uint8 and b["lbl"].dtype == torch.uint8
        assert torch.equal(a["img"], b["img"].float()) and torch.equal(a["lbl"], b["lbl"].long())


def test_decoded_cache_gives_the_decoded_items_and_is_not_decoded_again(tmp_path: Path, monkeypatch) -> None:
    root = _gta5_pair(tmp_path / "gta5")
    tf = PairTransform(resize=(50, 36), crop=(32, 24), hflip=True, uint8=True)
    plain, cached = GTA5(root, tf), GTA5(root, tf)
    cached.cache_dir = tmp_path / "cache"
    keys = [(i, s) for i in range(2) for s in range(4)]
    for key in keys:  # the first pass decodes and writes the cache
        assert torch.equal(plain[key]["img"], cached[key]["img"])
        assert torch.equal(plain[key]["lbl"], cached[key]["lbl"])
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2

    def no_decoding(index: int) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(cached, "_read", no_decoding)
    for key in keys:  # the second pass reads the cache only
        assert torch.equal(plain[key]["img"], cached[key]["img"])
    other = GTA5(root, PairTransform(resize=(40, 30), crop=(32, 24), uint8=True))
    other.cache_dir = tmp_path / "cache"
    assert other[0]["img"].shape == (3, 24, 32)  # another resize is another cache entry
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 3


def test_batch_to_device_converts_uint8_to_float_and_int64() -> None:
    from uda_ray.methods.base import UDABatch

    img = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    lbl = torch.tensor([[0, 18, 255]], dtype=torch.uint8)
    b = UDABatch(src_img=img, src_lbl=lbl, tgt_img=img).to("cpu")
    assert b.src_img.dtype == torch.float32 and torch.equal(b.src_img, img.float())
    assert b.src_lbl.dtype == torch.int64 and b.src_lbl.tolist() == [[0, 18, 255]] and b.tgt_lbl is None


def test_loader_workers_default_from_the_worker_cpus() -> None:
    from uda_ray.data.loading import resolve_loader_workers

    assert resolve_loader_workers(-1, 1.0, 2) == 0  # one CPU: load in the training process
    assert resolve_loader_workers(-1, 0.75, 1) == 0
    assert resolve_loader_workers(-1, 5.0, 2) == 2  # 4 spare CPUs over source + target
    assert resolve_loader_workers(3, 1.0, 2) == 3  # an explicit count wins
