"""The catalog's tables (SQLAlchemy 2.0). Alembic migrations in ``migrations/`` create them.

Every blob lives in S3; rows hold object keys and content hashes, never bytes.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from flawline.catalog.enums import (  # noqa: F401  (re-exported: the catalog's vocabulary)
    AnnotationSource,
    Label,
    LabelTaskStatus,
    ModelStage,
    QueueStatus,
    RunStatus,
    Split,
)

# Deterministic constraint names so migrations behave the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as plain strings (no native PG enum type): adding a member needs no type migration.
    return Enum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e],
                validate_strings=True)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    layout: Mapped[str | None] = mapped_column(String(50))  # importer that created it
    source_uri: Mapped[str | None] = mapped_column(Text)
    split_info: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # seed + fractions of `data split`
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    images: Mapped[list[Image]] = relationship(back_populates="dataset", cascade="all, delete-orphan")


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("dataset_id", "content_hash", name="uq_images_dataset_hash"),
        Index("ix_images_dataset_split", "dataset_id", "split"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    object_key: Mapped[str] = mapped_column(String(512))
    content_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the stored bytes
    byte_size: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    split: Mapped[Split | None] = mapped_column(_enum(Split))
    origin: Mapped[str | None] = mapped_column(Text)  # where it was imported from (path or URI)
    attrs: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # importer extras (ELPV cell type ...)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    dataset: Mapped[Dataset] = relationship(back_populates="images")
    annotations: Mapped[list[Annotation]] = relationship(
        back_populates="image", cascade="all, delete-orphan"
    )


class Annotation(Base):
    __tablename__ = "annotations"
    __table_args__ = (
        Index("ix_annotations_ls", "ls_task_id", "ls_annotation_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    label: Mapped[Label | None] = mapped_column(_enum(Label))  # image-level verdict
    defect_class: Mapped[str | None] = mapped_column(String(100))
    mask_key: Mapped[str | None] = mapped_column(String(512))
    boxes: Mapped[list[Any] | None] = mapped_column(JSON)  # [{x, y, w, h, label}] in pixels
    confidence: Mapped[float | None] = mapped_column(Float)  # pseudo-labels, soft labels
    source: Mapped[AnnotationSource] = mapped_column(_enum(AnnotationSource))
    annotator: Mapped[str | None] = mapped_column(String(200))
    attrs: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    ls_task_id: Mapped[int | None] = mapped_column(Integer)
    ls_annotation_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    image: Mapped[Image] = relationship(back_populates="annotations")


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    method: Mapped[str] = mapped_column(String(100))
    setting: Mapped[str] = mapped_column(String(50))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus), default=RunStatus.pending)
    ray_job_id: Mapped[str | None] = mapped_column(String(200))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id", ondelete="SET NULL"))
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    artifact_uri: Mapped[str] = mapped_column(String(1024))
    method: Mapped[str] = mapped_column(String(100))
    backbone: Mapped[str | None] = mapped_column(String(100))
    threshold: Mapped[float | None] = mapped_column(Float)
    threshold_info: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # method, data it came from
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    stage: Mapped[ModelStage] = mapped_column(_enum(ModelStage), default=ModelStage.candidate)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ActiveLearningRound(Base):
    __tablename__ = "al_rounds"
    __table_args__ = (UniqueConstraint("dataset_id", "round_index", name="uq_al_rounds_dataset_round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    round_index: Mapped[int] = mapped_column(Integer)
    strategy: Mapped[str] = mapped_column(String(100))
    budget: Mapped[int] = mapped_column(Integer)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(32), default="open")
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    items: Mapped[list[QueueItem]] = relationship(back_populates="round", cascade="all, delete-orphan")


class QueueItem(Base):
    __tablename__ = "al_queue_items"
    __table_args__ = (UniqueConstraint("round_id", "image_id", name="uq_al_queue_items_round_image"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("al_rounds.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float)
    status: Mapped[QueueStatus] = mapped_column(_enum(QueueStatus), default=QueueStatus.queued)
    ls_task_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    round: Mapped[ActiveLearningRound] = relationship(back_populates="items")


class LabelProject(Base):
    """A Label Studio project for one dataset and labelling task, and how far it has been pulled."""

    __tablename__ = "ls_projects"
    __table_args__ = (UniqueConstraint("dataset_id", "task", "ls_url", name="uq_ls_projects_dataset_task_url"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(32))  # classification | segmentation | polygons | boxes
    ls_url: Mapped[str] = mapped_column(String(500))
    ls_project_id: Mapped[int] = mapped_column(Integer)
    title: Mapped[str] = mapped_column(String(200))
    classes: Mapped[list[str]] = mapped_column(JSON, default=list)  # defect classes in the labelling config
    watermark: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # tasks updated later get pulled
    webhook_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    tasks: Mapped[list[LabelTask]] = relationship(back_populates="project", cascade="all, delete-orphan")


class LabelTask(Base):
    """One image sent to Label Studio: the ledger that makes pushes and pulls idempotent."""

    __tablename__ = "ls_tasks"
    __table_args__ = (UniqueConstraint("project_id", "image_id", name="uq_ls_tasks_project_image"),
                      UniqueConstraint("project_id", "ls_task_id", name="uq_ls_tasks_project_task"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("ls_projects.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    ls_task_id: Mapped[int] = mapped_column(Integer)
    status: Mapped[LabelTaskStatus] = mapped_column(_enum(LabelTaskStatus), default=LabelTaskStatus.pushed)
    model_version: Mapped[str | None] = mapped_column(String(200))  # of the pre-annotation
    score: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    project: Mapped[LabelProject] = relationship(back_populates="tasks")


class DataChange(Base):
    """One repair of a dataset (``flawline data remove`` / ``relabel``): what, who, when and why.
    The image row may be gone (removed); its content hash and origin stay here."""

    __tablename__ = "data_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    action: Mapped[str] = mapped_column(String(32))  # remove | relabel
    content_hash: Mapped[str] = mapped_column(String(64))
    origin: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # labels before/after, objects deleted, forced
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
