"""YOLO (Ultralytics) labels: ``images/`` and a ``labels/`` tree mirroring it, ``labels/a/NAME.txt``
for ``images/a/NAME.jpg``.

- Class names: ``data.yaml`` (or ``dataset.yaml``) ``names`` in the folder, a list or an
  ``{id: name}`` mapping; else ``classes.txt`` (one name a line) in the folder or in ``labels/``.
- A line ``class cx cy w h`` is a box: centre and size normalised to [0, 1] by the image's size in
  the shown frame (EXIF orientation applied; read from its header), so the box is
  x = (cx - w/2) * W, y = (cy - h/2) * H, w * W, h * H pixels. A line ``class x1 y1 x2 y2 ...``
  (at least 3 normalised points) is a polygon: it goes into the mask. Other lines (keypoints with
  visibilities, a coordinate outside [0, 1], an unknown class id) stop the import naming the
  file and line.
- An empty label file → normal; an image with no label file → unlabeled; a label file with no
  image is listed as unused. ``images/train``, ``images/val`` (or ``valid``) and ``images/test``
  keep their split.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flawline.catalog.enums import Split
from flawline.data.importers.annotation_files import (
    annotated_item,
    image_files,
    image_size,
    number,
    pixel_box,
    polygon_mask,
    read_lines,
    read_text,
    unlabeled_item,
)
from flawline.data.importers.base import Importer, ImportItem, register_importer
from flawline.errors import InvalidInput

SPLITS = {"train": Split.train, "val": Split.val, "valid": Split.val, "validation": Split.val, "test": Split.test}
TOLERANCE = 1e-6  # normalised coordinates written as 1.0000001 are still inside


def _names_files(root: Path) -> list[Path]:
    return [p for p in (root / "data.yaml", root / "dataset.yaml", root / "classes.txt",
                        root / "labels" / "classes.txt") if p.is_file()]


def class_names(root: Path) -> tuple[dict[int, str], Path]:
    """class id → name, and the file they came from (module docstring)."""
    files = _names_files(root)
    if not files:
        raise InvalidInput(f"{root}: no class names (data.yaml with names, or classes.txt)")
    path = files[0]
    if path.suffix == ".txt":
        lines = [line.strip() for line in read_text(path).splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        if "" in lines:
            raise InvalidInput(f"{path}:{lines.index('') + 1}: empty class name")
        if not lines:
            raise InvalidInput(f"{path}: no class names")
        return dict(enumerate(lines)), path
    import yaml

    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise InvalidInput(f"{path}: malformed YAML ({' '.join(str(err).split())})") from None
    raw = data.get("names") if isinstance(data, dict) else None
    if isinstance(raw, list) and all(isinstance(v, str) and v for v in raw):
        return dict(enumerate(raw)), path
    if isinstance(raw, dict) and raw:
        try:
            out = {int(k): str(v) for k, v in raw.items() if str(v)}
        except (TypeError, ValueError):
            out = {}
        if len(out) == len(raw):
            return out, path
    raise InvalidInput(f"{path}: names is neither a list of names nor a mapping of class ids to names")


@register_importer
class YoloImporter(Importer):
    name = "yolo"
    description = "YOLO: images/ and labels/ mirroring it (normalised boxes, polygons), names in data.yaml or classes.txt"

    def detect(self, root: Path) -> bool:
        return (root / "images").is_dir() and (root / "labels").is_dir()

    def unused_reason(self, root: Path, path: Path) -> str:
        if path in _names_files(root):
            return "class names are read from " + _names_files(root)[0].name
        if path.relative_to(root).parts[0] == "labels":
            if path.suffix.lower() == ".txt":
                return "a label file that matches no image"
            if path.suffix == ".cache":
                return "an Ultralytics cache (not read)"
        return super().unused_reason(root, path)

    def scan(self, root: Path | None, **options: Any) -> Iterator[ImportItem]:
        assert root is not None
        images_dir, labels_dir = root / "images", root / "labels"
        if not images_dir.is_dir() or not labels_dir.is_dir():
            raise InvalidInput(f"{root}: YOLO needs images/ and labels/ folders")
        names, names_file = class_names(root)
        self.side_files.append(names_file)
        claimed: dict[Path, Path] = {}
        for image in image_files(images_dir):
            rel = image.relative_to(images_dir)
            split = SPLITS.get(rel.parts[0].lower()) if len(rel.parts) > 1 else None
            label = labels_dir / rel.with_suffix(".txt")
            if not label.is_file():
                yield unlabeled_item(image, split)
                continue
            if label in claimed:
                raise InvalidInput(f"{label}: two images share its name ({claimed[label].name}, {image.name})")
            claimed[label] = image
            yield _item(image, label, names, split)


def _item(image: Path, label: Path, names: dict[int, str], split: Split | None) -> ImportItem:
    lines = read_lines(label)
    if not lines:
        return annotated_item(image, label, [], None, [], split)
    width, height, _ = image_size(image)
    boxes, classes, shapes = [], [], []
    for lineno, line in lines:
        where = f"{label}:{lineno}"
        parts = line.split()
        try:
            class_id = int(parts[0])
        except ValueError:
            raise InvalidInput(f"{where}: class id {parts[0]!r} is not an integer") from None
        if class_id not in names:
            raise InvalidInput(f"{where}: class id {class_id} is not in the class names (0..{max(names)})")
        import numpy as np

        values = np.array([number(v, where, "coordinate") for v in parts[1:]], dtype=np.float64)
        if len(values) != 4 and (len(values) < 6 or len(values) % 2):
            raise InvalidInput(f"{where}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', "
                               f"got {len(parts)} fields")
        if values.min() < -TOLERANCE or values.max() > 1 + TOLERANCE:
            raise InvalidInput(f"{where}: coordinates must be normalised to [0, 1] (YOLO), got {line!r}")
        name = names[class_id]
        if len(values) == 4:
            cx, cy, w, h = values
            box = pixel_box((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height, name, where)
            if box["x"] < -0.5 or box["y"] < -0.5 or box["x"] + box["w"] > width + 0.5 or \
                    box["y"] + box["h"] > height + 0.5:
                raise InvalidInput(f"{where}: box reaches outside the image ({width}x{height})")
            boxes.append(box)
        else:
            shapes.append(values.reshape(-1, 2) * (width, height))
        classes.append(name)
    mask = polygon_mask(shapes, width, height) if shapes else None
    return annotated_item(image, label, boxes, mask, classes, split)
