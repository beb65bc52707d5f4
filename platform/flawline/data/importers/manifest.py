"""Manifest layout: ``manifest.csv`` or ``manifest.jsonl`` at the source's root, one row per image.

Columns (CSV header, or JSON keys per line):

- ``file`` (required): the image, relative to the manifest's folder;
- ``label``: ``normal``, ``defect`` or empty (unlabelled);
- ``class``: the defect class (only with ``label`` defect);
- ``group``: any string (a board id, a batch): kept as the image attribute ``group``, for
  ``flawline data split --group-by group``;
- ``reference``: the ``file`` of this image's defect-free reference image, itself a row of the
  manifest (not labelled defect, not the row itself); the import stores the reference's content
  hash on the image (attribute ``reference``);
- ``split``: ``train``, ``val``, ``test`` or empty: a preset split, kept as ``preset_split``
  (``flawline data split --keep-preset``);
- ``mask``: an optional mask file, relative to the manifest's folder;
- any other column: an image attribute of that name (empty CSV cells are left out).

Every bad row stops the scan, before anything is read or uploaded, with one line naming the
manifest file and line. Files below the source that the manifest does not list are reported as
unused ("not in manifest.csv"). ``options["manifest"]`` names another manifest file (relative to
the source folder, or absolute).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flawline.catalog.enums import Label, Split
from flawline.data.importers.base import Blob, Importer, ImportItem, register_importer
from flawline.errors import InvalidInput

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
COLUMNS = ("file", "label", "class", "group", "reference", "split", "mask")
LABELS = {"normal": Label.normal, "defect": Label.defect, "": None}
SPLITS = {"train": Split.train, "val": Split.val, "test": Split.test, "": None}


@dataclass
class _Row:
    line: int
    path: Path
    label: Label | None
    defect_class: str | None
    split: Split | None
    mask: Path | None
    reference: str | None  # the reference's file as written
    attrs: dict[str, Any] = field(default_factory=dict)
    reference_row: _Row | None = None  # the row ``reference`` names (set once every row is read)


def find_manifest(root: Path) -> Path | None:
    """``root/manifest.csv`` or ``root/manifest.jsonl``; InvalidInput when both are there."""
    found = [root / n for n in MANIFEST_NAMES if (root / n).is_file()]
    if len(found) > 1:
        raise InvalidInput(f"{root}: both manifest.csv and manifest.jsonl; keep one (or name one with --manifest)")
    return found[0] if found else None


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [(c or "").strip() for c in (reader.fieldnames or [])]
            if "file" not in {c.lower() for c in header}:
                raise InvalidInput(f"{path}:1: no 'file' column (columns: {', '.join(header) or 'none'})")
            line = reader.line_num
            for raw in reader:
                start, line = line + 1, reader.line_num
                if None in raw:
                    raise InvalidInput(f"{path}:{start}: more values than the header's {len(header)} columns")
                row = {(k or "").strip(): v for k, v in raw.items()}
                if not any(_text(v) for v in row.values()):
                    continue
                yield start, row
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not UTF-8 text") from None
    except csv.Error as err:
        raise InvalidInput(f"{path}: not a readable CSV file ({err})") from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not UTF-8 text") from None
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidInput(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise InvalidInput(f"{path}:{lineno}: not a JSON object")
        if "file" not in {str(k).strip().lower() for k in row}:
            raise InvalidInput(f"{path}:{lineno}: no 'file' field")
        yield lineno, {str(k).strip(): v for k, v in row.items()}


def _norm(path: Path) -> str:
    """The key two spellings of one file share."""
    return os.path.normcase(str(path.resolve()))


def read_manifest(manifest: Path) -> list[_Row]:
    """Parse and check ``manifest`` (every error names the manifest file and line)."""
    base = manifest.parent
    reader = _read_jsonl if manifest.suffix.lower() == ".jsonl" else _read_csv
    rows: list[_Row] = []
    by_file: dict[str, _Row] = {}
    for line, raw in reader(manifest):
        where = f"{manifest}:{line}"
        known = {c: _text(v) for k, v in raw.items() if (c := k.lower()) in COLUMNS}
        rel = known.get("file", "")
        if not rel:
            raise InvalidInput(f"{where}: empty 'file'")
        label_text = known.get("label", "").lower()
        if label_text not in LABELS:
            raise InvalidInput(f"{where}: unknown label {known['label']!r} (normal, defect, or empty for unlabelled)")
        split_text = known.get("split", "").lower()
        if split_text not in SPLITS:
            raise InvalidInput(f"{where}: unknown split {known['split']!r} (train, val, test, or empty)")
        label = LABELS[label_text]
        defect_class = known.get("class") or None
        if defect_class and label is not Label.defect:
            raise InvalidInput(f"{where}: class {defect_class!r} given with label {label_text or 'empty'} "
                               "(a class needs label defect)")
        path = base / rel
        if not path.is_file():
            raise InvalidInput(f"{where}: file {rel!r} does not exist")
        key = _norm(path)
        if key in by_file:
            raise InvalidInput(f"{where}: file {rel!r} is listed twice (first on line {by_file[key].line})")
        mask = None
        if known.get("mask"):
            mask = base / known["mask"]
            if not mask.is_file():
                raise InvalidInput(f"{where}: mask {known['mask']!r} does not exist")
        attrs: dict[str, Any] = {k: (v.strip() if isinstance(v, str) else v) for k, v in raw.items()
                                 if k and k.lower() not in COLUMNS and v is not None and _text(v) != ""}
        if known.get("group"):
            attrs["group"] = known["group"]
        row = _Row(line, path, label, defect_class, SPLITS[split_text], mask, known.get("reference") or None, attrs)
        rows.append(row)
        by_file[key] = row
    for row in rows:
        if row.reference is None:
            continue
        where = f"{manifest}:{row.line}"
        ref = by_file.get(_norm(base / row.reference))
        if ref is None:
            raise InvalidInput(f"{where}: reference {row.reference!r} is not a row of {manifest.name}")
        if ref is row:
            raise InvalidInput(f"{where}: reference {row.reference!r} refers to the row itself")
        if ref.label is Label.defect:
            raise InvalidInput(f"{where}: reference {row.reference!r} is labelled defect on line {ref.line} "
                               "(a reference must be defect-free)")
        if row.split is not None and ref.split is not None and row.split is not ref.split:
            raise InvalidInput(f"{where}: split {row.split.value!r} but its reference {row.reference!r} has split "
                               f"{ref.split.value!r} on line {ref.line} (an image and its reference share a split)")
        row.reference_row = ref
    return rows


@register_importer
class ManifestImporter(Importer):
    name = "manifest"
    description = ("manifest.csv or manifest.jsonl: one row per image (file, label, class, group, reference, "
                   "split, mask, other columns as attributes)")
    # An explicit manifest is the strongest statement a folder makes about itself: it wins over
    # layouts that guess from folder names (a manifest folder often also has normal/ or defect/).
    detect_priority = 0

    def __init__(self) -> None:
        self.manifest_name = MANIFEST_NAMES[0]

    def detect(self, root: Path) -> bool:
        return any((root / n).is_file() for n in MANIFEST_NAMES)

    def unused_reason(self, root: Path, path: Path) -> str:
        return f"not in {self.manifest_name}"

    def scan(self, root: Path | None, manifest: str | Path | None = None, **options: Any) -> Iterator[ImportItem]:
        assert root is not None
        if manifest is not None:
            path = Path(manifest).expanduser()
            path = path if path.is_absolute() else root / path
            if not path.is_file():
                raise InvalidInput(f"{path}: no such manifest file")
        else:
            found = find_manifest(root)
            if found is None:
                raise InvalidInput(f"{root}: no manifest.csv or manifest.jsonl")
            path = found
        self.manifest_name = path.name
        rows = read_manifest(path)  # every row checked before the first item is handed out
        source = Blob(str(path), path=path)
        for row in rows:
            yield ImportItem(
                image=Blob(str(row.path), path=row.path),
                label=row.label,
                defect_class=row.defect_class,
                mask=Blob(str(row.mask), path=row.mask) if row.mask else None,
                split=row.split,
                image_attrs=row.attrs,
                reference=str(row.reference_row.path) if row.reference_row else None,
                annotation=source,
            )
