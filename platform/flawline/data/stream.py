"""Catalogued images in batches with bounded memory: the streaming form of ``records.fetch``.

``stream_batches`` downloads and decodes records (``records.decode_record``, the one decoder) in a
pool of threads, at most ``prefetch`` batches ahead of the consumer, and yields them in record
order. However many records there are, at most ``(prefetch + 1) * batch_size`` decoded images are
alive at once (the batch being consumed and the ``prefetch`` batches being prepared).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from flawline.data.records import ImageRecord, decode_record
from flawline.errors import InvalidInput
from flawline.storage import ObjectStore


@dataclass
class RecordBatch:
    """One batch: ``images`` float [B, 3, S, S] in [0, 1]; ``masks`` bool [B, S, S] (None when
    decoded without masks); ``records`` the B records they came from, in order."""

    records: list[ImageRecord]
    images: torch.Tensor
    masks: np.ndarray | None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        """bool [B], True = defect (unlabelled counts as normal, as ``fetch`` does)."""
        return np.array([bool(r.defect) for r in self.records], dtype=bool)


def stream_batches(store: ObjectStore, records: Sequence[ImageRecord], size: int, batch_size: int = 16,
                   workers: int = 8, prefetch: int = 2, with_masks: bool = True,
                   reference: bool = False) -> Iterator[RecordBatch]:
    """``records`` → ``RecordBatch``es of at most ``batch_size`` images at ``size`` x ``size`` pixels,
    in order; ``workers`` download/decode threads work at most ``prefetch`` batches ahead (each
    batch's images decode in parallel). ``with_masks``: also decode the defect masks (an image
    without one gets an empty mask); ``reference``: images are pairs with their references
    (``decode_record``). Raises ``InvalidInput`` for a file that does not decode (naming
    it) or for ``batch_size`` / ``prefetch`` < 1. Closing the generator early cancels what is queued."""
    if batch_size < 1 or prefetch < 1:
        raise InvalidInput(f"batch_size {batch_size} and prefetch {prefetch} must be at least 1")
    window = batch_size * prefetch  # images submitted and not yet taken into a batch
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="flawline-stream")
    pending: deque[tuple[ImageRecord, Future]] = deque()
    todo = iter(records)

    def refill() -> None:
        while len(pending) < window and (r := next(todo, None)) is not None:
            pending.append((r, pool.submit(decode_record, store, r, size, None, with_masks, reference)))

    try:
        refill()
        while pending:
            take = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            refill()  # the next batches decode while this one is consumed
            pairs = [f.result() for _, f in take]
            batch = RecordBatch(records=[r for r, _ in take], images=torch.stack([p[0] for p in pairs]),
                                masks=np.stack([p[1] for p in pairs]) if with_masks else None)
            del take, pairs
            yield batch
            del batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
