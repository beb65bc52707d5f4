"""COCO detection/segmentation JSON: a folder holding the images and one COCO file (``*.json`` in
the folder or in ``annotations/``) with ``images``, ``annotations`` and ``categories``.

- ``images[].file_name`` is relative to the folder, or to its ``images/`` sub-folder; it must stay
  inside the folder. An image the file lists with no annotation is normal; an image file the COCO
  file does not list is left out (listed as unused).
- ``bbox`` ``[x, y, w, h]`` (pixels, top-left: flawline's own box form) → a box labelled with the
  category's name; ``segmentation`` → the mask: polygons (a list of flat ``[x1, y1, ...]`` lists),
  uncompressed RLE (``{"counts": [ints], "size": [h, w]}``, column-major) or compressed RLE (the
  counts as pycocotools' string). An annotation may have both (COCO's usually do): both are kept.
- ``images[].width`` / ``height``, when given, must be the image's size in the shown frame (EXIF
  orientation applied), the frame every coordinate is read in.
- Class: the category's ``name`` (``annotation_files``' label rule for several).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flawline.data.importers.annotation_files import (
    ImagesByName,
    annotated_item,
    check_points,
    forget_json,
    image_size,
    inside,
    is_image,
    json_files,
    json_problem,
    load_json,
    number,
    pixel_box,
    polygon_mask,
    polygon_points,
    read_json,
    rle_mask,
)
from flawline.data.importers.base import Importer, ImportItem, register_importer
from flawline.errors import InvalidInput

if TYPE_CHECKING:
    import numpy as np

COCO_KEYS = ("images", "annotations", "categories")


def _looks_like_coco(path: Path) -> bool:
    """A JSON object holding lists under ``images``, ``annotations`` and ``categories``."""
    try:
        data = load_json(path)
    except (OSError, InvalidInput):
        return False
    return isinstance(data, dict) and all(isinstance(data.get(k), list) for k in COCO_KEYS)


def coco_files(root: Path) -> list[Path]:
    """The COCO files of ``root``: top-level and ``annotations/`` JSON files shaped like COCO."""
    return [p for p in json_files((root, root / "annotations"), b"{") if _looks_like_coco(p)]


@register_importer
class CocoImporter(Importer):
    name = "coco"
    description = "a folder of images and one COCO JSON (bbox → boxes, polygons and RLE → masks)"
    _listed: Path | None = None  # the COCO file the scan read

    def detect(self, root: Path) -> bool:
        return bool(coco_files(root))

    def detect_problem(self, root: Path) -> str | None:
        return json_problem(json_files((root, root / "annotations"), b"{"))

    def unused_reason(self, root: Path, path: Path) -> str:
        if is_image(path) and self._listed is not None:
            return f"an image the COCO file {self._listed.name} does not list"
        if path.suffix.lower() == ".json":
            return "not the COCO file this import read"
        return super().unused_reason(root, path)

    def scan(self, root: Path | None, **options: Any) -> Iterator[ImportItem]:
        assert root is not None
        files = coco_files(root)
        if not files:
            for candidate in json_files((root, root / "annotations"), b"{"):
                read_json(candidate)  # a malformed one: say where it breaks
            raise InvalidInput(f"{root}: no COCO JSON (an object with images, annotations and categories lists) "
                               "in the folder or its annotations/")
        if len(files) > 1:
            raise InvalidInput(f"{root}: several COCO files ({', '.join(p.name for p in files)}); "
                               "import one folder per COCO file")
        path = self._listed = files[0]
        data = load_json(path)
        forget_json()
        categories = _categories(data["categories"], path)
        images = _images(data["images"], root, path)
        per_image: dict[Any, list[tuple[int, dict[str, Any]]]] = {image_id: [] for image_id in images}
        for n, ann in enumerate(data["annotations"]):
            where = f"{path}: annotations[{n}]"
            if not isinstance(ann, dict):
                raise InvalidInput(f"{where}: not an object")
            if not _is_id(ann.get("image_id")) or ann["image_id"] not in images:
                raise InvalidInput(f"{where}: image_id {ann.get('image_id')!r} is not in images")
            if not _is_id(ann.get("category_id")) or ann["category_id"] not in categories:
                raise InvalidInput(f"{where}: category_id {ann.get('category_id')!r} is not in categories")
            per_image[ann["image_id"]].append((n, ann))
        for image_id, (file, declared) in images.items():
            yield _item(file, declared, per_image[image_id], categories, path)


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _categories(entries: list[Any], path: Path) -> dict[Any, str]:
    out: dict[Any, str] = {}
    for n, cat in enumerate(entries):
        if not isinstance(cat, dict) or not _is_id(cat.get("id")) or not isinstance(cat.get("name"), str) \
                or not cat["name"]:
            raise InvalidInput(f"{path}: categories[{n}] needs an id and a name")
        if cat["id"] in out:
            raise InvalidInput(f"{path}: categories[{n}]: id {cat['id']!r} is used twice")
        out[cat["id"]] = cat["name"]
    return out


def _images(entries: list[Any], root: Path, path: Path) -> dict[Any, tuple[Path, tuple[Any, Any]]]:
    """image id → (file, declared (width, height)); every file must exist inside ``root``."""
    out: dict[Any, tuple[Path, tuple[Any, Any]]] = {}
    seen: dict[Path, int] = {}
    by_name = None
    for n, entry in enumerate(entries):
        where = f"{path}: images[{n}]"
        if not isinstance(entry, dict) or not _is_id(entry.get("id")) or not isinstance(entry.get("file_name"), str):
            raise InvalidInput(f"{where}: needs an id and a file_name")
        if entry["id"] in out:
            raise InvalidInput(f"{where}: id {entry['id']!r} is used twice")
        name = entry["file_name"].replace("\\", "/")
        file = next((c for c in (root / name, root / "images" / name) if c.is_file() and inside(root, c)), None)
        if file is None and "/" not in name:  # a bare name: wherever it is below the folder, if only once
            by_name = by_name or ImagesByName(root)
            file = by_name.get(name, where)
        if file is None:
            raise InvalidInput(f"{where}: file_name {entry['file_name']!r} names a missing image "
                               f"(looked in {root} and {root / 'images'})")
        if file.resolve() in seen:
            raise InvalidInput(f"{where}: {entry['file_name']!r} is listed twice (also images[{seen[file.resolve()]}])")
        seen[file.resolve()] = n
        out[entry["id"]] = (file, (entry.get("width"), entry.get("height")))
    return out


def _item(file: Path, declared: tuple[Any, Any], anns: list[tuple[int, dict[str, Any]]],
          categories: dict[Any, str], path: Path) -> ImportItem:
    boxes: list[dict[str, Any]] = []
    classes: list[str] = []
    shapes: list[np.ndarray] = []
    mask: np.ndarray | None = None
    size: tuple[int, int] | None = None
    if anns:
        width, height, orientation = image_size(file)
        size = (width, height)
        if declared[0] is not None and declared[1] is not None and tuple(declared) != size:
            hint = (f"; that is its stored frame, but it is shown turned (EXIF orientation {orientation}) and "
                    "coordinates are read in the shown frame") if orientation in (5, 6, 7, 8) and \
                tuple(declared) == (height, width) else ""
            raise InvalidInput(f"{path}: {file.name} is declared {declared[0]}x{declared[1]} but the image is "
                               f"{width}x{height}{hint}")
    for n, ann in anns:
        where = f"{path}: annotations[{n}] ({file.name})"
        label = categories[ann["category_id"]]
        bbox, seg = ann.get("bbox"), ann.get("segmentation")
        if not bbox and not seg:
            raise InvalidInput(f"{where}: neither a bbox nor a segmentation")
        if bbox:
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise InvalidInput(f"{where}: bbox is not [x, y, width, height] ({bbox!r})")
            x, y, w, h = (number(v, where, "bbox value") for v in bbox)
            boxes.append(pixel_box(x, y, w, h, label, where))
        if seg:
            assert size is not None
            if isinstance(seg, list):
                for flat in seg:
                    points = polygon_points(flat, where)
                    check_points(points, *size, where)
                    shapes.append(points)
            else:
                rle = rle_mask(seg, *size, where)
                mask = rle if mask is None else mask | rle
        classes.append(label)
    if shapes:
        assert size is not None
        drawn = polygon_mask(shapes, *size)
        mask = drawn if mask is None else mask | drawn
    return annotated_item(file, path, boxes, mask, classes)
