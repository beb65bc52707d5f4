"""Detection and segmentation metrics, each checked against hand-computed cases in tests.

Image level: ROC-AUC, the ROC curve, average precision (scikit-learn's, with
flawline's input checks: ``InvalidInput`` for one class only or non-finite scores),
precision/recall/F1 at a threshold. Pixel level: ROC-AUC over all pixels, AUPRO up to a
false-positive rate (per-region overlap; Bergmann et al., "The MVTec Anomaly Detection Dataset",
IJCV 2021; ours, as no well-kept library has it), IoU of binarised maps.
"""

from __future__ import annotations

import numpy as np

from flawline.errors import InvalidInput


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise InvalidInput(f"{y.size} labels but {s.size} scores")
    if not np.isfinite(s).all():
        raise InvalidInput("scores contain NaN or infinite values")
    if y.all() or not y.any():
        raise InvalidInput("the metric needs both positive (defect) and negative (normal) samples")
    return y, s


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random defect > score of a random normal), ties
    counting 1/2 (``sklearn.metrics.roc_auc_score``). Raises ``InvalidInput`` without both classes
    or with non-finite scores."""
    from sklearn.metrics import roc_auc_score

    y, s = _check(labels, scores)
    return float(roc_auc_score(y, s))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending; a point per distinct score, after (0, 0) at
    threshold +inf (``sklearn.metrics.roc_curve`` keeping every point)."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    y, s = _check(labels, scores)
    fpr, tpr, thresholds = sk_roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thresholds


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Sum over thresholds of (R_n - R_{n-1}) * P_n, the step-wise definition
    (``sklearn.metrics.average_precision_score``)."""
    from sklearn.metrics import average_precision_score

    y, s = _check(labels, scores)
    return float(average_precision_score(y, s))


def precision_recall_f1(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Counts and rates when images scoring >= threshold are called defective."""
    y = np.asarray(labels).astype(bool).ravel()
    pred = np.asarray(scores, dtype=np.float64).ravel() >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = (tp + tn) / y.size if y.size else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall, "f1": f1,
            "accuracy": accuracy}


def pixel_roc_auc(masks: np.ndarray, maps: np.ndarray) -> float:
    """ROC-AUC over every pixel of every image."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.shape != maps.shape:
        raise InvalidInput(f"masks {masks.shape} and anomaly maps {maps.shape} differ in shape")
    return roc_auc(masks.ravel() > 0, maps.ravel())


def per_class(labels: np.ndarray, classes: list[str | None], scores: np.ndarray,
              masks: np.ndarray | None = None, maps: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Each defect class against the normals: ``image_auroc_per_class`` and, given ``masks`` and
    ``maps`` [N, H, W], ``pixel_auroc_per_class`` and ``defect_pixel_share_per_class`` (the class's
    share of all defect pixels). Pooled over every pixel, ``pixel_roc_auc`` weighs classes by their
    defect area, so one class of large regions can decide it alone; these say which.
    ``labels`` [N] (true = defective), ``classes`` [N] (None for normals)."""
    labels = np.asarray(labels).astype(bool)
    normal = ~labels
    out: dict[str, dict[str, float]] = {"image_auroc_per_class": {}}
    pixel, share = {}, {}
    total = float(np.count_nonzero(masks)) if masks is not None else 0.0
    for cls in sorted({c for c in classes if c}):
        mine = np.array([c == cls for c in classes])
        sel = normal | mine
        out["image_auroc_per_class"][cls] = roc_auc(labels[sel], np.asarray(scores)[sel])
        if masks is not None and maps is not None and total and np.asarray(masks)[mine].any():
            pixel[cls] = pixel_roc_auc(np.asarray(masks)[sel], np.asarray(maps)[sel])
            share[cls] = float(np.count_nonzero(np.asarray(masks)[mine])) / total
    if pixel:
        out["pixel_auroc_per_class"], out["defect_pixel_share_per_class"] = pixel, share
    return out


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3, num_thresholds: int = 200) -> float:
    """Area under the per-region-overlap curve for false-positive rates up to ``max_fpr``,
    normalised to [0, 1]. Each connected defect region counts equally, whatever its size."""
    from scipy import ndimage

    masks = np.asarray(masks) > 0
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise InvalidInput(f"masks {masks.shape} and maps {maps.shape} must both be [N, H, W]")
    if not masks.any() or masks.all():
        raise InvalidInput("AUPRO needs defect and normal pixels")
    regions = []  # (image index, flat pixel indices of one region)
    for i, m in enumerate(masks):
        labels, n = ndimage.label(m)
        for r in range(1, n + 1):
            regions.append((i, np.flatnonzero(labels == r)))
    normal = ~masks
    # Thresholds at the normal-pixel quantiles that give false-positive rates 0 .. a bit past max_fpr.
    levels = 1.0 - np.linspace(0.0, min(1.0, max_fpr * 1.1), num_thresholds)
    thresholds = np.unique(np.quantile(maps[normal], levels))
    flat = maps.reshape(maps.shape[0], -1)
    n_normal = normal.sum()
    fprs, pros = [0.0], [0.0]  # threshold +inf: nothing flagged
    for t in thresholds[::-1]:
        fprs.append(float(((maps > t) & normal).sum() / n_normal))
        pros.append(float(np.mean([(flat[i, idx] > t).mean() for i, idx in regions])))
    fprs.append(1.0)
    pros.append(1.0)  # threshold -inf: everything flagged
    fprs_a, pros_a = np.array(fprs), np.array(pros)
    order = np.lexsort((pros_a, fprs_a))
    fprs_a, pros_a = fprs_a[order], pros_a[order]
    keep = fprs_a <= max_fpr
    x = np.r_[fprs_a[keep], max_fpr]
    y = np.r_[pros_a[keep], np.interp(max_fpr, fprs_a, pros_a)]
    return float(np.trapezoid(y, x) / max_fpr)


def iou(pred_masks: np.ndarray, gt_masks: np.ndarray) -> float:
    """Intersection over union of all defect pixels (1.0 when both are empty)."""
    p, g = np.asarray(pred_masks) > 0, np.asarray(gt_masks) > 0
    if p.shape != g.shape:
        raise InvalidInput(f"predicted masks {p.shape} and ground truth {g.shape} differ in shape")
    union = (p | g).sum()
    return float((p & g).sum() / union) if union else 1.0
