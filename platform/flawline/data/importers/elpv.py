"""ELPV solar-cell set shipped by the ``elpv-dataset`` package (or a copy of its ``data/`` folder):
``labels.csv`` rows ``images/cellNNNN.png  <defect probability>  <mono|poly>``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flawline.catalog.enums import Label
from flawline.data.importers.base import Blob, Importer, ImportItem, register_importer
from flawline.errors import InvalidInput

DEFECT_THRESHOLD = 0.5  # defect probability at or above this counts as defective (Deitsch et al.)


def packaged_elpv_dir() -> Path:
    try:
        import elpv_dataset
    except ImportError:
        raise InvalidInput("the ELPV set needs the `elpv-dataset` package (part of flawline[local])") from None
    return Path(elpv_dataset.__file__).parent / "data"


@register_importer
class ElpvImporter(Importer):
    name = "elpv"
    description = "ELPV solar cells from the elpv-dataset package (PATH optional: a folder with labels.csv)"
    needs_path = False

    def detect(self, root: Path) -> bool:
        return (root / "labels.csv").is_file() and (root / "images").is_dir()

    def default_dataset_name(self, root: Path | None) -> str:
        return "elpv"

    def scan(self, root: Path | None, threshold: float = DEFECT_THRESHOLD, **options: Any) -> Iterator[ImportItem]:
        data_dir = root if root is not None else packaged_elpv_dir()
        labels = data_dir / "labels.csv"
        if not labels.is_file():
            raise InvalidInput(f"{data_dir}: no labels.csv (expected the elpv-dataset data folder)")
        for lineno, line in enumerate(labels.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                rel, prob_text, cell_type = parts
                prob = float(prob_text)
            except ValueError:
                raise InvalidInput(f"{labels}:{lineno}: expected 'PATH PROBABILITY TYPE', got {line!r}") from None
            if not 0.0 <= prob <= 1.0:
                raise InvalidInput(f"{labels}:{lineno}: defect probability {prob} is outside [0, 1]")
            path = data_dir / rel
            defective = prob >= threshold
            yield ImportItem(
                image=Blob(str(path), path=path),
                label=Label.defect if defective else Label.normal,
                defect_class="cell_defect" if defective else None,
                image_attrs={"cell_type": cell_type},
                annotation_attrs={"defect_probability": prob},
            )
