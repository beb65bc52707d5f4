"""Catalogued images as training, evaluation and scoring read them: one typed record, one catalog
query and one decoder.

- ``ImageRecord``: one image of a dataset (object key, split, size, deciding label and class, mask
  key, boxes, origin, white level, its reference image's key; ``target`` once a run has assigned a
  class index). It crosses
  into Ray as JSON (``to_json`` / ``from_json``).
- ``image_records``: the one catalog query (a dataset's images in id order, filtered by split or
  label when asked).
- ``decode_record``: the one decoder of a record's image and mask; ``decode_rows`` is its Ray form
  (a batch of records → uint8 numpy arrays, what Ray Data moves), ``fetch`` its in-process form
  for evaluation (``LabelledImages``) and ``decode_images`` its model-ready form for scoring.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from sqlalchemy import select

from flawline.catalog import Annotation, Catalog, Image, Label, Split
from flawline.catalog.queries import LABEL_SOURCES, dataset_white, get_dataset, image_labels
from flawline.data.loading import decode_image, decode_mask, pair
from flawline.errors import InvalidInput
from flawline.storage import ObjectStore

UNLABELLED = -1  # ``ImageRecord.target`` of an image whose label a run does not use


@dataclass
class ImageRecord:
    """One catalogued image. ``defect``: True / False from its deciding label, None when
    unlabelled; ``width`` / ``height`` in pixels of the shown frame; ``boxes``: coarse regions
    ``{x, y, w, h}`` in those pixels; ``white``: the white level its pixels decode at (images of
    more than 8 bits; None otherwise); ``target``: the class index a run gave it (``UNLABELLED``
    when its label is not used); ``reference_key``: the object key of its defect-free reference
    image (image attribute ``reference``, set at import), None when it has none or that image is no
    longer in the dataset."""

    image_id: int
    key: str
    dataset: str
    split: str | None
    width: int
    height: int
    defect: bool | None
    defect_class: str | None = None
    mask_key: str | None = None
    boxes: list[dict[str, Any]] | None = None
    origin: str = ""
    stratum: str = ""
    white: int | None = None
    target: int = UNLABELLED
    reference_key: str | None = None

    @property
    def label(self) -> Label | None:
        return None if self.defect is None else Label.defect if self.defect else Label.normal

    @property
    def file_name(self) -> str:
        """The source file's name (the last part of ``origin``)."""
        return str(self.origin).replace("\\", "/").rsplit("/", 1)[-1] or f"image-{self.image_id}.png"

    def unlabelled(self) -> ImageRecord:
        """This image with its label held back."""
        return replace(self, defect=None, defect_class=None, target=UNLABELLED)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> ImageRecord:
        return cls(**(json.loads(text) if isinstance(text, str) else text))


def dump_records(records: list[ImageRecord]) -> bytes:
    """Records as one JSON array (what a Ray job reads back with ``load_records``)."""
    return json.dumps([asdict(r) for r in records]).encode()


def load_records(data: bytes) -> list[ImageRecord]:
    return [ImageRecord.from_json(item) for item in json.loads(data)]


