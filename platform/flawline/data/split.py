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
    # Images sharing this attribute's value (a board id, a batch) go wholly to one split; images
    # without a value are each a group of their own.
    group_by: str | None = None
    # Images with a preset split (attribute ``preset_split``, set at import) keep it; only the rest
    # are split by the fractions.
    keep_preset: bool = False

    def __post_init__(self) -> None:
        fractions = (self.train, self.val, self.test)
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise InvalidInput(f"split fractions train={self.train} val={self.val} test={self.test} "
                               "must be non-negative and sum to 1")


def _cut(units: list[list[int]], fractions: tuple[float, ...], rng: np.random.Generator) -> list[list[list[int]]]:
    """Shuffle ``units`` (groups of image ids) and cut them at the fractions of their image count: a
    unit goes to the part its middle image falls in (single images: exactly the per-image cut)."""
    order = [units[i] for i in rng.permutation(len(units))]
    bounds = np.round(np.cumsum(fractions) * sum(len(u) for u in order)).astype(int)
    parts: list[list[list[int]]] = [[] for _ in fractions]
    start = 0
    for unit in order:
        middle = start + len(unit) / 2
        parts[min(int(np.searchsorted(bounds, middle, side="right")), len(parts) - 1)].append(unit)
        start += len(unit)
    return parts


def _groups(ids: list[int], digest: dict[int, str], attrs: dict[int, dict], group_by: str | None) -> list[list[int]]:
    """Images that must share a split: those with the same ``attrs[group_by]``, and each image with
    its reference (attribute ``reference``, a content hash), transitively. Members in content order,
    groups in their first member's order."""
    parent = {i: i for i in ids}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first: dict[str, int] = {}
    by_hash = {digest[i]: i for i in ids}
    for i in ids:
        value = _value(attrs[i].get(group_by)) if group_by else ""
        if value:
            join(i, first.setdefault(value, i))
        ref = by_hash.get(attrs[i].get("reference") or "")
        if ref is not None:
            join(i, ref)
    members: dict[int, list[int]] = {}
    for i in ids:  # ids come in content order, so members and groups do too
        members.setdefault(find(i), []).append(i)
    return list(members.values())


def _value(value: object) -> str:
    return "" if value is None else str(value).strip()


def _stratum(members: list[int], labels: dict, attr: dict[int, str]) -> tuple[str, str, str]:
    """(label, classes, attribute) of a group: defect if any member is, else unlabeled if any member
    is, else normal; its defect classes and stratify-by values joined (one image: its own)."""
    found = {labels[i][0].value if labels[i][0] else "unlabeled" for i in members}
    label = next(x for x in ("defect", "unlabeled", "normal") if x in found)
    classes = sorted({labels[i][1] for i in members if labels[i][1]})
    values = sorted({attr[i] for i in members if attr.get(i)})
    return label, "+".join(classes), "+".join(values)


def assign_splits(catalog: Catalog, dataset: str, spec: SplitSpec) -> dict[str, int]:
    """Give every image of ``dataset`` a split, stratified by label and defect class; returns the
    image count per split. Groups (``spec.group_by``, and every image with its reference image)
    go wholly to one split, stratified by whether they hold a defect (and its classes); with
    ``spec.keep_preset`` images keep their preset split. ``split_info`` records the spec, the
    image counts and the group counts per split."""
    with catalog.session() as session:
        ds = get_dataset(session, dataset)
        labels = image_labels(session, ds.id)
        if not labels:
            raise InvalidInput(f"dataset {dataset!r} has no images to split")
        rows = session.execute(select(Image.id, Image.content_hash, Image.attrs, Image.origin)
                               .where(Image.dataset_id == ds.id)).all()
        digest = {i: h for i, h, _, _ in rows}
        attrs = {i: a or {} for i, _, a, _ in rows}
        origin = {i: o for i, _, _, o in rows}
        attr: dict[int, str] = {}
        if spec.stratify_by:
            attr = {i: str(a.get(spec.stratify_by, "")) for i, a in attrs.items()}
            if not any(attr.values()):
                raise InvalidInput(f"dataset {dataset!r}: no image has the attribute {spec.stratify_by!r}")
        if spec.group_by and not any(_value(a.get(spec.group_by)) for a in attrs.values()):
            raise InvalidInput(f"dataset {dataset!r}: no image has the attribute {spec.group_by!r} to group by")
        preset: dict[int, Split] = {}
        if spec.keep_preset:
            preset = {i: Split(a["preset_split"]) for i, a in attrs.items()
                      if a.get("preset_split") in Split.__members__}
            if not preset:
                raise InvalidInput(f"dataset {dataset!r}: no image has a preset split (set at import by the "
                                   "manifest's split column or MVTec's train/test), so --keep-preset has none to keep")
        # Content order, not id order: ids follow upload completion in a parallel import, so the
        # same seed would not give the same split of the same images.
        ordered = sorted(labels, key=lambda i: (digest[i], i))
        assigned: dict[Split, list[int]] = {s: [] for s in Split}
        groups: dict[Split, int] = {s: 0 for s in Split}
        strata: dict[tuple[str, str, str], list[list[int]]] = {}
        for members in _groups(ordered, digest, attrs, spec.group_by):
            presets = sorted({preset[i] for i in members if i in preset}, key=list(Split).index)
            if len(presets) > 1:
                a, b = (next(i for i in members if preset.get(i) is p) for p in presets[:2])
                raise InvalidInput(f"dataset {dataset!r}: {origin[a]} (preset {presets[0].value}) and {origin[b]} "
                                   f"(preset {presets[1].value}) are in one group (" + (f"the same {spec.group_by!r}, or "
                                   if spec.group_by else "") + "an image and its reference), which cannot keep both "
                                   "presets")
            if presets:
                assigned[presets[0]].extend(members)
                groups[presets[0]] += 1
            else:
                strata.setdefault(_stratum(members, labels, attr), []).append(members)
        rng = np.random.default_rng(spec.seed)
        for (label, _cls, _attr), units in sorted(strata.items()):
            if spec.normal_only_train and label != "normal":
                held = spec.val + spec.test
                fractions = (0.0, spec.val / held, spec.test / held) if held > 0 else (0.0, 0.0, 1.0)
            else:
                fractions = (spec.train, spec.val, spec.test)
            for split, part in zip((Split.train, Split.val, Split.test), _cut(units, fractions, rng)):
                assigned[split].extend(i for unit in part for i in unit)
                groups[split] += len(part)
        for split, ids in assigned.items():
            for start in range(0, len(ids), 500):
                session.execute(update(Image).where(Image.id.in_(ids[start:start + 500])).values(split=split))
        counts = {s.value: len(ids) for s, ids in assigned.items()}
        ds.split_info = {
            "seed": spec.seed, "train": spec.train, "val": spec.val, "test": spec.test,
            "normal_only_train": spec.normal_only_train, "stratify_by": spec.stratify_by,
            "group_by": spec.group_by, "keep_preset": spec.keep_preset, "counts": counts,
            "group_counts": {s.value: n for s, n in groups.items()}, "preset_kept": len(preset),
            "created_at": datetime.now(timezone.utc).isoformat(),
        }
        return counts


def split_keys(catalog: Catalog, dataset: str, split: Split) -> list[str]:
    """Object keys of one split, in id order."""
    with catalog.session() as session:
        ds = get_dataset(session, dataset)
        return list(session.scalars(select(Image.object_key).where(Image.dataset_id == ds.id, Image.split == split)
                                    .order_by(Image.id)))
