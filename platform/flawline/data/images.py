"""Decode and check image bytes: the one place that decides whether a file is a usable image.

Two levels, so an import checks every file without decoding every pixel twice:
- ``identify_image``: header only (format, size in the shown frame, bands) — catches empty,
  non-image and absurd files, and modes no policy converts;
- ``verify_image``: the whole byte stream — JPEG must end in its EOI marker, PNG chunks must pass
  their CRCs up to IEND, other formats are fully decoded; ``full_decode`` decodes every format.

One decoding policy (``to_canonical``), the same at import, training, scoring, serving and export:
- **Frame**: the shown one. An EXIF orientation tag is applied (as viewers and Label Studio do),
  so images, masks, boxes and pulled annotations all live in the frame people see.
- **Modes**: gray (``L``) and ``RGB`` as they are; 1-bit to gray; palette to RGB; CMYK and YCbCr
  to RGB; an alpha channel that is fully opaque is dropped. Transparent pixels have no clear
  conversion: refused, at import (``check_pixels``) as at prediction.
- **More than 8 bits** (16-bit gray): scaled by a white level, ``value / white`` clipped to [0, 1],
  where ``white`` is the dataset's range (``white_level``: the highest image's 99.9th percentile
  rounded up to a bit depth, stored with each image at import and with each model it trains), or
  the container's full scale (65535) when none is known. One hot pixel then changes the image
  only where it is.
- **Masks**: a pixel is a defect when it is non-zero (0/1 and 0/255 masks alike); masks are stored
  as 0/255 single-channel PNGs in the shown frame.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flawline.errors import InvalidInput

# Decompression-bomb bound: a file claiming more pixels than this is refused before decoding.
MAX_PIXELS = 64_000_000
MIN_SIDE = 8

_CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp", "TIFF": "image/tiff",
                  "WEBP": "image/webp", "GIF": "image/gif"}
_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "GIF": ".gif"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PLAIN_MODES = ("L", "RGB")  # decoded as they are
CONVERTED_MODES = ("1", "P", "CMYK", "YCbCr")  # a clear conversion, whatever the pixels
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")  # converted when the alpha is fully opaque
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # more than 8 bits: scaled by a white level
SUPPORTED_MODES = PLAIN_MODES + CONVERTED_MODES + ALPHA_MODES + WIDE_MODES
SUPPORTED_TEXT = "gray, RGB, palette, CMYK, 1-bit, 16-bit gray, or any of them with a fully opaque alpha"
FULL_SCALE = 65535  # a 16-bit container's white when the dataset's range is not known
WHITE_PERCENTILE = 99.9  # a dataset's range ignores a few hot pixels per image
ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ImageInfo:
    """A file's header facts; ``width`` x ``height`` in the shown frame (EXIF orientation applied),
    ``orientation`` the EXIF tag (1 = none)."""

    sha256: str
    byte_size: int
    width: int
    height: int
    channels: int
    format: str
    mode: str
    orientation: int = 1

    @property
    def stored_size(self) -> tuple[int, int]:
        """(width, height) of the pixels as stored (before the EXIF orientation)."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPES.get(self.format, "application/octet-stream")

    @property
    def suffix(self) -> str:
        return _SUFFIX.get(self.format, ".bin")


Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow refuses beyond twice this; we refuse beyond it, in one line


