"""Seeded train / validation / test splits, recorded in the catalog."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
from sqlalchemy import select, update

from flawline.catalog import Catalog, Image, Split
from flawline.catalog.queries import get_dataset, image_labels
from flawline.errors import InvalidInput


@dataclass(frozen=True)
class SplitSpec:
    train: float = 0.7
    val: float = 0.1
    test: float = 0.2
    seed: int = 0
    # Anomaly-detection protocol: fit on normal images only, so defects go to val/test only.
    normal_only_train: bool = False
    # Also stratify by this image attribute (e.g. ELPV's "cell_type": mono / poly).
    stratify_by: str | None = None

    def __post_init__(self) -> None:
        fractions = (self.train, self.val, self.test)
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise InvalidInput(f"split fractions train={self.train} val={self.val} test={self.test} "
                               "must be non-negative and sum to 1")


def _cut(ids: list[int], fractions: tuple[float, ...], rng: np.random.Generator) -> list[list[int]]:
    order = [ids[i] for i in rng.permutation(len(ids))]
    bounds = np.round(np.cumsum(fractions) * len(order)).astype(int)
    parts, start = [], 0
    for end in bounds:
        parts.append(order[start:end])
        start = end
    return parts


def assign_splits(catalog: Catalog, dataset: str, spec: SplitSpec) -> dict[str, int]:
    """Give every image of ``dataset`` a split, stratified by label and defect class."""
    with catalog.session() as session:
        ds = get_dataset(session, dataset)
        labels = image_labels(session, ds.id)
        if not labels:
            raise InvalidInput(f"dataset {dataset!r} has no images to split")
        attr: dict[int, str] = {}
        if spec.stratify_by:
            attr = {i: str((a or {}).get(spec.stratify_by, "")) for i, a in
                    session.execute(select(Image.id, Image.attrs).where(Image.dataset_id == ds.id))}
            if not any(attr.values()):
                raise InvalidInput(f"dataset {dataset!r}: no image has the attribute {spec.stratify_by!r}")
        # Content order, not id order: ids follow upload completion in a parallel import, so the
        # same seed would not give the same split of the same images.
        digest = dict(session.execute(select(Image.id, Image.content_hash).where(Image.dataset_id == ds.id)).all())
        strata: dict[tuple[str, str, str], list[int]] = {}
        for image_id in sorted(labels, key=lambda i: (digest[i], i)):
            label, cls = labels[image_id]
            key = (label.value if label else "unlabeled", cls or "", attr.get(image_id, ""))
            strata.setdefault(key, []).append(image_id)
        rng = np.random.default_rng(spec.seed)
        assigned: dict[Split, list[int]] = {s: [] for s in Split}
        for (label, _cls, _attr), ids in sorted(strata.items()):
            if spec.normal_only_train and label != "normal":
                held = spec.val + spec.test
                fractions = (0.0, spec.val / held, spec.test / held) if held > 0 else (0.0, 0.0, 1.0)
            else:
                fractions = (spec.train, spec.val, spec.test)
            for split, part in zip((Split.train, Split.val, Split.test), _cut(ids, fractions, rng)):
                assigned[split].extend(part)
        for split, ids in assigned.items():
            for start in range(0, len(ids), 500):
                session.execute(update(Image).where(Image.id.in_(ids[start:start + 500])).values(split=split))
        counts = {s.value: len(ids) for s, ids in assigned.items()}
        ds.split_info = {
            "seed": spec.seed, "train": spec.train, "val": spec.val, "test": spec.test,
            "normal_only_train": spec.normal_only_train, "stratify_by": spec.stratify_by, "counts": counts,
            "created_at": datetime.now(timezone.utc).isoformat(),
        }
        return counts


def split_keys(catalog: Catalog, dataset: str, split: Split) -> list[str]:
    """Object keys of one split, in id order."""
    with catalog.session() as session:
        ds = get_dataset(session, dataset)
        return list(session.scalars(select(Image.object_key).where(Image.dataset_id == ds.id, Image.split == split)
                                    .order_by(Image.id)))
