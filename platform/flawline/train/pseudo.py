"""Pseudo-annotations: a trained model's confident verdicts on the unlabelled pool, written back to
the catalog as ``source = pseudo`` annotations (the semi-supervised part of the survey's "few defect
labels" setting, ``../shared/seeds/000_...`` section 3.3).

One home for what every setting that stores them shares: decoding the unlabelled rows a chunk at a
time and replacing the model's earlier pseudo-annotations on those images. They never decide an
image's label (``catalog.queries.image_labels`` reads human and imported annotations only); they
are what an annotator can confirm and what the next model can be compared against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy import delete

from flawline.catalog import Annotation, AnnotationSource, Catalog, Label
from flawline.data.records import ImageRecord
from flawline.storage import ObjectStore
from flawline.train.data import decode_all, to_model

PREDICT_CHUNK = 256  # unlabelled images decoded at once


@dataclass(frozen=True)
class PseudoVerdict:
    """A confident verdict on one image: ``confidence`` in [0, 1]."""

    image_id: int
    label: Label
    confidence: float
    defect_class: str | None = None


def conformal_confidence(normal_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """How surely each score is not a normal image's: ``1 - p`` with the conformal p-value
    ``p = (1 + #{normal scores >= s}) / (n + 1)`` against ``n`` held-out normal images' scores
    (Vovk et al. 2005; Bates et al. 2023, "Testing for outliers with conformal p-values"). For an
    exchangeable normal image ``P(confidence >= 1 - a) <= a``, so with ``n`` normals it never
    exceeds ``n / (n + 1)``. ``normal_scores`` [n] sorted ascending, ``scores`` [m] → [m]."""
    normal_scores = np.asarray(normal_scores, dtype=np.float64)
    above = len(normal_scores) - np.searchsorted(normal_scores, np.asarray(scores, dtype=np.float64), side="left")
    return 1.0 - (1.0 + above) / (len(normal_scores) + 1.0)


def decoded_chunks(store: ObjectStore, rows: Sequence[ImageRecord],
                   image_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``rows`` (``RunData`` rows) decoded ``PREDICT_CHUNK`` at a time: (image ids, float images in
    [0, 1], [n, 3, image_size, image_size]: what ``Detector.predict`` takes)."""
    for start in range(0, len(rows), PREDICT_CHUNK):
        chunk = rows[start:start + PREDICT_CHUNK]
        yield [r.image_id for r in chunk], to_model(decode_all(store, chunk, image_size))["image"]


def store_pseudo(catalog: Catalog, image_ids: Sequence[int], found: Sequence[PseudoVerdict],
                 annotator: str) -> int:
    """Replace ``annotator``'s pseudo-annotations on ``image_ids`` with ``found`` (an image the model
    is no longer confident about loses its old one), in one transaction. Returns how many were
    stored."""
    ids = list(image_ids)
    with catalog.session() as s:
        for start in range(0, len(ids), 500):
            s.execute(delete(Annotation).where(Annotation.image_id.in_(ids[start:start + 500]),
                                               Annotation.source == AnnotationSource.pseudo,
                                               Annotation.annotator == annotator))
        s.add_all([Annotation(image_id=v.image_id, label=v.label, defect_class=v.defect_class,
                              confidence=v.confidence, source=AnnotationSource.pseudo, annotator=annotator)
                   for v in found])
    return len(found)


def predict_and_store(catalog: Catalog, store: ObjectStore, rows: Sequence[ImageRecord], image_size: int,
                      annotator: str, verdicts: Callable[[list[int], torch.Tensor], list[PseudoVerdict]]) -> int:
    """Decode ``rows`` chunk by chunk, let ``verdicts(ids, images)`` pick the confident ones, and
    store them all at once (``store_pseudo``). Returns how many were stored."""
    found: list[PseudoVerdict] = []
    for ids, images in decoded_chunks(store, rows, image_size):
        found += verdicts(ids, images)
    return store_pseudo(catalog, [r.image_id for r in rows], found, annotator)