@contextlib.contextmanager
def open_image(data: bytes) -> Iterator[Image.Image]:
    """``Image.open`` on bytes, without Pillow's two-line decompression-bomb warning (every caller
    bounds the pixel count itself and says so in one line); a file beyond Pillow's own hard limit
    raises ``ValueError`` with the size, which callers turn into their one-line error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                yield img
        except Image.DecompressionBombError as err:
            raise ValueError(f"{str(err).split(' pixels')[0].replace('Image size (', '')} pixels exceeds the "
                             f"limit of {MAX_PIXELS}") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def identify_image(data: bytes, name: str, what: str = "image") -> ImageInfo:
    """Describe ``data`` from its header; ``name`` is for errors."""
    if not data:
        raise InvalidInput(f"{name}: {what} file is empty (0 bytes)")
    try:
        with open_image(data) as img:
            width, height = img.size
            fmt, mode = img.format or "UNKNOWN", img.mode
            channels = len(img.getbands())
            orientation = _orientation(img)
    except UnidentifiedImageError:
        raise InvalidInput(f"{name}: not an image file (cannot identify format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidInput(f"{name}: unreadable {what} ({_first_line(err)})") from None
    if width * height > MAX_PIXELS:
        raise InvalidInput(f"{name}: {width}x{height} pixels exceeds the limit of {MAX_PIXELS}")
    if what == "image" and min(width, height) < MIN_SIDE:
        raise InvalidInput(f"{name}: image is {width}x{height}, smaller than {MIN_SIDE} px a side")
    if what == "image" and mode not in SUPPORTED_MODES:
        raise InvalidInput(f"{name}: image mode {mode} is not supported ({SUPPORTED_TEXT})")
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return ImageInfo(sha256_hex(data), len(data), width, height, channels, fmt, mode, orientation)


def shown_size(path: Path, name: str | None = None) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) of the image file at ``path`` from its header alone, the
    size in the shown frame as ``identify_image`` gives it, without reading or hashing the whole
    file: for importers that turn relative or drawn annotations into pixels. ``name`` is for errors."""
    label = name or str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                width, height = img.size
                orientation = _orientation(img)
        except UnidentifiedImageError:
            raise InvalidInput(f"{label}: not an image file (cannot identify format)") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise InvalidInput(f"{label}: unreadable image ({_first_line(err)})") from None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return width, height, orientation


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(ORIENTATION_TAG, 1))
    except (OSError, SyntaxError, ValueError, TypeError):  # a broken EXIF block: the stored frame
        return 1
    return value if 1 <= value <= 8 else 1


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def to_shown_frame(img: Image.Image, orientation: int) -> Image.Image:
    """Pixels in the stored frame → the shown frame, for EXIF ``orientation`` (1..8; 1 = as is),
    as ``ImageOps.exif_transpose`` turns an image carrying that tag."""
    method = _TRANSPOSE.get(int(orientation))
    return img.transpose(method) if method is not None else img


def to_canonical(img: Image.Image, name: str, white: int | None = None) -> Image.Image:
    """The one decoding policy (module docstring): a loaded image → 8-bit ``L`` or ``RGB`` in the
    shown frame. ``white``: the value that becomes full brightness for images of more than 8 bits
    (None: ``FULL_SCALE``). Raises ``InvalidInput`` naming ``name`` for transparent pixels and
    modes without a clear conversion."""
    if _orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in PLAIN_MODES:
        return img
    if mode == "1":
        return img.convert("L")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("CMYK", "YCbCr"):
        return img.convert("RGB")
    elif mode in WIDE_MODES:
        arr = np.asarray(img, dtype=np.float64)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > FULL_SCALE):
            raise InvalidInput(f"{name}: 32-bit integer image with values outside 0..{FULL_SCALE}; not supported")
        scaled = np.clip(arr / float(white or FULL_SCALE), 0.0, 1.0)
        return Image.fromarray(np.round(scaled * 255.0).astype(np.uint8), "L")
    if img.mode in PLAIN_MODES:  # a palette without transparency
        return img
    if img.mode in ALPHA_MODES:
        lowest = img.getchannel("A").getextrema()[0]
        if lowest < 255:
            raise InvalidInput(f"{name}: image mode {mode} has transparent pixels (alpha down to {lowest}); "
                               "flatten it onto its background first")
        return img.convert("L" if img.mode in ("LA", "La") else "RGB")
    raise InvalidInput(f"{name}: image mode {mode} is not supported ({SUPPORTED_TEXT})")


def robust_high(img: Image.Image) -> int | None:
    """For images of more than 8 bits: the ``WHITE_PERCENTILE`` percentile of the stored values
    (a few hot pixels do not count); None for 8-bit images."""
    if img.mode not in WIDE_MODES:
        return None
    return int(np.percentile(np.asarray(img, dtype=np.float64), WHITE_PERCENTILE))


def white_level(highs: list[int | None]) -> int | None:
    """A dataset's white from its images' ``robust_high`` values: the highest, rounded up to a bit
    depth (2^b - 1, b >= 8); None when no image has more than 8 bits."""
    known = [h for h in highs if h is not None]
    if not known:
        return None
    return min(FULL_SCALE, 2 ** max(8, int(max(known)).bit_length()) - 1)


