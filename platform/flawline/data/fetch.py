"""Catalog rows + S3 objects → decoded tensors for training and evaluation (parallel downloads)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from sqlalchemy import select

from flawline.catalog import Annotation, Catalog, Image, Label, Split
from flawline.catalog.queries import dataset_white, get_dataset, image_labels
from flawline.data.loading import decode_image, decode_mask, stack_rgb
from flawline.storage import ObjectStore


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


@dataclass
class ImageRef:
    image_id: int
    key: str
    label: Label | None
    defect_class: str | None
    mask_key: str | None
    origin: str
    white: int | None = None  # white level for images of more than 8 bits (data.images.white_level)


def split_refs(catalog: Catalog, dataset: str, split: Split | None, *, labelled_only: bool = True,
               normal_only: bool = False) -> list[ImageRef]:
    """The images of one split with their deciding label and mask, in id order."""
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        labels = image_labels(s, ds.id)
        query = select(Image.id, Image.object_key, Image.origin).where(Image.dataset_id == ds.id)
        if split is not None:
            query = query.where(Image.split == split)
        rows = s.execute(query.order_by(Image.id)).all()
        white = dataset_white(s, ds.id)
        masks = {i: k for i, k, attrs in s.execute(
            select(Annotation.image_id, Annotation.mask_key, Annotation.attrs).join(Image)
            .where(Image.dataset_id == ds.id, Annotation.mask_key.is_not(None))).all()
            if not (attrs and attrs.get("superseded"))}  # a relabel's overridden regions no longer hold
    refs = []
    for image_id, key, origin in rows:
        label, cls = labels.get(image_id, (None, None))
        if labelled_only and label is None:
            continue
        if normal_only and label is not Label.normal:
            continue
        refs.append(ImageRef(image_id, key, label, cls, masks.get(image_id), origin or key, white))
    return refs


def fetch(store: ObjectStore, refs: list[ImageRef], size: int, workers: int = 16) -> LabelledImages:
    """Download and decode ``refs`` (images and masks) in parallel."""

    def one(ref: ImageRef) -> tuple[torch.Tensor, np.ndarray]:
        img = decode_image(store.get_bytes(ref.key), size, ref.origin, ref.white)
        mask = decode_mask(store.get_bytes(ref.mask_key) if ref.mask_key else None, size, ref.origin)
        return img, mask

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pairs = list(pool.map(one, refs))
    return LabelledImages(
        images=stack_rgb([p[0] for p in pairs]),
        labels=np.array([r.label is Label.defect for r in refs], dtype=bool),
        masks=np.stack([p[1] for p in pairs]) if pairs else np.zeros((0, size, size), bool),
        names=[r.origin for r in refs],
        classes=[r.defect_class for r in refs],
    )
