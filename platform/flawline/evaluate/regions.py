"""Where an image's defect is: the region mask Serve answers with and pre-annotations show, and
its regions as polygons (``regions``).

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
MAX_REGIONS = 50


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


def regions(amap: np.ndarray, mask: np.ndarray, image_size: tuple[int, int], eps: float = 0.5
            ) -> list[dict[str, Any]]:
    """Connected defect regions of ``mask`` [H, W] (bool) with ``amap`` [H, W]: for each its outer
    polygon, box ``[x0, y0, x1, y1]``, area and peak score, in the original image's pixels
    (``image_size`` = (width, height)), largest peak first, at most ``MAX_REGIONS``.

    The outline is the region's boundary on pixel edges (marching squares at level 0.5 on the
    region's 0/1 mask, contourpy), simplified by Douglas-Peucker with tolerance ``eps`` map pixels
    (OpenCV's ``approxPolyDP`` on the closed ring; at least 3 vertices)."""
    if not mask.any():
        return []
    import contourpy
    import cv2
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    peaks = ndimage.maximum(amap, labels, index=np.arange(1, n + 1))
    order = np.argsort(-np.asarray(peaks))[:MAX_REGIONS]
    slices = ndimage.find_objects(labels)
    sx, sy = image_size[0] / amap.shape[1], image_size[1] / amap.shape[0]
    out = []
    for k in order:
        label = int(k) + 1
        ys, xs = slices[k]
        sub = np.pad((labels[ys, xs] == label).astype(np.float32), 1)
        lines = contourpy.contour_generator(z=sub, line_type=contourpy.LineType.Separate).lines(0.5)
        outer = max(lines, key=len)[:-1]  # a closed ring: its last point repeats the first
        ring = cv2.approxPolyDP(outer.astype(np.float32).reshape(-1, 1, 2), eps, True).reshape(-1, 2)
        if len(ring) < 3:  # a region of a pixel or a line of pixels: its unsimplified outline
            ring = outer
        ring = ring + np.array([xs.start - 1, ys.start - 1])  # back to map pixels (undo crop and pad)
        out.append({
            "polygon": [[round((float(x) + 0.5) * sx, 1), round((float(y) + 0.5) * sy, 1)] for x, y in ring],
            "bbox": [round(xs.start * sx, 1), round(ys.start * sy, 1), round(xs.stop * sx, 1), round(ys.stop * sy, 1)],
            "area_px": round(float((labels[ys, xs] == label).sum()) * sx * sy, 1),
            "peak_score": float(peaks[k]),
        })
    return out
