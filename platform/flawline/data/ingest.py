"""Import pipeline shared by every layout: check → de-duplicate → upload → catalogue.

Guarantees:
- Every file is checked (header, size, whole-stream integrity, mask size in the shown frame, and
  the pixels of files the decoding policy converts only when they allow it: alpha channels,
  16-bit images; ``flawline.data.images``) before it is uploaded; a
  bad file stops the import with a one-line error naming it (or, with ``skip_invalid``, is left out
  and listed). The same bytes under two different labels stop it too.
- Objects are content-addressed (``images/sha256/..``): re-runs recognise what the dataset has by
  hash and upload nothing for it; an object never changes once written.
- Boxes from annotation files are checked against their image's size (inside it, positive width
  and height) before anything is uploaded; a bad box stops the import naming its file and image.
- Every file of the source that no image, mask or annotation uses is listed with why
  (``ImportReport.unused``): a mask that matches no image, a file outside the layout's folders, a
  file that is no image.
- Catalog rows are written only after every object of the import is stored, so an import that dies
  midway never leaves a row pointing at a missing object, and running it again completes it.
- An importer's split (``ImportItem.split``: MVTec's train/test, a manifest's split column) is the
  image's split and is also kept as the image attribute ``preset_split``, which later re-splits
  leave alone (``flawline data split --keep-preset`` restores it).
- An image's reference (``ImportItem.reference``: another item of the same scan) is stored as the
  reference's content hash (image attribute ``reference``), resolved once every file is hashed and
  before any row is written. A reference that will not be in the dataset (skipped as invalid,
  removed from it earlier, the same bytes as the image itself) stops the import naming both files;
  with ``skip_invalid`` the image is imported without it and listed (``references_dropped``), as is
  a reference that ``limit`` cut off.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from flawline.catalog import Annotation, AnnotationSource, Catalog, DataChange, Dataset, Image, Label
from flawline.catalog.models import utcnow
from flawline.data.images import (
    ImageInfo,
    canonical_mask,
    check_pixels,
    identify_image,
    mask_has_defect,
    shown_size,
    verify_image,
)
from flawline.data.importers import ImportItem, detect_layout, get_importer
from flawline.data.repair import default_actor, removed_images
from flawline.errors import FlawlineError, ImportConflict, InvalidInput
from flawline.storage import ObjectStore, content_key

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
T = TypeVar("T")
R = TypeVar("R")

ROWS_PER_COMMIT = 1000


@dataclass
class _Mask:
    sha256: str
    key: str
    data: bytes  # a 1-channel PNG: the file itself, or re-encoded when it was not one


@dataclass
class _Prepared:
    item: ImportItem
    info: ImageInfo
    mask: _Mask | None
    data: bytes = b""  # the image's bytes, held only while this file is being imported
    high: int | None = None  # images of more than 8 bits: data.images.robust_high
    reference: str | None = None  # content hash of the item's reference image, once resolved

    @property
    def key(self) -> str:
        return content_key("images", self.info.sha256, self.info.suffix)

    @property
    def label_text(self) -> str:
        if self.item.label is None:
            return "unlabeled"
        return self.item.label.value + (f"/{self.item.defect_class}" if self.item.defect_class else "")


@dataclass
class ImportReport:
    dataset: str
    layout: str
    source: str
    scanned: int = 0
    new_images: int = 0
    already_present: int = 0
    duplicates: int = 0
    labels_added: int = 0
    masks: int = 0
    boxes: int = 0  # boxes imported from annotation files, over every image
    objects_uploaded: int = 0
    bytes_uploaded: int = 0
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # images `data remove` took out: left out again
    unused: list[str] = field(default_factory=list)  # "path: why" for each source file no image or mask used
    references_dropped: list[str] = field(default_factory=list)  # "image: why" imported without its reference
    seconds: float = 0.0
    by_label: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def import_dataset(
    catalog: Catalog,
    store: ObjectStore,
    source: Path | None,
    *,
    layout: str = "auto",
    dataset: str | None = None,
    workers: int = 16,
    skip_invalid: bool = False,
    full_decode: bool = False,
    readd_removed: bool = False,
    limit: int | None = None,
    options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> ImportReport:
    """Import every image of ``source`` (laid out as ``layout``) into ``dataset``.

    ``full_decode`` decodes every pixel of every file instead of checking stream integrity
    (JPEG end marker, PNG chunk CRCs); slower, for sources you do not trust. Images ``flawline
    data remove`` took out of the dataset are left out and listed (``report.removed``), unless
    ``readd_removed`` (then recorded as a ``readd`` change).
    """
    started = time.perf_counter()
    source = source.expanduser().resolve() if source is not None else None
    if source is not None and not source.exists():
        raise InvalidInput(f"{source}: no such file or directory")
    if layout == "auto" and (options or {}).get("manifest"):
        layout = "manifest"  # a manifest file named explicitly says which layout this is
    if layout == "auto":
        importer = detect_layout(source) if source is not None else get_importer("elpv")
    else:
        importer = get_importer(layout)
    if importer.needs_path and source is None:
        raise InvalidInput(f"layout {importer.name!r} needs a PATH to import from")
    if source is not None and not source.is_dir():
        raise InvalidInput(f"{source}: not a directory")
    name = dataset or importer.default_dataset_name(source)
    report = ImportReport(dataset=name, layout=importer.name, source=str(source or f"package:{importer.name}"))

    items = list(importer.scan(source, **(options or {})))
    if source is not None and limit is None:
        report.unused = _unused_files(importer, source, items)
    cut_off = {it.image.name for it in items[limit:]} if limit is not None else set()
    if limit is not None:
        items = items[:limit]
    if not items:
        raise InvalidInput(f"{report.source}: no images found for layout {importer.name!r}")
    report.scanned = len(items)
    boxed = [it for it in items if it.boxes]
    if boxed and not skip_invalid:  # a bad box stops the import before any upload (skipped later otherwise)
        _parallel(_check_item_boxes, boxed, workers, "checking boxes", progress)

    store.ensure_bucket()  # a down server or refused keys fails here, before any work
    with catalog.session() as session:
        ds = session.scalar(select(Dataset).where(Dataset.name == name))
        existing = _existing_labels(session, ds.id) if ds is not None else {}
        removed = {h: (o, why) for h, o, why in removed_images(session, ds.id)} if ds is not None else {}

    # One pass per file on a thread pool, so checking overlaps uploading: read, hash, check headers,
    # register by hash (duplicates and label conflicts surface here), then verify and upload what
    # is new. Rows are written only after the pass, once every object is stored.
    registry = _Registry(existing, report, {} if readd_removed else removed)
    hashes: dict[str, str] = {}  # image name → content hash, for resolving references

    def import_one(item: ImportItem) -> tuple[int, int]:
        p = _identify(item)
        hashes[item.image.name] = p.info.sha256
        try:
            if not registry.claim(p):
                return 0, 0
            to_put = _verify(p, full_decode)
        finally:
            p.data = b""  # rows need the description, not the bytes
        sent = puts = 0
        for key, data, content_type in to_put:
            store.put_bytes(key, data, content_type)
            sent, puts = sent + len(data), puts + 1
        return sent, puts

    # Without skip_invalid the first error stops the pass (pending files are cancelled).
    try:
        uploaded, errors = _parallel(import_one, items, workers, "importing", progress, collect_errors=skip_invalid)
    except InvalidInput as err:
        if skip_invalid or isinstance(err, ImportConflict):
            raise
        raise InvalidInput(f"{err} (no image was added; --skip-invalid imports the others and lists the bad "
                           "files)") from None
    errors.sort(key=lambda e: e[0].image.name)
    conflicts = [err for _, err in errors if isinstance(err, ImportConflict)]
    if conflicts:
        raise conflicts[0]
    failed = {id(item) for item, _ in errors}
    report.skipped = [str(err) for _, err in errors]
    for result in uploaded:
        if result is not None:
            report.bytes_uploaded += result[0]
            report.objects_uploaded += result[1]
    unique = [p for p in registry.by_hash.values() if id(p.item) not in failed]
    to_add = [p for p in unique if p.info.sha256 not in existing]
    labels_to_add = registry.labels_to_add
    _resolve_references(unique, hashes, set(existing), {item.image.name for item, _ in errors}, cut_off,
                        skip_invalid, report)

    for start in range(0, len(to_add), ROWS_PER_COMMIT):
        with catalog.session() as session:
            ds_id = _get_or_create_dataset(session, name, importer.name, report.source)
            _insert_rows(session, ds_id, to_add[start:start + ROWS_PER_COMMIT])
    report.new_images = len(to_add)
    readded = [p for p in to_add if p.info.sha256 in removed] if readd_removed else []
    if readded:
        with catalog.session() as session:
            ds_id = _get_or_create_dataset(session, name, importer.name, report.source)
            session.add_all([DataChange(dataset_id=ds_id, action="readd", content_hash=p.info.sha256,
                                        origin=p.item.image.name, actor=default_actor(),
                                        reason="imported again with --readd-removed") for p in readded])
    if labels_to_add:
        now = utcnow()
        with catalog.session() as session:
            session.execute(insert(Annotation), [
                {"image_id": image_id, **_annotation_fields(p), "created_at": now, "updated_at": now}
                for image_id, p in labels_to_add])
        report.labels_added = len(labels_to_add)

    for p in unique:
        report.by_label[p.label_text] = report.by_label.get(p.label_text, 0) + 1
    report.masks = sum(1 for p in unique if p.mask is not None)
    report.boxes = sum(len(p.item.boxes or ()) for p in unique)
    report.seconds = time.perf_counter() - started
    return report


def _resolve_references(unique: list[_Prepared], hashes: dict[str, str], existing: set[str], failed: set[str],
                        cut_off: set[str], skip_invalid: bool, report: ImportReport) -> None:
    """Set each image's ``reference`` to its reference's content hash when that image will be in the
    dataset; otherwise raise InvalidInput naming both (or, with ``skip_invalid``, or when ``limit``
    cut the reference off, list the image in ``report.references_dropped``)."""
    present = existing | {p.info.sha256 for p in unique}
    for p in sorted(unique, key=lambda p: p.item.image.name):
        ref = p.item.reference
        if ref is None:
            continue
        digest = hashes.get(ref)
        if digest is not None and digest in present and digest != p.info.sha256:
            p.reference = digest
            continue
        if ref in cut_off:
            why, dropped = "was left out by the import's limit", True
        elif ref in failed:
            why, dropped = "was skipped as invalid", skip_invalid
        elif digest == p.info.sha256:
            why, dropped = "has the same bytes as the image itself", skip_invalid
        elif digest is not None:
            why, dropped = "was removed from the dataset earlier (--readd-removed imports it again)", skip_invalid
        else:
            why, dropped = "is not an image of this import", skip_invalid
        line = f"{p.item.image.name}: its reference {ref} {why}"
        if not dropped:
            raise InvalidInput(line)
        report.references_dropped.append(line + "; imported without a reference")


def _unused_files(importer: Any, source: Path, items: list[ImportItem]) -> list[str]:
    """Every non-hidden file below ``source`` that no item reads (as image, mask or annotation) and
    the scan did not read either (``Importer.side_files``), with why."""
    used = {b.path.resolve() for it in items for b in (it.image, it.mask, it.annotation)
            if b is not None and b.path is not None}
    used |= {path.resolve() for path in getattr(importer, "side_files", ())}
    out = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts) and path.resolve() not in used:
            out.append(f"{path}: {importer.unused_reason(source, path)}")
    return out


# -- stages -------------------------------------------------------------------------------------
def _identify(item: ImportItem) -> _Prepared:
    """Read, hash and parse headers; a mask must match its image's size."""
    data = item.image.read()
    info = identify_image(data, item.image.name)
    mask = None
    if item.mask is not None:
        raw = item.mask.read()
        canonical, minfo = canonical_mask(raw, item.mask.name)
        if (minfo.width, minfo.height) != (info.width, info.height):
            if info.orientation != 1 and (minfo.width, minfo.height) == info.stored_size:
                raise InvalidInput(f"{item.mask.name}: mask is {minfo.width}x{minfo.height}, the stored frame of "
                                   f"{item.image.name}, which is shown turned (EXIF orientation {info.orientation}) "
                                   f"as {info.width}x{info.height}; masks must be in the shown frame")
            raise InvalidInput(f"{item.mask.name}: mask is {minfo.width}x{minfo.height} but its image "
                               f"{item.image.name} is {info.width}x{info.height}")
        mask = _Mask(minfo.sha256, content_key("masks", minfo.sha256, ".png"), canonical)
    if item.boxes:
        check_boxes(item.boxes, info.width, info.height,
                    item.annotation.name if item.annotation else item.image.name, item.image.name)
    return _Prepared(item, info, mask, data)


