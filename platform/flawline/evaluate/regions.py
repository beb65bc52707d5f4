"""Where an image's defect is: the region mask Serve answers with and pre-annotations show.

A region is sent only where the model localises something:
- the pixels of the anomaly map at or above the threshold (for a ``max-area`` threshold, only
  regions of at least ``max_area`` pixels);
- for an image judged defective whose map has no pixel there (its map and its image score may be in
  different units: a classifier's CAM, a mixed-supervision head's logit), the connected region
  around the map's peak above half its height over the median (full width at half maximum);
- none at all where that region covers more than ``MAX_REGION_SHARE`` of the image: a region over
  most of the image locates nothing, and an annotator would have to erase it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_REGION_SHARE = 0.25


def defect_mask(amap: np.ndarray, threshold: dict[str, Any] | None, is_defect: bool | None = None) -> np.ndarray:
    """Bool mask [H, W] of ``amap`` [H, W] (module docstring). ``is_defect``: the image's verdict
    (False: no region; True: the peak region when the threshold marks no pixel; None: the
    threshold's pixels only)."""
    from scipy import ndimage

    empty = np.zeros(amap.shape, dtype=bool)
    if not threshold or is_defect is False:
        return empty
    mask = amap >= float(threshold["value"])
    if threshold.get("method") == "max-area" and mask.any():
        labels, _ = ndimage.label(mask)
        keep = np.bincount(labels.ravel()) >= int(threshold.get("params", {}).get("max_area", 1))
        keep[0] = False
        mask = keep[labels]
    if not mask.any() and is_defect:
        med, peak = float(np.median(amap)), float(amap.max())
        if peak > med:
            labels, _ = ndimage.label(amap >= med + 0.5 * (peak - med))
            mask = labels == labels[np.unravel_index(int(np.argmax(amap)), amap.shape)]
    return mask if mask.mean() <= MAX_REGION_SHARE else empty
