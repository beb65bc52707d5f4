"""Model versions in the catalog: register, look up, change a threshold (keeping the old one), and
move versions between stages.

Stages: a new version is a ``candidate``; ``promote`` makes one version of a name ``production``
and archives the one it replaces, so ``archived`` means "was in production once". ``rollback``
archives the production version and puts back the highest archived version below it: with
versions promoted in order, the one it replaced. The stage history is all it goes by (no extra
columns): "archived" says "was in production", not "was good" — a version rolled back from and
later superseded is archived too, and a later rollback may return to it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flawline.catalog.models import ModelStage, ModelVersion
from flawline.errors import InvalidInput, NotFound


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
        versions = session.scalars(select(ModelVersion.version).where(ModelVersion.name == name)
                                   .order_by(ModelVersion.version)).all()
        if versions:  # the name exists, the version does not
            raise NotFound(f"no model {ref!r}; {name} has version(s) {', '.join(map(str, versions))}")
        names = session.scalars(select(ModelVersion.name).distinct().order_by(ModelVersion.name)).all()
        raise NotFound(f"no model {ref!r}" + (f"; models: {', '.join(names)}" if names else "; none registered yet"))
    return row


def set_threshold(session: Session, row: ModelVersion, threshold: dict[str, Any]) -> None:
    history = list((row.threshold_info or {}).get("history", []))
    if row.threshold_info:
        history.append({k: v for k, v in row.threshold_info.items() if k != "history"})
    row.threshold = threshold["value"]
    row.threshold_info = {**threshold, "history": history}


def production_version(session: Session, name: str) -> ModelVersion | None:
    """The version of ``name`` now in production (the newest one, should there be several)."""
    return session.scalar(select(ModelVersion).where(ModelVersion.name == name,
                                                     ModelVersion.stage == ModelStage.production)
                          .order_by(ModelVersion.version.desc()).limit(1))


def promote(session: Session, ref: str) -> ModelVersion:
    """Make ``ref`` (``name``: the newest version, or ``name:version``) the production version of
    its name; the version in production until now is archived. Promoting the production version
    changes nothing."""
    row = get_version(session, ref)
    for other in session.scalars(select(ModelVersion).where(ModelVersion.name == row.name,
                                                            ModelVersion.stage == ModelStage.production,
                                                            ModelVersion.id != row.id)):
        other.stage = ModelStage.archived
    row.stage = ModelStage.production
    session.flush()
    return row


def rollback(session: Session, name: str) -> ModelVersion:
    """Archive ``name``'s production version and promote the highest archived version below it
    (archived = was in production before); returns the version now in production."""
    get_version(session, name)  # NotFound, listing the models, if there is no such name
    current = production_version(session, name)
    if current is None:
        raise InvalidInput(f"model {name!r} has no production version to roll back; "
                           f"promote one with `flawline models promote {name}:VERSION`")
    previous = session.scalar(select(ModelVersion).where(ModelVersion.name == name,
                                                         ModelVersion.stage == ModelStage.archived,
                                                         ModelVersion.version < current.version)
                              .order_by(ModelVersion.version.desc()).limit(1))
    if previous is None:
        raise InvalidInput(f"cannot roll back {name}:{current.version}: no earlier version of {name!r} "
                           "was in production (none archived below it)")
    return promote(session, f"{name}:{previous.version}")


def version_threshold(row: ModelVersion) -> dict[str, Any] | None:
    """The threshold the catalog holds for a version (set at training or by hand), without its
    history; None when it has none."""
    if not row.threshold_info:
        return None
    return {k: v for k, v in row.threshold_info.items() if k != "history"}


def load_version(catalog: Any, store: Any, ref: str | ModelVersion, device: str | None = None) -> Any:
    """A registered model version as the catalog describes it: its artifact, with the catalog's
    threshold (which ``flawline models threshold`` may have changed after the artifact was saved).
    The one loader for serving, evaluation, scoring and pre-annotations. ``ref``: ``name``,
    ``name:version`` or the row. Raises ``NotFound`` for an unknown reference."""
    from flawline.evaluate.thresholds import Threshold
    from flawline.models.artifacts import detector_from_bytes

    if isinstance(ref, ModelVersion):
        uri, info = ref.artifact_uri, version_threshold(ref)
    else:
        with catalog.session() as s:
            row = get_version(s, ref)
            uri, info = row.artifact_uri, version_threshold(row)
    detector = detector_from_bytes(store.get_bytes(store.key_from_uri(uri)), uri, device)
    if info:
        detector.set_threshold(Threshold.from_dict(info))
    return detector
