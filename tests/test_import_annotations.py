"""Importing annotation files (coco, voc, yolo, boxes, labelstudio) into the real local S3 server:
boxes in pixels, masks drawn from polygons and RLE, labels, the normal/unlabeled rules,
auto-detection, unused files, and bad input stopping the import before anything is stored."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from conftest import image_bytes, write
from flawline.catalog import Annotation, Image, Label, Split
from flawline.catalog.queries import get_dataset, summarize_dataset
from flawline.data.images import mask_image
from flawline.data.importers.annotation_files import rle_string_counts
from flawline.data.ingest import import_dataset
from flawline.data.records import image_records
from flawline.errors import InvalidInput

W, H = 64, 48  # conftest.image_bytes' default size


def _rows(catalog, store):
    """file name → (label, class, boxes, mask pixel count or None, annotation attrs); None for
    an image without annotation (unlabeled)."""
    out = {}
    with catalog.session() as s:
        for image in s.scalars(select(Image)):
            name = image.origin.rsplit("/", 1)[-1]
            if not image.annotations:
                out[name] = None
                continue
            (ann,) = image.annotations
            pixels = None
            if ann.mask_key:
                mask = np.asarray(mask_image(store.get_bytes(ann.mask_key), ann.mask_key))
                assert mask.shape == (image.height, image.width)
                pixels = int((mask > 0).sum())
            out[name] = (ann.label, ann.defect_class, ann.boxes, pixels, ann.attrs)
    return out


def _nothing_stored(catalog, store):
    with catalog.session() as s:
        assert s.scalar(select(func.count(Image.id))) == 0
        assert s.scalar(select(func.count(Annotation.id))) == 0
    assert list(store.list_keys()) == []


def _unused(report):
    return {line.split(": ", 1)[0].rsplit("/", 1)[-1]: line.split(": ", 1)[1] for line in report.unused}


def _box(x, y, w, h, label):
    return {"x": x, "y": y, "w": w, "h": h, "label": label}


def _rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a bool mask: runs over column-major pixels, background first."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return counts


def _rle_string(counts: list[int]) -> str:
    """pycocotools' compressed form of ``counts`` (rleToString), written from its C source."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


# -- COCO ---------------------------------------------------------------------------------------
def _coco_source(root, annotations, images=None, categories=None):
    images = images if images is not None else [
        {"id": 1, "file_name": "a.png", "width": W, "height": H},
        {"id": 2, "file_name": "b.png", "width": W, "height": H},
        {"id": 3, "file_name": "c.png", "width": W, "height": H},
        {"id": 4, "file_name": "d.png", "width": W, "height": H},  # in images/, no annotations
        {"id": 5, "file_name": "t.png"},
    ]
    for n, name in enumerate(("a.png", "b.png", "c.png", "images/d.png", "t.png", "e.png")):
        write(root / name, image_bytes(200 + n))
    data = {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 7, "name": "scratch"}, {"id": 9, "name": "dent"}]}
    write(root / "annotations" / "instances.json", json.dumps(data).encode())
    write(root.parent / "outside.png", image_bytes(299))  # an image outside the source folder
    return root


