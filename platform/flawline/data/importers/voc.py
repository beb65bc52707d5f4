"""Pascal VOC: ``Annotations/NAME.xml`` per image, the images in ``JPEGImages/`` (else
``images/``, else the folder itself).

- Each XML's image is its ``<filename>`` in the images folder (by stem when the name has no image
  suffix), or, with no ``<filename>``, the image of the XML's stem; an XML whose image is missing
  stops the import.
- Each ``<object>``: ``<name>`` is the class and box label; ``<bndbox>`` ``xmin ymin xmax ymax`` are
  VOC's 1-based pixel indices, both corners inclusive (the whole image is 1, 1, W, H), so the box
  is x = xmin - 1, y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1 in flawline's continuous
  pixels; a corner below 1 is refused (a 0-based file is not VOC). ``difficult``, ``truncated``,
  ``pose`` and ``<size>`` are not read (the image's own size is checked).
- An XML with no ``<object>`` → normal; an image with no XML → unlabeled.
- ``ImageSets/`` lists and the ``Segmentation*`` PNGs are not read (listed as unused).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flawline.data.importers.annotation_files import (
    annotated_item,
    inside,
    is_image,
    number,
    pixel_box,
    read_xml,
    unlabeled_item,
)
from flawline.data.importers.base import IMAGE_SUFFIXES, Importer, ImportItem, register_importer
from flawline.errors import InvalidInput


def _image_folder(root: Path) -> Path:
    return next((d for d in (root / "JPEGImages", root / "images") if d.is_dir()), root)


@register_importer
class VocImporter(Importer):
    name = "voc"
    description = "Pascal VOC: Annotations/*.xml (1-based boxes) and JPEGImages/ (or images/, or beside)"

    def detect(self, root: Path) -> bool:
        folder = root / "Annotations"
        return folder.is_dir() and any(p.suffix.lower() == ".xml" for p in folder.iterdir())

    def unused_reason(self, root: Path, path: Path) -> str:
        top = path.relative_to(root).parts[0]
        if top == "ImageSets":
            return "a VOC image set list (not read: splits are made with `flawline data split`)"
        if top.startswith("Segmentation"):
            return "a VOC segmentation PNG (not read: this layout imports boxes)"
        return super().unused_reason(root, path)

    def scan(self, root: Path | None, **options: Any) -> Iterator[ImportItem]:
        assert root is not None
        xml_dir = root / "Annotations"
        if not xml_dir.is_dir():
            raise InvalidInput(f"{root}: no Annotations/ folder")
        folder = _image_folder(root)
        images = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_image(p))
        by_stem: dict[str, list[Path]] = {}
        for p in images:
            by_stem.setdefault(p.stem, []).append(p)
        annotated: dict[Path, ImportItem] = {}
        for xml in sorted(p for p in xml_dir.iterdir() if p.is_file() and p.suffix.lower() == ".xml"):
            image, item = _read(xml, folder, by_stem)
            if image in annotated:
                raise InvalidInput(f"{xml}: its image {image.name} is also described by {annotated[image].annotation.name}")
            annotated[image] = item
        for image in images:
            yield annotated.get(image) or unlabeled_item(image)


def _find_image(xml: Path, filename: str | None, folder: Path, by_stem: dict[str, list[Path]]) -> Path:
    if filename:
        candidate = folder / filename
        if candidate.is_file() and inside(folder, candidate) and is_image(candidate):
            return candidate
        stem = filename if Path(filename).suffix.lower() not in IMAGE_SUFFIXES else None
    else:
        stem = xml.stem
    found = by_stem.get(stem, []) if stem else []
    if len(found) > 1:
        raise InvalidInput(f"{xml}: several images are named {stem} ({', '.join(p.name for p in found)})")
    if not found:
        named = f"<filename> {filename!r}" if filename else f"its name ({xml.stem}.*)"
        raise InvalidInput(f"{xml}: {named} names a missing image in {folder}")
    return found[0]


def _read(xml: Path, folder: Path, by_stem: dict[str, list[Path]]) -> tuple[Path, ImportItem]:
    tree = read_xml(xml)
    if tree.tag != "annotation":
        raise InvalidInput(f"{xml}: not a VOC annotation (root element <{tree.tag}>)")
    filename = (tree.findtext("filename") or "").strip() or None
    image = _find_image(xml, filename, folder, by_stem)
    boxes, classes = [], []
    for n, obj in enumerate(tree.findall("object"), start=1):
        where = f"{xml}: object {n}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise InvalidInput(f"{where}: no <name>")
        box = obj.find("bndbox")
        if box is None:
            raise InvalidInput(f"{where} ({name}): no <bndbox>")
        corners = {k: number(box.findtext(k), f"{where} ({name})", k) for k in ("xmin", "ymin", "xmax", "ymax")}
        if corners["xmin"] < 1 or corners["ymin"] < 1:
            raise InvalidInput(f"{where} ({name}): xmin {corners['xmin']:g}, ymin {corners['ymin']:g}: VOC pixel "
                               "coordinates start at 1")
        boxes.append(pixel_box(corners["xmin"] - 1, corners["ymin"] - 1, corners["xmax"] - corners["xmin"] + 1,
                               corners["ymax"] - corners["ymin"] + 1, name, f"{where} ({name})"))
        classes.append(name)
    return image, annotated_item(image, xml, boxes, None, classes)
