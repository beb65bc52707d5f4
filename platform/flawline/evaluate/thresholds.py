"""Decision thresholds a person can understand and control.

From normal validation images, the four methods of the survey (Bergmann et al.): maximum score,
p-quantile, k-sigma and maximum defect area; with labelled defects also best-F1 and Youden's J
(best balanced accuracy, independent of the share of defects). ``auto`` uses what is labelled:
best-F1 when the calibration images hold labelled defects, else the 0.99-quantile of the normal
ones, and its record says which rule it took and why. Each returns a ``Threshold`` that records
how and on what data it was chosen; a manual value overrides it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from flawline.errors import InvalidInput

METHODS = ("auto", "max", "quantile", "k-sigma", "max-area", "best-f1", "youden", "manual")
LABEL_FREE = ("max", "quantile", "k-sigma", "max-area")  # chosen on the normal images alone


@dataclass
class Threshold:
    value: float
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # what it was computed on (dataset, split, counts)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Threshold:
        return cls(**values)

    def describe(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        on = ", ".join(f"{k} {v}" for k, v in self.data.items())
        return f"{self.value:.6g} ({self.method}{': ' + params if params else ''}{'; on ' + on if on else ''})"


def _normal_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise InvalidInput("threshold needs at least one normal validation score")
    if not np.isfinite(scores).all():
        raise InvalidInput("threshold: validation scores contain NaN or infinite values")
    return scores


def max_score(scores: np.ndarray, data: dict | None = None) -> Threshold:
    """The highest normal score: no false positive on the validation set (conservative)."""
    s = _normal_scores(scores)
    return Threshold(float(np.nextafter(s.max(), np.inf)), "max", {}, data or {"normal_images": s.size})


def quantile(scores: np.ndarray, p: float = 0.99, data: dict | None = None) -> Threshold:
    """The p-quantile of normal scores: tolerates a few noisy validation images."""
    if not 0.0 < p <= 1.0:
        raise InvalidInput(f"quantile p={p} must lie in (0, 1]")
    s = _normal_scores(scores)
    return Threshold(float(np.quantile(s, p)), "quantile", {"p": p}, data or {"normal_images": s.size})


def k_sigma(scores: np.ndarray, k: float = 3.0, data: dict | None = None) -> Threshold:
    """mean + k * std of normal scores (a Gaussian model of the normal score distribution)."""
    s = _normal_scores(scores)
    return Threshold(float(s.mean() + k * s.std(ddof=1 if s.size > 1 else 0)), "k-sigma", {"k": k},
                     data or {"normal_images": s.size})


def max_area_level(amap: np.ndarray, max_area: int) -> float:
    """One normal map [H, W]'s share of the ``max-area`` rule: the lowest pixel threshold (to
    about 1e-12 of its value range, by 40 bisection steps) above which ``amap`` has no connected
    region of ``max_area`` pixels or more. A map with no such region even below its lowest pixel
    gives that pixel minus 1e-9. O(1) to keep per image, so the rule streams."""
    from scipy import ndimage

    m = np.asarray(amap, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise InvalidInput(f"max-area threshold needs a pixel map [H, W], got shape {m.shape}")

    def largest_region(t: float) -> int:
        labels, n = ndimage.label(m > t)
        return int(np.bincount(labels.ravel())[1:].max()) if n else 0

    lo, hi = float(m.min()) - 1e-9, float(m.max())  # largest_region(hi) == 0 < max_area
    if largest_region(lo) < max_area:
        return lo
    for _ in range(40):  # bisection: the region size only shrinks as the threshold grows
        mid = (lo + hi) / 2
        if largest_region(mid) >= max_area:
            lo = mid
        else:
            hi = mid
    return hi


def max_defect_area_from_levels(levels: np.ndarray, max_area: int, data: dict | None = None) -> Threshold:
    """The ``max-area`` threshold from each normal map's ``max_area_level`` [N]: their maximum
    (no map has a region of ``max_area`` pixels or more above it)."""
    levels = np.asarray(levels, dtype=np.float64).ravel()
    if levels.size == 0:
        raise InvalidInput("max-area threshold needs at least one normal validation map")
    return Threshold(float(levels.max()), "max-area", {"max_area": int(max_area)},
                     data or {"normal_images": int(levels.size)})


def max_defect_area(maps: np.ndarray, max_area: int, data: dict | None = None) -> Threshold:
    """The lowest pixel threshold at which no normal validation map ([N, H, W]) has a connected
    region of ``max_area`` pixels or more above it (smaller regions are treated as noise and
    filtered): the largest of the maps' ``max_area_level``."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise InvalidInput("max-area threshold needs normal validation maps shaped [N, H, W]")
    if max_area < 1:
        raise InvalidInput("max_area must be at least 1 pixel")
    return max_defect_area_from_levels(np.array([max_area_level(m, max_area) for m in maps]), max_area,
                                       data or {"normal_images": maps.shape[0]})


