"""Evaluate a fitted detector on labelled images: every metric of ``metrics`` in one dict."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from flawline.data.records import LabelledImages
from flawline.evaluate import metrics as M
from flawline.evaluate.thresholds import Threshold, decide
from flawline.models.base import Detector, Prediction


def evaluate(detector: Detector, data: LabelledImages, threshold: Threshold | None = None,
             pixel_metrics: bool = True) -> tuple[dict[str, Any], Prediction]:
    """Metrics of ``detector`` on ``data``; the threshold defaults to the detector's own."""
    started = time.perf_counter()
    pred = detector.predict(data.images)
    seconds = time.perf_counter() - started
    threshold = threshold or detector.threshold
    out: dict[str, Any] = {
        "images": len(data), "defects": int(data.labels.sum()),
        "image_auroc": M.roc_auc(data.labels, pred.scores),
        "average_precision": M.average_precision(data.labels, pred.scores),
        "predict_seconds": seconds, "predict_images_per_s": len(data) / seconds if seconds else None,
    }
    if threshold is not None:
        verdicts = decide(threshold, pred.scores, pred.maps)
        at = M.precision_recall_f1(data.labels, verdicts.astype(np.float64), 0.5)
        out.update(threshold=threshold.as_dict(), f1=at["f1"], precision=at["precision"], recall=at["recall"],
                   accuracy=at["accuracy"], confusion={k: at[k] for k in ("tp", "fp", "fn", "tn")})
    if pixel_metrics and data.masks.any():
        out["pixel_auroc"] = M.pixel_roc_auc(data.masks, pred.maps)
        out["aupro"] = M.aupro(data.masks, pred.maps)
        if threshold is not None:
            out["iou"] = M.iou(pred.maps >= threshold.value, data.masks)
    if data.classes:
        with_masks = pixel_metrics and data.masks.any()
        out.update(M.per_class(data.labels, data.classes, pred.scores, data.masks if with_masks else None,
                               pred.maps if with_masks else None))
    return out, pred
