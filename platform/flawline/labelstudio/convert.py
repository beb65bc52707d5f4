"""Between flawline's labels and predictions and Label Studio's result JSON.

Region coordinates in Label Studio are percentages of the image; brush masks are Label Studio's
RLE of the RGBA mask (``label_studio_sdk.converter.brush``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image as PILImage
from PIL import ImageDraw

from flawline.data.images import to_shown_frame
from flawline.errors import InvalidInput
from flawline.labelstudio.configs import DEFECT, IMAGE, NORMAL, REGION, VERDICT, defect_name


@dataclass
class Prediction:
    """What a model says of one image, to show an annotator as a starting point."""

    model_version: str
    score: float
    is_defect: bool
    defect_class: str | None = None
    mask: np.ndarray | None = None  # bool (H, W) at the image's own size: the anomaly regions
    # What annotators see as the score: the share of held-out normal images this image scores
    # above (evaluate.thresholds.normal_percentile), in [0, 1]; None where the model has no record
    # of them (then no score is shown rather than a raw one read as a percentage).
    readable: float | None = None


@dataclass
class HumanLabel:
    """One finished Label Studio annotation, read back."""

    label: str  # normal | defect
    defect_class: str | None
    mask: np.ndarray | None = None  # uint8 (H, W), 255 = defect; brush and polygon regions
    boxes: list[dict[str, Any]] = field(default_factory=list)  # [{x, y, w, h, label}] in pixels
    annotator: str | None = None


def prediction_version(model: str, threshold: Any) -> str:
    """What Label Studio is told a pre-annotation comes from (its ``model_version``): the model
    version (``name:V``) and, since the verdicts and regions depend on it, the threshold (a
    ``Threshold`` or its dict; None: the model alone). A threshold set by hand thus makes a new
    prediction version: the next push gives the open tasks the new verdicts, and the queue, which
    shows only the project's version, never mixes old and new ones."""
    value = getattr(threshold, "value", None) if not isinstance(threshold, dict) else threshold.get("value")
    return model if value is None else f"{model} (threshold {float(value):.6g})"


def _regions(mask: np.ndarray) -> list[dict[str, Any]]:
    """Each connected region's outer polygon and box, in pixels (the same as Serve answers)."""
    from flawline.evaluate.regions import regions

    h, w = mask.shape
    return regions(mask.astype(np.float32), mask, (w, h))


def prediction_result(task: str, pred: Prediction, width: int, height: int,
                      classes: list[str] | None = None) -> list[dict[str, Any]]:
    """Label Studio's ``result`` list for a prediction: the verdict, and regions where the task has
    them. Every value is one the project's config (made with ``classes``) offers: a class it does
    not list, or none, becomes the generic ``defect`` (``configs.defect_name``)."""
    cls = defect_name(pred.defect_class, classes if classes is not None else [pred.defect_class or DEFECT])
    result: list[dict[str, Any]] = [{"from_name": VERDICT, "to_name": IMAGE, "type": "choices",
                                     "value": {"choices": [cls if pred.is_defect else NORMAL]}}]
    if task not in REGION or pred.mask is None or not pred.mask.any():
        return result
    mask = pred.mask.astype(bool)
    if mask.shape != (height, width):
        raise InvalidInput(f"prediction mask is {mask.shape[1]}x{mask.shape[0]}, the image {width}x{height}")
    tag, name = REGION[task]
    kind = tag.lower()
    base = {"from_name": name, "to_name": IMAGE, "type": kind, "original_width": width, "original_height": height,
            "image_rotation": 0}
    if task == "segmentation":
        rle = mask2rle(mask.astype(np.uint8) * 255)
        return result + [{**base, "value": {"format": "rle", "rle": rle, kind: [cls]}}]
    for region in _regions(mask):
        if task == "polygons":
            pts = [[round(100 * x / width, 3), round(100 * y / height, 3)] for x, y in region["polygon"]]
            result.append({**base, "value": {"points": pts, "closed": True, kind: [cls]}})
        else:
            x0, y0, x1, y1 = region["bbox"]
            result.append({**base, "value": {"x": 100 * x0 / width, "y": 100 * y0 / height,
                                             "width": 100 * (x1 - x0) / width, "height": 100 * (y1 - y0) / height,
                                             "rotation": 0, kind: [cls]}})
    return result


def rotated_box(x: float, y: float, w: float, h: float, degrees: float) -> list[tuple[float, float]]:
    """The corners (pixels) of a ``w`` x ``h`` box at top-left (``x``, ``y``) turned ``degrees``
    clockwise about that corner (image y axis pointing down), as Label Studio rotates rectangles."""
    t = np.deg2rad(degrees)
    c, s = float(np.cos(t)), float(np.sin(t))
    return [(x + dx * c - dy * s, y + dx * s + dy * c) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]