def check_pixels(data: bytes, name: str, info: ImageInfo) -> int | None:
    """Import-time decode of the files whose usability depends on their pixels (alpha channels,
    16-bit images): refuses what ``to_canonical`` would refuse later, so nothing is accepted at
    import and failed at training. Returns ``robust_high`` (16-bit images) or None."""
    if info.mode in PLAIN_MODES or (info.mode in CONVERTED_MODES and info.mode != "P"):
        return None
    try:
        with open_image(data) as img:
            img.load()
            to_canonical(img, name)
            return robust_high(img)
    except InvalidInput:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InvalidInput(f"{name}: unreadable image ({_first_line(err)})") from None


def verify_image(data: bytes, name: str, fmt: str, *, full_decode: bool = False, what: str = "image") -> None:
    """Check that the whole stream is there and intact (see module docstring)."""
    if fmt == "JPEG" and not full_decode:  # no need to parse the header again
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise InvalidInput(f"{name}: {what} file is truncated (JPEG end marker missing)")
        return
    try:
        with open_image(data) as img:
            if full_decode or fmt not in ("JPEG", "PNG"):
                img.load()
            else:
                img.verify()  # PNG: every chunk's CRC, through IEND
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InvalidInput(f"{name}: unreadable {what} ({_first_line(err)})") from None


def mask_image(data: bytes, name: str) -> Image.Image:
    """A mask as a 0/255 single-channel image in the shown frame: a pixel is a defect when it is
    non-zero in every mode (0/1 and 0/255 masks alike)."""
    if not data:
        raise InvalidInput(f"{name}: mask file is empty (0 bytes)")
    try:
        with open_image(data) as img:
            img.load()
            if _orientation(img) != 1:
                img = ImageOps.exif_transpose(img)
            arr = np.asarray(img)
            if "A" in img.getbands():  # transparency is no defect
                arr = arr[..., :-1]
            if arr.ndim == 3:
                arr = arr.any(axis=2)
            return Image.fromarray(np.where(arr != 0, 255, 0).astype(np.uint8), "L")
    except UnidentifiedImageError:
        raise InvalidInput(f"{name}: mask is not an image file") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidInput(f"{name}: unreadable mask ({_first_line(err)})") from None


def canonical_mask(data: bytes, name: str) -> tuple[bytes, ImageInfo]:
    """Mask bytes as stored, a 0/255 single-channel PNG in the shown frame (kept byte for byte when
    it already is one), and their description."""
    info = identify_image(data, name, what="mask")
    if info.format == "PNG" and info.mode == "L" and info.orientation == 1 and _png_gray8_values(data) <= {0, 255}:
        return data, info
    buf = io.BytesIO()
    mask_image(data, name).save(buf, format="PNG")
    out = buf.getvalue()
    return out, identify_image(out, name, what="mask")


def mask_has_defect(data: bytes, name: str) -> bool:
    """Whether any mask pixel is non-zero."""
    fast = _png_gray8_any(data)
    return fast if fast is not None else mask_image(data, name).getbbox() is not None


def _png_gray8_values(data: bytes) -> set[int]:
    """The distinct values of an 8-bit gray PNG (decoded)."""
    with open_image(data) as img:
        return {int(v) for v in np.unique(np.asarray(img))}


def _png_gray8_any(data: bytes) -> bool | None:
    """Fast path for 8-bit grayscale, non-interlaced PNG (most masks): inflate the pixel rows and
    look for a non-zero byte outside the per-row filter bytes. Starting from zero pixels every PNG
    filter maps all-zero deltas to zero pixels and a first non-zero delta to a non-zero pixel, so
    this equals "some pixel is non-zero". None means: not this kind of PNG, decode normally."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, chunks, size = 8, [], None
    try:
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos:pos + 8])
            body = data[pos + 8:pos + 8 + length]
            if kind == b"IHDR":
                width, height, depth, color, _c, _f, interlace = struct.unpack(">IIBBBBB", body)
                if depth != 8 or color != 0 or interlace != 0:
                    return None
                size = (width, height)
            elif kind == b"IDAT":
                chunks.append(body)
            elif kind == b"IEND":
                break
            pos += 12 + length
        if size is None:
            return None
        rows = np.frombuffer(zlib.decompress(b"".join(chunks)), np.uint8)
        return bool(rows.reshape(size[1], size[0] + 1)[:, 1:].any())
    except (struct.error, zlib.error, ValueError):
        return None  # let the normal decoder produce the error message
