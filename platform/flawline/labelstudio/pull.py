"""Bring finished Label Studio annotations into the catalog.

``pull_annotations`` polls the project's tasks updated since its watermark; the webhook endpoint
names the tasks that changed and calls ``apply_tasks`` for them. Both write through ``apply_task``:
the task's current state replaces whatever the catalog had from it, so pulling twice changes
nothing, an updated annotation replaces the old one, a deleted one is removed, and a skipped or
cancelled task puts its image back in the unlabelled pool. A task that cannot be read (malformed
result, contradictory verdict, an empty answer) is reported and leaves the catalog as it was. A
task deleted in Label Studio leaves the ledger (``forget_deleted_tasks``): its image, if nobody
labelled it, returns to the pool; a label it gave stays."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import delete, select

from flawline.catalog import (
    Annotation,
    AnnotationSource,
    Catalog,
    Image,
    Label,
    LabelProject,
    LabelTask,
    LabelTaskStatus,
)
from flawline.errors import InvalidInput
from flawline.labelstudio.client import LabelStudioClient
from flawline.labelstudio.convert import read_annotation
from flawline.storage import ObjectStore
from flawline.storage.objectstore import content_key

OVERLAP = timedelta(seconds=2)  # re-read tasks this close to the watermark: clocks and same-second writes


@dataclass
class PullReport:
    seen: int = 0
    labelled: int = 0
    removed: int = 0  # annotations deleted in Label Studio, removed from the catalog
    skipped: int = 0  # skipped or cancelled: back to the pool
    unchanged: int = 0
    orphaned: int = 0  # annotated after the image was deleted from the catalog
    tasks_gone: int = 0  # ledger rows whose task was deleted in Label Studio (forget_deleted_tasks)
    errors: list[str] = field(default_factory=list)
    watermark: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in self.__dict__.items()}


def _aware(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _store_mask(store: ObjectStore, mask: np.ndarray) -> str:
    buf = io.BytesIO()
    PILImage.fromarray(mask).save(buf, format="PNG")
    data = buf.getvalue()
    key = content_key("masks", hashlib.sha256(data).hexdigest(), ".png")
    if not store.exists(key):
        store.put_bytes(key, data, "image/png")
    return key


def apply_task(catalog: Catalog, store: ObjectStore, project: LabelProject, task: Any) -> str:
    """Make the catalog agree with one task's current annotations; returns what happened."""
    task_id = int(_field(task, "id"))
    data = _field(task, "data") or {}
    annotations = [a if isinstance(a, dict) else a.__dict__ for a in (_field(task, "annotations") or [])]
    with catalog.session() as s:
        entry = s.scalar(select(LabelTask).where(LabelTask.project_id == project.id, LabelTask.ls_task_id == task_id))
        if entry is None:  # made outside flawline, or the ledger row was lost: adopt it by its image id
            image_id = data.get("flawline_image_id")
            if image_id is None:
                return "unchanged"
            entry = s.scalar(select(LabelTask).where(LabelTask.project_id == project.id,
                                                     LabelTask.image_id == image_id))
            if entry is None:
                exists = s.get(Image, image_id) is not None
                entry = LabelTask(project_id=project.id, image_id=image_id if exists else None, ls_task_id=task_id)
                s.add(entry)
                s.flush()
        image = s.get(Image, entry.image_id) if entry.image_id is not None else None
        if image is None:
            if annotations and entry.status is not LabelTaskStatus.orphaned:
                entry.status = LabelTaskStatus.orphaned
                entry.image_id = None
                return "orphaned"
            return "unchanged"
        width, height, image_id = image.width, image.height, image.id
        orientation = int((image.attrs or {}).get("orientation", 1))
        finished = [a for a in annotations if not a.get("was_cancelled")]
        current = max(finished, key=lambda a: (str(a.get("updated_at") or ""), a.get("id") or 0)) if finished else None
        had = s.scalars(select(Annotation).where(Annotation.image_id == image_id, Annotation.ls_task_id == task_id,
                                                 Annotation.source == AnnotationSource.human)).all()
        if current is None:
            if had:
                s.execute(delete(Annotation).where(Annotation.id.in_([a.id for a in had])))
            cancelled = any(a.get("was_cancelled") for a in annotations)
            entry.status = LabelTaskStatus.skipped if cancelled else LabelTaskStatus.pushed
            if cancelled:
                return "skipped"
            return "removed" if had else "unchanged"
        if len(had) == 1 and had[0].ls_annotation_id == current.get("id") and had[0].attrs \
                and had[0].attrs.get("ls_updated_at") == str(current.get("updated_at")):
            return "unchanged"
    # Read and store the mask outside the transaction (S3 first: a row never names a missing object).
    human = read_annotation(current.get("result") or [], width, height, orientation)
    mask_key = _store_mask(store, human.mask) if human.mask is not None else None
    with catalog.session() as s:
        s.execute(delete(Annotation).where(Annotation.image_id == image_id, Annotation.ls_task_id == task_id,
                                           Annotation.source == AnnotationSource.human))
        completed_by = current.get("completed_by")
        s.add(Annotation(image_id=image_id, label=Label(human.label), defect_class=human.defect_class,
                         mask_key=mask_key, boxes=human.boxes or None, source=AnnotationSource.human,
                         annotator=None if completed_by is None else str(completed_by), ls_task_id=task_id,
                         ls_annotation_id=current.get("id"),
                         attrs={"ls_updated_at": str(current.get("updated_at")), "ls_project_id": project.ls_project_id}))
        entry = s.scalar(select(LabelTask).where(LabelTask.project_id == project.id, LabelTask.ls_task_id == task_id))
        entry.status = LabelTaskStatus.labelled
    return "labelled"


