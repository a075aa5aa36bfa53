"""Label contract shared by every dataset: 19 Cityscapes train ids, 255 = ignore."""

from __future__ import annotations

import numpy as np

IGNORE = 255
NUM_CLASSES = 19
CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# Cityscapes label id -> train id (GTA5 label PNGs hold the same ids).
CITYSCAPES_ID_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
TRAIN_TO_CITYSCAPES_ID: dict[int, int] = {t: i for i, t in CITYSCAPES_ID_TO_TRAIN.items()}

# SYNTHIA-RAND-CITYSCAPES raw id (first stored channel of GT/LABELS) -> train id.
SYNTHIA_ID_TO_TRAIN: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12,
    8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}
TRAIN_TO_SYNTHIA_ID: dict[int, int] = {t: i for i, t in SYNTHIA_ID_TO_TRAIN.items()}

# Class subsets used when the source is SYNTHIA.
MIOU16_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
MIOU13_CLASSES: tuple[int, ...] = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)


# The 16-class protocol of SYNTHIA -> Cityscapes (ADVENT, CPSL `--n_class 16`): a model with 16 outputs,
# the pixels of terrain, truck and train ignored everywhere (source, target, val). Its class k is the
# 19-class train id MIOU16_CLASSES[k].
LABEL_SETS: dict[str, int] = {"cityscapes19": NUM_CLASSES, "synthia16": len(MIOU16_CLASSES)}
SYNTHIA16_CLASSES: tuple[str, ...] = tuple(CLASSES[t] for t in MIOU16_CLASSES)
SYNTHIA16_MIOU13: tuple[int, ...] = tuple(MIOU16_CLASSES.index(t) for t in MIOU13_CLASSES)  # in 16-class ids


def lookup_table(mapping: dict[int, int], size: int = 65536) -> np.ndarray:
    """A dense LUT: raw id -> train id, everything unmapped -> IGNORE."""
    lut = np.full(size, IGNORE, dtype=np.uint8)
    for raw, train in mapping.items():
        lut[raw] = train
    return lut


CITYSCAPES_LUT = lookup_table(CITYSCAPES_ID_TO_TRAIN, 256)
SYNTHIA_LUT = lookup_table(SYNTHIA_ID_TO_TRAIN, 65536)


def label_set_lut(label_set: str) -> np.ndarray | None:
    """19-class train id (and 255) -> the label set's class id (uint8, 256 entries); None for cityscapes19."""
    if label_set == "cityscapes19":
        return None
    if label_set == "synthia16":
        return lookup_table({t: k for k, t in enumerate(MIOU16_CLASSES)}, 256)
    raise ValueError(f"unknown label set {label_set!r} (valid: {', '.join(LABEL_SETS)})")
