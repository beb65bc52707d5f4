"""Catalog rows → the image streams a training run consumes.

A run sees plain rows (image key, label, mask key, boxes); ``decode_rows`` turns a batch of rows
into tensors (Ray Data runs it in parallel over the cluster; tests and benchmarks call it
directly). ``TensorBatches`` serves decoded streams from memory with the same per-epoch,
per-rank batches a Ray dataset shard gives a Ray Train worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from sqlalchemy import select

from flawline.catalog import Annotation, Catalog, Image, Label, Split
from flawline.catalog.queries import LABEL_SOURCES, dataset_white, get_dataset, image_labels
from flawline.data.loading import decode_image, decode_mask
from flawline.storage import ObjectStore

NORMAL = "normal"
UNLABELLED = -1


@dataclass
class RunData:
    """The rows of one run, gathered from one or more datasets."""

    labelled: list[dict[str, Any]]  # train split, labelled (target = class index)
    unlabelled: list[dict[str, Any]]  # train split without a label, or with its label held back
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    classes: list[str] = field(default_factory=lambda: [NORMAL, "defect"])  # index 0 = normal

    def count(self, rows: str, *, defect: bool | None = None, with_masks: bool = False,
              with_boxes: bool = False) -> int:
        items = getattr(self, rows)
        if defect is not None:
            items = [r for r in items if r["defect"] is defect]
        if with_masks:
            items = [r for r in items if r["mask_key"]]
        if with_boxes:
            items = [r for r in items if r["boxes"]]
        return len(items)


def dataset_rows(catalog: Catalog, dataset: str) -> list[dict[str, Any]]:
    """One plain row per image of ``dataset``: key, split, size, deciding label, mask and boxes, and
    the dataset's white level (images of more than 8 bits; None otherwise)."""
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        labels = image_labels(s, ds.id)
        white = dataset_white(s, ds.id)
        images = s.execute(select(Image.id, Image.object_key, Image.split, Image.width, Image.height, Image.attrs,
                                  Image.origin).where(Image.dataset_id == ds.id).order_by(Image.id)).all()
        extras: dict[int, dict[str, Any]] = {}
        for image_id, mask_key, boxes, attrs in s.execute(
                select(Annotation.image_id, Annotation.mask_key, Annotation.boxes, Annotation.attrs).join(Image)
                .where(Image.dataset_id == ds.id, Annotation.source.in_(LABEL_SOURCES))):
            if attrs and attrs.get("superseded"):  # overridden by a relabel: its regions no longer hold
                continue
            e = extras.setdefault(image_id, {"mask_key": None, "boxes": None})
            e["mask_key"] = e["mask_key"] or mask_key
            e["boxes"] = e["boxes"] or boxes
    rows = []
    for image_id, key, split, width, height, attrs, origin in images:
        label, cls = labels.get(image_id, (None, None))
        e = extras.get(image_id, {})
        rows.append({"image_id": image_id, "key": key, "dataset": dataset, "split": split.value if split else None,
                     "width": width, "height": height, "stratum": (attrs or {}).get("cell_type", ""),
                     "defect": None if label is None else label is Label.defect, "defect_class": cls,
                     "mask_key": e.get("mask_key"), "boxes": e.get("boxes"), "origin": origin or key,
                     "white": white})
    return rows


def held_out_image(catalog: Catalog, store: ObjectStore, dataset: str, seed: int = 0) -> tuple[str, bytes, str]:
    """(file name, stored bytes, its label as "normal" or "defect[/class]") of one labelled
    test-split image of ``dataset`` (a defect where there is one), picked with ``seed``: an image no
    model of the dataset was fitted on."""
    from flawline.errors import InvalidInput

    rows = [r for r in dataset_rows(catalog, dataset) if r["split"] == Split.test.value and r["defect"] is not None]
    if not rows:
        raise InvalidInput(f"{dataset}: no labelled test images; run `flawline data split`")
    defects = [r for r in rows if r["defect"]] or rows
    row = defects[int(np.random.default_rng(seed).integers(len(defects)))]
    name = str(row["origin"]).replace("\\", "/").rsplit("/", 1)[-1] or f"image-{row['image_id']}.png"
    label = ("defect" + (f"/{row['defect_class']}" if row["defect_class"] else "")) if row["defect"] else "normal"
    return name, store.get_bytes(row["key"]), label