def test_coco_boxes_polygons_and_rle(catalog, store, tmp_path):
    rle_b = np.zeros((H, W), dtype=bool)
    rle_b[10:20, 30:33] = True  # 30 pixels
    rle_b[40, 0:5] = True  # 5 more, a run across columns' ends
    rle_c = np.zeros((H, W), dtype=bool)
    rle_c[0:48, 60:64] = True  # whole columns: one long run, counts over 31 (multi-character)
    rle_c[5:9, 2] = True
    root = _coco_source(tmp_path / "coco", [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10]},
        # a rectangle polygon [2, 12] x [2, 10]: 10 x 8 = 80 pixels exactly
        {"id": 2, "image_id": 1, "category_id": 9, "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]],
         "bbox": [2, 2, 10, 8]},
        {"id": 3, "image_id": 2, "category_id": 9, "iscrowd": 1,
         "segmentation": {"counts": _rle_counts(rle_b), "size": [H, W]}},
        {"id": 4, "image_id": 3, "category_id": 7,
         "segmentation": {"counts": _rle_string(_rle_counts(rle_c)), "size": [H, W]}},
        # a right triangle, legs 40 and 30: area 600
        {"id": 5, "image_id": 5, "category_id": 7, "segmentation": [[0, 0, 40, 0, 0, 30]]},
    ])
    write(root / "notes.json", b'{"not": "coco"}')
    report = import_dataset(catalog, store, root, workers=2)
    assert report.layout == "coco" and (report.new_images, report.boxes, report.masks) == (5, 2, 4)
    rows = _rows(catalog, store)
    assert rows["a.png"] == (Label.defect, "scratch", [_box(10, 5, 20, 10, "scratch"), _box(2, 2, 10, 8, "dent")],
                             80, {"classes": ["scratch", "dent"]})
    assert rows["b.png"][:4] == (Label.defect, "dent", None, 35)
    assert rows["c.png"][:4] == (Label.defect, "scratch", None, 48 * 4 + 4)
    assert rows["d.png"] == (Label.normal, None, None, None, None)
    label, cls, boxes, pixels, _ = rows["t.png"]
    # Each pixel the hypotenuse crosses (at most 40 + 30 of them) is in when at least half covered:
    # an error of under half a pixel each, and axis-aligned sides are exact.
    assert (label, cls, boxes) == (Label.defect, "scratch", None) and abs(pixels - 600) <= 35
    with catalog.session() as s:  # the masks are exactly the RLEs
        for name, expected in (("b.png", rle_b), ("c.png", rle_c)):
            key = s.scalar(select(Annotation.mask_key).join(Image).where(Image.origin.like(f"%/{name}")))
            assert (np.asarray(mask_image(store.get_bytes(key), key)) > 0).tolist() == expected.tolist()
    unused = _unused(report)
    assert unused == {"e.png": "an image the COCO file instances.json does not list",
                      "notes.json": "not the COCO file this import read"}


def test_rle_string_decoding_by_hand():
    # '5' '3' ':' are 5, 3, 10; 'O' is 31: sign bit set, so -1, added to the count two before (3)
    assert rle_string_counts("53:O") == [5, 3, 10, 2]
    # 40 = 8 + 1 * 32: 'X' (8 | 0x20 "more") then '1'
    assert rle_string_counts("X1") == [40]
    counts = [0, 700, 5, 1, 3000, 17]
    assert rle_string_counts(_rle_string(counts)) == counts


def test_polygon_masks_count_half_covered_pixels():
    from flawline.data.importers.annotation_files import polygon_mask

    square = np.array([[2, 2], [12, 2], [12, 10], [2, 10]], dtype=float)
    assert polygon_mask([square], W, H).sum() == 80  # on whole pixels: exact
    # moved by 0.2: the first row and column 0.8 covered (in), the corner 0.64 (in), the last 0.2 (out)
    assert polygon_mask([square + 0.2], W, H).sum() == 80
    # moved by 0.4: rows and columns 0.6 (in) but the corner 0.36 (out)
    assert polygon_mask([square + 0.4], W, H).sum() == 79
    tiny = np.array([[5.5, 5.5], [6.5, 5.5], [6.5, 6.5], [5.5, 6.5]])  # a quarter of 4 pixels each
    assert polygon_mask([tiny], W, H).sum() == 1  # a drawn region never vanishes
    assert polygon_mask([square, square + 20], W, H).sum() == 160  # a union


