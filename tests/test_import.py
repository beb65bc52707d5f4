"""Import of all four layouts into the real local S3 server, idempotent re-runs, de-duplication."""

from __future__ import annotations

from sqlalchemy import func, select

from flawline.catalog import Annotation, AnnotationSource, Image, Label, Split
from flawline.catalog.queries import get_dataset, summarize_dataset
from flawline.data.ingest import import_dataset

from conftest import image_bytes, write


def _summary(catalog, name):
    with catalog.session() as s:
        return summarize_dataset(s, get_dataset(s, name))


def _assert_every_key_stored(catalog, store):
    """No catalog row points at a missing object."""
    with catalog.session() as s:
        keys = set(s.scalars(select(Image.object_key)))
        keys |= {k for k in s.scalars(select(Annotation.mask_key)) if k}
    stored = set(store.list_keys())
    assert keys <= stored, keys - stored


def test_folder_layout(catalog, store, folder_tree):
    report = import_dataset(catalog, store, folder_tree, workers=4)
    assert report.layout == "folder"
    assert (report.scanned, report.new_images, report.masks) == (8, 8, 2)
    assert report.objects_uploaded == 8 + 2
    s = _summary(catalog, "folder-src")
    assert s.by_label == {"normal": 3, "defect": 3, "unlabeled": 2}
    assert s.by_class == {"scratch": 2, "dent": 1}
    assert s.masks == 2
    with catalog.session() as ses:
        img = ses.scalar(select(Image).where(Image.origin.like("%d0.jpg")))
        assert (img.format, img.width, img.height, img.channels) == ("JPEG", 64, 48, 3)
        assert img.object_key == f"images/sha256/{img.content_hash[:2]}/{img.content_hash}.jpg"
        ann = img.annotations[0]
        assert (ann.label, ann.defect_class, ann.source) == (Label.defect, "dent", AnnotationSource.imported)
    assert store.get_bytes(img.object_key) == (folder_tree / "defect" / "dent" / "d0.jpg").read_bytes()
    _assert_every_key_stored(catalog, store)


def test_mvtec_layout(catalog, store, mvtec_tree):
    report = import_dataset(catalog, store, mvtec_tree, layout="auto", dataset="widget")
    assert report.layout == "mvtec"
    assert report.new_images == 6  # license.txt sits beside the category, not in it
    s = _summary(catalog, "widget")
    assert s.by_label == {"normal": 4, "defect": 2}
    assert s.by_split == {"train": 3, "test": 3}
    assert s.masks == 2
    _assert_every_key_stored(catalog, store)


def test_magnetic_tile_layout(catalog, store, magnetic_tile_slice):
    report = import_dataset(catalog, store, magnetic_tile_slice, workers=4)
    assert report.layout == "magnetic-tile" and report.dataset == "magnetic-tile"
    s = _summary(catalog, "magnetic-tile")
    assert s.by_label == {"normal": 3, "defect": 4}
    assert s.by_class == {"blowhole": 2, "crack": 2}
    assert s.masks == 7  # MT_Free ships all-black masks; they are kept
    _assert_every_key_stored(catalog, store)


def test_elpv_layout_keeps_probability_and_cell_type(catalog, store, elpv_slice):
    report = import_dataset(catalog, store, elpv_slice, layout="elpv")
    assert report.new_images == 6
    with catalog.session() as s:
        rows = s.execute(select(Image.attrs, Annotation.label, Annotation.attrs).join(Annotation)).all()
    assert len(rows) == 6
    for image_attrs, label, ann_attrs in rows:
        assert image_attrs["cell_type"] in ("mono", "poly")
        prob = ann_attrs["defect_probability"]
        assert label == (Label.defect if prob >= 0.5 else Label.normal)


def test_elpv_from_the_package(catalog, store):
    report = import_dataset(catalog, store, None, layout="elpv", limit=5)
    assert report.source == "package:elpv" and report.new_images == 5


def test_reimport_is_idempotent(catalog, store, folder_tree):
    first = import_dataset(catalog, store, folder_tree)
    second = import_dataset(catalog, store, folder_tree)
    assert second.new_images == 0 and second.objects_uploaded == 0
    assert second.already_present == first.new_images
    with catalog.session() as s:
        assert s.scalar(select(func.count(Image.id))) == 8
        assert s.scalar(select(func.count(Annotation.id))) == 6  # unlabeled images have none


def test_reimport_adds_only_new_files(catalog, store, folder_tree):
    import_dataset(catalog, store, folder_tree)
    write(folder_tree / "normal" / "n9.png", image_bytes(99))
    again = import_dataset(catalog, store, folder_tree)
    assert (again.new_images, again.already_present, again.objects_uploaded) == (1, 8, 1)


def test_same_bytes_twice_are_one_image(catalog, store, folder_tree):
    write(folder_tree / "normal" / "copy-of-n0.png", (folder_tree / "normal" / "n0.png").read_bytes())
    report = import_dataset(catalog, store, folder_tree)
    assert report.duplicates == 1 and report.new_images == 8


def test_unlabeled_image_gains_its_label_later(catalog, store, tmp_path):
    src = tmp_path / "a"
    write(src / "unlabeled" / "x.png", image_bytes(5))
    import_dataset(catalog, store, src, dataset="d")
    src2 = tmp_path / "b"
    write(src2 / "defect" / "scratch" / "x.png", image_bytes(5))
    report = import_dataset(catalog, store, src2, dataset="d")
    assert report.labels_added == 1 and report.new_images == 0
    assert _summary(catalog, "d").by_label == {"defect": 1}


def test_same_image_in_two_datasets_shares_one_object(catalog, store, folder_tree):
    import_dataset(catalog, store, folder_tree, dataset="one")
    second = import_dataset(catalog, store, folder_tree, dataset="two")
    assert second.new_images == 8
    with catalog.session() as s:
        keys = s.execute(select(Image.object_key, func.count()).group_by(Image.object_key)).all()
    assert all(n == 2 for _, n in keys)


def test_mvtec_split_is_recorded(catalog, store, mvtec_tree):
    import_dataset(catalog, store, mvtec_tree, dataset="w")
    with catalog.session() as s:
        splits = dict(s.execute(select(Image.split, func.count()).group_by(Image.split)).all())
    assert splits == {Split.train: 3, Split.test: 3}
