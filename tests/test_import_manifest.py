"""The manifest layout: manifest.csv / manifest.jsonl rows with labels, classes, groups, references,
preset splits, masks and extra attributes; one-line errors naming the manifest's line."""

from __future__ import annotations

import csv
import json

import pytest
from sqlalchemy import func, select

from flawline.catalog import Dataset, Image
from flawline.catalog.queries import get_dataset, image_labels, summarize_dataset
from flawline.data.importers import detect_layout
from flawline.data.ingest import import_dataset
from flawline.data.records import image_records
from flawline.data.repair import remove_images
from flawline.errors import InvalidInput

from conftest import image_bytes, mask_bytes, write

COLUMNS = ["file", "label", "class", "group", "reference", "split", "mask", "lot"]

# Two boards, each a defect-free reference and two tested images; one stray image and a note.
ROWS = [
    {"file": "ref/b1.png", "label": "normal", "group": "b1", "split": "test", "lot": "L7"},
    {"file": "test/b1_a.png", "label": "defect", "class": "short", "group": "b1", "reference": "ref/b1.png",
     "split": "test", "mask": "masks/b1_a.png", "lot": "L7"},
    {"file": "test/b1_b.png", "label": "normal", "group": "b1", "reference": "ref/b1.png", "split": "test"},
    {"file": "ref/b2.png", "label": "normal", "group": "b2"},
    {"file": "test/b2_a.png", "label": "", "group": "b2", "reference": "ref/b2.png", "lot": "L8"},
    {"file": "test/b2_b.png", "label": "defect", "class": "open", "group": "b2", "reference": "ref/b2.png"},
]


def _tree(root, rows=ROWS, fmt="csv"):
    for n, row in enumerate(rows):
        write(root / row["file"], image_bytes(700 + n))
    write(root / "masks" / "b1_a.png", mask_bytes())
    write(root / "stray.png", image_bytes(799))
    write(root / "notes.txt", b"bench notes")
    _manifest(root, rows, fmt)
    return root


def _manifest(root, rows, fmt="csv", name=None):
    path = root / (name or f"manifest.{fmt}")
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if v != ""}) + "\n" for r in rows))
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return path


def _images(catalog, name):
    """origin's path below the source → (Image, label, class)."""
    with catalog.session() as s:
        ds = get_dataset(s, name)
        labels = image_labels(s, ds.id)
        images = s.scalars(select(Image).where(Image.dataset_id == ds.id)).all()
        return {img.origin.split("/src/", 1)[1]: (img, *labels[img.id]) for img in images}


def _check_boards(catalog, name):
    images = _images(catalog, name)
    assert set(images) == {r["file"] for r in ROWS}
    for row in ROWS:
        img, label, cls = images[row["file"]]
        assert (label.value if label else "") == row["label"]
        assert cls == (row.get("class") or None)
        attrs = img.attrs or {}
        assert attrs.get("group") == row["group"]
        assert attrs.get("lot") == row.get("lot")
        assert attrs.get("preset_split") == (row.get("split") or None)
        assert (img.split.value if img.split else None) == (row.get("split") or None)
        ref = row.get("reference")
        assert attrs.get("reference") == (images[ref][0].content_hash if ref else None)
    records = {r.origin.split("/src/", 1)[1]: r for r in image_records(catalog, name)}
    for row in ROWS:
        ref = row.get("reference")
        assert records[row["file"]].reference_key == (images[ref][0].object_key if ref else None)
    assert records["test/b1_a.png"].mask_key is not None
    return images


def test_csv_manifest(catalog, store, tmp_path):
    root = _tree(tmp_path / "src")
    report = import_dataset(catalog, store, root, dataset="pcb", workers=4)
    assert report.layout == "manifest" and report.new_images == 6 and report.masks == 1
    _check_boards(catalog, "pcb")
    with catalog.session() as s:  # what `flawline data show` prints
        shown = summarize_dataset(s, get_dataset(s, "pcb"), detail=True)
    assert (shown.groups, shown.with_reference, shown.by_preset) == (2, 4, {"test": 3})
    assert (shown.boxes, shown.with_boxes) == (0, 0)
    assert sorted(report.unused) == [f"{root / 'notes.txt'}: not in manifest.csv",
                                     f"{root / 'stray.png'}: not in manifest.csv"]


