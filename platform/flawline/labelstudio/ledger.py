"""The catalog's side of the Label Studio bridge: which project a command means, which images a
push sends, a project's task counts, and the ground truth the simulated annotator answers from.

Plain SQL on the catalog; nothing here talks to Label Studio or imports its SDK (``flawline label
status`` works offline). The CLI (``flawline.cli.label``) calls these.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import exists, func, select

from flawline.catalog import (
    Annotation,
    AnnotationSource,
    Catalog,
    Image,
    LabelProject,
    LabelTask,
    LabelTaskStatus,
    Split,
)
from flawline.catalog.queries import get_dataset
from flawline.config import Settings
from flawline.errors import InvalidInput, NotFound
from flawline.labelstudio.configs import check_task

DEFAULT_TASK = "segmentation"
SPLITS = ("train", "val", "test", "all")


def _ls_url(settings: Settings) -> str:
    return settings.labelstudio_url.rstrip("/")


def resolve_task(catalog: Catalog, settings: Settings, dataset: str, task: str | None) -> str:
    """``task`` checked; when not given, the task of the dataset's only project on this server."""
    if task is not None:
        return check_task(task)
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        tasks = list(s.scalars(select(LabelProject.task).where(LabelProject.dataset_id == ds.id,
                                                              LabelProject.ls_url == _ls_url(settings))))
    return tasks[0] if len(tasks) == 1 else DEFAULT_TASK


def project_record(catalog: Catalog, settings: Settings, dataset: str, task: str) -> LabelProject:
    """The catalog's project record without talking to Label Studio (``status`` works offline)."""
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        row = s.scalar(select(LabelProject).where(LabelProject.dataset_id == ds.id, LabelProject.task == task,
                                                  LabelProject.ls_url == _ls_url(settings)))
        if row is None:
            raise NotFound(f"no Label Studio {task} project for dataset {dataset!r} at {_ls_url(settings)}; "
                           f"run `flawline label setup --dataset {dataset} --task {task}`")
        s.expunge(row)
        return row


def images_to_push(catalog: Catalog, project: LabelProject, dataset: str, split: str, include_labelled: bool,
                   limit: int | None) -> tuple[list[int], int]:
    """(image ids to hand push_tasks, how many of them are new to the project).

    The images of ``split`` without a human annotation (any, with ``include_labelled``); those the
    project has already come first (push_tasks counts them as already there), then up to ``limit``
    new ones in image order."""
    if split not in SPLITS:
        raise InvalidInput(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        query = select(Image.id).where(Image.dataset_id == ds.id).order_by(Image.id)
        if split != "all":
            query = query.where(Image.split == Split(split))
        if not include_labelled:
            query = query.where(~exists().where(Annotation.image_id == Image.id,
                                                Annotation.source == AnnotationSource.human))
        candidates = list(s.scalars(query))
        ledger = set(s.scalars(select(LabelTask.image_id).where(LabelTask.project_id == project.id)))
    there = [i for i in candidates if i in ledger]
    new = [i for i in candidates if i not in ledger]
    if limit is not None:
        new = new[:limit]
    return there + new, len(new)


def label_status(catalog: Catalog, settings: Settings, dataset: str, task: str) -> dict[str, Any]:
    """The project's ledger counts by status, its watermark and the dataset's human annotations."""
    project = project_record(catalog, settings, dataset, task)
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        counts = dict(s.execute(select(LabelTask.status, func.count()).where(LabelTask.project_id == project.id)
                                .group_by(LabelTask.status)).all())
        human = s.scalar(select(func.count(Annotation.id)).join(Image).where(
            Image.dataset_id == ds.id, Annotation.source == AnnotationSource.human))
    tasks = {status.value: int(counts.get(status, 0)) for status in LabelTaskStatus}
    return {"dataset": dataset, "task": task, "project": project.ls_project_id,
            "url": f"{project.ls_url}/projects/{project.ls_project_id}", "classes": list(project.classes),
            "tasks": tasks, "total": sum(tasks.values()),
            "watermark": _utc(project.watermark).isoformat() if project.watermark else None,
            "webhook": project.webhook_id, "human_annotations": int(human or 0)}


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)  # SQLite drops the zone


def truth_for(catalog: Catalog, dataset: str, truth_dataset: str | None) -> dict[int, Any]:
    """Ground truth for ``dataset``'s images: its own imported labels, or another dataset's matched
    to these images by content hash."""
    from flawline.labelstudio.annotator import truth_from_catalog

    source = truth_dataset or dataset
    truth = truth_from_catalog(catalog, source)
    if not truth:
        raise InvalidInput(f"dataset {source!r} has no imported labels for the simulated annotator to answer from")
    if source == dataset:
        return truth
    with catalog.session() as s:
        target = get_dataset(s, dataset).id
        hashes = dict(s.execute(select(Image.content_hash, Image.id).where(Image.id.in_(list(truth)))).all())
        mine = s.execute(select(Image.id, Image.content_hash).where(Image.dataset_id == target)).all()
    matched = {image_id: truth[hashes[h]] for image_id, h in mine if h in hashes}
    if not matched:
        raise InvalidInput(f"no image of dataset {dataset!r} is in {source!r} (matched by content hash); "
                           "nothing to answer from")
    return matched