def _check_item_boxes(item: ImportItem) -> None:
    """``check_boxes`` on an item's boxes against its image's size from the header alone (the
    same size ``_identify`` reads), so that a bad box is found before anything is uploaded."""
    assert item.boxes
    if item.image.path is not None and item.image.data is None:
        width, height, _ = shown_size(item.image.path, item.image.name)
    else:
        info = identify_image(item.image.read(), item.image.name)
        width, height = info.width, info.height
    check_boxes(item.boxes, width, height, item.annotation.name if item.annotation else item.image.name,
                item.image.name)


def check_boxes(boxes: list[dict[str, Any]], width: int, height: int, source: str, image: str) -> None:
    """Each box [{x, y, w, h, label}] (pixels, top-left corner) has a positive size and lies inside
    the ``width`` x ``height`` image (half a pixel of rounding allowed); InvalidInput names the
    annotation file ``source``, the image and the box otherwise."""
    for n, box in enumerate(boxes, start=1):
        try:
            x, y, w, h = (float(box[k]) for k in ("x", "y", "w", "h"))
        except (KeyError, TypeError, ValueError):
            raise InvalidInput(f"{source}: box {n} of {image} is not x, y, w, h numbers ({box!r})") from None
        if not all(map(math.isfinite, (x, y, w, h))) or w <= 0 or h <= 0:
            raise InvalidInput(f"{source}: box {n} of {image} has no area (x={x:g} y={y:g} w={w:g} h={h:g})")
        if x < -0.5 or y < -0.5 or x + w > width + 0.5 or y + h > height + 0.5:
            raise InvalidInput(f"{source}: box {n} of {image} (x={x:g} y={y:g} w={w:g} h={h:g}) lies outside "
                               f"the {width}x{height} image")


