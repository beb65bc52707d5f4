"""Dataset importers, one module per source layout, registered by name."""

from flawline.data.importers import (  # noqa: F401  (registration)
    boxes,
    coco,
    elpv,
    folder,
    labelstudio,
    magnetic_tile,
    manifest,
    mvtec,
    voc,
    yolo,
)
from flawline.data.importers.base import (
    Blob,
    Importer,
    ImportItem,
    detect_layout,
    get_importer,
    importer_names,
    register_importer,
)

__all__ = ["Blob", "ImportItem", "Importer", "detect_layout", "get_importer", "importer_names",
           "register_importer"]
