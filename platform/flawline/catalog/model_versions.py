"""Model versions in the catalog: register, look up, and change a threshold (keeping the old one)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flawline.catalog.models import ModelStage, ModelVersion
from flawline.errors import NotFound


def register_version(session: Session, *, name: str, artifact_uri: str, method: str, backbone: str | None,
                     threshold: dict[str, Any] | None, metrics: dict[str, Any] | None,
                     dataset_id: int | None = None, run_id: int | None = None) -> ModelVersion:
    version = (session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name)) or 0) + 1
    row = ModelVersion(name=name, version=version, artifact_uri=artifact_uri, method=method, backbone=backbone,
                       threshold=threshold["value"] if threshold else None, threshold_info=threshold,
                       metrics=metrics, dataset_id=dataset_id, run_id=run_id, stage=ModelStage.candidate)
    session.add(row)
    session.flush()
    return row


def get_version(session: Session, ref: str) -> ModelVersion:
    """``name`` (newest version) or ``name:version``."""
    name, _, version = ref.partition(":")
    query = select(ModelVersion).where(ModelVersion.name == name)
    if version:
        if not version.isdigit():
            raise NotFound(f"model reference {ref!r}: version must be a number (name:3)")
        query = query.where(ModelVersion.version == int(version))
    row = session.scalar(query.order_by(ModelVersion.version.desc()).limit(1))
    if row is None:
        names = session.scalars(select(ModelVersion.name).distinct().order_by(ModelVersion.name)).all()
        raise NotFound(f"no model {ref!r}" + (f"; models: {', '.join(names)}" if names else "; none registered yet"))
    return row


def set_threshold(session: Session, row: ModelVersion, threshold: dict[str, Any]) -> None:
    history = list((row.threshold_info or {}).get("history", []))
    if row.threshold_info:
        history.append({k: v for k, v in row.threshold_info.items() if k != "history"})
    row.threshold = threshold["value"]
    row.threshold_info = {**threshold, "history": history}