def decide(threshold: Threshold, scores: np.ndarray, maps: np.ndarray | None = None) -> np.ndarray:
    """Defect verdicts: image score at or above the threshold; for ``max-area``, any connected
    region of the pixel map above it that is at least ``max_area`` pixels large."""
    if threshold.method != "max-area":
        return np.asarray(scores) >= threshold.value
    from scipy import ndimage

    if maps is None:
        raise InvalidInput("a max-area threshold needs the pixel anomaly maps to decide")
    max_area = int(threshold.params["max_area"])
    verdicts = []
    for m in np.asarray(maps):
        labels, n = ndimage.label(m > threshold.value)
        verdicts.append(bool(n) and int(np.bincount(labels.ravel())[1:].max()) >= max_area)
    return np.array(verdicts, dtype=bool)


def best_f1(labels: np.ndarray, scores: np.ndarray, data: dict | None = None) -> Threshold:
    """The score threshold with the highest F1 on labelled images (needs defects and normals);
    scikit-learn's precision-recall curve."""
    from sklearn.metrics import precision_recall_curve

    y = np.asarray(labels).astype(bool).ravel()
    s = _normal_scores(scores)
    if y.all() or not y.any():
        raise InvalidInput("best-f1 threshold needs both normal and defect images")
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    i = int(np.argmax(f1))
    return Threshold(float(thresholds[i]), "best-f1", {"f1": round(float(f1[i]), 6)},
                     data or {"images": int(y.size), "defects": int(y.sum())})