def test_jsonl_manifest_keeps_json_values(catalog, store, tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[0]["temperature"] = 21.5  # a JSON number stays a number
    root = _tree(tmp_path / "src", rows, fmt="jsonl")
    report = import_dataset(catalog, store, root, dataset="pcb")
    assert report.layout == "manifest"
    images = _check_boards(catalog, "pcb")
    assert images["ref/b1.png"][0].attrs["temperature"] == 21.5
    assert all(line.endswith("not in manifest.jsonl") for line in report.unused) and len(report.unused) == 2


def test_explicit_manifest_option(catalog, store, tmp_path):
    root = _tree(tmp_path / "src")
    (root / "manifest.csv").rename(root / "boards.csv")
    report = import_dataset(catalog, store, root, dataset="pcb", options={"manifest": "boards.csv"})
    assert report.layout == "manifest" and report.new_images == 6


def test_manifest_wins_over_folder_layout(tmp_path):
    root = _tree(tmp_path / "src")
    write(root / "normal" / "n0.png", image_bytes(1))  # the folder layout matches too
    assert detect_layout(root).name == "manifest"
    (root / "manifest.csv").unlink()
    assert detect_layout(root).name == "folder"


def _bad(rows, **change):
    out = [dict(r) for r in rows]
    for key, value in change.items():
        index, column = key.rsplit("_", 1)
        out[int(index[1:])][column] = value
    return out


BAD = {
    "unknown label": (_bad(ROWS, r2_label="broken"), 4, "unknown label 'broken'"),
    "unknown split": (_bad(ROWS, r0_split="training"), 2, "unknown split 'training'"),
    "missing file": (_bad(ROWS, r3_file="ref/gone.png"), 5, "file 'ref/gone.png' does not exist"),
    "listed twice": (_bad(ROWS, r3_file="ref/b1.png"), 5, "file 'ref/b1.png' is listed twice (first on line 2)"),
    "reference not a row": (_bad(ROWS, r4_reference="stray.png"), 6, "reference 'stray.png' is not a row"),
    "reference itself": (_bad(ROWS, r4_reference="test/b2_a.png"), 6, "refers to the row itself"),
    "reference is a defect": (_bad(ROWS, r5_reference="test/b1_a.png"), 7,
                              "reference 'test/b1_a.png' is labelled defect on line 3"),
    "class on a normal": (_bad(ROWS, r2_class="short"), 4, "class 'short' given with label normal"),
    "split apart from its reference": (_bad(ROWS, r2_split="train"), 4,
                                       "split 'train' but its reference 'ref/b1.png' has split 'test' on line 2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_manifest_errors_name_the_line_and_store_nothing(catalog, store, tmp_path, case):
    rows, line, message = BAD[case]
    root = _tree(tmp_path / "src")
    _manifest(root, rows)
    with pytest.raises(InvalidInput) as err:
        import_dataset(catalog, store, root, dataset="pcb")
    text = str(err.value)
    assert text.startswith(f"{root / 'manifest.csv'}:{line}: ") and message in text and "\n" not in text
    with catalog.session() as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 0
        assert s.scalar(select(func.count()).select_from(Dataset)) == 0
    assert list(store.list_keys()) == []


def test_missing_file_column(catalog, store, tmp_path):
    root = _tree(tmp_path / "src")
    (root / "manifest.csv").write_text("path,label\nref/b1.png,normal\n")
    with pytest.raises(InvalidInput, match=r"manifest\.csv:1: no 'file' column \(columns: path, label\)"):
        import_dataset(catalog, store, root, dataset="pcb")
    (root / "manifest.csv").unlink()
    (root / "manifest.jsonl").write_text('{"file": "ref/b1.png"}\n{"path": "ref/b2.png"}\n')
    with pytest.raises(InvalidInput, match=r"manifest\.jsonl:2: no 'file' field"):
        import_dataset(catalog, store, root, dataset="pcb")
    assert list(store.list_keys()) == []


def test_invalid_reference_is_dropped_with_skip_invalid(catalog, store, tmp_path):
    root = _tree(tmp_path / "src")
    (root / "ref" / "b2.png").write_bytes(b"not an image")
    with pytest.raises(InvalidInput, match="b2.png"):
        import_dataset(catalog, store, root, dataset="pcb")
    report = import_dataset(catalog, store, root, dataset="pcb", skip_invalid=True)
    assert report.new_images == 5 and len(report.skipped) == 1
    assert sorted(report.references_dropped) == [
        f"{root / name}: its reference {root / 'ref' / 'b2.png'} was skipped as invalid; imported without a reference"
        for name in ("test/b2_a.png", "test/b2_b.png")]
    images = _images(catalog, "pcb")
    assert "reference" not in images["test/b2_a.png"][0].attrs
    assert images["test/b1_b.png"][0].attrs["reference"] == images["ref/b1.png"][0].content_hash


def test_reference_removed_earlier_stops_the_import(catalog, store, tmp_path):
    root = _tree(tmp_path / "src")
    _manifest(root, [ROWS[0]])
    import_dataset(catalog, store, root, dataset="pcb")
    remove_images(catalog, store, "pcb", ["b1.png"], reason="bad reference shot")
    _manifest(root, ROWS)
    with pytest.raises(InvalidInput, match=r"test/b1_a\.png: its reference .*ref/b1\.png was removed from the dataset"):
        import_dataset(catalog, store, root, dataset="pcb")
    with catalog.session() as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 0


def test_the_readme_manifest_example_imports_as_documented(catalog, store, tmp_path):
    """The manifest shown in README.md, pasted as a user would (its files made up): it imports."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("    file,label,class,group,reference,split,mask,lot\n", 1)[1].split("\n\n", 1)[0]
    lines = ["file,label,class,group,reference,split,mask,lot"] + [ln.strip() for ln in block.splitlines()]
    root = tmp_path / "example"
    rows = list(csv.DictReader(lines))
    for n, row in enumerate(rows):
        write(root / row["file"], image_bytes(900 + n))
        if row["mask"]:
            write(root / row["mask"], mask_bytes())
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    report = import_dataset(catalog, store, root, dataset="readme-example")
    assert report.new_images == len(rows) == 3 and report.masks == 1
    with catalog.session() as s:
        shown = summarize_dataset(s, get_dataset(s, "readme-example"), detail=True)
    assert shown.with_reference == 2 and shown.by_preset == {"test": 2}