def _need(value: dict[str, Any], key: str, kind: str) -> Any:
    if key not in value:
        raise InvalidInput(f"malformed {kind} result: no {key!r} in its value")
    return value[key]


def read_annotation(results: list[dict[str, Any]], width: int, height: int, orientation: int = 1) -> HumanLabel:
    """A finished annotation's ``result`` → verdict, class, mask and boxes at the image's size
    (``width`` x ``height``, the shown frame; ``orientation``: the image's EXIF tag).

    An explicit verdict wins; with none, any drawn region means a defect. Refused with
    ``InvalidInput`` (the pull lists it and the catalog keeps what it had):
    - an empty answer: no verdict chosen and nothing drawn (no answer is not "normal");
    - a 'normal' verdict with regions drawn (contradictory);
    - a brush mask whose size is neither the image's nor, for an image shown turned by its EXIF
      orientation, its stored frame's (that one is turned into the shown frame).
    A rotated rectangle is the polygon it covers: it goes into the mask, exactly, not into the
    axis-aligned boxes."""
    if not isinstance(results, list):
        raise InvalidInput(f"malformed annotation: result is {type(results).__name__}, not a list")
    verdict: str | None = None
    region_classes: list[str] = []
    mask = np.zeros((height, width), dtype=bool)
    drawn = False
    boxes: list[dict[str, Any]] = []
    for item in results:
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise InvalidInput("malformed annotation: a result item without a value")
        kind, value = item.get("type"), item["value"]
        labels = value.get(kind) if isinstance(value.get(kind), list) else []
        if kind == "choices":
            choices = _need(value, "choices", kind)
            verdict = choices[0] if choices else None
            continue
        if kind not in ("brushlabels", "polygonlabels", "rectanglelabels"):
            continue  # other controls (comments, ratings) carry no label
        region_classes.extend(str(c) for c in labels)
        drawn = True
        if kind == "brushlabels":
            rle = _need(value, "rle", kind)
            try:
                rgba = np.asarray(decode_rle(rle), dtype=np.uint8)
                alpha = rgba.reshape(int(item.get("original_height", height)),
                                     int(item.get("original_width", width)), 4)[:, :, 3]
            except Exception as err:  # noqa: BLE001 - any RLE that does not decode to this image's size
                raise InvalidInput(f"malformed brush RLE ({type(err).__name__}: {err})") from None
            if alpha.shape != mask.shape:
                if orientation in (5, 6, 7, 8) and alpha.shape == (width, height) or \
                        orientation in (2, 3, 4) and alpha.shape == (height, width):
                    alpha = np.asarray(to_shown_frame(PILImage.fromarray(alpha), orientation))
                if alpha.shape != mask.shape:
                    raise InvalidInput(f"malformed brush mask: it is {alpha.shape[1]}x{alpha.shape[0]} but the image "
                                       f"is {width}x{height}")
            mask |= alpha > 0
        elif kind == "polygonlabels":
            pts = [(float(x) * width / 100, float(y) * height / 100) for x, y in _need(value, "points", kind)]
            if len(pts) >= 3:
                canvas = PILImage.new("L", (width, height), 0)
                ImageDraw.Draw(canvas).polygon(pts, fill=255)
                mask |= np.asarray(canvas) > 0
        else:
            x, y = float(_need(value, "x", kind)) * width / 100, float(_need(value, "y", kind)) * height / 100
            w, h = float(_need(value, "width", kind)) * width / 100, float(_need(value, "height", kind)) * height / 100
            angle = float(value.get("rotation") or 0.0) % 360.0
            if angle:  # Label Studio turns the box clockwise about its top-left corner
                canvas = PILImage.new("L", (width, height), 0)
                ImageDraw.Draw(canvas).polygon(rotated_box(x, y, w, h, angle), fill=255)
                mask |= np.asarray(canvas) > 0
                continue
            boxes.append({"x": round(x, 1), "y": round(y, 1), "w": round(w, 1), "h": round(h, 1),
                          "label": labels[0] if labels else DEFECT})
    if verdict == NORMAL and drawn:
        raise InvalidInput("contradictory annotation: verdict 'normal' but defect regions are drawn")
    if verdict is None and not drawn:
        raise InvalidInput("empty answer: no verdict chosen and nothing drawn (not taken as 'normal'; "
                           "the catalog keeps what it had)")
    label = NORMAL if verdict == NORMAL or (verdict is None and not drawn) else DEFECT
    cls = None
    if label == DEFECT:
        cls = verdict if verdict not in (None, DEFECT) else (region_classes[0] if region_classes else None)
        cls = None if cls == DEFECT else cls
    return HumanLabel(label=label, defect_class=cls, mask=(mask.astype(np.uint8) * 255) if mask.any() else None,
                      boxes=boxes)