def keep_fraction(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded share of ``rows``, stratified by (dataset, verdict, class, stratum), at least one per
    stratum; returns (kept, held back)."""
    if fraction >= 1.0:
        return list(rows), []
    strata: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        strata.setdefault((r["dataset"], r["defect"], r["defect_class"] or "", r["stratum"]), []).append(i)
    rng = np.random.default_rng(seed)
    kept: set[int] = set()
    for key in sorted(strata, key=str):
        idx = strata[key]
        n = max(1, round(fraction * len(idx)))
        kept.update(idx[i] for i in rng.permutation(len(idx))[:n])
    return [r for i, r in enumerate(rows) if i in kept], [r for i, r in enumerate(rows) if i not in kept]


def gather(catalog: Catalog, datasets: list[str], label_fraction: float = 1.0, seed: int = 0) -> RunData:
    """Every dataset's rows by split; ``label_fraction`` < 1 moves the rest of the labelled
    training rows to the unlabelled pool (their labels are not used)."""
    rows = [r for name in datasets for r in dataset_rows(catalog, name)]
    train = [r for r in rows if r["split"] == Split.train.value]
    labelled = [r for r in train if r["defect"] is not None]
    labelled, held = keep_fraction(labelled, label_fraction, seed)
    unlabelled = [r for r in train if r["defect"] is None] + [dict(r, defect=None, defect_class=None) for r in held]
    classes = [NORMAL] + sorted({r["defect_class"] or "defect" for r in labelled if r["defect"]})
    if len(classes) == 1:
        classes.append("defect")
    data = RunData(labelled=labelled, unlabelled=unlabelled, classes=classes,
                   val=[r for r in rows if r["split"] == Split.val.value and r["defect"] is not None],
                   test=[r for r in rows if r["split"] == Split.test.value and r["defect"] is not None])
    white = run_white(data)  # one white level for every image of the run, as its model will keep
    for r in [*data.labelled, *data.unlabelled, *data.val, *data.test]:
        r["white"] = white
    for r in data.labelled:
        r["target"] = class_index(data.classes, r)
    for r in data.unlabelled:
        r["target"] = UNLABELLED
    return data


def class_index(classes: list[str], row: dict[str, Any]) -> int:
    if not row["defect"]:
        return 0
    cls = row["defect_class"] or "defect"
    return classes.index(cls) if cls in classes else 1


def boxes_to_region(boxes: list[dict[str, Any]], width: int, height: int, size: int) -> np.ndarray:
    """Rasterise coarse annotations ({x, y, w, h} in pixels, optional ``shape``: "ellipse") at the
    model's input size: a weak, over-covering mask of where the defect is."""
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


def decode_rows(store: ObjectStore, rows: list[dict[str, Any]], size: int,
                white: int | None = None) -> dict[str, np.ndarray]:
    """A batch of rows → uint8 images [B, 3, S, S], targets [B], masks [B, S, S] (uint8, with
    ``has_mask``) and coarse regions from boxes [B, S, S] (with ``has_region``). ``white``: a
    model's white level for images of more than 8 bits (``DetectorConfig.white``); None: each
    row's dataset's."""
    images, masks, regions = [], [], []
    for r in rows:
        images.append((_rgb(store, r, size, white) * 255).round().to(torch.uint8).numpy())
        masks.append(decode_mask(store.get_bytes(r["mask_key"]) if r["mask_key"] else None, size, r["origin"]))
        regions.append(boxes_to_region(r["boxes"] or [], r["width"], r["height"], size))
    return {
        "image": np.stack(images),
        "target": np.array([r.get("target", UNLABELLED) for r in rows], dtype=np.int64),
        "mask": np.stack(masks).astype(np.uint8),
        "has_mask": np.array([bool(r["mask_key"]) for r in rows]),
        "region": np.stack(regions).astype(np.uint8),
        "has_region": np.array([bool(r["boxes"]) for r in rows]),
        "image_id": np.array([int(r.get("image_id", -1)) for r in rows], dtype=np.int64),
    }


def decode_images(store: ObjectStore, rows: list[dict[str, Any]], size: int, white: int | None = None) -> torch.Tensor:
    """Rows' images only, model-ready: float [B, 3, S, S] in [0, 1] (no masks, no uint8 round trip),
    decoded as ``fetch`` decodes evaluation images. ``white`` as in ``decode_rows``. The one decoder
    for scoring pools and pre-annotating (``active.scoring``)."""
    images = [_rgb(store, r, size, white) for r in rows]
    return torch.stack(images) if images else torch.zeros((0, 3, size, size))


def _rgb(store: ObjectStore, row: dict[str, Any], size: int, white: int | None) -> torch.Tensor:
    """One row's image: float [3, S, S] in [0, 1] (gray repeated)."""
    img = decode_image(store.get_bytes(row["key"]), size, row["origin"], white if white is not None else row.get("white"))
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img


def decode_all(store: ObjectStore, rows: list[dict[str, Any]], size: int, workers: int = 16,
               chunk: int = 32, white: int | None = None) -> dict[str, torch.Tensor]:
    """``decode_rows`` over many rows with a thread pool (local runs, tests, benchmarks)."""
    from concurrent.futures import ThreadPoolExecutor

    parts = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(lambda p: decode_rows(store, p, size, white), parts))
    if not decoded:
        return {}
    return {k: torch.from_numpy(np.concatenate([d[k] for d in decoded])) for k in decoded[0]}


