"""Per-image box text files, as public PCB defect sets ship them: for an image ``DIR/NAME.EXT`` its
boxes are in ``DIR/NAME.txt`` beside it, or in ``boxes/DIR/NAME.txt`` (a ``boxes/`` folder
mirroring the image tree; both at once stop the import).

- One box a line: ``x1,y1,x2,y2,class`` or ``x1 y1 x2 y2 class``: absolute pixel corners (top-left
  and bottom-right, continuous: the box is ``x1, y1, x2 - x1, y2 - y1``), the class as written
  (a name or a number; the box's label and the image's defect class).
- An empty box file → normal; an image with no box file → unlabeled; a ``.txt`` matching no
  image is listed as unused.
- Never auto-detected: a folder of images and ``.txt`` files is as likely YOLO labels or notes;
  pass ``--layout boxes``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flawline.data.importers.annotation_files import (
    annotated_item,
    image_files,
    number,
    pixel_box,
    read_lines,
    unlabeled_item,
)
from flawline.data.importers.base import Importer, ImportItem, register_importer
from flawline.errors import InvalidInput

BOXES_DIR = "boxes"


@register_importer
class BoxesImporter(Importer):
    name = "boxes"
    description = ("per-image box files NAME.txt beside each image or in a boxes/ mirror, lines "
                   "'x1,y1,x2,y2,class' in pixels (never auto-detected)")

    def detect(self, root: Path) -> bool:
        return False  # see the module docstring

    def unused_reason(self, root: Path, path: Path) -> str:
        if path.suffix.lower() == ".txt":
            return "a text file that matches no image (box files are NAME.txt for NAME.<image suffix>)"
        return super().unused_reason(root, path)

    def scan(self, root: Path | None, **options: Any) -> Iterator[ImportItem]:
        assert root is not None
        mirror = root / BOXES_DIR
        claimed: dict[Path, Path] = {}
        for image in image_files(root):
            rel = image.relative_to(root)
            if rel.parts[0] == BOXES_DIR:
                continue
            beside, mirrored = image.with_suffix(".txt"), mirror / rel.with_suffix(".txt")
            found = [p for p in (beside, mirrored) if p.is_file()]
            if len(found) > 1:
                raise InvalidInput(f"{image}: two box files ({beside} and {mirrored}); keep one")
            if not found:
                yield unlabeled_item(image)
                continue
            if found[0] in claimed:
                raise InvalidInput(f"{found[0]}: two images share its name ({claimed[found[0]].name}, {image.name})")
            claimed[found[0]] = image
            yield _item(image, found[0])


def _item(image: Path, path: Path) -> ImportItem:
    boxes, classes = [], []
    for lineno, line in read_lines(path):
        where = f"{path}:{lineno}"
        parts = [p.strip() for p in line.split(",")] if "," in line else line.split()
        if len(parts) != 5 or not parts[4]:
            raise InvalidInput(f"{where}: expected 'x1,y1,x2,y2,class', got {line!r}")
        x1, y1, x2, y2 = (number(v, where, k) for v, k in zip(parts[:4], ("x1", "y1", "x2", "y2")))
        boxes.append(pixel_box(x1, y1, x2 - x1, y2 - y1, parts[4], where))
        classes.append(parts[4])
    return annotated_item(image, path, boxes, None, classes)
