"""Plain folder layout: ``normal/``, ``defect/<class>/``, ``unlabeled/``, optional ``masks/`` mirror."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flawline.catalog.enums import Label
from flawline.data.importers.base import (
    IMAGE_SUFFIXES,
    Blob,
    Importer,
    ImportItem,
    find_mask,
    iter_files,
    register_importer,
)
from flawline.errors import InvalidInput


@register_importer
class FolderImporter(Importer):
    name = "folder"
    description = "normal/, defect/<class>/, unlabeled/ and an optional masks/ tree mirroring them"

    def detect(self, root: Path) -> bool:
        return any((root / d).is_dir() for d in ("normal", "defect", "unlabeled"))

    def scan(self, root: Path | None, **options: Any) -> Iterator[ImportItem]:
        assert root is not None
        masks_root = root / "masks"
        found = False
        for sub, label in (("normal", Label.normal), ("defect", Label.defect), ("unlabeled", None)):
            folder = root / sub
            if not folder.is_dir():
                continue
            found = True
            for path in iter_files(folder):
                if path.suffix.lower() not in IMAGE_SUFFIXES:  # notes, exports: listed as unused, not images
                    continue
                rel = path.relative_to(root)
                defect_class = None
                if label is Label.defect:
                    parts = path.relative_to(folder).parts
                    if len(parts) < 2:
                        raise InvalidInput(f"{path}: defect images go in defect/<class>/, not defect/ itself")
                    defect_class = parts[0]
                mask_path = find_mask(masks_root / rel.parent, path.stem)
                yield ImportItem(
                    image=Blob(str(path), path=path),
                    label=label,
                    defect_class=defect_class,
                    mask=Blob(str(mask_path), path=mask_path) if mask_path else None,
                )
        if not found:
            raise InvalidInput(f"{root}: no normal/, defect/ or unlabeled/ folder")