def apply_tasks(catalog: Catalog, store: ObjectStore, project: LabelProject, tasks: Iterable[Any],
                report: PullReport | None = None, progress: Callable[[int], None] | None = None) -> PullReport:
    report = report or PullReport()
    for task in tasks:
        report.seen += 1
        try:
            outcome = apply_task(catalog, store, project, task)
        except InvalidInput as err:
            report.errors.append(f"task {_field(task, 'id')}: {err}")
        else:
            setattr(report, outcome, getattr(report, outcome) + 1)
        if progress:
            progress(1)
    return report


def pull_annotations(catalog: Catalog, store: ObjectStore, client: LabelStudioClient, project: LabelProject,
                     *, full: bool = False, progress: Callable[[int], None] | None = None) -> PullReport:
    """Apply every task updated since the project's watermark (all of them with ``full``), then
    move the watermark to the newest update seen. If Label Studio fails part-way the watermark
    stays where it was, and the next pull reads those tasks again (applying them is idempotent)."""
    with catalog.session() as s:
        since = None if full else _aware(s.get(LabelProject, project.id).watermark)
    newest = since
    changed, existing = [], set()
    for task in client.iter_tasks(project.ls_project_id, "list tasks to pull"):
        existing.add(int(_field(task, "id")))
        updated = _aware(_field(task, "updated_at"))
        if since is not None and updated is not None and updated < since - OVERLAP:
            continue
        changed.append(task)
        if updated is not None and (newest is None or updated > newest):
            newest = updated
    report = apply_tasks(catalog, store, project, changed, progress=progress)
    report.tasks_gone = forget_deleted_tasks(catalog, project, existing)
    with catalog.session() as s:
        row = s.get(LabelProject, project.id)
        if newest is not None and (row.watermark is None or newest > _aware(row.watermark)):
            row.watermark = newest
        report.watermark = _aware(row.watermark)
    return report


def fetch_and_apply(catalog: Catalog, store: ObjectStore, client: LabelStudioClient, project: LabelProject,
                    task_ids: Iterable[int]) -> PullReport:
    """Re-read named tasks from Label Studio and apply them (what a webhook call triggers)."""
    tasks = [client.call(f"read task {t}", lambda t=t: client.sdk.tasks.get(id=t)) for t in dict.fromkeys(task_ids)]
    return apply_tasks(catalog, store, project, tasks)


def forget_deleted_tasks(catalog: Catalog, project: LabelProject, existing: set[int]) -> int:
    """Make the ledger agree with the tasks Label Studio has (``existing``: every task id of the
    project, as just listed): a ledger row whose task is gone is removed, so the image is neither
    counted as sent nor refused by the next push. What that means per image:
    - never labelled (pushed, skipped): back in the unlabelled pool, and can be pushed again;
    - labelled: the person's answer stays in the catalog (a task tidied away in Label Studio does
      not take a label with it); the annotation is marked ``ls_task_deleted`` in its attrs.
    Returns how many ledger rows were removed."""
    with catalog.session() as s:
        gone = [t for t in s.scalars(select(LabelTask).where(LabelTask.project_id == project.id))
                if t.ls_task_id not in existing]
        for task in gone:
            for ann in s.scalars(select(Annotation).where(Annotation.ls_task_id == task.ls_task_id,
                                                          Annotation.source == AnnotationSource.human,
                                                          Annotation.image_id == task.image_id)):
                ann.attrs = {**(ann.attrs or {}), "ls_task_deleted": True}
            s.delete(task)
        return len(gone)
