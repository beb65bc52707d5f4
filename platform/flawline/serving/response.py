"""Outcome → the JSON a client gets: verdict, and on request the anomaly heatmap and mask as PNG
(base64) and the defect regions as polygons (``evaluate.regions``: every post-processing step
lives there); and the overlay images ``flawline predict`` writes.

Maps are at the model's input size (S x S). Heatmap PNGs are 8-bit gray at that size with the
scale given next to them (value = lo + (hi - lo) * pixel / 255; hi is twice the threshold, so
the threshold sits at mid-gray). Polygons and region boxes are in the original image's pixels.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from flawline.evaluate.regions import defect_mask, regions
from flawline.serving.models import ModelRef
from flawline.serving.pipeline import Outcome

def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def heatmap_scale(amap: np.ndarray, threshold: float | None) -> tuple[float, float]:
    lo = min(float(amap.min()), 0.0)
    hi = 2.0 * threshold if threshold is not None and threshold > lo else float(amap.max())
    return lo, hi if hi > lo else lo + 1.0


def heatmap_png(amap: np.ndarray, threshold: float | None) -> tuple[bytes, dict[str, float]]:
    lo, hi = heatmap_scale(amap, threshold)
    gray = np.clip((amap - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return _png(gray), {"lo": lo, "hi": hi}


def build_response(outcome: Outcome, ref: ModelRef, image_size: tuple[int, int], latency_ms: float, *,
                   heatmap: bool = False, mask: bool = False, with_regions: bool = False) -> dict[str, Any]:
    th = outcome.threshold
    body: dict[str, Any] = {
        "score": outcome.score,
        "is_defect": outcome.is_defect,
        "threshold": None if th is None else th["value"],
        "threshold_method": None if th is None else th.get("method"),
        "defect_class": outcome.defect_class,
        "model": ref.name,
        "model_version": ref.version,
        "latency_ms": round(latency_ms, 3),
        "inference_ms": None if outcome.inference_ms is None else round(outcome.inference_ms, 3),
        "batch_size": outcome.batch_size,
    }
    if outcome.map is not None and (heatmap or mask or with_regions):
        amap = outcome.map
        body["map_size"] = [int(amap.shape[1]), int(amap.shape[0])]
        body["image_size"] = list(image_size)
        if heatmap:
            png, scale = heatmap_png(amap, None if th is None else float(th["value"]))
            body["heatmap_png"] = base64.b64encode(png).decode("ascii")
            body["heatmap_scale"] = scale
        if mask or with_regions:
            m = defect_mask(amap, th, outcome.is_defect)
            if mask:
                body["mask_png"] = base64.b64encode(_png(m.astype(np.uint8) * 255)).decode("ascii")
            if with_regions:
                body["regions"] = regions(amap, m, image_size)
    return body


# -- overlays (flawline predict --out) -----------------------------------------------------------
_COLORS = np.array([[0, 0, 0], [40, 0, 120], [200, 30, 60], [255, 150, 0], [255, 255, 160]], dtype=np.float32)


def _colorize(gray: np.ndarray) -> np.ndarray:
    """8-bit gray → RGB along a dark-purple-red-orange-yellow ramp."""
    pos = gray.astype(np.float32) / 255.0 * (len(_COLORS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_COLORS) - 2)
    frac = (pos - lo)[..., None]
    return (_COLORS[lo] * (1 - frac) + _COLORS[lo + 1] * frac).astype(np.uint8)


def overlay_png(image_bytes: bytes, response: dict[str, Any], alpha: float = 0.45) -> bytes:
    """The original image with the heatmap blended over it, region outlines, and the verdict."""
    with Image.open(io.BytesIO(image_bytes)) as img:
        base = img.convert("RGB")
    if response.get("heatmap_png"):
        heat = Image.open(io.BytesIO(base64.b64decode(response["heatmap_png"]))).convert("L")
        heat = heat.resize(base.size, Image.BILINEAR)
        colored = Image.fromarray(_colorize(np.asarray(heat)))
        base = Image.blend(base, colored, alpha)
    draw = ImageDraw.Draw(base)
    for region in response.get("regions") or []:
        points = [tuple(p) for p in region["polygon"]]
        if len(points) >= 2:
            draw.line(points + [points[0]], fill=(0, 255, 0), width=max(1, base.size[0] // 200))
    verdict = {True: "DEFECT", False: "ok", None: "no threshold"}[response.get("is_defect")]
    score = response.get("score")
    label = f"{verdict}  score {score:.4g}" if score is not None else verdict
    left, top, right, bottom = draw.textbbox((4, 4), label)
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.text((4, 4), label, fill=(255, 80, 80) if response.get("is_defect") else (80, 255, 80))
    buf = io.BytesIO()
    base.save(buf, format="PNG")
    return buf.getvalue()