def _verify(p: _Prepared, full_decode: bool) -> list[tuple[str, bytes, str]]:
    """Check whole streams (after the cheap header checks passed); returns what to put."""
    data = p.data
    verify_image(data, p.item.image.name, p.info.format, full_decode=full_decode)
    p.high = check_pixels(data, p.item.image.name, p.info)  # alpha and 16-bit files: refused now, not at training
    out = [(p.key, data, p.info.content_type)]
    if p.mask is not None and p.item.mask is not None:
        mdata = p.mask.data
        verify_image(mdata, p.item.mask.name, "PNG", full_decode=full_decode, what="mask")
        if p.item.label is Label.normal and mask_has_defect(mdata, p.item.mask.name):
            raise ImportConflict(f"{p.item.mask.name}: mask marks defect pixels but its image is labelled normal")
        out.append((p.mask.key, mdata, "image/png"))
    return out


def _parallel(fn: Callable[[T], R], items: Sequence[T], workers: int, stage: str,
              progress: ProgressFn | None, *, collect_errors: bool = False
              ) -> tuple[list[R | None], list[tuple[T, FlawlineError]]]:
    """Run ``fn`` over ``items`` on a thread pool, keeping order. With ``collect_errors`` flawline
    errors are gathered per item; otherwise the first error cancels what has not started and raises."""
    results: list[R | None] = [None] * len(items)
    errors: list[tuple[T, FlawlineError]] = []
    done = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"flawline-{stage}") as pool:
        futures = {pool.submit(fn, it): i for i, it in enumerate(items)}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
                for fut in finished:
                    idx = futures[fut]
                    err = fut.exception()
                    if err is None:
                        results[idx] = fut.result()
                    elif collect_errors and isinstance(err, FlawlineError):
                        errors.append((items[idx], err))
                    else:
                        raise err
                    done += 1
                if progress and finished:
                    progress(stage, done, len(items))
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return results, errors


