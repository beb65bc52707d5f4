"""MVTec AD layout: ``<category>/{train/good, test/<type>, ground_truth/<type>/<name>_mask.png}``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flawline.catalog.enums import Label, Split
from flawline.data.importers.base import (
    Blob,
    Importer,
    ImportItem,
    find_mask,
    iter_files,
    register_importer,
)
from flawline.errors import InvalidInput


def _is_category(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


@register_importer
class MVTecImporter(Importer):
    name = "mvtec"
    description = "MVTec AD: one category folder, or the root of several with --category"

    def detect(self, root: Path) -> bool:
        # train/good, not just train/ and test/: a YOLO tree's images/{train,test} is no MVTec category
        def looks(path: Path) -> bool:
            return _is_category(path) and (path / "train" / "good").is_dir()

        return looks(root) or any(looks(p) for p in root.iterdir() if p.is_dir())

    def _category_root(self, root: Path, category: str | None) -> Path:
        if _is_category(root):
            return root
        categories = sorted(p.name for p in root.iterdir() if p.is_dir() and _is_category(p))
        if category:
            if category not in categories:
                raise InvalidInput(f"{root}: no MVTec category {category!r}; found {', '.join(categories)}")
            return root / category
        if len(categories) == 1:
            return root / categories[0]
        raise InvalidInput(f"{root} holds {len(categories)} MVTec categories ({', '.join(categories)}); "
                           "pass --category")

    def scan(self, root: Path | None, category: str | None = None, **options: Any) -> Iterator[ImportItem]:
        assert root is not None
        cat = self._category_root(root, category)
        for split_name, split in (("train", Split.train), ("test", Split.test)):
            for type_dir in sorted(p for p in (cat / split_name).iterdir() if p.is_dir()):
                label = Label.normal if type_dir.name == "good" else Label.defect
                for path in iter_files(type_dir):
                    mask_path = None
                    if label is Label.defect:
                        mask_path = find_mask(cat / "ground_truth" / type_dir.name, path.stem)
                    yield ImportItem(
                        image=Blob(str(path), path=path),
                        label=label,
                        defect_class=None if label is Label.normal else type_dir.name,
                        mask=Blob(str(mask_path), path=mask_path) if mask_path else None,
                        split=split,
                        image_attrs={"category": cat.name},
                    )
