"""Simulated labelling for benchmarks and tests: hold a dataset's imported labels back as oracle
ground truth (training never sees source ``oracle``) so the simulated annotator can give them back
one query at a time through Label Studio, exactly as a person's labels would arrive."""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy import select, update

from flawline.catalog import Annotation, AnnotationSource, Catalog, Image, Label
from flawline.catalog.queries import get_dataset
from flawline.data.records import image_records, keep_fraction


def hide_labels(catalog: Catalog, dataset: str, keep: float, seed: int = 0, split: str = "train") -> dict[str, int]:
    """Keep a seeded, stratified ``keep`` share of the split's labelled images (at least one per
    class and stratum) and turn the rest's imported labels into oracle truth. The share is drawn
    over the images with ground truth, hidden or not, so running it again hides nothing more."""
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        oracle = {i: (label, cls) for i, label, cls in s.execute(
            select(Annotation.image_id, Annotation.label, Annotation.defect_class).join(Image).where(
                Image.dataset_id == ds.id, Annotation.source == AnnotationSource.oracle,
                Annotation.label.is_not(None)))}
    rows = []
    for r in image_records(catalog, dataset):
        if r.split != split:
            continue
        if r.defect is None and r.image_id in oracle:
            label, cls = oracle[r.image_id]
            r = replace(r, defect=label is Label.defect, defect_class=cls)
        if r.defect is not None:
            rows.append(r)
    kept, held = keep_fraction(rows, keep, seed) if keep > 0 else ([], rows)  # keep 0: start from no labels
    ids = [r.image_id for r in held if r.image_id not in oracle]
    with catalog.session() as s:
        if ids:
            s.execute(update(Annotation).where(Annotation.image_id.in_(ids),
                                               Annotation.source == AnnotationSource.imported)
                      .values(source=AnnotationSource.oracle))
    return {"kept": len(kept), "hidden": len(ids)}


def reveal_labels(catalog: Catalog, dataset: str) -> int:
    """Undo ``hide_labels``: oracle truth becomes imported labels again."""
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        ids = list(s.scalars(select(Annotation.id).join(Image).where(Image.dataset_id == ds.id,
                                                                     Annotation.source == AnnotationSource.oracle)))
        if ids:
            s.execute(update(Annotation).where(Annotation.id.in_(ids)).values(source=AnnotationSource.imported))
        return len(ids)
