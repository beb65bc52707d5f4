"""Metrics and thresholds against small cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from flawline.errors import InvalidInput
from flawline.evaluate import thresholds as th
from flawline.evaluate.metrics import (
    aupro,
    average_precision,
    iou,
    pixel_roc_auc,
    precision_recall_f1,
    roc_auc,
    roc_curve,
)


def test_roc_auc_by_hand():
    # defects 0.9, 0.4; normals 0.1, 0.5, 0.3. Pairs defect>normal: 0.9 beats 3, 0.4 beats 2 → 5/6.
    assert roc_auc([1, 1, 0, 0, 0], [0.9, 0.4, 0.1, 0.5, 0.3]) == pytest.approx(5 / 6)
    assert roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert roc_auc([1, 1, 0, 0], [3, 4, 1, 2]) == 1.0
    assert roc_auc([0, 0, 1, 1], [3, 4, 1, 2]) == 0.0


def test_roc_curve_points():
    fpr, tpr, thr = roc_curve([1, 0, 1, 0], [0.8, 0.6, 0.4, 0.2])
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0, 0.5, 0.5, 1.0, 1.0]
    assert thr[1:].tolist() == [0.8, 0.6, 0.4, 0.2]


def test_average_precision_by_hand():
    # ranked: D(0.8) N(0.6) D(0.4) N(0.2): precision at each recall step: 1/1, then 2/3 → (1 + 2/3)/2
    assert average_precision([1, 0, 1, 0], [0.8, 0.6, 0.4, 0.2]) == pytest.approx((1 + 2 / 3) / 2)


def test_f1_at_threshold():
    r = precision_recall_f1([1, 0, 1, 0], [0.8, 0.6, 0.4, 0.2], threshold=0.5)
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 1, 1, 1)
    assert r["precision"] == 0.5 and r["recall"] == 0.5 and r["f1"] == 0.5


def test_pixel_auroc_and_iou():
    masks = np.array([[[0, 1], [0, 1]]])
    maps = np.array([[[0.1, 0.9], [0.2, 0.8]]])
    assert pixel_roc_auc(masks, maps) == 1.0
    assert iou(maps > 0.5, masks) == 1.0
    assert iou(np.array([[1, 1, 0, 0]]), np.array([[0, 1, 1, 0]])) == pytest.approx(1 / 3)
    assert iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_aupro_perfect_and_inverted():
    mask = np.zeros((1, 4, 8), dtype=bool)
    mask[0, 1:3, 1:3] = True
    good = np.where(mask, 1.0, 0.0) + np.linspace(0, 0.1, 32).reshape(1, 4, 8)
    assert aupro(mask, good) == pytest.approx(1.0)
    assert aupro(mask, -good) == pytest.approx(0.0, abs=1e-9)


def test_aupro_weighs_regions_not_pixels():
    """Two defect regions, a big one found and a small one missed at every FPR ≤ 30 %:
    per-region overlap is 0.5 (a pixel-weighted score would be far higher)."""
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 0:5, 0:5] = True  # 25 px, found
    mask[0, 8, 8] = True  # 1 px, missed
    maps = np.linspace(0, 0.5, 100).reshape(1, 10, 10)  # normal pixels: 0 .. 0.5, distinct
    maps = np.where(mask, -1.0, maps)
    maps[0, 0:5, 0:5] = 2.0
    assert aupro(mask, maps) == pytest.approx(0.5, abs=0.01)


def test_metrics_refuse_single_class_and_nan():
    with pytest.raises(InvalidInput, match="both positive"):
        roc_auc([0, 0], [0.1, 0.2])
    with pytest.raises(InvalidInput, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])


# -- thresholds -----------------------------------------------------------------------------------
NORMAL = np.array([1.0, 2.0, 3.0, 4.0, 5.0])


def test_max_quantile_ksigma():
    assert th.max_score(NORMAL).value == pytest.approx(5.0)
    assert th.max_score(NORMAL).value > 5.0  # strictly above: the max itself is not flagged
    assert th.quantile(NORMAL, 0.5).value == 3.0
    std = np.std(NORMAL, ddof=1)
    t = th.k_sigma(NORMAL, 2.0)
    assert t.value == pytest.approx(3.0 + 2 * std) and t.params == {"k": 2.0}
    assert t.data == {"normal_images": 5}


def test_max_defect_area():
    maps = np.zeros((2, 6, 6))
    maps[0, 0, 0] = 0.9  # a 1-pixel speck
    maps[1, 2:4, 2:4] = 0.5  # a 4-pixel blob
    # regions of >= 2 px must vanish: the blob needs t >= 0.5; the speck (1 px) is tolerated
    assert th.max_defect_area(maps, max_area=2).value == pytest.approx(0.5, abs=1e-6)
    # no region at all: t must clear the speck too
    assert th.max_defect_area(maps, max_area=1).value == pytest.approx(0.9, abs=1e-6)


def test_best_f1():
    t = th.best_f1([0, 0, 1, 1, 0, 1], [0.1, 0.2, 0.7, 0.8, 0.3, 0.6])
    assert t.value == pytest.approx(0.6) and t.params["f1"] == 1.0


def test_auto_threshold_uses_labelled_defects_when_there_are_some():
    labels, scores = [0, 0, 1, 1, 0, 1], [0.1, 0.2, 0.7, 0.8, 0.3, 0.6]
    with_defects = th.compute("auto", scores=np.array(scores), labels=np.array(labels))
    assert (with_defects.method, with_defects.value) == ("best-f1", pytest.approx(0.6))  # as test_best_f1
    assert with_defects.params["rule"].startswith("auto: best F1, as 3 of the 6 calibration images")
    normals_only = th.compute("auto", scores=NORMAL, labels=np.zeros(NORMAL.size))
    assert (normals_only.method, normals_only.value) == ("quantile", th.quantile(NORMAL, 0.99).value)
    assert "none of the 5 calibration images is a labelled defect" in normals_only.describe()
    # a label-free method given labels takes the normal images only
    assert th.compute("max", scores=np.array(scores), labels=np.array(labels)).value == pytest.approx(0.3)
    with pytest.raises(InvalidInput, match="every calibration image is a defect"):
        th.auto(np.ones(3), np.arange(3.0))


def test_threshold_errors_and_description():
    with pytest.raises(InvalidInput, match="at least one"):
        th.max_score(np.array([]))
    with pytest.raises(InvalidInput, match="unknown threshold method"):
        th.compute("median", scores=NORMAL)
    assert "quantile: p=0.9; on normal_images 5" in th.quantile(NORMAL, 0.9).describe()
    assert th.manual(0.7, "line 3 setting").method == "manual"


def test_max_area_decides_on_regions():
    maps = np.zeros((3, 6, 6))
    maps[0, 0, 0] = 0.9  # a speck: tolerated
    maps[1, 1:4, 1:4] = 0.9  # a 9-pixel blob: a defect
    t = th.Threshold(0.5, "max-area", {"max_area": 4})
    assert th.decide(t, np.array([0.9, 0.9, 0.0]), maps).tolist() == [False, True, False]
    assert th.decide(th.Threshold(0.5, "quantile"), np.array([0.9, 0.4, 0.6])).tolist() == [True, False, True]


def test_youden_threshold_maximises_balanced_accuracy_and_ignores_the_defect_share():
    from flawline.evaluate.thresholds import youden

    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.9])
    t = youden(labels, scores)
    assert t.method == "youden" and t.value == 0.5 and t.params["balanced_accuracy"] == pytest.approx(0.875)
    # the same images with the defects repeated tenfold: the threshold does not move (best F1 would)
    many = youden(np.r_[labels, np.ones(40)], np.r_[scores, np.tile([0.5, 0.9], 20)])
    assert many.value == t.value
    with pytest.raises(InvalidInput, match="needs both normal and defect images"):
        youden(np.ones(3), np.arange(3.0))


def test_per_class_metrics_by_hand():
    """Pooled pixel ROC-AUC weighs a class by its defect area; per class it is each against the
    normals (hand-computed: the large region's pixels at 0.4 beat 39 of 40 normal pixels, those
    at 0 tie with 39 of them)."""
    from flawline.evaluate.metrics import per_class

    maps, masks = np.zeros((4, 4, 4)), np.zeros((4, 4, 4), dtype=bool)
    maps[1, 0, 0] = 0.5  # one bright normal pixel
    masks[2, 3, 3], maps[2, 3, 3] = True, 1.0  # "spot": one pixel, found
    masks[3, :2, :] = True  # "patch": 8 pixels, half of them at 0.4
    maps[3, 0, :] = 0.4
    labels = np.array([False, False, True, True])
    out = per_class(labels, [None, None, "spot", "patch"], np.array([0.1, 0.2, 0.9, 0.15]), masks, maps)
    assert out["image_auroc_per_class"] == {"patch": 0.5, "spot": 1.0}
    assert out["pixel_auroc_per_class"]["spot"] == pytest.approx(1.0)
    assert out["pixel_auroc_per_class"]["patch"] == pytest.approx((39 + 19.5) / 80)
    assert out["defect_pixel_share_per_class"] == pytest.approx({"spot": 1 / 9, "patch": 8 / 9})
    assert set(per_class(labels, [None, None, "spot", "patch"], np.array([0.1, 0.2, 0.9, 0.15]))) == {
        "image_auroc_per_class"}
