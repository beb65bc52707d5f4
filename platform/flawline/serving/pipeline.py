"""One batch of checked images through one loaded model, in two stages: ``decode_items`` (the
training decode path, to uint8 pixels; no torch, so any thread) and ``forward_items`` (one forward
pass and per-image verdicts, on the thread that runs the model). Plain Python: the Serve deployment
runs the stages on different threads inside ``@serve.batch`` (one batch decodes while another runs
the model); ``flawline predict --local`` and the benchmark call ``predict_items``, both in turn.

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

from flawline.data.loading import decode_pixels, pair, stack_rgb, to_tensor
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


def _decode(model: LoadedModel, item: Item, references: dict[bytes, np.ndarray | Exception]
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """An item's pixels (``decode_pixels``), with its reference's for a model that takes pairs (each
    distinct reference decoded once, kept in ``references`` with its error if it fails)."""
    det, size, white = model.detector, model.image_size, model.detector.config.white
    reference_policy(model.ref.name, det.name, det.uses_reference, item.reference is not None)
    if not det.uses_reference:
        return decode_pixels(item.data, size, item.name, white), None
    if item.reference not in references:
        try:
            references[item.reference] = decode_pixels(item.reference, size, item.reference_name, white)
        except Exception as err:  # noqa: BLE001 — the reference's failure, answered for every image with it
            references[item.reference] = ReferenceRefused(one_line(err), http_status(err))
    reference = references[item.reference]
    if isinstance(reference, Exception):
        raise reference
    return decode_pixels(item.data, size, item.name, white), reference


@dataclass
class Decoded:
    """The decoding stage's result for a list of items: the pixels of those that decoded (with
    their references' for pairs), by position, and the outcomes of those that did not."""

    pixels: list[tuple[np.ndarray, np.ndarray | None]]
    index: list[int]  # positions in the items of ``pixels``
    failed: dict[int, Outcome]
    seconds: float


def decode_items(model: LoadedModel, items: list[Item],
                 references: dict[bytes, np.ndarray | Exception] | None = None) -> Decoded:
    """Stage 1, no torch (safe on any thread): every item's image decoded and resized to the model's
    input size, or its own error outcome. ``references``: decoded reference pixels by their bytes,
    shared across the calls of one request (each reference decoded once)."""
    started = time.perf_counter()
    references = {} if references is None else references
    pixels, index, failed = [], [], {}
    for i, item in enumerate(items):
        try:
            pixels.append(_decode(model, item, references))
            index.append(i)
        except Exception as err:  # noqa: BLE001 — this image only (or its request's reference: shared)
            failed[i] = Outcome(error=one_line(err), status=http_status(err),
                                shared=isinstance(err, ReferenceRefused))
    return Decoded(pixels, index, failed, time.perf_counter() - started)


def _model_input(pixels: tuple[np.ndarray, np.ndarray | None]) -> torch.Tensor:
    image, reference = pixels
    return to_tensor(image) if reference is None else pair(to_tensor(image), to_tensor(reference))


def forward_items(model: LoadedModel, items: list[Item], decoded: Decoded) -> list[Outcome]:
    """Stage 2, on the thread that runs the model: one forward pass over the decoded items, their
    verdicts (each item's threshold) and, where asked, their maps; the failed ones' outcomes kept."""
    started = time.perf_counter()
    outcomes: list[Outcome | None] = [decoded.failed.get(i) for i in range(len(items))]
    if decoded.pixels:
        batch = stack_rgb([_model_input(p) for p in decoded.pixels])
        pred = model.detector.predict(batch)
        verdicts = []
        for j, i in enumerate(decoded.index):
            th = _threshold(model, items[i])
            verdict = None if th is None else bool(decide(th, pred.scores[j:j + 1], pred.maps[j:j + 1])[0])
            verdicts.append(verdict)
            outcomes[i] = Outcome(score=float(pred.scores[j]), is_defect=verdict,
                                  threshold=th.as_dict() if th else None,
                                  map=pred.maps[j].astype(np.float32) if items[i].want_map else None)
        for j, cls in enumerate(_defect_classes(model, batch, [bool(v) for v in verdicts])):
            outcomes[decoded.index[j]].defect_class = cls
    elapsed = (decoded.seconds + time.perf_counter() - started) * 1e3
    for outcome in outcomes:
        outcome.inference_ms, outcome.batch_size = elapsed, len(items)
    return outcomes  # type: ignore[return-value]


def predict_items(model: LoadedModel, items: list[Item],
                  references: dict[bytes, np.ndarray | Exception] | None = None) -> list[Outcome]:
    """``items`` of one model → their outcomes, in order, in one forward pass: ``decode_items`` then
    ``forward_items`` on the calling thread (``flawline predict --local``, the benchmark)."""
    return forward_items(model, items, decode_items(model, items, references))