@pytest.mark.parametrize(("change", "message"), [
    ({"annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [50, 5, 20, 10]}]},
     r"instances\.json: box 1 of .*a\.png .* lies outside the 64x48 image"),
    ({"annotations": [{"id": 1, "image_id": 99, "category_id": 7, "bbox": [1, 1, 2, 2]}]},
     r"instances\.json: annotations\[0\]: image_id 99 is not in images"),
    ({"annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]}]},
     r"annotations\[0\]: category_id 3 is not in categories"),
    ({"annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 2]}]},
     r"annotations\[0\] \(a\.png\): box has no area"),
    ({"images": [{"id": 1, "file_name": "missing.png"}]},
     r"images\[0\]: file_name 'missing\.png' names a missing image"),
    ({"images": [{"id": 1, "file_name": "../outside.png"}]}, r"file_name '\.\./outside\.png' names a missing image"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 48, "height": 64}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 2, 2]}]},
     r"instances\.json: a\.png is declared 48x64 but the image is 64x48"),
    ({"annotations": [{"id": 1, "image_id": 1, "category_id": 7, "segmentation": {"counts": "53:O", "size": [H, W]}}]},
     r"RLE runs cover 20 pixels, the image 3072"),
])
def test_coco_bad_input_stores_nothing(catalog, store, tmp_path, change, message):
    annotations = change.get("annotations", [])
    root = _coco_source(tmp_path / "coco", annotations, images=change.get("images"))
    with pytest.raises(InvalidInput, match=message):
        import_dataset(catalog, store, root, workers=2)
    _nothing_stored(catalog, store)


def test_coco_malformed_json_names_the_place(catalog, store, tmp_path):
    write(tmp_path / "c" / "a.png", image_bytes(1))
    write(tmp_path / "c" / "coco.json", b'{"images": [}')
    with pytest.raises(InvalidInput, match=r"coco\.json: malformed JSON \(line 1, column 13\): "):
        import_dataset(catalog, store, tmp_path / "c", layout="coco")
    # --layout auto cannot tell what it is, and says which file stopped it from telling
    with pytest.raises(InvalidInput, match=r"layout not recognised;.*; .*coco\.json: malformed JSON \(line 1, "):
        import_dataset(catalog, store, tmp_path / "c")
    write(tmp_path / "l" / "a.png", image_bytes(1))
    write(tmp_path / "l" / "export.json", b'[{"data": {"image": "a.png"}, "annotations": [}]')
    with pytest.raises(InvalidInput, match=r"export\.json: malformed JSON"):
        import_dataset(catalog, store, tmp_path / "l")
    _nothing_stored(catalog, store)


# -- Pascal VOC ---------------------------------------------------------------------------------
def _voc_xml(filename, objects):
    objs = "".join(f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
                   f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                   for name, b in objects)
    head = f"<filename>{filename}</filename>" if filename else ""
    return f"<annotation>{head}<size><width>{W}</width><height>{H}</height></size>{objs}</annotation>".encode()


def _voc_source(root, a_objects):
    for n, name in enumerate(("a.jpg", "b.jpg", "c.jpg")):
        write(root / "JPEGImages" / name, image_bytes(300 + n, fmt="JPEG"))
    write(root / "Annotations" / "a.xml", _voc_xml("a.jpg", a_objects))
    write(root / "Annotations" / "b.xml", _voc_xml(None, []))  # no <filename>: by its stem; no objects
    write(root / "ImageSets" / "Main" / "train.txt", b"a\nb\n")
    return root


def test_voc_one_based_boxes(catalog, store, tmp_path):
    # The whole image in VOC is 1, 1, W, H; pixel indices inclusive
    root = _voc_source(tmp_path / "voc", [("short", (1, 1, 10, 20)), ("open", (5, 6, W, H)),
                                          ("short", (30, 40, 30, 40))])
    report = import_dataset(catalog, store, root, workers=2)
    assert report.layout == "voc" and report.boxes == 3
    rows = _rows(catalog, store)
    assert rows["a.jpg"] == (Label.defect, "short",
                             [_box(0, 0, 10, 20, "short"), _box(4, 5, 60, 43, "open"), _box(29, 39, 1, 1, "short")],
                             None, {"classes": ["short", "open"]})
    assert rows["b.jpg"] == (Label.normal, None, None, None, None)
    assert rows["c.jpg"] is None  # no XML: unlabeled
    assert _unused(report) == {"train.txt": "a VOC image set list (not read: splits are made with "
                                            "`flawline data split`)"}