def to_model(batch: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Decoded batch → float images in [0, 1], float masks, on ``device``."""
    out = {k: v.to(device) for k, v in batch.items()}
    out["image"] = out["image"].float() / 255.0
    for k in ("mask", "region"):
        if k in out:
            out[k] = out[k].float()
    return out


class BatchSource(Protocol):
    """Per-epoch batches of a named stream ("labelled", "unlabelled"), already this worker's shard."""

    def epoch(self, stream: str, epoch: int) -> Iterator[dict[str, torch.Tensor]]: ...

    def size(self, stream: str) -> int: ...


class TensorBatches:
    """In-memory streams; each epoch a seeded shuffle, split evenly over ``world`` ranks (every rank
    gets the same number of batches, as DDP needs)."""

    def __init__(self, streams: dict[str, dict[str, torch.Tensor]], batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu") -> None:
        self.streams, self.batch_size, self.seed = streams, batch_size, seed
        self.rank, self.world, self.device = rank, world, device

    def size(self, stream: str) -> int:
        data = self.streams.get(stream)
        return 0 if not data else int(data["image"].shape[0])

    def epoch(self, stream: str, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        n = self.size(stream)
        if n == 0:
            return
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
        per_rank = -(-n // self.world)
        order = order.repeat(-(-per_rank * self.world // n))[: per_rank * self.world]  # wrap to equal shards
        mine = order[self.rank::self.world]
        data = self.streams[stream]
        for start in range(0, len(mine), self.batch_size):
            idx = mine[start:start + self.batch_size]
            yield to_model({k: v[idx] for k, v in data.items()}, self.device)


def run_white(data: RunData) -> int | None:
    """The white level a run's model keeps (``DetectorConfig.white``): the highest of its rows'
    datasets' (None when every image has 8 bits)."""
    whites = [r.get("white") for rows in (data.labelled, data.unlabelled, data.val, data.test) for r in rows]
    known = [w for w in whites if w is not None]
    return max(known) if known else None
