"""Repairing a dataset: take images out (``remove_images``) or correct their labels
(``relabel_images``), each change recorded in the catalog (``data_changes``: who, when, why).

Guarantees:
- Images are named by file name (the name they were imported from, or its whole origin path),
  by content hash (the 64 hex digits, or a prefix of at least 8) or by a list of those. A name that
  matches nothing, or more than one image, stops the command before anything changes.
- ``remove_images`` refuses an image that a registered model version was trained or tested on (a
  version of its dataset registered after the image was imported, while it had a split) unless
  ``force``; forcing is recorded.
- Rows first, then objects: the image rows (with their annotations, queue items and ledger links)
  and the change records are one transaction; only after it commits are the objects no row names
  any more deleted (an object another dataset or image still uses stays). An object whose deletion
  fails is listed in the report and in the change's record, never a row without its object.
- ``relabel_images`` adds a human annotation by ``actor`` (the deciding one:
  ``catalog.queries.image_labels``); the annotations it overrides stay, marked ``superseded``, so
  nothing already stored is lost, and their masks no longer count (a mask of a "defect" that is
  now "normal" would contradict the label).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from flawline.catalog import (
    Annotation,
    AnnotationSource,
    Catalog,
    DataChange,
    Image,
    Label,
    ModelVersion,
    TrainingRun,
)
from flawline.catalog.queries import LABEL_SOURCES, get_dataset, image_labels
from flawline.errors import ConfigError, InvalidInput
from flawline.storage import ObjectStore

MIN_HASH_PREFIX = 8


@dataclass
class RepairReport:
    dataset: str
    action: str
    images: list[str] = field(default_factory=list)  # origin of each image changed
    objects_deleted: int = 0
    objects_kept: int = 0  # still named by another row
    objects_failed: list[str] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)  # used by these model versions, removed with force
    unchanged: list[str] = field(default_factory=list)  # relabel: images that had that label already

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def default_actor() -> str:
    """Who is making the change: ``FLAWLINE_USER``, else the login name."""
    try:
        return os.environ.get("FLAWLINE_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def read_selectors(names: Iterable[str], list_file: Path | None) -> list[str]:
    """The command line's names plus one per non-empty, non-comment line of ``list_file``."""
    out = [n.strip() for n in names if n.strip()]
    if list_file is not None:
        try:
            text = list_file.read_text(encoding="utf-8")
        except OSError as err:
            raise InvalidInput(f"{list_file}: cannot read the list ({err.strerror or err})") from None
        out += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise InvalidInput("name at least one image (file name or content hash), or pass --from-file")
    return list(dict.fromkeys(out))


def _match(rows: list[tuple[int, str, str | None]], selectors: list[str],
           removed: list[tuple[str, str | None, str]] = ()) -> list[int]:
    """Image ids for ``selectors`` (see module docstring); refuses unknown and ambiguous ones.
    ``removed``: (hash, origin, when/who/why) of the dataset's removed images, to say so."""
    by_id: dict[int, None] = {}
    for sel in selectors:
        low = sel.lower()
        is_hash = len(low) >= MIN_HASH_PREFIX and all(c in "0123456789abcdef" for c in low)
        hits = [i for i, digest, origin in rows
                if (is_hash and digest.startswith(low))
                or (origin is not None and (origin == sel or origin.replace("\\", "/").rsplit("/", 1)[-1] == sel))]
        if not hits:
            gone = [w for digest, origin, w in removed if (is_hash and digest.startswith(low)) or (
                origin is not None and (origin == sel or origin.replace("\\", "/").rsplit("/", 1)[-1] == sel))]
            if gone:
                raise InvalidInput(f"{sel!r} was removed from this dataset already ({gone[-1]}); nothing changed")
            raise InvalidInput(f"{sel!r}: no image of this dataset has that file name or content hash; nothing changed")
        if len(hits) > 1:
            raise InvalidInput(f"{sel!r} names {len(hits)} images; use the content hash or the whole origin path; "
                               "nothing changed")
        by_id[hits[0]] = None
    return list(by_id)


def _require_reason(reason: str | None) -> None:
    if not (reason or "").strip():
        raise InvalidInput("say why with --reason: every change is recorded with it; nothing changed")


def _dataset_rows(session: Any, dataset_id: int) -> list[tuple[int, str, str | None]]:
    return [tuple(r) for r in session.execute(select(Image.id, Image.content_hash, Image.origin)
                                              .where(Image.dataset_id == dataset_id))]


def removed_images(session: Any, dataset_id: int) -> list[tuple[str, str | None, str]]:
    """(content hash, origin, "on <date> by <who>: <why>") of each image ``data remove`` took out of
    the dataset, oldest first (``ingest`` leaves them out of later imports)."""
    rows = session.scalars(select(DataChange).where(DataChange.dataset_id == dataset_id,
                                                    DataChange.action.in_(("remove", "readd"))).order_by(DataChange.id))
    latest: dict[str, DataChange] = {}
    for r in rows:  # an image imported again (--readd-removed) is no longer removed
        latest[r.content_hash] = r
    return [(r.content_hash, r.origin, f"on {r.created_at:%Y-%m-%d %H:%M} by {r.actor}: {r.reason}")
            for r in latest.values() if r.action == "remove"]


def dataset_versions(session: Any, dataset_id: int, dataset_name: str) -> list[tuple[str, Any]]:
    """(``name:version``, registered at) of every model version of the dataset: directly, or
    through its run's datasets. One query for a whole removal."""
    rows = session.execute(select(ModelVersion, TrainingRun.config).outerjoin(
        TrainingRun, TrainingRun.id == ModelVersion.run_id)).all()
    out = []
    for version, config in rows:
        datasets = ((config or {}).get("spec") or {}).get("datasets") or (config or {}).get("datasets") or []
        if version.dataset_id == dataset_id or dataset_name in datasets:
            out.append((f"{version.name}:{version.version}", version.created_at))
    return out