@pytest.mark.parametrize(("objects", "extra", "message"), [
    ([("short", (0, 1, 10, 20))], None, r"a\.xml: object 1 \(short\): xmin 0, ymin 1: VOC pixel coordinates start at 1"),
    ([("short", (10, 1, 5, 20))], None, r"a\.xml: object 1 \(short\): box has no area \(width -4"),
    ([("short", (1, 1, W + 1, H))], None, r"a\.xml: box 1 of .*a\.jpg .* lies outside the 64x48 image"),
    ([("short", (1, "x", 2, 2))], None, r"a\.xml: object 1 \(short\): ymin is not a number"),
    ([], ("z.xml", _voc_xml("zz.jpg", [])), r"z\.xml: <filename> 'zz\.jpg' names a missing image"),
    ([], ("m.xml", b"<annotation><object></annotation>"), r"m\.xml: malformed XML"),
    ([], ("e.xml", b'<!DOCTYPE a [<!ENTITY x "y">]><annotation>&x;</annotation>'), r"e\.xml: XML"),
])
def test_voc_bad_input_stores_nothing(catalog, store, tmp_path, objects, extra, message):
    root = _voc_source(tmp_path / "voc", objects)
    if extra:
        write(root / "Annotations" / extra[0], extra[1])
    with pytest.raises(InvalidInput, match=message):
        import_dataset(catalog, store, root, workers=2)
    _nothing_stored(catalog, store)


# -- YOLO ---------------------------------------------------------------------------------------
def _turned_jpeg(seed: int) -> bytes:
    """A JPEG stored 48 wide and 64 high, shown turned (EXIF orientation 6) as 64 x 48."""
    img = PILImage.new("RGB", (H, W), (seed, 90, 40))
    exif = PILImage.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def _yolo_source(root, a_label="0 0.5 0.5 0.25 0.5\n"):
    write(root / "images" / "train" / "a.png", image_bytes(400))
    write(root / "labels" / "train" / "a.txt", a_label.encode())
    write(root / "images" / "train" / "r.jpg", _turned_jpeg(7))
    write(root / "labels" / "train" / "r.txt", b"1 0.5 0.5 0.25 0.5\n")
    write(root / "images" / "val" / "b.png", image_bytes(401))
    write(root / "labels" / "val" / "b.txt", b"")  # empty: normal
    write(root / "images" / "test" / "c.png", image_bytes(402))  # no label file: unlabeled
    write(root / "labels" / "train" / "orphan.txt", b"0 0.5 0.5 0.1 0.1\n")
    write(root / "data.yaml", b"path: .\ntrain: images/train\nnames:\n  0: scratch\n  1: dent\n")
    return root


def test_yolo_normalised_boxes_and_polygons(catalog, store, tmp_path):
    # a box centred at (0.5, 0.5), 0.25 x 0.5 of 64 x 48: top-left (24, 12), 16 x 24 pixels; a
    # polygon over [0.125, 0.375] x [0.125, 0.375]: pixels [8, 24] x [6, 18], 16 x 12 = 192
    root = _yolo_source(tmp_path / "yolo", "0 0.5 0.5 0.25 0.5\n\n1 0.125 0.125 0.375 0.125 0.375 0.375 0.125 0.375\n")
    report = import_dataset(catalog, store, root, workers=2)
    assert report.layout == "yolo" and (report.boxes, report.masks) == (2, 1)  # not mvtec: no train/good
    rows = _rows(catalog, store)
    assert rows["a.png"] == (Label.defect, "scratch", [_box(24, 12, 16, 24, "scratch")], 192,
                             {"classes": ["scratch", "dent"]})
    # the turned image's box is in its shown frame (64 x 48), not its stored one (48 x 64)
    assert rows["r.jpg"] == (Label.defect, "dent", [_box(24, 12, 16, 24, "dent")], None, None)
    assert rows["b.png"] == (Label.normal, None, None, None, None)
    assert rows["c.png"] is None
    with catalog.session() as s:
        splits = {i.origin.rsplit("/", 1)[-1]: i.split for i in s.scalars(select(Image))}
    assert splits == {"a.png": Split.train, "r.jpg": Split.train, "b.png": Split.val, "c.png": Split.test}
    assert _unused(report) == {"orphan.txt": "a label file that matches no image"}


def test_yolo_class_names_from_classes_txt(catalog, store, tmp_path):
    root = _yolo_source(tmp_path / "yolo")
    (root / "data.yaml").unlink()
    write(root / "classes.txt", b"crack\nhole\n\n")
    import_dataset(catalog, store, root, workers=2)
    assert _rows(catalog, store)["a.png"][:3] == (Label.defect, "crack", [_box(24, 12, 16, 24, "crack")])


