"""One batch of checked images through one loaded model: decode (the training decode path), one
forward pass, per-image verdicts. Plain Python: the Serve deployment runs it inside
``@serve.batch``, ``flawline predict --local`` and the benchmark run it in process.

A batch never fails as a whole for one bad image: an image that does not decode gets its own
error outcome and the others are predicted.

A model that compares each image with its defect-free reference (``Detector.uses_reference``)
takes pairs: each item carries its request's reference image, decoded once per distinct reference
in a batch (a batch inspection request shares one, decoded once for all its forward passes) and paired with each image by
``flawline.data.loading.pair``, as training and evaluation pair them. What is wrong with the
reference (or its absence) is the request's, not one image's: those outcomes say so (``shared``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flawline.data.loading import decode_image, pair, stack_rgb
from flawline.evaluate.thresholds import Threshold, decide
from flawline.serving.errors import ReferenceRefused, http_status, one_line
from flawline.serving.inputs import CheckedImage, reference_policy
from flawline.serving.models import LoadedModel


@dataclass
class Item:
    """One image to predict (already checked by ``inputs.check_image``)."""

    data: bytes
    name: str = "image"
    threshold: dict[str, Any] | None = None  # the catalog's, resolved with the request
    want_map: bool = False  # keep the anomaly map (heatmap, mask or regions asked for)
    reference: bytes | None = None  # the request's reference image (checked like the image), if it named one
    reference_name: str = "reference"


def make_item(image: CheckedImage, threshold: dict[str, Any] | None, want_map: bool,
         reference: CheckedImage | None = None) -> Item:
    """A checked image as the model side takes it, with its request's checked reference image if
    any (a batch's items share the one bytes object: pickled once, decoded once)."""
    if reference is None:
        return Item(image.data, image.name, threshold, want_map)
    return Item(image.data, image.name, threshold, want_map, reference.data, reference.name)


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
    shared: bool = False  # the error is the request's reference (or its absence): every image of it fails


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


def _decode(model: LoadedModel, item: Item, references: dict[bytes, torch.Tensor | Exception]) -> torch.Tensor:
    """An item's model input: its image [C, S, S], or with a reference model the pair [6, S, S]
    (each distinct reference decoded once, kept in ``references`` with its error if it fails)."""
    det, size, white = model.detector, model.image_size, model.detector.config.white
    reference_policy(model.ref.name, det.name, det.uses_reference, item.reference is not None)
    if not det.uses_reference:
        return decode_image(item.data, size, item.name, white)
    if item.reference not in references:
        try:
            references[item.reference] = decode_image(item.reference, size, item.reference_name, white)
        except Exception as err:  # noqa: BLE001 — the reference's failure, answered for every image with it
            references[item.reference] = ReferenceRefused(one_line(err), http_status(err))
    reference = references[item.reference]
    if isinstance(reference, Exception):
        raise reference
    return pair(decode_image(item.data, size, item.name, white), reference)


def predict_items(model: LoadedModel, items: list[Item],
                  references: dict[bytes, torch.Tensor | Exception] | None = None) -> list[Outcome]:
    """``items`` of one model → their outcomes, in order, in one forward pass. ``references``: the
    decoded reference images by their bytes, to share across the forward passes of one request
    (each decoded once); by default each distinct reference is decoded once here."""
    started = time.perf_counter()
    outcomes: list[Outcome | None] = [None] * len(items)
    tensors, index = [], []
    references = {} if references is None else references
    for i, item in enumerate(items):
        try:
            tensors.append(_decode(model, item, references))
            index.append(i)
        except Exception as err:  # noqa: BLE001 — this image only (or its request's reference: shared)
            outcomes[i] = Outcome(error=one_line(err), status=http_status(err),
                                  shared=isinstance(err, ReferenceRefused))
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
