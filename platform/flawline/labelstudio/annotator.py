"""A simulated annotator, for benchmarks and tests only: it answers open Label Studio tasks from
ground truth through the same API a person's annotations go through (``POST /api/tasks/{id}/annotations``),
so everything downstream (pull, webhook, retraining) sees what it would see from a person."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from flawline.catalog import Annotation, AnnotationSource, Catalog, Image, Label, LabelProject
from flawline.catalog.queries import get_dataset
from flawline.data.images import mask_image
from flawline.labelstudio.client import LabelStudioClient
from flawline.labelstudio.convert import Prediction, prediction_result
from flawline.storage import ObjectStore


@dataclass
class Truth:
    is_defect: bool
    defect_class: str | None = None
    mask_key: str | None = None


def truth_from_catalog(catalog: Catalog, dataset: str,
                       sources: tuple[AnnotationSource, ...] = (AnnotationSource.oracle, AnnotationSource.imported)
                       ) -> dict[int, Truth]:
    """image id → the dataset's imported verdict, class and mask: what the simulated person knows."""
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        rows = s.execute(select(Annotation.image_id, Annotation.label, Annotation.defect_class, Annotation.mask_key)
                         .join(Image).where(Image.dataset_id == ds.id, Annotation.source.in_(sources),
                                            Annotation.label.is_not(None))).all()
    return {i: Truth(label is Label.defect, cls, mask) for i, label, cls, mask in rows}


class SimulatedAnnotator:
    """Answers tasks from ``truth``; ``skip`` lists image ids it skips (cancels) instead."""

    def __init__(self, client: LabelStudioClient, store: ObjectStore, truth: dict[int, Truth],
                 skip: set[int] | None = None) -> None:
        self.client, self.store, self.truth, self.skip = client, store, truth, skip or set()

    def _mask(self, key: str | None) -> np.ndarray | None:
        if not key:
            return None
        return np.asarray(mask_image(self.store.get_bytes(key), key)) > 0  # the one mask rule

    def result(self, task: str, truth: Truth, width: int, height: int) -> list[dict[str, Any]]:
        mask = self._mask(truth.mask_key) if truth.is_defect else None
        if mask is not None and mask.shape != (height, width):
            mask = np.asarray(PILImage.fromarray(mask).resize((width, height), PILImage.NEAREST))
        answer = Prediction(model_version="ground-truth", score=float(truth.is_defect), is_defect=truth.is_defect,
                            defect_class=truth.defect_class, mask=mask)
        return prediction_result(task, answer, width, height)

    def answer(self, project: LabelProject, limit: int | None = None) -> int:
        """Annotate up to ``limit`` open tasks of the project; returns how many were answered."""
        done = 0
        for task in list(self.client.iter_tasks(project.ls_project_id, "list tasks to annotate")):
            if limit is not None and done >= limit:
                break
            if task.annotations:  # answered already (by a person, or an earlier call)
                continue
            data = task.data or {}
            image_id = data.get("flawline_image_id")
            if image_id not in self.truth:
                continue
            if image_id in self.skip:
                self.client.call("skip a task", lambda t=task: self.client.sdk.annotations.create(
                    id=t.id, result=[], was_cancelled=True))
            else:
                result = self.result(project.task, self.truth[image_id], int(data["width"]), int(data["height"]))
                self.client.call("annotate a task", lambda t=task, r=result: self.client.sdk.annotations.create(
                    id=t.id, result=r, was_cancelled=False, lead_time=1.0))
            done += 1
        return done