@pytest.mark.parametrize(("label", "message"), [
    ("0 0.5 0.5 0.25 0.5\n5 0.5 0.5 0.1 0.1\n", r"a\.txt:2: class id 5 is not in the class names \(0\.\.1\)"),
    ("0 32 24 16 24\n", r"a\.txt:1: coordinates must be normalised to \[0, 1\]"),
    ("0 0.5 0.5 0.25\n", r"a\.txt:1: expected 'class cx cy w h'"),
    ("0 0.95 0.5 0.25 0.5\n", r"a\.txt:1: box reaches outside the image \(64x48\)"),
    ("0 0.5 0.5 0 0.5\n", r"a\.txt:1: box has no area"),
    ("x 0.5 0.5 0.2 0.2\n", r"a\.txt:1: class id 'x' is not an integer"),
])
def test_yolo_bad_input_stores_nothing(catalog, store, tmp_path, label, message):
    root = _yolo_source(tmp_path / "yolo", label)
    with pytest.raises(InvalidInput, match=message):
        import_dataset(catalog, store, root, workers=2)
    _nothing_stored(catalog, store)


# -- per-image box files ------------------------------------------------------------------------
def _boxes_source(root, a_boxes=b"10,5,30,25,short\n8 8 16 20 open\n"):
    write(root / "a.png", image_bytes(500))
    write(root / "a.txt", a_boxes)
    write(root / "sub" / "b.png", image_bytes(501))
    write(root / "boxes" / "sub" / "b.txt", b"\n")  # the boxes/ mirror; empty: normal
    write(root / "c.png", image_bytes(502))  # no box file: unlabeled
    write(root / "readme.txt", b"PCB defects")
    return root


def test_boxes_files_need_the_layout_named(catalog, store, tmp_path):
    root = _boxes_source(tmp_path / "pcb")
    with pytest.raises(InvalidInput, match="layout not recognised"):  # never auto-detected
        import_dataset(catalog, store, root)
    report = import_dataset(catalog, store, root, layout="boxes", workers=2)
    rows = _rows(catalog, store)
    assert rows["a.png"] == (Label.defect, "short", [_box(10, 5, 20, 20, "short"), _box(8, 8, 8, 12, "open")],
                             None, {"classes": ["short", "open"]})
    assert rows["b.png"] == (Label.normal, None, None, None, None)
    assert rows["c.png"] is None
    with catalog.session() as s:  # what `flawline data show` prints
        shown = summarize_dataset(s, get_dataset(s, report.dataset), detail=True)
    assert (shown.boxes, shown.with_boxes, shown.groups, shown.with_reference) == (2, 1, 0, 0)
    assert _unused(report) == {"readme.txt": "a text file that matches no image (box files are NAME.txt for "
                                             "NAME.<image suffix>)"}


@pytest.mark.parametrize(("lines", "message"), [
    (b"30,5,10,25,short\n", r"a\.txt:1: box has no area \(width -20"),
    (b"10,5,30,25\n", r"a\.txt:1: expected 'x1,y1,x2,y2,class'"),
    (b"10,5,30,49,short\n", r"a\.txt: box 1 of .*a\.png .* lies outside the 64x48 image"),
])
def test_boxes_bad_input_stores_nothing(catalog, store, tmp_path, lines, message):
    root = _boxes_source(tmp_path / "pcb", lines)
    with pytest.raises(InvalidInput, match=message):
        import_dataset(catalog, store, root, layout="boxes", workers=2)
    _nothing_stored(catalog, store)


