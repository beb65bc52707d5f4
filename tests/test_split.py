"""Seeded, stratified train/val/test splits recorded in the catalog."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from flawline.catalog import Image
from flawline.catalog.queries import get_dataset, image_labels
from flawline.data.ingest import import_dataset
from flawline.data.split import SplitSpec, assign_splits, split_keys
from flawline.errors import InvalidInput

from conftest import image_bytes, write


@pytest.fixture
def twenty(catalog, store, tmp_path):
    src = tmp_path / "s"
    for i in range(14):
        write(src / "normal" / f"n{i}.png", image_bytes(300 + i))
    for i in range(6):
        write(src / "defect" / "crack" / f"d{i}.png", image_bytes(400 + i))
    import_dataset(catalog, store, src, dataset="s")
    return "s"


def _splits(catalog, name):
    with catalog.session() as s:
        ds = get_dataset(s, name)
        return dict(s.execute(select(Image.id, Image.split).where(Image.dataset_id == ds.id)).all())


def test_same_seed_same_split(catalog, twenty):
    assign_splits(catalog, twenty, SplitSpec(0.5, 0.25, 0.25, seed=3))
    first = _splits(catalog, twenty)
    assign_splits(catalog, twenty, SplitSpec(0.5, 0.25, 0.25, seed=4))
    assert _splits(catalog, twenty) != first
    assign_splits(catalog, twenty, SplitSpec(0.5, 0.25, 0.25, seed=3))
    assert _splits(catalog, twenty) == first


def test_stratified_and_recorded(catalog, twenty):
    counts = assign_splits(catalog, twenty, SplitSpec(0.5, 0.0, 0.5, seed=0))
    assert counts == {"train": 10, "val": 0, "test": 10}
    with catalog.session() as s:
        ds = get_dataset(s, twenty)
        labels = image_labels(s, ds.id)
        assert ds.split_info["seed"] == 0 and ds.split_info["counts"] == counts
    splits = _splits(catalog, twenty)
    defects_in_train = sum(1 for i, sp in splits.items() if sp.value == "train" and labels[i][0].value == "defect")
    assert defects_in_train == 3  # half of each stratum


def test_normal_only_train(catalog, twenty):
    assign_splits(catalog, twenty, SplitSpec(0.8, 0.0, 0.2, seed=1, normal_only_train=True))
    with catalog.session() as s:
        labels = image_labels(s, get_dataset(s, twenty).id)
    splits = _splits(catalog, twenty)
    assert all(labels[i][0].value == "normal" for i, sp in splits.items() if sp.value == "train")
    assert sum(sp.value == "train" for sp in splits.values()) == round(14 * 0.8)
    assert len(split_keys(catalog, twenty, splits[next(iter(splits))])) > 0


def test_bad_fractions(catalog, twenty):
    with pytest.raises(InvalidInput, match="must be non-negative and sum to 1"):
        assign_splits(catalog, twenty, SplitSpec(0.5, 0.5, 0.5))


def test_split_follows_content_not_import_order(catalog, store, tmp_path, catalog_url):
    """Image ids follow upload order (parallel imports finish in any order); the same seed must
    still split the same images the same way."""
    from flawline.catalog import Catalog, upgrade
    from flawline.catalog.db import make_engine

    src = tmp_path / "o"
    for i in range(12):
        write(src / "normal" / f"n{i:02d}.png", image_bytes(500 + i))
    for i in range(6):
        write(src / "defect" / "crack" / f"d{i}.png", image_bytes(600 + i))
    import_dataset(catalog, store, src, dataset="o", workers=1)
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    upgrade(make_engine(other_url))
    other = Catalog(other_url)
    half = tmp_path / "half"  # the second catalog sees the last six normals first: other ids, same images
    for i in range(6, 12):
        write(half / "normal" / f"n{i:02d}.png", image_bytes(500 + i))
    import_dataset(other, store, half, dataset="o", workers=1)
    import_dataset(other, store, src, dataset="o", workers=1)

    def by_content(cat):
        assign_splits(cat, "o", SplitSpec(0.5, 0.25, 0.25, seed=7))
        with cat.session() as s:
            return dict(s.execute(select(Image.content_hash, Image.split)).all())

    assert by_content(catalog) == by_content(other)
    other.dispose()
