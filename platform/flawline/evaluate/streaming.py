"""Pixel metrics with bounded memory: accumulators fed one anomaly map at a time.

``metrics.pixel_roc_auc`` and ``metrics.aupro`` need every map of the test set at once (N x S x S
floats). Here each map is binned as it comes, on bin edges fixed *before* the test pass
(``bin_edges``, from a sample of the calibration maps' pixel values), and only fixed-size counts
are kept, whatever the number of images:

- pixel ROC-AUC from two histograms (defect and normal pixels). Pairs of a defect and a normal
  pixel in different bins are ordered exactly; pairs in the same bin count one half, so the
  result is within ``pixel_auroc_error_bound`` = sum_b D_b N_b / (2 D N) of the exact value
  (a bound computed from the counts, typically ~1e-4 with 2,048 bins);
- AUPRO from, at each bin edge t, the sum over defect regions of the share of the region's pixels
  above t (per-region overlap) and the count of normal pixels above t (the false-positive rate):
  every edge is a point of the exact per-region-overlap curve, joined by straight lines.
  Between two points the true curve rises monotonically, so the area is off by at most
  sum_i dFPR_i dPRO_i / 2 (normalised by ``max_fpr``): ``aupro_error_bound``;
- IoU at the threshold from two exact pixel counts.

Memory: O(bins x (defect classes + 2)) numbers; per image, a transient O(regions x bins) table.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flawline.errors import InvalidInput

DEFAULT_BINS = 2048
SAMPLE_BUDGET = 1 << 20  # calibration pixel values kept to place the bin edges (8 MiB of float64)


def bin_edges(sample: np.ndarray, bins: int = DEFAULT_BINS, lo: float | None = None,
              hi: float | None = None) -> np.ndarray:
    """``bins - 1`` ascending edges (fewer where they coincide) for map values: half at quantiles
    of ``sample`` (pixel values of calibration maps; every bin then holds about the same share of
    normal pixels, whatever their distribution), half evenly spaced over [lo, hi] (default: the
    sample's range). Values at or below the first edge and above the last fall into the two
    overflow bins. Raises ``InvalidInput`` for fewer than 4 bins or an empty / non-finite sample."""
    s = np.asarray(sample, dtype=np.float64).ravel()
    if bins < 4:
        raise InvalidInput(f"pixel histograms need at least 4 bins, got {bins}")
    if s.size == 0 or not np.isfinite(s).all():
        raise InvalidInput("bin edges need a non-empty sample of finite map values")
    lo = float(s.min()) if lo is None else float(lo)
    hi = float(s.max()) if hi is None else float(hi)
    n_q = bins // 2
    edges = np.concatenate([np.quantile(s, np.linspace(0.0, 1.0, n_q)),
                            np.linspace(lo, max(hi, lo), bins - 1 - n_q)])
    return np.unique(edges)


def _suffix_above(counts: np.ndarray) -> np.ndarray:
    """Bin counts [..., E+1] → counts of values above each edge [..., E] (bins k+1 .. E)."""
    rev = np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1]
    return rev[..., 1:]


def histogram_roc_auc(defect: np.ndarray, normal: np.ndarray) -> tuple[float, float]:
    """(ROC-AUC, bound on its distance to the exact one) from bin counts of defect and normal values
    on the same bins. Raises ``InvalidInput`` when either is empty."""
    d, n = np.asarray(defect, dtype=np.float64), np.asarray(normal, dtype=np.float64)
    dn, nn = d.sum(), n.sum()
    if dn == 0 or nn == 0:
        raise InvalidInput("the metric needs both positive (defect) and negative (normal) samples")
    below = np.cumsum(n) - n  # normal values in lower bins
    auc = float((d * (below + 0.5 * n)).sum() / (dn * nn))
    bound = float((d * n).sum() / (2.0 * dn * nn))
    return auc, bound


@dataclass
class PixelAccumulator:
    """Streamed pixel metrics over the test maps (module docstring). ``edges`` [E] ascending, fixed
    for the whole pass; ``threshold``: the pixel threshold for IoU (None: no IoU)."""

    edges: np.ndarray
    threshold: float | None = None
    max_fpr: float = 0.3
    # (is defect image, class) → [2, E+1] counts: row 0 pixels outside the mask, row 1 inside it
    groups: dict[tuple[bool, str | None], np.ndarray] = field(default_factory=dict)
    pro_sum: np.ndarray | None = None  # [E] summed per-region overlap above each edge
    regions: int = 0
    intersection: int = 0
    union: int = 0
    lowest: float = np.inf
    highest: float = -np.inf

    def __post_init__(self) -> None:
        self.edges = np.asarray(self.edges, dtype=np.float64)
        if self.edges.ndim != 1 or self.edges.size == 0 or np.any(np.diff(self.edges) <= 0):
            raise InvalidInput("pixel histogram edges must be a non-empty ascending 1-D array")
        self.pro_sum = np.zeros(self.edges.size, dtype=np.float64)

    @property
    def bins(self) -> int:
        """Bins including the two overflow bins."""
        return self.edges.size + 1

    def add(self, amap: np.ndarray, mask: np.ndarray, defect: bool, defect_class: str | None = None) -> None:
        """One image: ``amap`` float [H, W] and its ``mask`` bool [H, W] (True = defect pixel),
        ``defect``: the image's label. Raises ``InvalidInput`` for differing shapes or non-finite values."""
        from scipy import ndimage

        m = np.asarray(amap, dtype=np.float64)
        mk = np.asarray(mask) > 0
        if m.shape != mk.shape or m.ndim != 2:
            raise InvalidInput(f"mask {mk.shape} and anomaly map {m.shape} must both be [H, W]")
        if not np.isfinite(m).all():
            raise InvalidInput("anomaly map contains NaN or infinite values")
        self.lowest, self.highest = min(self.lowest, float(m.min())), max(self.highest, float(m.max()))
        nb = self.bins
        idx = np.searchsorted(self.edges, m, side="left")  # bin b: edges[b-1] < v <= edges[b]
        key = (bool(defect), defect_class if defect else None)
        counts = self.groups.setdefault(key, np.zeros((2, nb), dtype=np.int64))
        counts[0] += np.bincount(idx[~mk], minlength=nb)
        counts[1] += np.bincount(idx[mk], minlength=nb)
        if self.threshold is not None:
            pred = m >= self.threshold
            self.intersection += int((pred & mk).sum())
            self.union += int((pred | mk).sum())
        if mk.any():
            labels, n = ndimage.label(mk)
            per_region = np.bincount(labels[mk] * nb + idx[mk], minlength=(n + 1) * nb).reshape(n + 1, nb)[1:]
            sizes = per_region.sum(1, keepdims=True)
            self.pro_sum += (_suffix_above(per_region) / sizes).sum(0)
            self.regions += n

    def _counts(self, keys: list[tuple[bool, str | None]]) -> np.ndarray:
        return sum((self.groups[k] for k in keys), np.zeros((2, self.bins), dtype=np.int64))

    @property
    def has_defect_pixels(self) -> bool:
        return bool(self._counts(list(self.groups))[1].sum())

    def pixel_roc_auc(self) -> tuple[float, float]:
        """(pixel ROC-AUC over every pixel seen, its error bound). Raises ``InvalidInput`` without
        defect or normal pixels."""
        c = self._counts(list(self.groups))
        return histogram_roc_auc(c[1], c[0])

    def aupro(self) -> tuple[float, float]:
        """(AUPRO up to ``max_fpr``, normalised to [0, 1]; the bound on its binning error).
        Raises ``InvalidInput`` without defect regions or normal pixels."""
        c = self._counts(list(self.groups))
        normal = c[0]
        if not self.regions or not normal.sum():
            raise InvalidInput("AUPRO needs defect and normal pixels")
        fpr_at = _suffix_above(normal) / normal.sum()  # [E], descending with the edge
        pro_at = self.pro_sum / self.regions
        fprs = np.r_[0.0, fpr_at[::-1], 1.0]  # threshold +inf .. -inf
        pros = np.r_[0.0, pro_at[::-1], 1.0]
        order = np.lexsort((pros, fprs))
        fprs, pros = fprs[order], pros[order]
        keep = fprs <= self.max_fpr
        x = np.r_[fprs[keep], self.max_fpr]
        y = np.r_[pros[keep], np.interp(self.max_fpr, fprs, pros)]
        area = float(np.trapezoid(y, x) / self.max_fpr)
        # points up to the first one past max_fpr: the segments the area was taken over
        last = min(int(keep.sum()) + 1, fprs.size)
        bound = float((np.diff(fprs[:last]) * np.diff(pros[:last])).sum() / 2 / self.max_fpr)
        return area, bound

    def iou(self) -> float | None:
        """IoU of (map >= threshold) with the masks over every pixel seen (1.0 when both are empty);
        None without a threshold."""
        if self.threshold is None:
            return None
        return self.intersection / self.union if self.union else 1.0

    def per_class(self) -> dict[str, dict[str, float]]:
        """``pixel_auroc_per_class`` (each class's images with the normal images) and
        ``defect_pixel_share_per_class``, as ``metrics.per_class`` gives them; empty without classes
        holding defect pixels."""
        total = self._counts(list(self.groups))[1].sum()
        normal_keys = [k for k in self.groups if not k[0]]
        pixel, share = {}, {}
        for cls in sorted({k[1] for k in self.groups if k[0] and k[1]}):
            mine = self.groups[(True, cls)]
            if not total or not mine[1].sum():
                continue
            c = self._counts(normal_keys) + mine
            pixel[cls] = histogram_roc_auc(c[1], c[0])[0]
            share[cls] = float(mine[1].sum() / total)
        return {"pixel_auroc_per_class": pixel, "defect_pixel_share_per_class": share} if pixel else {}

    def percentile(self, q: float) -> float:
        """About the ``q``-th percentile (0-100) of every pixel value seen: the upper edge of the
        bin it falls in (clamped to the values seen); for colour scales."""
        c = self._counts(list(self.groups)).sum(0)
        if not c.sum():
            raise InvalidInput("no pixels seen")
        b = int(np.searchsorted(np.cumsum(c), q / 100.0 * c.sum(), side="left"))
        value = self.edges[min(b, self.edges.size - 1)] if b < self.edges.size else self.highest
        return float(np.clip(value, self.lowest, self.highest))

    def metrics(self) -> dict[str, Any]:
        """``pixel_auroc``, ``aupro`` (with their error bounds), ``iou`` and the per-class pixel
        metrics, under the keys ``evaluate.run.evaluate`` uses; empty without defect pixels."""
        if not self.has_defect_pixels:
            return {}
        auc, auc_err = self.pixel_roc_auc()
        pro, pro_err = self.aupro()
        out: dict[str, Any] = {"pixel_auroc": auc, "aupro": pro, "pixel_auroc_error_bound": auc_err,
                               "aupro_error_bound": pro_err, "pixel_bins": self.bins}
        if self.threshold is not None:
            out["iou"] = self.iou()
        out.update(self.per_class())
        return out


class TopK:
    """The ``k`` items of highest priority seen (a bounded heap): O(k) memory however many are
    pushed. ``items()``: highest priority first; ties keep the earlier item."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._heap: list[tuple[float, int, Any]] = []
        self._order = itertools.count()

    def would_keep(self, priority: float) -> bool:
        return self.k > 0 and (len(self._heap) < self.k or priority > self._heap[0][0])

    def push(self, priority: float, item: Any) -> None:
        if not self.would_keep(priority):
            return
        entry = (float(priority), -next(self._order), item)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        else:
            heapq.heapreplace(self._heap, entry)

    def items(self) -> list[Any]:
        return [e[2] for e in sorted(self._heap, key=lambda e: (e[0], e[1]), reverse=True)]

    def __len__(self) -> int:
        return len(self._heap)
