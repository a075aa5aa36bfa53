from __future__ import annotations

import math

import torch

from uda_ray.metrics import ConfusionMatrix, metrics_from_confusion


def test_confusion_matrix_and_miou_match_hand_computation():
    # gt:   0 0 1 1 2 255      pred: 0 1 1 1 0 2
    gt = torch.tensor([[0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    assert cm.mat.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    m = cm.compute()
    # IoU0 = 1 / (1+1+1) ; IoU1 = 2 / (2+1) ; IoU2 = 0 / 1
    assert math.isclose(m["iou/0"], 1 / 3) and math.isclose(m["iou/1"], 2 / 3) and m["iou/2"] == 0
    assert math.isclose(m["miou"], (1 / 3 + 2 / 3 + 0) / 3)
    assert math.isclose(m["pixel_acc"], 3 / 5)


def test_absent_classes_do_not_count_in_the_mean():
    mat = torch.zeros(19, 19, dtype=torch.int64)
    mat[0, 0] = 10
    mat[13, 13] = 5
    mat[13, 0] = 5
    m = metrics_from_confusion(mat)
    assert math.isnan(m["iou/wall"])
    assert math.isclose(m["miou"], (10 / 15 + 5 / 10) / 2)
    assert math.isclose(m["miou16"], m["miou"]) and math.isclose(m["miou13"], m["miou"])
