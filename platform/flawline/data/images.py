"""Decode and check image bytes: the one place that decides whether a file is a usable image.

Two levels, so an import checks every file without decoding every pixel twice:
- ``identify_image``: header only (format, size, bands) — catches empty, non-image and absurd files;
- ``verify_image``: the whole byte stream — JPEG must end in its EOI marker, PNG chunks must pass
  their CRCs up to IEND, other formats are fully decoded; ``full_decode`` decodes every format.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from flawline.errors import InvalidInput

# Decompression-bomb bound: a file claiming more pixels than this is refused before decoding.
MAX_PIXELS = 64_000_000
MIN_SIDE = 8

_CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp", "TIFF": "image/tiff",
                  "WEBP": "image/webp", "GIF": "image/gif"}
_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "GIF": ".gif"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    byte_size: int
    width: int
    height: int
    channels: int
    format: str
    mode: str

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPES.get(self.format, "application/octet-stream")

    @property
    def suffix(self) -> str:
        return _SUFFIX.get(self.format, ".bin")


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
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            fmt, mode = img.format or "UNKNOWN", img.mode
            channels = len(img.getbands())
    except UnidentifiedImageError:
        raise InvalidInput(f"{name}: not an image file (cannot identify format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidInput(f"{name}: unreadable {what} ({_first_line(err)})") from None
    if width * height > MAX_PIXELS:
        raise InvalidInput(f"{name}: {width}x{height} pixels exceeds the limit of {MAX_PIXELS}")
    if what == "image" and min(width, height) < MIN_SIDE:
        raise InvalidInput(f"{name}: image is {width}x{height}, smaller than {MIN_SIDE} px a side")
    return ImageInfo(sha256_hex(data), len(data), width, height, channels, fmt, mode)


def verify_image(data: bytes, name: str, fmt: str, *, full_decode: bool = False, what: str = "image") -> None:
    """Check that the whole stream is there and intact (see module docstring)."""
    if fmt == "JPEG" and not full_decode:  # no need to parse the header again
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise InvalidInput(f"{name}: {what} file is truncated (JPEG end marker missing)")
        return
    try:
        with Image.open(io.BytesIO(data)) as img:
            if full_decode or fmt not in ("JPEG", "PNG"):
                img.load()
            else:
                img.verify()  # PNG: every chunk's CRC, through IEND
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InvalidInput(f"{name}: unreadable {what} ({_first_line(err)})") from None


def _mask_image(data: bytes, name: str) -> Image.Image:
    """A mask as a single-channel image (non-zero = defect)."""
    if not data:
        raise InvalidInput(f"{name}: mask file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("L") if img.mode != "L" else img.copy()
    except UnidentifiedImageError:
        raise InvalidInput(f"{name}: mask is not an image file") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidInput(f"{name}: unreadable mask ({_first_line(err)})") from None


def canonical_mask(data: bytes, name: str) -> tuple[bytes, ImageInfo]:
    """Mask bytes as stored, a single-channel PNG (kept byte for byte when it already is one),
    and their description."""
    info = identify_image(data, name, what="mask")
    if info.format == "PNG" and info.mode in ("L", "1"):
        return data, info
    buf = io.BytesIO()
    _mask_image(data, name).point(lambda v: 255 if v else 0).save(buf, format="PNG")
    out = buf.getvalue()
    return out, identify_image(out, name, what="mask")


def mask_has_defect(data: bytes, name: str) -> bool:
    """Whether any mask pixel is non-zero."""
    fast = _png_gray8_any(data)
    return fast if fast is not None else _mask_image(data, name).getbbox() is not None


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