def youden(labels: np.ndarray, scores: np.ndarray, data: dict | None = None) -> Threshold:
    """The score threshold with the highest balanced accuracy (Youden's J = TPR - FPR) on
    labelled images: unlike best-F1 it does not depend on the share of defects among the labelled
    images, which active learning and few-shot labelling skew. scikit-learn's ROC curve."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels).astype(bool).ravel()
    s = _normal_scores(scores)
    if y.all() or not y.any():
        raise InvalidInput("youden threshold needs both normal and defect images")
    fpr, tpr, thresholds = roc_curve(y, s)
    j = tpr - fpr
    i = int(np.flatnonzero(j == j.max())[0])  # the highest threshold among the best
    value = float(thresholds[i]) if np.isfinite(thresholds[i]) else float(np.nextafter(s.max(), np.inf))
    return Threshold(value, "youden", {"balanced_accuracy": round(float(0.5 + j[i] / 2), 6)},
                     data or {"images": int(y.size), "defects": int(y.sum())})


def auto(labels: np.ndarray | None, scores: np.ndarray, p: float = 0.99, data: dict | None = None) -> Threshold:
    """What the labels allow: with labelled defects and normals among the calibration images
    (``labels`` [N], 1 = defect; ``scores`` [N]), best F1 on them (where defects actually score,
    rather than a guess from normals alone); with normals only, the p-quantile of their scores. The
    threshold's ``params["rule"]`` says which rule was taken and why. Raises ``InvalidInput`` when
    every calibration image is a defect."""
    s = _normal_scores(scores)
    y = np.zeros(s.size, dtype=bool) if labels is None else np.asarray(labels).astype(bool).ravel()
    if y.all():
        raise InvalidInput("auto threshold: every calibration image is a defect; it needs normal images")
    if y.any():
        chosen = best_f1(y, s, data)
        chosen.params["rule"] = (f"auto: best F1, as {int(y.sum())} of the {y.size} calibration images are "
                                 "labelled defects")
        return chosen
    chosen = quantile(s, p, data)
    chosen.params["rule"] = (f"auto: the {p:g}-quantile of normal scores, as none of the {s.size} calibration "
                             "images is a labelled defect (label a few defects in the val split for best F1)")
    return chosen


def manual(value: float, note: str = "") -> Threshold:
    if not np.isfinite(value):
        raise InvalidInput(f"manual threshold {value} is not a finite number")
    return Threshold(float(value), "manual", {"note": note} if note else {}, {})


def compute(method: str, *, scores: np.ndarray | None = None, maps: np.ndarray | None = None,
            labels: np.ndarray | None = None, data: dict | None = None, area_levels: np.ndarray | None = None,
            **params: Any) -> Threshold:
    """Dispatch by method name (CLI and jobs). ``labels`` [N] (1 = defect) beside ``scores`` [N]:
    the label-free methods take the normal images among them only. ``max-area`` needs either
    ``maps`` [N, H, W] or, streamed, ``area_levels`` [N] (each map's ``max_area_level`` at this
    ``max_area``; NaN or anything for the defect images, which it leaves out)."""
    if method == "auto":
        return auto(labels, scores, params.get("p", 0.99), data)
    if method in LABEL_FREE and labels is not None:
        normal = ~np.asarray(labels).astype(bool).ravel()
        scores = None if scores is None else np.asarray(scores)[normal]
        maps = None if maps is None else np.asarray(maps)[normal]
        area_levels = None if area_levels is None else np.asarray(area_levels)[normal]
    if method == "max":
        return max_score(scores, data)
    if method == "quantile":
        return quantile(scores, params.get("p", 0.99), data)
    if method == "k-sigma":
        return k_sigma(scores, params.get("k", 3.0), data)
    if method == "max-area":
        if area_levels is not None and maps is None:
            if int(params.get("max_area", 64)) < 1:
                raise InvalidInput("max_area must be at least 1 pixel")
            return max_defect_area_from_levels(area_levels, int(params.get("max_area", 64)), data)
        return max_defect_area(maps, int(params.get("max_area", 64)), data)
    if method == "best-f1":
        return best_f1(labels, scores, data)
    if method == "youden":
        return youden(labels, scores, data)
    raise InvalidInput(f"unknown threshold method {method!r}; choose one of: {', '.join(METHODS[:-1])}")


QUANTILE_STEPS = 101  # held-out normal scores are kept as this many quantiles (0 %, 1 %, ..., 100 %)
MIN_READABLE_NORMALS = 10  # fewer held-out normal images say too little to put a score among them


def normal_quantiles(scores: np.ndarray) -> list[float]:
    """Held-out normal images' scores [N] → ``QUANTILE_STEPS`` quantiles (what ``normal_percentile``
    reads; kept with the model in ``Detector.info["normal_score_quantiles"]``)."""
    s = _normal_scores(scores)
    return [float(v) for v in np.quantile(s, np.linspace(0.0, 1.0, QUANTILE_STEPS))]


def normal_percentile(quantiles: list[float] | None, scores: np.ndarray) -> np.ndarray | None:
    """The share of held-out normal images each score is above, in [0, 1]: the same meaning for
    every model whatever its score's units (PaDiM distances, flow log-likelihoods, a head's logit),
    so people can read it (what pre-annotations show annotators as their score). Linear between
    the stored quantiles; 0 below the lowest, 1 above the highest. None without quantiles."""
    if not quantiles:
        return None
    q = np.asarray(quantiles, dtype=np.float64)
    return np.interp(np.asarray(scores, dtype=np.float64), q, np.linspace(0.0, 1.0, len(q)), left=0.0, right=1.0)
