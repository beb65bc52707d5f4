"""Read-side queries over the catalog, shared by the CLI, jobs and reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flawline.catalog.models import Annotation, AnnotationSource, Dataset, Image, Label
from flawline.errors import NotFound

# Which annotation decides an image's label when several exist: a person's word beats an import.
LABEL_SOURCES = (AnnotationSource.human, AnnotationSource.imported)


def get_dataset(session: Session, name: str) -> Dataset:
    ds = session.scalar(select(Dataset).where(Dataset.name == name))
    if ds is None:
        names = session.scalars(select(Dataset.name).order_by(Dataset.name)).all()
        hint = f"; datasets: {', '.join(names)}" if names else "; the catalog has no datasets yet"
        raise NotFound(f"no dataset named {name!r}{hint}")
    return ds


def image_labels(session: Session, dataset_id: int) -> dict[int, tuple[Label | None, str | None]]:
    """image id → (label, defect class) from the deciding annotation; unlabelled images map to None.
    Annotations a relabel superseded (``attrs.superseded``, ``flawline.data.repair``) do not count."""
    rank = {AnnotationSource.human: 0, AnnotationSource.imported: 1}
    rows = session.execute(
        select(Image.id, Annotation.label, Annotation.defect_class, Annotation.source, Annotation.updated_at,
               Annotation.attrs)
        .outerjoin(Annotation, (Annotation.image_id == Image.id) & Annotation.source.in_(LABEL_SOURCES)
                   & Annotation.label.is_not(None))
        .where(Image.dataset_id == dataset_id)
    ).all()
    best: dict[int, tuple[tuple[int, float], Label | None, str | None]] = {}
    for image_id, label, defect_class, source, updated, attrs in rows:
        if attrs and attrs.get("superseded"):
            label, defect_class, source, updated = None, None, None, None
        key = (rank.get(source, 9), -(updated.timestamp() if updated else 0.0))
        if image_id not in best or (label is not None and key < best[image_id][0]):
            best[image_id] = (key, label, defect_class)
    return {i: (v[1], v[2]) for i, v in best.items()}


@dataclass
class DatasetSummary:
    name: str
    layout: str | None
    source: str | None
    images: int = 0
    bytes: int = 0
    masks: int = 0
    by_label: dict[str, int] = field(default_factory=dict)
    by_class: dict[str, int] = field(default_factory=dict)
    by_split: dict[str, int] = field(default_factory=dict)
    split_info: dict[str, Any] | None = None
    created_at: str | None = None
    # With ``detail`` (``flawline data show``): annotation boxes, groups, references and presets.
    with_boxes: int | None = None  # images with at least one box
    boxes: int | None = None  # boxes over every image
    groups: int | None = None  # distinct values of the image attribute ``group``
    with_reference: int | None = None  # images that name a reference image
    by_preset: dict[str, int] | None = None  # images per preset split (``preset_split``)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize_dataset(session: Session, ds: Dataset, detail: bool = False) -> DatasetSummary:
    """Counts of one dataset; ``detail`` adds boxes, groups, references and presets (it reads
    every image's attributes, so ``flawline data list`` leaves it out)."""
    summary = DatasetSummary(ds.name, ds.layout, ds.source_uri, split_info=ds.split_info,
                             created_at=ds.created_at.isoformat() if ds.created_at else None)
    count, size = session.execute(
        select(func.count(Image.id), func.coalesce(func.sum(Image.byte_size), 0)).where(Image.dataset_id == ds.id)
    ).one()
    summary.images, summary.bytes = int(count), int(size)
    summary.masks = int(session.scalar(
        select(func.count(func.distinct(Annotation.image_id))).join(Image)
        .where(Image.dataset_id == ds.id, Annotation.mask_key.is_not(None))) or 0)
    for label, defect_class in image_labels(session, ds.id).values():
        key = label.value if label else "unlabeled"
        summary.by_label[key] = summary.by_label.get(key, 0) + 1
        if defect_class:
            summary.by_class[defect_class] = summary.by_class.get(defect_class, 0) + 1
    for split, n in session.execute(
        select(Image.split, func.count(Image.id)).where(Image.dataset_id == ds.id).group_by(Image.split)
    ):
        summary.by_split[split.value if split else "unassigned"] = int(n)
    if detail:
        boxed: dict[int, int] = {}
        for image_id, boxes in session.execute(
                select(Annotation.image_id, Annotation.boxes).join(Image)
                .where(Image.dataset_id == ds.id, Annotation.boxes.is_not(None))):
            boxed[image_id] = max(boxed.get(image_id, 0), len(boxes or ()))  # the fullest annotation
        summary.with_boxes = sum(1 for n in boxed.values() if n)
        summary.boxes = sum(boxed.values())
        attrs = [a or {} for a in session.scalars(select(Image.attrs).where(Image.dataset_id == ds.id))]
        summary.groups = len({str(a["group"]) for a in attrs if a.get("group") not in (None, "")})
        summary.with_reference = sum(1 for a in attrs if a.get("reference"))
        summary.by_preset = {}
        for a in attrs:
            if a.get("preset_split"):
                summary.by_preset[a["preset_split"]] = summary.by_preset.get(a["preset_split"], 0) + 1
    return summary


def list_summaries(session: Session) -> list[DatasetSummary]:
    return [summarize_dataset(session, ds) for ds in session.scalars(select(Dataset).order_by(Dataset.name))]


def dataset_white(session: Session, dataset_id: int) -> int | None:
    """The dataset's white level for images of more than 8 bits (``flawline.data.images.white_level``
    over the ``high`` each such image got at import); None when it has none."""
    from flawline.data.images import white_level

    attrs = session.scalars(select(Image.attrs).where(Image.dataset_id == dataset_id, Image.channels == 1)).all()
    return white_level([a.get("high") for a in attrs if a and a.get("high") is not None])