# -- Label Studio export ------------------------------------------------------------------------
def _rect(x, y, w, h, label):
    return {"type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": W,
            "original_height": H, "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                            "rectanglelabels": [label]}}


def _verdict(choice):
    return {"type": "choices", "from_name": "verdict", "to_name": "image", "value": {"choices": [choice]}}


def _ls_source(root, tasks):
    for n, name in enumerate(("a.png", "b.png", "c.png", "d.png")):
        write(root / "imgs" / name, image_bytes(600 + n))
    write(root / "export.json", json.dumps(tasks).encode())
    return root


def test_labelstudio_export(catalog, store, tmp_path):
    root = _ls_source(tmp_path / "ls", [
        # uploaded: Label Studio put 'ab12cd34-' before the name; the last annotation counts
        {"id": 1, "data": {"image": "/data/upload/3/ab12cd34-a.png"}, "annotations": [
            {"result": [_verdict("normal")]},
            {"result": [_rect(25, 25, 50, 50, "scratch")]},
            {"result": [_verdict("dent")], "was_cancelled": True}]},
        {"id": 2, "data": {"image": "s3://bucket/raw/b.png"}, "annotations": [{"result": [_verdict("normal")]}]},
        {"id": 3, "data": {"image": "/data/upload/3/c.png"}, "annotations": [
            {"result": [_verdict("normal")], "was_cancelled": True}]},
    ])
    report = import_dataset(catalog, store, root, workers=2)
    assert report.layout == "labelstudio"
    rows = _rows(catalog, store)
    # 25 % / 50 % of 64 x 48
    assert rows["a.png"] == (Label.defect, "scratch", [_box(16, 12, 32, 24, "scratch")], None, None)
    assert rows["b.png"] == (Label.normal, None, None, None, None)
    assert rows["c.png"] is None and rows["d.png"] is None  # only cancelled; named by no task
    assert report.unused == []


@pytest.mark.parametrize(("task", "message"), [
    ({"id": 5, "data": {"image": "/data/upload/1/0badf00d-zz.png"}, "annotations": []},
     (r"export\.json: task 5: data\.image '/data/upload/1/0badf00d-zz\.png' names a missing image "
      r"\(no 0badf00d-zz\.png or zz\.png")),
    ({"id": 6, "data": {"image": "a.png"}, "annotations": [{"result": []}]},
     r"export\.json: task 6 \(a\.png\): empty answer"),
    ({"id": 7, "data": {"image": "a.png"}, "annotations": [{"result": [_rect(80, 25, 40, 50, "x")]}]},
     r"export\.json: box 1 of .*a\.png .* lies outside the 64x48 image"),
])
def test_labelstudio_bad_input_stores_nothing(catalog, store, tmp_path, task, message):
    root = _ls_source(tmp_path / "ls", [task])
    with pytest.raises(InvalidInput, match=message):
        import_dataset(catalog, store, root, workers=2)
    _nothing_stored(catalog, store)


# -- detection and training records -------------------------------------------------------------
def test_auto_detection_is_one_layout_or_an_error(catalog, store, tmp_path):
    from flawline.data.importers import detect_layout

    assert detect_layout(_coco_source(tmp_path / "coco", [])).name == "coco"
    assert detect_layout(_voc_source(tmp_path / "voc", [])).name == "voc"
    assert detect_layout(_yolo_source(tmp_path / "yolo")).name == "yolo"
    ls = _ls_source(tmp_path / "ls", [{"id": 1, "data": {"image": "a.png"}, "annotations": []}])
    assert detect_layout(ls).name == "labelstudio"
    write(ls / "coco.json", json.dumps({"images": [], "annotations": [], "categories": []}).encode())
    with pytest.raises(InvalidInput, match=r"looks like several layouts \(coco, labelstudio\); pass --layout"):
        import_dataset(catalog, store, ls)
    report = import_dataset(catalog, store, ls, layout="labelstudio", workers=2)
    assert _unused(report) == {"coco.json": "not the Label Studio export this import read"}


def test_imported_boxes_reach_training_records(catalog, store, tmp_path):
    root = _voc_source(tmp_path / "voc", [("short", (1, 1, 10, 20))])
    import_dataset(catalog, store, root, dataset="pcb", workers=2)
    records = {r.file_name: r for r in image_records(catalog, "pcb")}
    assert records["a.jpg"].boxes == [_box(0, 0, 10, 20, "short")]
    assert (records["a.jpg"].defect, records["a.jpg"].defect_class) == (True, "short")
    assert records["b.jpg"].defect is False and records["b.jpg"].boxes is None
    assert records["c.jpg"].defect is None
