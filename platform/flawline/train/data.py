"""Catalogued images → the image streams a training run consumes.

A run sees ``ImageRecord``s (``flawline.data.records``: the one record, query and decoder);
``gather`` splits a run's records into its streams, ``decode_all`` decodes them in process, and
``TensorBatches`` serves decoded streams from memory with the same per-epoch, per-rank batches a
Ray dataset shard gives a Ray Train worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from flawline.catalog import Catalog, Split
from flawline.data.records import UNLABELLED, ImageRecord, decode_rows, image_records, keep_fraction
from flawline.storage import ObjectStore

NORMAL = "normal"


@dataclass
class RunData:
    """The rows of one run, gathered from one or more datasets."""

    labelled: list[ImageRecord]  # train split, labelled (target = class index)
    unlabelled: list[ImageRecord]  # train split without a label, or with its label held back
    val: list[ImageRecord]
    test: list[ImageRecord]
    classes: list[str] = field(default_factory=lambda: [NORMAL, "defect"])  # index 0 = normal

    def count(self, rows: str, *, defect: bool | None = None, with_masks: bool = False,
              with_boxes: bool = False) -> int:
        items = getattr(self, rows)
        if defect is not None:
            items = [r for r in items if r.defect is defect]
        if with_masks:
            items = [r for r in items if r.mask_key]
        if with_boxes:
            items = [r for r in items if r.boxes]
        return len(items)


def gather(catalog: Catalog, datasets: list[str], label_fraction: float = 1.0, seed: int = 0) -> RunData:
    """Every dataset's rows by split; ``label_fraction`` < 1 moves the rest of the labelled
    training rows to the unlabelled pool (their labels are not used)."""
    rows = [r for name in datasets for r in image_records(catalog, name)]
    train = [r for r in rows if r.split == Split.train.value]
    labelled = [r for r in train if r.defect is not None]
    labelled, held = keep_fraction(labelled, label_fraction, seed)
    unlabelled = [r for r in train if r.defect is None] + [r.unlabelled() for r in held]
    classes = [NORMAL] + sorted({r.defect_class or "defect" for r in labelled if r.defect})
    if len(classes) == 1:
        classes.append("defect")
    data = RunData(labelled=labelled, unlabelled=unlabelled, classes=classes,
                   val=[r for r in rows if r.split == Split.val.value and r.defect is not None],
                   test=[r for r in rows if r.split == Split.test.value and r.defect is not None])
    white = run_white(data)  # one white level for every image of the run, as its model will keep
    for r in [*data.labelled, *data.unlabelled, *data.val, *data.test]:
        r.white = white
    for r in data.labelled:
        r.target = class_index(data.classes, r)
    for r in data.unlabelled:
        r.target = UNLABELLED
    return data


def class_index(classes: list[str], record: ImageRecord) -> int:
    """The index of ``record``'s class in ``classes`` (0: normal; an unknown class: 1)."""
    if not record.defect:
        return 0
    cls = record.defect_class or "defect"
    return classes.index(cls) if cls in classes else 1


def decode_all(store: ObjectStore, rows: list[ImageRecord], size: int, workers: int = 16,
               chunk: int = 32, white: int | None = None, reference: bool = False) -> dict[str, torch.Tensor]:
    """``decode_rows`` over many rows with a thread pool (local runs, tests, benchmarks)."""
    from concurrent.futures import ThreadPoolExecutor

    parts = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(lambda p: decode_rows(store, p, size, white, reference), parts))
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
    whites = [r.white for rows in (data.labelled, data.unlabelled, data.val, data.test) for r in rows]
    known = [w for w in whites if w is not None]
    return max(known) if known else None