class _Registry:
    """The import's distinct images by content hash, shared by the worker threads."""

    def __init__(self, existing: dict[str, tuple[int, str | None, str]], report: ImportReport,
                 removed: dict[str, tuple[str | None, str]] | None = None) -> None:
        self.existing = existing
        self.removed = removed or {}
        self.report = report
        self.by_hash: dict[str, _Prepared] = {}
        self.labels_to_add: list[tuple[int, _Prepared]] = []
        self.lock = threading.Lock()

    def claim(self, p: _Prepared) -> bool:
        """Register ``p``; True if its bytes are new to the dataset and must be uploaded."""
        digest = p.info.sha256
        with self.lock:
            if digest in self.removed:
                self.report.removed.append(f"{p.item.image.name}: removed {self.removed[digest][1]}")
                return False
            seen = self.by_hash.get(digest)
            if seen is not None:
                self.report.duplicates += 1
                if p.item.label is not None and seen.item.label is not None and p.label_text != seen.label_text:
                    a, b = sorted((p.item.image.name, seen.item.image.name))
                    la, lb = (p.label_text, seen.label_text) if a == p.item.image.name else (seen.label_text, p.label_text)
                    raise ImportConflict(f"{a} and {b} are the same image with conflicting labels ({la} vs {lb})")
                if seen.item.label is None and p.item.label is not None:
                    self.by_hash[digest] = p  # a labelled copy beats an unlabelled one
                return False
            self.by_hash[digest] = p
            found = self.existing.get(digest)
            if found is None:
                return True
            image_id, old_label, origin = found
            if p.item.label is not None and old_label is not None and old_label != p.label_text:
                raise ImportConflict(f"{p.item.image.name} is already in dataset {self.report.dataset!r} "
                                     f"(from {origin}) labelled {old_label}, not {p.label_text}")
            self.report.already_present += 1
            if old_label is None and p.item.label is not None:
                self.labels_to_add.append((image_id, p))
            return False


