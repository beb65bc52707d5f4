"""Streamed evaluation against the exact in-memory metrics: pixel ROC-AUC and AUPRO from
histograms, the max-area rule from per-image levels, bounded heaps and the batch stream."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from flawline.data.records import ImageRecord
from flawline.data.stream import stream_batches
from flawline.evaluate import metrics as M
from flawline.evaluate import thresholds as th
from flawline.evaluate.streaming import PixelAccumulator, TopK, bin_edges, histogram_roc_auc

# The exact AUPRO (metrics.aupro) samples the curve at 200 thresholds, normal-pixel quantiles
# spaced 1.1 * 0.3 / 199 in false-positive rate; joining them by straight lines under a monotone
# curve errs by at most step * (rise of PRO <= 1) / 2, normalised by max_fpr = 0.3. The streamed
# value errs by at most its own reported bound; the two can differ by the sum.
EXACT_AUPRO_GRID_ERROR = (1.1 * 0.3 / 199) / 2 / 0.3  # 2.8e-3


def _maps(rng: np.random.Generator, n: int, size: int = 40, defect_share: float = 0.5):
    """Smooth gamma noise maps; defect images get 1-3 discs raised by a random amount (some
    barely above the noise, so the metrics are far from 0 and 1). Returns masks, maps, classes."""
    maps = ndimage.gaussian_filter(rng.gamma(2.0, 1.0, (n, size, size)), (0, 1.5, 1.5))
    masks = np.zeros((n, size, size), dtype=bool)
    classes: list[str | None] = [None] * n
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        if rng.random() < defect_share:
            classes[i] = "spot" if rng.random() < 0.5 else "ring"
            for _ in range(rng.integers(1, 4)):
                cy, cx, r = rng.integers(4, size - 4, 2).tolist() + [int(rng.integers(1, 6))]
                masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    maps = maps + masks * rng.uniform(0.0, 1.5, (n, 1, 1))
    return masks, maps, classes


@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_pixel_metrics_match_the_exact_ones(seed):
    rng = np.random.default_rng(seed)
    _, calibration, _ = _maps(rng, 30, defect_share=0.0)  # edges fixed before the test maps are seen
    masks, maps, classes = _maps(rng, 80)
    labels = masks.reshape(len(masks), -1).any(1)
    acc = PixelAccumulator(bin_edges(calibration.ravel(), 2048), threshold=2.5)
    for mask, amap, defect, cls in zip(masks, maps, labels, classes):
        acc.add(amap, mask, bool(defect), cls)
    got = acc.metrics()

    exact_auc = M.pixel_roc_auc(masks, maps)
    assert 0.6 < exact_auc < 0.99
    # the pixel ROC-AUC bound is rigorous: only pairs sharing a bin are uncertain, counted 1/2
    assert abs(got["pixel_auroc"] - exact_auc) <= got["pixel_auroc_error_bound"] + 1e-12
    assert got["pixel_auroc_error_bound"] < 1e-3
    exact_pro = M.aupro(masks, maps)
    assert abs(got["aupro"] - exact_pro) <= got["aupro_error_bound"] + EXACT_AUPRO_GRID_ERROR
    assert got["aupro_error_bound"] < 3e-3
    assert got["iou"] == pytest.approx(M.iou(maps >= 2.5, masks), abs=1e-12)  # counts: exact

    exact = M.per_class(labels, classes, np.zeros(len(labels)) + labels, masks, maps)
    assert got["defect_pixel_share_per_class"] == pytest.approx(exact["defect_pixel_share_per_class"])
    for cls, value in exact["pixel_auroc_per_class"].items():
        assert got["pixel_auroc_per_class"][cls] == pytest.approx(value, abs=1e-3)


def test_histogram_auc_by_hand_and_its_bound():
    # defects in bins 2, 2; normals in bins 0, 2: pairs (2>0) x2 = 2, (2=2) x2 ties = 1 → 3/4
    auc, bound = histogram_roc_auc(np.array([0, 0, 2]), np.array([1, 0, 1]))
    assert auc == pytest.approx(0.75) and bound == pytest.approx(0.25)  # 2 tied pairs of 4, half each
    with pytest.raises(Exception, match="both positive"):
        histogram_roc_auc(np.array([0, 0]), np.array([1, 1]))


def test_no_defect_pixels_gives_no_pixel_metrics():
    acc = PixelAccumulator(np.linspace(0, 1, 9))
    acc.add(np.random.default_rng(0).random((8, 8)), np.zeros((8, 8), dtype=bool), False)
    assert acc.metrics() == {}


def test_max_area_from_levels_equals_the_rule_on_all_maps():
    rng = np.random.default_rng(3)
    maps = ndimage.gaussian_filter(rng.random((6, 24, 24)), (0, 1, 1))
    for area in (1, 5, 40):
        whole = th.max_defect_area(maps, area).value
        levels = [th.max_area_level(m, area) for m in maps]
        assert th.max_defect_area_from_levels(levels, area).value == pytest.approx(whole, abs=1e-9)
        # compute() with labels: defect images' levels are left out
        streamed = th.compute("max-area", scores=np.zeros(7), labels=np.r_[0, 0, 0, 0, 0, 0, 1],
                              area_levels=np.r_[levels, 1e9], max_area=area)
        assert streamed.value == pytest.approx(whole, abs=1e-9) and streamed.params == {"max_area": area}


def test_topk_keeps_the_k_highest_and_the_earlier_of_ties():
    top = TopK(3)
    for i, p in enumerate([0.1, 5.0, 3.0, 5.0, -1.0, 4.0]):
        top.push(p, i)
    assert top.items() == [1, 3, 5] and len(top) == 3
    assert not top.would_keep(4.0) and top.would_keep(4.5)
    assert TopK(0).would_keep(1.0) is False


class _Store:
    """get_bytes from a dict, counting the images requested (what stream_batches downloads)."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs, self.requested, self.lock = blobs, 0, threading.Lock()

    def get_bytes(self, key: str) -> bytes:
        with self.lock:
            self.requested += 1
        return self.blobs[key]


def _png(value: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_stream_batches_keeps_order_and_a_bounded_window():
    n, bs, prefetch = 23, 4, 2
    store = _Store({f"k{i}": _png(i * 10) for i in range(n)})
    records = [ImageRecord(i, f"k{i}", "d", "test", 12, 12, bool(i % 2), origin=f"f{i}.png") for i in range(n)]
    seen, most_ahead = [], 0
    for batch in stream_batches(store, records, 8, batch_size=bs, workers=3, prefetch=prefetch, with_masks=True):
        assert batch.images.shape[1:] == (3, 8, 8) and batch.masks.shape[1:] == (8, 8)
        seen.extend(r.image_id for r in batch.records)
        # never more than `prefetch` batches requested beyond the ones handed over
        most_ahead = max(most_ahead, store.requested - len(seen))
        assert batch.labels.tolist() == [bool(r.image_id % 2) for r in batch.records]
        assert np.allclose(batch.images[:, 0, 0, 0].numpy(), [r.image_id * 10 / 255 for r in batch.records],
                           atol=1e-6)
    assert seen == list(range(n)) and most_ahead <= prefetch * bs
