"""Send images to Label Studio as tasks, with the model's predictions as pre-annotations.

A push with predictions sets the project's ``model_version`` to their model, so Label Studio's
labelling queue shows them, and adds them to the open tasks the project already has from an older
model (``_update_open_tasks``).

The catalog's task ledger (``ls_tasks``) makes a push idempotent: an image already sent to the
project is not sent again. Each chunk is one import request, which Label Studio applies whole; a
push that lost its answer (Label Studio went down mid-request) is reconciled on the next push from
the tasks' ``flawline_image_id`` before anything is sent, so nothing is duplicated or lost."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select

from flawline.catalog import Catalog, Dataset, Image, LabelProject, LabelTask, LabelTaskStatus
from flawline.errors import InvalidInput
from flawline.labelstudio.client import LabelStudioClient
from flawline.labelstudio.convert import Prediction, prediction_result
from flawline.labelstudio.pull import forget_deleted_tasks
from flawline.storage import ObjectStore

URL_EXPIRY = timedelta(days=7)  # the longest an S3 presigned URL may live


@dataclass
class PushReport:
    created: int = 0
    already_there: int = 0  # images the project had already (ledger, or reconciled from Label Studio)
    reconciled: int = 0  # tasks found in Label Studio that the ledger had lost
    tasks_gone: int = 0  # ledger rows whose task was deleted in Label Studio (pull.forget_deleted_tasks)
    predictions_updated: int = 0  # tasks already there that got the newer model's pre-annotation
    model_version: str | None = None  # what the project now shows in its labelling queue
    stale_open_tasks: int = 0  # open tasks not in this push whose pre-annotation is another version's
    task_ids: dict[int, int] = field(default_factory=dict)  # image id → Label Studio task id


def reconcile(catalog: Catalog, client: LabelStudioClient, project: LabelProject) -> tuple[int, int]:
    """Make the ledger agree with Label Studio: record the project's tasks that Label Studio has and
    the catalog does not, and forget the ones Label Studio no longer has
    (``pull.forget_deleted_tasks``). Returns (recorded, forgotten)."""
    existing: set[int] = set()
    with catalog.session() as s:
        known = set(s.scalars(select(LabelTask.ls_task_id).where(LabelTask.project_id == project.id)))
        known_images = set(s.scalars(select(LabelTask.image_id).where(LabelTask.project_id == project.id)))
        added = 0
        for task in client.iter_tasks(project.ls_project_id, "list tasks to reconcile", fields="task_only"):
            existing.add(int(task.id))
            image_id = (task.data or {}).get("flawline_image_id")
            if task.id in known or image_id is None or image_id in known_images:
                continue
            if s.get(Image, image_id) is None:
                continue
            s.add(LabelTask(project_id=project.id, image_id=image_id, ls_task_id=task.id))
            known_images.add(image_id)
            added += 1
    return added, forget_deleted_tasks(catalog, project, existing)


def push_tasks(catalog: Catalog, store: ObjectStore, client: LabelStudioClient, project: LabelProject,
               image_ids: list[int], predictions: dict[int, Prediction] | None = None, *, chunk: int = 50,
               progress: Callable[[int], None] | None = None) -> PushReport:
    """Create one task per image not yet in the project; returns what was created and found."""
    predictions = predictions or {}
    reconciled, gone = reconcile(catalog, client, project)
    report = PushReport(reconciled=reconciled, tasks_gone=gone)
    with catalog.session() as s:
        ledger = dict(s.execute(select(LabelTask.image_id, LabelTask.ls_task_id)
                                .where(LabelTask.project_id == project.id)).all())
        rows = {i.id: (i.object_key, i.width, i.height, ds) for i, ds in s.execute(
            select(Image, Dataset.name).join(Dataset).where(Image.id.in_(image_ids)))}
    missing = [i for i in image_ids if i not in rows]
    if missing:
        raise InvalidInput(f"{len(missing)} image id(s) are not in the catalog (first: {missing[0]})")
    todo = []
    for image_id in dict.fromkeys(image_ids):  # keeps order, drops repeats
        if image_id in ledger:
            report.already_there += 1
            report.task_ids[image_id] = ledger[image_id]
        else:
            todo.append(image_id)
    if predictions:
        _update_open_tasks(catalog, client, project, rows, ledger, predictions, report)
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        tasks = []
        for image_id in part:
            key, width, height, dataset = rows[image_id]
            task = {"data": {"image": store.presigned_get(key, expires=URL_EXPIRY), "flawline_image_id": image_id,
                             "flawline_dataset": dataset, "width": width, "height": height}}
            if (pred := predictions.get(image_id)) is not None:
                task["predictions"] = [{"model_version": pred.model_version, **_shown_score(pred),
                                        "result": prediction_result(project.task, pred, width, height,
                                                                    project.classes)}]
            tasks.append(task)
        answer = client.call("import tasks", lambda: client.sdk.projects.import_tasks(
            id=project.ls_project_id, request=tasks, return_task_ids=True))
        ids = list(answer.task_ids or [])
        if len(ids) != len(part):
            raise InvalidInput(f"Label Studio created {len(ids)} tasks for {len(part)} images; run the push "
                               "again to reconcile")
        with catalog.session() as s:
            for image_id, task_id in zip(part, ids):
                pred = predictions.get(image_id)
                s.add(LabelTask(project_id=project.id, image_id=image_id, ls_task_id=task_id,
                                status=LabelTaskStatus.pushed, model_version=pred.model_version if pred else None,
                                score=float(pred.score) if pred else None))
                report.task_ids[image_id] = task_id
        report.created += len(part)
        if progress:
            progress(len(part))
    if predictions and (report.created or report.predictions_updated):
        # Label Studio accepts a model version only once predictions of it exist: after the tasks.
        report.model_version = max((p.model_version for p in predictions.values()), key=str)
        client.call("set the project's model version", lambda: client.sdk.projects.update(
            id=project.ls_project_id, model_version=report.model_version))
        with catalog.session() as s:  # the queue shows these without a pre-annotation now
            report.stale_open_tasks = sum(
                1 for t in s.scalars(select(LabelTask).where(LabelTask.project_id == project.id,
                                                             LabelTask.status == LabelTaskStatus.pushed))
                if t.image_id not in predictions and t.model_version and t.model_version != report.model_version)
    return report


def _update_open_tasks(catalog: Catalog, client: LabelStudioClient, project: LabelProject, rows: dict[int, tuple],
                       ledger: dict[int, int], predictions: dict[int, Prediction], report: PushReport) -> None:
    """Give the open tasks already there this push's pre-annotation when theirs came from another
    model: a newer model's help reaches them without duplicating tasks. (``push_tasks`` then sets
    the project's ``model_version`` to it, so Label Studio's labelling queue, which shows only the
    project's model version, shows them.)"""
    with catalog.session() as s:
        entries = {t.image_id: t for t in s.scalars(select(LabelTask).where(LabelTask.project_id == project.id))}
        for image_id, task_id in ledger.items():
            pred, entry = predictions.get(image_id), entries.get(image_id)
            if pred is None or entry is None or entry.model_version == pred.model_version \
                    or entry.status is not LabelTaskStatus.pushed:
                continue
            _, width, height, _ = rows[image_id]
            result = prediction_result(project.task, pred, width, height, project.classes)
            client.call("add a pre-annotation", lambda t=task_id, p=pred, r=result: client.sdk.predictions.create(
                task=t, result=r, model_version=p.model_version, **_shown_score(p)))
            entry.model_version, entry.score = pred.model_version, float(pred.score)
            report.predictions_updated += 1


def _shown_score(pred: Prediction) -> dict[str, float]:
    """Label Studio shows a prediction's score as a percentage: only a readable one is sent (the
    share of held-out normal images the image scores above), never a raw anomaly score."""
    return {} if pred.readable is None else {"score": round(float(pred.readable), 4)}