def _existing_labels(session: Session, dataset_id: int) -> dict[str, tuple[int, str | None, str]]:
    """content hash → (image id, imported label text or None, origin) for one dataset."""
    rows = session.execute(
        select(Image.id, Image.content_hash, Image.origin, Annotation.label, Annotation.defect_class)
        .outerjoin(Annotation, (Annotation.image_id == Image.id)
                   & (Annotation.source == AnnotationSource.imported) & Annotation.label.is_not(None))
        .where(Image.dataset_id == dataset_id)
    )
    out: dict[str, tuple[int, str | None, str]] = {}
    for image_id, digest, origin, label, defect_class in rows:
        text = None if label is None else label.value + (f"/{defect_class}" if defect_class else "")
        if digest not in out or text is not None:
            out[digest] = (image_id, text, origin or "")
    return out


# -- rows ---------------------------------------------------------------------------------------
def _get_or_create_dataset(session: Session, name: str, layout: str, source: str) -> int:
    ds = session.scalar(select(Dataset).where(Dataset.name == name))
    if ds is None:
        ds = Dataset(name=name, layout=layout, source_uri=source)
        session.add(ds)
        session.flush()
    return ds.id


def _annotation_fields(p: _Prepared) -> dict[str, Any]:
    return {
        "label": p.item.label,
        "defect_class": p.item.defect_class,
        "mask_key": p.mask.key if p.mask else None,
        "boxes": p.item.boxes or None,
        "source": AnnotationSource.imported,
        "annotator": "import",
        "attrs": p.item.annotation_attrs or None,
    }


def _insert_rows(session: Session, dataset_id: int, chunk: list[_Prepared]) -> None:
    """Bulk-insert image rows, then their imported annotations (one executemany each)."""
    now = utcnow()
    ids = session.scalars(
        insert(Image).returning(Image.id, sort_by_parameter_order=True),
        [{"dataset_id": dataset_id, "object_key": p.key, "content_hash": p.info.sha256,
          "byte_size": p.info.byte_size, "width": p.info.width, "height": p.info.height,
          "channels": p.info.channels, "format": p.info.format, "split": p.item.split,
          "origin": p.item.image.name, "created_at": now,
          "attrs": {**(p.item.image_attrs or {}), **({"high": p.high} if p.high is not None else {}),
                    **({"orientation": p.info.orientation} if p.info.orientation != 1 else {}),
                    **({"preset_split": p.item.split.value} if p.item.split is not None else {}),
                    **({"reference": p.reference} if p.reference else {})} or None}
         for p in chunk],
    ).all()
    annotations = [{"image_id": image_id, **_annotation_fields(p), "created_at": now, "updated_at": now}
                   for image_id, p in zip(ids, chunk)
                   if p.item.label is not None or p.mask is not None or p.item.boxes]
    if annotations:
        session.execute(insert(Annotation), annotations)
