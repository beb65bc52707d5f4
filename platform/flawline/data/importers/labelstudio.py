"""Label Studio's JSON export (the full "JSON" format: a list of tasks) in a folder with the images.

- Each task's ``data.image`` (``/data/upload/3/ab12cd34-NAME.png``, ``s3://bucket/dir/NAME.png``,
  ``.../data/local-files/?d=dir/NAME.png``) is matched by file name to an image below the folder;
  Label Studio's upload prefix (8 hex digits and ``-``) is dropped when the name as given is not
  found. A task naming a missing image, or an image two tasks name, stops the import.
- Its last annotation not cancelled (``was_cancelled``) is read by the same reader as
  ``flawline label pull`` (``labelstudio.convert.read_annotation``): verdict, class, brush and
  polygon mask, boxes; its refusals (an empty answer, 'normal' with regions drawn) stop the
  import naming the task. A task with no such annotation, and an image no task names, is unlabeled.
- Predictions are not read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flawline.catalog.enums import Label
from flawline.data.importers.annotation_files import (
    ImagesByName,
    forget_json,
    image_size,
    json_files,
    json_problem,
    load_json,
    mask_blob,
    read_json,
    unlabeled_item,
    url_file_name,
)
from flawline.data.importers.base import Blob, Importer, ImportItem, register_importer
from flawline.errors import InvalidInput

UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-(.+)$")


def _looks_like_export(path: Path) -> bool:
    """A JSON list of task objects, each with a ``data`` object and an ``annotations`` list."""
    try:
        data = load_json(path)
    except (OSError, InvalidInput):
        return False
    return isinstance(data, list) and bool(data) and all(
        isinstance(t, dict) and isinstance(t.get("data"), dict) and isinstance(t.get("annotations"), list)
        for t in data)


def export_files(root: Path) -> list[Path]:
    return [p for p in json_files((root,), b"[") if _looks_like_export(p)]


@register_importer
class LabelStudioImporter(Importer):
    name = "labelstudio"
    description = "Label Studio's JSON export and the images its tasks name, matched by file name"

    def detect(self, root: Path) -> bool:
        return bool(export_files(root))

    def detect_problem(self, root: Path) -> str | None:
        return json_problem(json_files((root,), b"["))

    def unused_reason(self, root: Path, path: Path) -> str:
        if path.suffix.lower() == ".json":
            return "not the Label Studio export this import read"
        return super().unused_reason(root, path)

    def scan(self, root: Path | None, **options: Any) -> Iterator[ImportItem]:
        assert root is not None
        files = export_files(root)
        if not files:
            for candidate in json_files((root,), b"["):
                read_json(candidate)  # a malformed one: say where it breaks
            raise InvalidInput(f"{root}: no Label Studio JSON export (a list of tasks with data and annotations) "
                               "in the folder")
        if len(files) > 1:
            raise InvalidInput(f"{root}: several Label Studio exports ({', '.join(p.name for p in files)}); "
                               "import one folder per export")
        path = files[0]
        self.side_files.append(path)  # read even when no task has a finished annotation
        tasks = load_json(path)
        forget_json()
        images = ImagesByName(root)
        done: dict[Path, str] = {}
        for n, task in enumerate(tasks):
            where = f"{path}: task {task.get('id', f'#{n}')}"
            uri = task["data"].get("image")
            if not isinstance(uri, str) or not uri:
                raise InvalidInput(f"{where}: no data.image")
            name = url_file_name(uri)
            image = images.get(name, where)
            match = UPLOAD_PREFIX.match(name)
            if image is None and match:
                image = images.get(match.group(1), where)
            if image is None:
                raise InvalidInput(f"{where}: data.image {uri!r} names a missing image (no {name}"
                                   + (f" or {match.group(1)}" if match else "") + f" below {root})")
            if image in done:
                raise InvalidInput(f"{where}: {image.name} is also the image of {done[image]}")
            done[image] = where.split(": ", 1)[1]
            yield _item(image, task, path, where)
        for image in images.files:
            if image not in done:
                yield unlabeled_item(image)


def _item(image: Path, task: dict[str, Any], path: Path, where: str) -> ImportItem:
    from flawline.labelstudio.convert import read_annotation

    finished = [a for a in task["annotations"] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not finished:
        return unlabeled_item(image)
    width, height, orientation = image_size(image)
    try:
        human = read_annotation(finished[-1].get("result"), width, height, orientation)
    except InvalidInput as err:
        raise InvalidInput(f"{where} ({image.name}): {err}") from None
    label = Label(human.label)
    return ImportItem(
        image=Blob(str(image), path=image),
        label=label,
        defect_class=human.defect_class,
        mask=mask_blob(human.mask, f"{path} (mask of {image.name})") if human.mask is not None else None,
        boxes=human.boxes or None,
        annotation=Blob(str(path), path=path),
    )
