"""What an importer yields, and the registry importers add themselves to.

An importer only *describes* a source (which files, which labels, which masks); checking,
de-duplicating, uploading and cataloguing is done once for all of them by ``flawline.data.ingest``.
Adding a layout = writing one module with a ``@register_importer`` class and importing it in
``flawline/data/importers/__init__.py``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from flawline.catalog.enums import Label, Split
from flawline.errors import InvalidInput
from flawline.registry import Registry

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class Blob:
    """Bytes from a file, or bytes already in memory (e.g. from a package)."""

    name: str  # shown in errors: a path, or package:item
    path: Path | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        try:
            return self.path.read_bytes()
        except OSError as err:
            raise InvalidInput(f"{self.name}: cannot read file ({err.strerror or err})") from None


@dataclass
class ImportItem:
    """One image as an importer found it."""

    image: Blob
    label: Label | None  # None: unlabeled
    defect_class: str | None = None
    mask: Blob | None = None
    split: Split | None = None
    image_attrs: dict[str, Any] = field(default_factory=dict)
    annotation_attrs: dict[str, Any] = field(default_factory=dict)
    # Axis-aligned boxes in pixels of the shown frame: [{"x", "y", "w", "h", "label"}] (x, y: the
    # top-left corner), as Label Studio pulls store them; checked against the image's size on import.
    boxes: list[dict[str, Any]] | None = None
    # The annotation file the labels, boxes or mask came from (an import lists it as used).
    annotation: Blob | None = None
    # This image's defect-free reference image: the ``image.name`` of another item of the same
    # scan. The import stores the reference's content hash (image attribute ``reference``).
    reference: str | None = None


class Importer:
    """Base class; subclasses set ``name`` and implement ``scan``."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_path: ClassVar[bool] = True
    # ``--layout auto`` tries layouts in (detect_priority, name) order and takes the first match:
    # a layout named by a file of its own (a manifest) sets a lower number than layouts guessed
    # from folder names, so it wins when a folder matches both.
    detect_priority: ClassVar[int] = 100

    def __init__(self) -> None:
        # Files a scan read besides those its items name (a class list, a dataset YAML): counted as
        # used, so an import does not list them as left out.
        self.side_files: list[Path] = []

    def detect(self, root: Path) -> bool:
        """Whether ``root`` looks like this layout (used by ``--layout auto``)."""
        return False

    def detect_problem(self, root: Path) -> str | None:
        """When ``detect`` said no: a file that would have made ``root`` this layout but could not
        be read (e.g. a malformed annotation JSON), as one line; None otherwise."""
        return None

    def scan(self, root: Path | None, **options: Any) -> Iterator[ImportItem]:
        raise NotImplementedError

    def unused_reason(self, root: Path, path: Path) -> str:
        """Why ``path``, a file below ``root`` that no item uses, was left out."""
        return unused_reason(root, path, self.name)

    def default_dataset_name(self, root: Path | None) -> str:
        return root.resolve().name if root is not None else self.name


IMPORTERS: Registry[type[Importer]] = Registry("layout", InvalidInput)
register_importer = IMPORTERS.register  # class decorator
importer_names = IMPORTERS.names


def get_importer(name: str) -> Importer:
    return IMPORTERS.get(name)()


def detect_layout(root: Path) -> Importer:
    """The importer whose layout ``root`` matches: among the matching layouts of the lowest
    ``detect_priority``, the only one; InvalidInput when none matches or several do."""
    if not root.is_dir():
        raise InvalidInput(f"{root}: not a directory")
    ordered = sorted(IMPORTERS.values(), key=lambda cls: (cls.detect_priority, cls.name))
    matches = [imp for cls in ordered if cls.needs_path and (imp := cls()).detect(root)]
    # a layout named by a file of its own (detect_priority below the default) wins outright
    matches = [m for m in matches if m.detect_priority == matches[0].detect_priority] if matches else matches
    if not matches:
        problems = [p for cls in ordered if cls.needs_path and (p := cls().detect_problem(root))]
        raise InvalidInput(
            f"{root}: layout not recognised; expected one of {', '.join(importer_names())} "
            "(pass --layout to choose)" + (f"; {problems[0]}" if problems else "")
        )
    if len(matches) > 1:
        raise InvalidInput(f"{root}: looks like several layouts ({', '.join(m.name for m in matches)}); "
                           "pass --layout to choose")
    return matches[0]


def iter_files(folder: Path) -> Iterator[Path]:
    """Every regular, non-hidden file below ``folder``, in a stable order."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            yield path


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _listing(folder: Path) -> dict[tuple[str, str], Path]:
    """(NFC stem, lower-case suffix) → file, for the image files directly in ``folder``."""
    try:
        mtime = folder.stat().st_mtime_ns
    except OSError:
        return {}
    cached = _LISTINGS.get(folder)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    index = {(_nfc(p.stem), p.suffix.lower()): p for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    _LISTINGS[folder] = (mtime, index)
    return index


_LISTINGS: dict[Path, tuple[int, dict[tuple[str, str], Path]]] = {}


def find_mask(folder: Path, stem: str) -> Path | None:
    """The mask of the image named ``stem``: ``stem.png`` or ``stem_mask.png`` (any image suffix,
    any case) in ``folder``. Names compare in Unicode NFC, so a mask saved by a system that writes
    another normal form (macOS: NFD) still matches its image."""
    index = _listing(folder)
    for base in (_nfc(stem), _nfc(f"{stem}_mask")):
        for suffix in sorted(IMAGE_SUFFIXES):
            if (base, suffix) in index:
                return index[(base, suffix)]
    return None


def unused_reason(root: Path, path: Path, layout: str) -> str:
    """Why an import left a file of its source out (``import_dataset`` lists every such file)."""
    parts = {p.lower() for p in path.relative_to(root).parts[:-1]}
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return "not an image file type"
    if parts & {"masks", "ground_truth"} or path.stem.lower().endswith("_mask"):
        return "a mask that matches no image"
    return f"not where the {layout!r} layout looks for images"