def image_records(catalog: Catalog, dataset: str, split: Split | None = None, *, labelled_only: bool = False,
                  normal_only: bool = False) -> list[ImageRecord]:
    """The images of ``dataset`` (of one ``split`` when given) in id order, with their deciding
    label, mask and boxes (from human or imported annotations; a relabel's superseded regions no
    longer hold) and the dataset's white level. ``labelled_only`` drops unlabelled images,
    ``normal_only`` keeps images labelled normal. Raises ``InvalidInput`` for an unknown dataset."""
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        labels = image_labels(s, ds.id)
        white = dataset_white(s, ds.id)
        query = select(Image.id, Image.object_key, Image.split, Image.width, Image.height, Image.attrs,
                       Image.origin).where(Image.dataset_id == ds.id)
        if split is not None:
            query = query.where(Image.split == split)
        images = s.execute(query.order_by(Image.id)).all()
        regions: dict[int, tuple[str | None, list | None]] = {}
        for image_id, mask_key, boxes, attrs in s.execute(
                select(Annotation.image_id, Annotation.mask_key, Annotation.boxes, Annotation.attrs).join(Image)
                .where(Image.dataset_id == ds.id, Annotation.source.in_(LABEL_SOURCES))):
            if attrs and attrs.get("superseded"):
                continue
            old_mask, old_boxes = regions.get(image_id, (None, None))
            regions[image_id] = (old_mask or mask_key, old_boxes or boxes)
        references = sorted({r.attrs["reference"] for r in images if r.attrs and r.attrs.get("reference")})
        reference_keys: dict[str, str] = {}
        for start in range(0, len(references), 500):
            reference_keys.update(s.execute(select(Image.content_hash, Image.object_key).where(
                Image.dataset_id == ds.id, Image.content_hash.in_(references[start:start + 500]))).all())
    records = []
    for image_id, key, image_split, width, height, attrs, origin in images:
        label, cls = labels.get(image_id, (None, None))
        if (labelled_only or normal_only) and label is None or normal_only and label is not Label.normal:
            continue
        mask_key, boxes = regions.get(image_id, (None, None))
        records.append(ImageRecord(
            image_id=image_id, key=key, dataset=dataset, split=image_split.value if image_split else None,
            width=width, height=height, defect=None if label is None else label is Label.defect, defect_class=cls,
            mask_key=mask_key, boxes=boxes, origin=origin or key, stratum=(attrs or {}).get("cell_type", ""),
            white=white, reference_key=reference_keys.get((attrs or {}).get("reference", ""))))
    return records


def held_out_image(catalog: Catalog, store: ObjectStore, dataset: str, seed: int = 0) -> tuple[str, bytes, str]:
    """(file name, stored bytes, its label as "normal" or "defect[/class]") of one labelled
    test-split image of ``dataset`` (a defect where there is one), picked with ``seed``: an image no
    model of the dataset was fitted on. Raises ``InvalidInput`` when the dataset has none."""
    records = image_records(catalog, dataset, Split.test, labelled_only=True)
    if not records:
        raise InvalidInput(f"{dataset}: no labelled test images; run `flawline data split`")
    defects = [r for r in records if r.defect] or records
    record = defects[int(np.random.default_rng(seed).integers(len(defects)))]
    label = ("defect" + (f"/{record.defect_class}" if record.defect_class else "")) if record.defect else "normal"
    return record.file_name, store.get_bytes(record.key), label


