"""What the annotation-file importers (coco, voc, yolo, boxes, labelstudio) share: reading their
files with one-line errors, boxes in flawline's form, polygons and RLE into masks, and the label
rule.

Conventions every one of them keeps:
- Coordinates are pixels of the shown frame (EXIF orientation applied, ``images.shown_size``),
  continuous: pixel ``(i, j)`` covers ``[i, i + 1) x [j, j + 1)``; a box is ``{x, y, w, h, label}``
  with ``(x, y)`` its top-left corner (what ``ImportItem.boxes`` and the catalog hold).
- A polygon's mask (``polygon_mask``, the one rasteriser, OpenCV's ``fillPoly``) holds each pixel
  at least half of which the polygon covers, measured on an 8 x 8 sub-pixel grid (4 x 4 for a
  polygon whose box exceeds 1 Mpx, 2 x 2 beyond 4 Mpx, whole pixels beyond 16 Mpx), so its pixel
  count is its area give or take the rounding of the pixels its outline crosses (a rectangle on
  whole pixels is exact); a polygon covering no pixel by half marks its most covered one, so no
  drawn region vanishes. Masks are stored as 0/255 PNGs (``mask_blob``).
- Label rule (``annotated_item``): an image with any box or mask region is a defect whose class
  is its first region's class (the class, when all regions share one); when regions name several
  classes they are kept in the annotation's ``attrs["classes"]``. An image whose annotation file
  lists no region is normal; one with no annotation at all is unlabeled.
"""

from __future__ import annotations

import io
import json
import math
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

from flawline.catalog.enums import Label, Split
from flawline.data.importers.base import IMAGE_SUFFIXES, Blob, ImportItem, iter_files
from flawline.errors import InvalidInput

if TYPE_CHECKING:
    import numpy as np

# numpy, OpenCV and PIL are imported by the functions that draw masks: every importer module is
# loaded to list the layouts (in `flawline data import --help`), most never draw one.

MAX_XML_BYTES = 8 * 1024 * 1024  # one image's VOC file is a few kB
BOX_DECIMALS = 2  # boxes are kept to 1/100 pixel
EDGE_TOLERANCE = 0.5  # how far outside the image a vertex may lie (rounding), as ingest.check_boxes
_SHIFT = 8  # fillPoly's fractional bits
_SUBPIXELS = ((1_000_000, 8), (4_000_000, 4), (16_000_000, 2))  # polygon box area (px) → grid side: ≤ 64 MB


# -- reading ------------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise InvalidInput(f"{path}: cannot read file ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise InvalidInput(f"{path}: not UTF-8 text (byte {err.start})") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise InvalidInput(f"{path}: malformed JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None


def json_problem(candidates: Iterable[Path]) -> str | None:
    """The first of ``candidates`` (JSON files) that does not parse, as its one-line error; None
    when every one parses. What a layout found by its JSON file says when detection failed."""
    for path in candidates:
        try:
            load_json(path)
        except (OSError, InvalidInput) as err:
            return str(err)
    return None


_LOADED: dict[Path, tuple[tuple[int, int], Any]] = {}  # the last JSON file load_json parsed


def load_json(path: Path) -> Any:
    """``read_json``, remembering the last file parsed (until it changes or ``forget_json``), so
    that detecting a layout and then scanning it parse a large file once. Callers do not change
    what it returns."""
    stat = path.stat()
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _LOADED.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    data = read_json(path)
    _LOADED.clear()
    _LOADED[path] = (key, data)
    return data


def forget_json() -> None:
    _LOADED.clear()


def json_files(folders: Iterable[Path], starts: bytes) -> list[Path]:
    """The non-hidden ``*.json`` files directly in ``folders`` whose text starts with ``starts``
    (``b"{"``: an object, ``b"["``: a list; a byte-order mark and white space skipped): the
    candidates a layout then parses."""
    found = []
    for folder in folders:
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            try:
                with path.open("rb") as fh:
                    head = fh.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
            except OSError:
                continue
            if path.is_file() and not path.name.startswith(".") and head.startswith(starts):
                found.append(path)
    return found


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of each non-blank line."""
    return [(n, line.strip()) for n, line in enumerate(read_text(path).splitlines(), start=1) if line.strip()]


def read_xml(path: Path) -> ElementTree.Element:
    """The root element of a small XML file, parsed safely: with ``defusedxml`` where it is
    installed, else with the standard parser after refusing DTDs and entity declarations (what
    entity-expansion attacks need; annotation files never carry them) and files over
    ``MAX_XML_BYTES``."""
    try:
        size = path.stat().st_size
        data = path.read_bytes() if size <= MAX_XML_BYTES else b""
    except OSError as err:
        raise InvalidInput(f"{path}: cannot read file ({err.strerror or err})") from None
    if size > MAX_XML_BYTES:
        raise InvalidInput(f"{path}: {size} bytes is too large for an annotation file (limit {MAX_XML_BYTES})")
    try:
        import defusedxml.ElementTree as safe_tree
    except ImportError:
        safe_tree = None
    if safe_tree is None and re.search(rb"<!(DOCTYPE|ENTITY)", data):
        raise InvalidInput(f"{path}: XML with a DTD or entity declaration is refused")
    try:
        if safe_tree is not None:
            return safe_tree.fromstring(data)
        return ElementTree.fromstring(data)
    except ElementTree.ParseError as err:
        raise InvalidInput(f"{path}: malformed XML ({err})") from None
    except Exception as err:  # noqa: BLE001 - defusedxml's refusals (DTDForbidden, EntitiesForbidden, ...)
        raise InvalidInput(f"{path}: XML refused ({type(err).__name__})") from None


def number(text: Any, where: str, what: str) -> float:
    """A finite number from ``text`` (a string or a JSON number), or InvalidInput naming ``where``."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InvalidInput(f"{where}: {what} is not a number ({text!r})") from None
    if isinstance(text, bool) or not math.isfinite(value):
        raise InvalidInput(f"{where}: {what} is not a finite number ({text!r})")
    return value


