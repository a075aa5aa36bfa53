"""The built-in synthetic benchmark: determinism, on-disk layouts, class coverage, domain shift."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uda_ray.data import synthetic
from uda_ray.data.datasets import DATASETS, GTA5, Cityscapes, Synthia
from uda_ray.data.labels import TRAIN_TO_CITYSCAPES_ID, TRAIN_TO_SYNTHIA_ID
from uda_ray.errors import DatasetError

# torchvision >= 0.29 flags its PNG decoder (used here to read 16-bit PNGs) as deprecated
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
SMALL = {"n_source": 40, "n_target": 40, "n_val": 6, "size": (96, 48), "seed": 0}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("synth") / "bench", **SMALL, synthia=True)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(ds: GTA5 | Cityscapes) -> tuple[np.ndarray, np.ndarray]:
    """All labeled pixels of a dataset: (N, 3) colours and (N,) train ids."""
    items = [ds[i] for i in range(len(ds))]
    img = torch.stack([d["img"] for d in items]).permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    lbl = torch.stack([d["lbl"] for d in items]).reshape(-1).numpy()
    return img[lbl != 255], lbl[lbl != 255]


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    params = {"n_source": 3, "n_target": 3, "n_val": 2, "size": (64, 32)}
    a = _files(synthetic.generate(tmp_path / "a", **params, seed=5, synthia=True))
    b = _files(synthetic.generate(tmp_path / "b", **params, seed=5, synthia=True))
    c = _files(synthetic.generate(tmp_path / "c", **params, seed=6, synthia=True))
    assert a == b and len(a) == 3 * 2 + 3 * 2 + 2 * 2 + 3 * 2 + 1
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))


def test_layouts_load_with_the_datasets(bench: Path) -> None:
    assert len(GTA5(bench / "gta5")) == 40 and len(Synthia(bench / "synthia")) == 40
    assert len(DATASETS["cityscapes"](bench / "cityscapes", "train", None)) == 40
    val = Cityscapes(bench / "cityscapes", "val")
    assert len(val) == 6 and val[0]["img"].shape == (3, 48, 96) and val[0]["lbl"].shape == (48, 96)
    assert (bench / "gta5/images/00001.png").is_file() and (bench / "gta5/labels/00040.png").is_file()
    assert (bench / "synthia/RGB/0000000.png").is_file()
    assert (bench / "synthia/GT/LABELS/0000039.png").is_file()
    cities = {p.name for p in (bench / "cityscapes/leftImg8bit/train").iterdir()}
    val_cities = {p.name for p in (bench / "cityscapes/leftImg8bit/val").iterdir()}
    assert len(cities) in (2, 3) and len(val_cities) in (2, 3) and not cities & val_cities
    for d in ("train", "val"):
        for img in (bench / "cityscapes/leftImg8bit" / d).rglob("*.png"):
            city, stem = img.parent.name, img.name.removesuffix("_leftImg8bit.png")
            assert stem.startswith(f"{city}_000000_") and len(stem.rsplit("_", 1)[1]) == 6
            assert (bench / "cityscapes/gtFine" / d / city / f"{stem}_gtFine_labelIds.png").is_file()


def test_every_class_appears_in_a_40_image_set(bench: Path) -> None:
    for ds in (GTA5(bench / "gta5"), Cityscapes(bench / "cityscapes", "train"), Synthia(bench / "synthia")):
        present = set(np.unique(np.concatenate([ds[i]["lbl"].numpy().ravel() for i in range(len(ds))])))
        assert set(range(19)) <= present, f"{ds.root}: missing classes {set(range(19)) - present}"


def test_label_pngs_hold_only_valid_ids(bench: Path) -> None:
    valid = {0, *TRAIN_TO_CITYSCAPES_ID.values()}
    for p in [*(bench / "gta5/labels").glob("*.png"), *(bench / "cityscapes/gtFine").rglob("*.png")]:
        with Image.open(p) as im:
            assert im.mode == "L"
            assert set(np.unique(np.asarray(im)).tolist()) <= valid, p


def test_synthia_labels_round_trip_through_the_loader(bench: Path) -> None:
    """The 16-bit first channel holds SYNTHIA ids; the loader gives back the generator's train ids."""
    from torchvision.io import ImageReadMode, decode_png, read_file

    raw = decode_png(read_file(str(bench / "synthia/GT/LABELS/0000002.png")), mode=ImageReadMode.UNCHANGED)
    assert raw.dtype == torch.uint16 and raw.shape == (3, 48, 96) and (raw[1:] == 0).all()
    assert set(raw[0].int().unique().tolist()) <= {0, *TRAIN_TO_SYNTHIA_ID.values()}
    ds = Synthia(bench / "synthia")
    assert ds[2]["name"] == "0000002.png"
    for i in (0, 2, 39):
        _, lbl = synthetic._sample(0, 3, i, (96, 48), real=False, ego=False)
        assert np.array_equal(ds[i]["lbl"].numpy(), lbl)


