"""Magnetic Tile Defect set: ``MT_<Class>/Imgs/NAME.jpg`` with its mask at ``NAME.png``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flawline.catalog.enums import Label
from flawline.data.importers.base import Blob, Importer, ImportItem, register_importer
from flawline.errors import InvalidInput


@register_importer
class MagneticTileImporter(Importer):
    name = "magnetic-tile"
    description = "Magnetic Tile Defect set: MT_Free (normal) and MT_<Class> folders of NAME.jpg + NAME.png"

    def detect(self, root: Path) -> bool:
        return any(p.is_dir() and p.name.startswith("MT_") for p in root.iterdir())

    def default_dataset_name(self, root: Path | None) -> str:
        return "magnetic-tile"

    def unused_reason(self, root: Path, path: Path) -> str:
        if path.parent.name == "Imgs" and path.suffix.lower() == ".png":
            return "a mask that matches no image (no .jpg of the same name beside it)"
        return super().unused_reason(root, path)

    def scan(self, root: Path | None, **options: Any) -> Iterator[ImportItem]:
        assert root is not None
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("MT_"))
        if not class_dirs:
            raise InvalidInput(f"{root}: no MT_<Class> folders")
        for class_dir in class_dirs:
            imgs = class_dir / "Imgs"
            if not imgs.is_dir():
                raise InvalidInput(f"{class_dir}: missing Imgs/ folder")
            name = class_dir.name[3:].lower()
            label = Label.normal if name == "free" else Label.defect
            for path in sorted(imgs.iterdir()):
                if not path.is_file() or path.name.startswith(".") or path.suffix.lower() == ".png":
                    continue  # .png files are the masks of the .jpg images beside them
                mask_path = path.with_suffix(".png")
                yield ImportItem(
                    image=Blob(str(path), path=path),
                    label=label,
                    defect_class=None if label is Label.normal else name,
                    mask=Blob(str(mask_path), path=mask_path) if mask_path.is_file() else None,
                )