# -- images -------------------------------------------------------------------------------------
def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: Path) -> list[Path]:
    """Every image file below ``folder`` (non-hidden), in a stable order."""
    return [p for p in iter_files(folder) if is_image(p)] if folder.is_dir() else []


def image_size(path: Path) -> tuple[int, int, int]:
    """(width, height, orientation) in the shown frame, from the header."""
    from flawline.data.images import shown_size

    return shown_size(path)


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` resolves to somewhere below ``root`` (no ``..`` or link escapes)."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def url_file_name(uri: str) -> str:
    """The file name an image URI or path ends in: ``/data/upload/3/ab-x.png``, ``s3://b/k/x.png``,
    ``http://h/data/local-files/?d=dir/x.png`` (Label Studio's local files) → ``x.png``."""
    parsed = urllib.parse.urlparse(uri)
    query = urllib.parse.parse_qs(parsed.query)
    path = query["d"][0] if "d" in query else parsed.path or uri
    return urllib.parse.unquote(path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


class ImagesByName:
    """The image files below a folder, found by file name (for annotation files that name their
    images); two files of one name in different sub-folders make that name ambiguous."""

    def __init__(self, folder: Path) -> None:
        self.files = image_files(folder)
        self.by_name: dict[str, list[Path]] = {}
        for path in self.files:
            self.by_name.setdefault(path.name, []).append(path)

    def get(self, name: str, where: str) -> Path | None:
        found = self.by_name.get(name, [])
        if len(found) > 1:
            raise InvalidInput(f"{where}: image name {name!r} is ambiguous ({', '.join(map(str, found))})")
        return found[0] if found else None


# -- regions ------------------------------------------------------------------------------------
def pixel_box(x: float, y: float, w: float, h: float, label: str, where: str) -> dict[str, Any]:
    """A box in flawline's form; refuses a non-finite one or one without area, naming ``where``.
    Whether it lies inside its image is checked on import (``ingest.check_boxes``)."""
    if not all(map(math.isfinite, (x, y, w, h))):
        raise InvalidInput(f"{where}: box is not finite numbers")
    if w <= 0 or h <= 0:
        raise InvalidInput(f"{where}: box has no area (width {w:g}, height {h:g})")
    r = BOX_DECIMALS
    return {"x": round(x, r), "y": round(y, r), "w": round(w, r), "h": round(h, r), "label": str(label)}


def check_points(points: np.ndarray, width: int, height: int, where: str) -> None:
    """Polygon vertices (pixels, [N, 2]) lie inside the ``width`` x ``height`` image."""
    tol = EDGE_TOLERANCE
    if (points[:, 0].min() < -tol or points[:, 1].min() < -tol
            or points[:, 0].max() > width + tol or points[:, 1].max() > height + tol):
        raise InvalidInput(f"{where}: polygon lies outside the {width}x{height} image")


def polygon_points(flat: Sequence[Any], where: str) -> np.ndarray:
    """A flat ``[x1, y1, x2, y2, ...]`` list → [N, 2] float points (at least 3)."""
    import numpy as np

    if not isinstance(flat, (list, tuple)) or len(flat) < 6 or len(flat) % 2:
        raise InvalidInput(f"{where}: a polygon is a flat list of at least 3 x, y pairs")
    return np.array([number(v, where, "polygon coordinate") for v in flat], dtype=np.float64).reshape(-1, 2)


def polygon_mask(polygons: Iterable[np.ndarray], width: int, height: int) -> np.ndarray:
    """The union of ``polygons`` ([N, 2] pixel points each) as a bool [height, width] mask: the
    pixels at least half covered (module docstring)."""
    import cv2
    import numpy as np

    mask = np.zeros((height, width), dtype=bool)
    for points in polygons:
        x0, y0 = max(int(np.floor(points[:, 0].min())), 0), max(int(np.floor(points[:, 1].min())), 0)
        x1, y1 = min(int(np.ceil(points[:, 0].max())), width), min(int(np.ceil(points[:, 1].max())), height)
        if x1 <= x0 or y1 <= y0:
            continue
        area = (x1 - x0) * (y1 - y0)
        sub = next((s for limit, s in _SUBPIXELS if area <= limit), 1)
        canvas = np.zeros(((y1 - y0) * sub, (x1 - x0) * sub), dtype=np.uint8)
        # continuous coordinates on the sub-pixel grid, less half a sub-pixel: fillPoly's vertices
        # are sub-pixel centres
        centres = (points - (x0, y0)) * sub - 0.5
        fixed = np.round(centres * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)
        # fillPoly fills the sub-pixels its outline touches as well, half a sub-pixel too many on
        # each side; counting the outline's sub-pixels as half (2 inside, 1 on it) cancels that
        cv2.fillPoly(canvas, [fixed], 2, lineType=cv2.LINE_8, shift=_SHIFT)
        cv2.polylines(canvas, [fixed], True, 1, lineType=cv2.LINE_8, shift=_SHIFT)
        share = canvas.reshape(y1 - y0, sub, x1 - x0, sub).sum(axis=(1, 3), dtype=np.int64) / (2 * sub * sub)
        region = share >= 0.5
        if not region.any() and share.max() > 0:  # smaller than a pixel: its most covered pixel
            region[np.unravel_index(int(np.argmax(share)), share.shape)] = True
        mask[y0:y1, x0:x1] |= region
    return mask


def rle_string_counts(text: str) -> list[int]:
    """COCO's compressed RLE string → run lengths (pycocotools' ``rleFrString``): each count is
    5-bit groups, low first, as characters from '0' (48), 0x20 meaning "more groups follow" and
    0x10 in the last group the sign; from the fourth count on each is stored as the difference to
    the count two before it."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value = shift = 0
        more = True
        while more:
            if pos >= len(text):
                raise ValueError("the string ends inside a count")
            code = ord(text[pos]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {text[pos]!r} at {pos} is outside the encoding")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            pos += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_mask(rle: Any, width: int, height: int, where: str) -> np.ndarray:
    """A COCO RLE ``{"counts": [ints] or compressed string, "size": [h, w]}`` → bool [h, w] mask.
    Runs alternate background and foreground, starting with background, over the pixels in
    column-major order (down each column, then the next), as pycocotools writes them."""
    import numpy as np

    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise InvalidInput(f"{where}: segmentation is neither polygons nor an RLE with counts and size")
    size = rle["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise InvalidInput(f"{where}: RLE size is not [height, width] ({size!r})")
    if (size[0], size[1]) != (height, width):
        raise InvalidInput(f"{where}: RLE size is {size[1]}x{size[0]} but the image is {width}x{height}")
    raw = rle["counts"]
    if isinstance(raw, str):
        try:
            counts = rle_string_counts(raw)
        except ValueError as err:
            raise InvalidInput(f"{where}: malformed compressed RLE ({err})") from None
    elif isinstance(raw, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
        counts = raw
    else:
        raise InvalidInput(f"{where}: RLE counts are neither a list of integers nor a compressed string")
    if any(c < 0 for c in counts):
        raise InvalidInput(f"{where}: RLE has a negative run")
    if sum(counts) != width * height:
        raise InvalidInput(f"{where}: RLE runs cover {sum(counts)} pixels, the image {width * height}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((height, width), order="F")


def mask_blob(mask: np.ndarray, name: str) -> Blob:
    """A bool or 0/255 mask as the bytes of a single-channel 0/255 PNG, named ``name`` in errors."""
    import numpy as np
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), "L").save(buf, format="PNG")
    return Blob(name, data=buf.getvalue())


# -- items --------------------------------------------------------------------------------------
def annotated_item(image: Path, annotation: Path, boxes: list[dict[str, Any]], mask: np.ndarray | None,
                   classes: list[str], split: Split | None = None) -> ImportItem:
    """The item of an image its annotation file describes: a defect when it has a box or mask
    region (class: the first region's, ``classes`` in file order), else normal (module docstring)."""
    has_mask = mask is not None and bool(mask.any())
    defective = bool(boxes) or has_mask
    distinct = list(dict.fromkeys(classes))
    return ImportItem(
        image=Blob(str(image), path=image),
        label=Label.defect if defective else Label.normal,
        defect_class=distinct[0] if defective and distinct else None,
        mask=mask_blob(mask, f"{annotation} (mask of {image.name})") if has_mask else None,
        split=split,
        annotation_attrs={"classes": distinct} if defective and len(distinct) > 1 else {},
        boxes=boxes or None,
        annotation=Blob(str(annotation), path=annotation),
    )


def unlabeled_item(image: Path, split: Split | None = None) -> ImportItem:
    return ImportItem(image=Blob(str(image), path=image), label=None, split=split)