def models_using(image: Image, versions: list[tuple[str, Any]]) -> list[str]:
    """Of ``versions`` (``dataset_versions``), those trained or tested on ``image``: registered
    after the image was imported, while it had a split."""
    if image.split is None:
        return []
    return [ref for ref, created in versions if created >= image.created_at]


def remove_images(catalog: Catalog, store: ObjectStore, dataset: str, selectors: list[str], *, reason: str | None,
                  actor: str | None = None, force: bool = False) -> RepairReport:
    """Take the named images out of ``dataset`` (module docstring). Raises ``InvalidInput`` for an
    unknown or ambiguous name and an empty ``reason``, ``ConfigError`` for an image a model version
    used (without ``force``); nothing changes then."""
    _require_reason(reason)
    actor = actor or default_actor()
    report = RepairReport(dataset, "remove")
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        ids = _match(_dataset_rows(s, ds.id), selectors, removed_images(s, ds.id))  # or refuse: nothing changed
        images = list(s.scalars(select(Image).where(Image.id.in_(ids))))
        versions = dataset_versions(s, ds.id, ds.name)
        users = {im.id: models_using(im, versions) for im in images}
        blocked = {im.origin or im.content_hash: u for im in images if (u := users[im.id])}
        if blocked and not force:
            first, versions = next(iter(blocked.items()))
            raise ConfigError(f"{first} was used by model version(s) {', '.join(versions)}"
                              + (f" (and {len(blocked) - 1} more image(s) are)" if len(blocked) > 1 else "")
                              + "; pass --force to remove anyway (recorded); nothing changed")
        keys: dict[str, None] = {}
        for im in images:
            masks = [m for m in s.scalars(select(Annotation.mask_key).where(Annotation.image_id == im.id,
                                                                           Annotation.mask_key.is_not(None)))]
            for key in [im.object_key, *masks]:
                keys[key] = None
            s.add(DataChange(dataset_id=ds.id, action="remove", content_hash=im.content_hash, origin=im.origin,
                             actor=actor, reason=reason,
                             detail={"label": _label_text(image_labels(s, ds.id).get(im.id)),
                                     "objects": [im.object_key, *masks],
                                     **({"forced_over": users[im.id]} if users[im.id] else {})}))
            report.images.append(im.origin or im.content_hash)
            report.forced += users[im.id]
            s.delete(im)  # annotations, queue items cascade; ledger rows keep the task, without the image
        s.flush()
        still_named = set(s.scalars(select(Image.object_key).where(Image.object_key.in_(list(keys))))) | set(
            s.scalars(select(Annotation.mask_key).where(Annotation.mask_key.in_(list(keys)))))
    for key in keys:  # after the commit: no row names these objects any more
        if key in still_named:
            report.objects_kept += 1
            continue
        try:
            store.remove(key)
            report.objects_deleted += 1
        except Exception as err:  # noqa: BLE001 - listed, the rows are already consistent
            report.objects_failed.append(f"{key}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    return report


def relabel_images(catalog: Catalog, dataset: str, selectors: list[str], label: str, *, reason: str | None,
                   defect_class: str | None = None, actor: str | None = None) -> RepairReport:
    """Correct the named images' label to ``label`` (normal | defect, with ``defect_class``).
    Raises ``InvalidInput`` for an unknown label, name or an empty ``reason``; nothing changes then."""
    _require_reason(reason)
    try:
        new = Label(label)
    except ValueError:
        raise InvalidInput(f"label {label!r}: choose normal or defect") from None
    if new is Label.normal and defect_class:
        raise InvalidInput("a normal image has no defect class")
    actor = actor or default_actor()
    report = RepairReport(dataset, "relabel")
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        ids = _match(_dataset_rows(s, ds.id), selectors, removed_images(s, ds.id))  # or refuse: nothing changed
        before = image_labels(s, ds.id)
        for im in s.scalars(select(Image).where(Image.id.in_(ids))):
            old = before.get(im.id)
            if old == (new, defect_class):
                report.unchanged.append(im.origin or im.content_hash)
                continue
            for ann in s.scalars(select(Annotation).where(Annotation.image_id == im.id,
                                                          Annotation.source.in_(LABEL_SOURCES))):
                ann.attrs = {**(ann.attrs or {}), "superseded": True}
            s.add(Annotation(image_id=im.id, label=new, defect_class=defect_class, source=AnnotationSource.human,
                             annotator=actor, attrs={"relabel": reason}))
            s.add(DataChange(dataset_id=ds.id, action="relabel", content_hash=im.content_hash, origin=im.origin,
                             actor=actor, reason=reason,
                             detail={"from": _label_text(old), "to": _label_text((new, defect_class))}))
            report.images.append(im.origin or im.content_hash)
    return report


def data_changes(catalog: Catalog, dataset: str) -> list[dict[str, Any]]:
    """The dataset's recorded repairs, oldest first."""
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        rows = s.scalars(select(DataChange).where(DataChange.dataset_id == ds.id).order_by(DataChange.id))
        return [{"action": r.action, "image": r.origin or r.content_hash, "content_hash": r.content_hash,
                 "actor": r.actor, "reason": r.reason, "at": r.created_at.isoformat(), **(r.detail or {})}
                for r in rows]


def _label_text(value: tuple[Label | None, str | None] | None) -> str | None:
    if not value or value[0] is None:
        return None
    label, cls = value
    return label.value + (f"/{cls}" if cls else "")
