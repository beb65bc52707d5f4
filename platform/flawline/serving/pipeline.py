"""One batch of checked images through one loaded model: decode (the training decode path), one
forward pass, per-image verdicts. Plain Python: the Serve deployment runs it inside
``@serve.batch``, ``flawline predict --local`` and the benchmark run it in process.

A batch never fails as a whole for one bad image: an image that does not decode gets its own
error outcome and the others are predicted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flawline.data.loading import decode_image, stack_rgb
from flawline.errors import InvalidInput
from flawline.evaluate.thresholds import Threshold, decide
from flawline.serving.errors import http_status, one_line
from flawline.serving.models import LoadedModel


@dataclass
class Item:
    """One image to predict (already checked by ``inputs.check_image``)."""

    data: bytes
    name: str = "image"
    threshold: dict[str, Any] | None = None  # the catalog's, resolved with the request
    want_map: bool = False  # keep the anomaly map (heatmap, mask or regions asked for)


@dataclass
class Outcome:
    score: float | None = None
    is_defect: bool | None = None
    threshold: dict[str, Any] | None = None
    defect_class: str | None = None
    map: np.ndarray | None = None  # [S, S] float32 at the model's input size, when asked for
    error: str | None = None
    status: int = 200
    inference_ms: float | None = None  # decoding and the forward pass of the batch this image was in
    batch_size: int = 1


def _threshold(model: LoadedModel, item: Item) -> Threshold | None:
    if item.threshold:
        return Threshold.from_dict({k: v for k, v in item.threshold.items() if k != "history"})
    return model.detector.threshold


def _defect_classes(model: LoadedModel, x: torch.Tensor, defect: list[bool]) -> list[str | None]:
    """A classifier's most likely defect class for the images it calls defective; anomaly
    detectors know no classes (None)."""
    det = model.detector
    classes = getattr(det.config, "classes", None)
    net = getattr(det, "net", None)
    if not classes or net is None or not any(defect):
        return [None] * len(defect)
    if len(classes) == 2:
        return [classes[1] if d else None for d in defect]
    with torch.no_grad(), det.autocast():
        logits, _ = net(det.prepare(x))
    best = logits.float()[:, 1:].argmax(1).tolist()
    return [classes[1 + b] if d else None for b, d in zip(best, defect)]


def predict_items(model: LoadedModel, items: list[Item]) -> list[Outcome]:
    started = time.perf_counter()
    outcomes: list[Outcome | None] = [None] * len(items)
    tensors, index = [], []
    for i, item in enumerate(items):
        try:
            if model.detector.uses_reference:
                raise InvalidInput(f"{model.detector.name} compares each image with its reference image, which "
                                   "requests cannot carry yet; score it with `flawline evaluate`")
            tensors.append(decode_image(item.data, model.image_size, item.name, model.detector.config.white))
            index.append(i)
        except Exception as err:  # noqa: BLE001 — this image only
            outcomes[i] = Outcome(error=one_line(err), status=http_status(err))
    if tensors:
        batch = stack_rgb(tensors)
        pred = model.detector.predict(batch)
        verdicts = []
        for j, i in enumerate(index):
            th = _threshold(model, items[i])
            verdict = None if th is None else bool(decide(th, pred.scores[j:j + 1], pred.maps[j:j + 1])[0])
            verdicts.append(verdict)
            outcomes[i] = Outcome(score=float(pred.scores[j]), is_defect=verdict,
                                  threshold=th.as_dict() if th else None,
                                  map=pred.maps[j].astype(np.float32) if items[i].want_map else None)
        for j, cls in enumerate(_defect_classes(model, batch, [bool(v) for v in verdicts])):
            outcomes[index[j]].defect_class = cls
    elapsed = (time.perf_counter() - started) * 1e3
    for outcome in outcomes:
        outcome.inference_ms, outcome.batch_size = elapsed, len(items)
    return outcomes  # type: ignore[return-value]
