"""Dataset importers, one module per source layout, registered by name."""

from flawline.data.importers import elpv, folder, magnetic_tile, manifest, mvtec  # noqa: F401  (registration)
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