def test_gta5_labels_round_trip_through_the_loader(bench: Path) -> None:
    img, lbl = synthetic._sample(0, 0, 4, (96, 48), real=False, ego=False)
    item = GTA5(bench / "gta5")[4]
    assert item["name"] == "00005.png"
    assert np.array_equal(item["lbl"].numpy(), lbl)
    assert np.array_equal(item["img"].permute(1, 2, 0).numpy(), img)


def test_target_colour_statistics_differ_from_source(bench: Path) -> None:
    src_x, src_y = _pixels(GTA5(bench / "gta5"))
    tgt_x, tgt_y = _pixels(Cityscapes(bench / "cityscapes", "train"))
    sat = lambda x: (x.max(1) - x.min(1)).mean()  # noqa: E731
    assert sat(src_x) > sat(tgt_x) + 20  # the game look is more saturated
    gaps = [np.linalg.norm(src_x[src_y == c].mean(0) - tgt_x[tgt_y == c].mean(0)) for c in range(19)]
    assert np.median(gaps) > 25
    # sharp flat source regions vs noisy textured target ones: neighbours of one class differ more
    def roughness(ds: GTA5 | Cityscapes) -> float:
        diffs = []
        for i in range(10):
            x, y = ds[i]["img"], ds[i]["lbl"]
            same = (y[:, 1:] == y[:, :-1]) & (y[:, 1:] != 255)
            diffs.append((x[:, :, 1:] - x[:, :, :-1]).abs().mean(0)[same])
        return torch.cat(diffs).mean().item()

    assert roughness(Cityscapes(bench / "cityscapes", "train")) > 2 * roughness(GTA5(bench / "gta5")) + 1


def test_shift_is_real_but_both_domains_are_learnable(bench: Path) -> None:
    """A nearest-class-colour classifier: fit on target beats fit on source, when tested on target val."""
    src_x, src_y = _pixels(GTA5(bench / "gta5"))
    tgt_x, tgt_y = _pixels(Cityscapes(bench / "cityscapes", "train"))
    val_x, val_y = _pixels(Cityscapes(bench / "cityscapes", "val"))

    def acc(fit_x: np.ndarray, fit_y: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        means = np.stack([fit_x[fit_y == c].mean(0) for c in range(19)])
        pred = np.linalg.norm(x[:, None] - means[None], axis=-1).argmin(1)
        return float((pred == y).mean())

    on_source = acc(src_x, src_y, src_x, src_y)
    source_only = acc(src_x, src_y, val_x, val_y)
    target_only = acc(tgt_x, tgt_y, val_x, val_y)
    assert on_source > 0.8 and target_only > 0.45 and source_only < target_only - 0.15


def test_existing_benchmark_is_reused_and_other_parameters_are_refused(bench: Path) -> None:
    before = (bench / "MANIFEST.json").stat().st_mtime_ns
    assert synthetic.generate(bench, **SMALL, synthia=True) == bench
    assert synthetic.generate(bench, **SMALL) == bench  # a SYNTHIA-including set serves a GTA5-only request
    assert (bench / "MANIFEST.json").stat().st_mtime_ns == before
    assert json.loads((bench / "MANIFEST.json").read_text())["params"]["size"] == [96, 48]
    with pytest.raises(DatasetError, match=str(bench)):
        synthetic.generate(bench, **{**SMALL, "seed": 1})


def test_generation_is_atomic_and_refuses_foreign_folders(tmp_path: Path) -> None:
    out = synthetic.generate(tmp_path / "s", n_source=1, n_target=1, n_val=1, size=(32, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary sibling left behind
    assert not (out / "synthia").exists()
    with pytest.raises(DatasetError, match="synthia"):
        synthetic.generate(out, n_source=1, n_target=1, n_val=1, size=(32, 16), synthia=True)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("not ours")
    with pytest.raises(DatasetError, match="foreign"):
        synthetic.generate(tmp_path / "foreign", n_source=1, n_target=1, n_val=1)


def test_png16_writer_round_trips(tmp_path: Path) -> None:
    from torchvision.io import ImageReadMode, decode_png

    arr = np.random.default_rng(0).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    path = tmp_path / "x.png"
    synthetic.write_png16(path, arr)
    back = decode_png(torch.from_numpy(np.frombuffer(path.read_bytes(), np.uint8).copy()),
                      mode=ImageReadMode.UNCHANGED)
    assert np.array_equal(back.permute(1, 2, 0).numpy().astype(np.uint16), arr)