def keep_fraction(rows: list[ImageRecord], fraction: float, seed: int
                  ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """A seeded share of ``rows``, stratified by (dataset, verdict, class, stratum), at least one per
    stratum; returns (kept, held back)."""
    if fraction >= 1.0:
        return list(rows), []
    strata: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        strata.setdefault((r.dataset, r.defect, r.defect_class or "", r.stratum), []).append(i)
    rng = np.random.default_rng(seed)
    kept: set[int] = set()
    for key in sorted(strata, key=str):
        idx = strata[key]
        n = max(1, round(fraction * len(idx)))
        kept.update(idx[i] for i in rng.permutation(len(idx))[:n])
    return [r for i, r in enumerate(rows) if i in kept], [r for i, r in enumerate(rows) if i not in kept]


# -- the one decoder ---------------------------------------------------------------------------------

def decode_record(store: ObjectStore, record: ImageRecord, size: int, white: int | None = None,
                  with_mask: bool = True, reference: bool = False) -> tuple[torch.Tensor, np.ndarray | None]:
    """One record → (float image [3, S, S] in [0, 1], gray repeated; bool mask [S, S], or None
    when ``with_mask`` is False). ``white``: a model's white level (``DetectorConfig.white``);
    None: the record's own. ``reference``: the image is a pair [6, S, S], the record's image then
    its reference image (for detectors that ``uses_reference``). Raises ``InvalidInput`` naming
    the file (or the image without a reference)."""
    level = white if white is not None else record.white
    img = decode_image(store.get_bytes(record.key), size, record.origin, level)
    img = img.expand(3, -1, -1) if img.shape[0] == 1 else img
    if reference:
        if not record.reference_key:
            raise InvalidInput(f"{record.origin}: no reference image; this detector compares each image with its "
                               "defect-free reference (give a `reference` column in the import manifest)")
        img = pair(img, decode_image(store.get_bytes(record.reference_key), size, f"{record.origin}'s reference",
                                     level))
    if not with_mask:
        return img, None
    return img, decode_mask(store.get_bytes(record.mask_key) if record.mask_key else None, size, record.origin)


def boxes_to_region(boxes: list[dict[str, Any]], width: int, height: int, size: int) -> np.ndarray:
    """Rasterise coarse annotations ({x, y, w, h} in pixels, optional ``shape``: "ellipse") at the
    model's input size: a weak, over-covering bool mask [size, size] of where the defect is."""
    region = np.zeros((size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    sx, sy = size / max(width, 1), size / max(height, 1)
    for b in boxes:
        x0, y0 = float(b["x"]) * sx, float(b["y"]) * sy
        x1, y1 = x0 + float(b["w"]) * sx, y0 + float(b["h"]) * sy
        if b.get("shape") == "ellipse":
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
            region |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
        else:
            region |= (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    return region


def decode_rows(store: ObjectStore, records: list[ImageRecord], size: int,
                white: int | None = None, reference: bool = False) -> dict[str, np.ndarray]:
    """The Ray form: a batch of records → uint8 images [B, 3, S, S] (pairs [B, 6, S, S] with
    ``reference``), targets [B], masks [B, S, S] (uint8, with ``has_mask``), coarse regions from
    boxes [B, S, S] (with ``has_region``) and ``image_id`` [B]. ``white``, ``reference`` as in
    ``decode_record``."""
    images, masks, regions = [], [], []
    for r in records:
        img, mask = decode_record(store, r, size, white, reference=reference)
        images.append((img * 255).round().to(torch.uint8).numpy())
        masks.append(mask)
        regions.append(boxes_to_region(r.boxes or [], r.width, r.height, size))
    return {
        "image": np.stack(images),
        "target": np.array([r.target for r in records], dtype=np.int64),
        "mask": np.stack(masks).astype(np.uint8),
        "has_mask": np.array([bool(r.mask_key) for r in records]),
        "region": np.stack(regions).astype(np.uint8),
        "has_region": np.array([bool(r.boxes) for r in records]),
        "image_id": np.array([r.image_id for r in records], dtype=np.int64),
    }


def decode_images(store: ObjectStore, records: list[ImageRecord], size: int,
                  white: int | None = None, reference: bool = False) -> torch.Tensor:
    """Records' images only, model-ready: float [B, 3, S, S] in [0, 1] (pairs [B, 6, S, S] with
    ``reference``; no masks, no uint8 round trip), as ``fetch`` decodes evaluation images; for
    scoring pools and pre-annotating."""
    images = [decode_record(store, r, size, white, with_mask=False, reference=reference)[0] for r in records]
    return torch.stack(images) if images else torch.zeros((0, 6 if reference else 3, size, size))


@dataclass
class LabelledImages:
    """Images [N, 3, S, S] in [0, 1] with image labels (True = defect), masks [N, S, S] and names."""

    images: torch.Tensor
    labels: np.ndarray
    masks: np.ndarray
    names: list[str]
    classes: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: np.ndarray) -> LabelledImages:
        return LabelledImages(self.images[idx], self.labels[idx], self.masks[idx], [self.names[i] for i in idx],
                              [self.classes[i] for i in idx] if self.classes else [])


def fetch(store: ObjectStore, records: list[ImageRecord], size: int, workers: int = 16,
          reference: bool = False) -> LabelledImages:
    """The in-process form for evaluation: download and decode ``records`` (images and masks;
    ``reference`` as in ``decode_record``) in parallel threads. Raises ``InvalidInput`` when there
    are none."""
    if not records:
        raise InvalidInput("no images")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pairs = list(pool.map(lambda r: decode_record(store, r, size, reference=reference), records))
    return LabelledImages(
        images=torch.stack([p[0] for p in pairs]),
        labels=np.array([bool(r.defect) for r in records], dtype=bool),
        masks=np.stack([p[1] for p in pairs]),
        names=[r.origin for r in records],
        classes=[r.defect_class for r in records],
    )
