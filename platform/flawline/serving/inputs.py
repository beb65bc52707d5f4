"""Request bodies → checked image bytes, before any model sees them.

A prediction request carries one image: the raw bytes (``image/*`` or
``application/octet-stream``), a ``multipart/form-data`` upload (field ``image`` or ``file``, else
the first part with a file name), or a JSON body ``{"uri": "s3://bucket/key"}`` naming an object in
flawline's bucket. Everything is bounded: the body size, and the pixel count read from the image
header before a pixel is decoded (a 100,000 x 100,000 PNG is a few hundred bytes). A bad request
raises a ``RequestError`` with the HTTP status it answers with and a one-line message.

A batch inspection request (``images_from_batch_request``) carries many images, each answered on
its own: a bad one gets its own status and the others their verdicts.

The gRPC API's messages carry the image (or its URI) as a field instead of a body:
``image_from_source`` and ``images_from_sources`` read them, with the same limits and messages.

A model that compares each image with its defect-free reference image (``Detector.uses_reference``)
needs the request to name that reference: an s3:// URI in the server's store (``?reference=`` over
HTTP, ``reference_uri`` over gRPC), one per request, shared by all its images. ``reference_policy``
says whether the model takes one, ``reference_from_uri`` reads and checks it as images are checked.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from flawline.data.images import MAX_PIXELS, MIN_SIDE, SUPPORTED_MODES, verify_image
from flawline.errors import FlawlineError
from flawline.serving.errors import (
    PayloadTooLarge,
    ReferenceRefused,
    RequestError,
    UnsupportedMediaType,
    http_status,
    one_line,
)

if TYPE_CHECKING:
    from flawline.storage import ObjectStore

MAX_REQUEST_BYTES = 32 * 2**20
ACCEPTED = "image/* or application/octet-stream (raw bytes), multipart/form-data (field 'image'), " \
           "application/json {\"uri\": \"s3://...\"}"
# Modes decode_image turns into 1 or 3 channels; anything else (RGBA, CMYK, ...) is refused up front.


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_image_pixels: int = MAX_PIXELS


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    name: str
    format: str
    width: int
    height: int


def _params(header: str) -> Message:
    msg = Message()
    msg["content-type"] = header
    return msg


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str | None, str | None, bytes]]:
    """``multipart/form-data`` → [(field name, file name, bytes)], exactly as sent (no re-encoding)."""
    boundary = _params(content_type).get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise RequestError("multipart/form-data body without a boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise RequestError("multipart/form-data body has no parts (boundary not found)")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise RequestError("multipart/form-data part without a header/body separator")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        name = filename = None
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = Message()
                disposition["content-disposition"] = value.strip()
                name = disposition.get_param("name", header="content-disposition")
                filename = disposition.get_param("filename", header="content-disposition")
        parts.append((name if isinstance(name, str) else None, filename if isinstance(filename, str) else None,
                      data))
    return parts


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"JSON body does not parse ({err.__class__.__name__}: {err})") from None


def image_from_request(content_type: str | None, body: bytes, fetch: Callable[[str], bytes], *,
                       limits: Limits = Limits()) -> tuple[bytes, str]:
    """The image bytes a request carries and a name for messages (file name, s3 URI or "image")."""
    if len(body) > limits.max_request_bytes:
        raise PayloadTooLarge(f"request body of {len(body)} bytes exceeds the limit of {limits.max_request_bytes}")
    kind = media_type(content_type)
    if not kind:
        raise UnsupportedMediaType(f"no Content-Type; send {ACCEPTED}")
    if kind.startswith("image/") or kind == "application/octet-stream":
        return body, "image"
    if kind == "multipart/form-data":
        parts = parse_multipart(body, content_type or "")
        named = [p for p in parts if p[0] in ("image", "file")] or [p for p in parts if p[1]]
        if not named:
            raise RequestError("multipart/form-data body has no image part; send the file as field 'image'")
        _, filename, data = named[0]
        return data, filename or "image"
    if kind == "application/json":
        doc = _json(body)
        uri = doc.get("uri") if isinstance(doc, dict) else None
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise RequestError('JSON body must be {"uri": "s3://bucket/key"}')
        return fetch(uri), uri
    raise UnsupportedMediaType(f"Content-Type {kind} is not accepted; send {ACCEPTED}")


BATCH_ACCEPTED = "multipart/form-data (one part per image, each with a file name or named 'image'/'file') or " \
                 "application/json {\"uris\": [\"s3://...\", ...]}"


def images_from_batch_request(content_type: str | None, body: bytes, fetch: Callable[[str], bytes], *,
                              limits: Limits = Limits(), max_images: int = 64) -> list[tuple[str, bytes | Exception]]:
    """The images a batch inspection request carries, in order: [(name, bytes, or the error that
    image alone answers with)]. An image S3 cannot give (a missing key, another bucket) fails
    alone. The request as a whole fails (``RequestError`` 400, ``PayloadTooLarge`` 413,
    ``UnsupportedMediaType`` 415) only when it is not one of ``BATCH_ACCEPTED``, carries no image,
    more than ``max_images``, or more than ``limits.max_request_bytes``."""
    if len(body) > limits.max_request_bytes:
        raise PayloadTooLarge(f"request body of {len(body)} bytes exceeds the limit of {limits.max_request_bytes}")
    kind = media_type(content_type)
    if kind == "multipart/form-data":
        parts: list[tuple[str, bytes | None, str]] = [
            (filename or name or "image", data, "") for name, filename, data in parse_multipart(body, content_type or "")
            if filename or name in ("image", "file", "images")]
    elif kind == "application/json":
        doc = _json(body)
        uris = doc.get("uris") if isinstance(doc, dict) else None
        if not isinstance(uris, list):
            raise RequestError('JSON body must be {"uris": ["s3://bucket/key", ...]}')
        wrong = next((i for i, u in enumerate(uris) if not isinstance(u, str)), None)
        if wrong is not None:
            raise RequestError(f'"uris" entry {wrong} is {type(uris[wrong]).__name__}, not a string; '
                               'send {"uris": ["s3://bucket/key", ...]}')
        parts = [(uri, None, uri) for uri in uris]
    else:
        raise UnsupportedMediaType(f"a batch request is {BATCH_ACCEPTED}, not {kind or 'a body without Content-Type'}")
    return _gather(parts, fetch, max_images, BATCH_ACCEPTED)


def _fetched(uri: str, fetch: Callable[[str], bytes]) -> bytes:
    if not uri.startswith("s3://"):
        raise RequestError(f"{uri}: not an s3:// URI")
    return fetch(uri)


def _gather(parts: list[tuple[str, bytes | None, str]], fetch: Callable[[str], bytes], max_images: int,
            accepted: str) -> list[tuple[str, bytes | Exception]]:
    """A batch's images [(name, bytes, or None to fetch the s3:// URI)] → [(name, bytes, or the
    error that image alone answers with)], once the batch as a whole is accepted (an image, at
    most ``max_images``)."""
    if not parts:
        raise RequestError(f"the batch request carries no image; send {accepted}")
    if len(parts) > max_images:
        raise PayloadTooLarge(f"the batch request carries {len(parts)} images, more than the limit of {max_images}")
    found: list[tuple[str, bytes | Exception]] = []
    for name, data, uri in parts:
        try:
            found.append((name, data if data is not None else _fetched(uri, fetch)))
        except Exception as err:  # noqa: BLE001 — this image only (a missing key, another bucket)
            found.append((name, err))
    return found


def image_from_source(data: bytes, uri: str, name: str, fetch: Callable[[str], bytes]) -> tuple[bytes, str]:
    """An image given as its encoded bytes or an s3:// URI (a gRPC ``Image``) → its bytes and a
    name for messages (``name``, else the URI, else "image"); ``check_image`` bounds its size."""
    return (_fetched(uri, fetch), name or uri) if uri else (data, name or "image")


GRPC_ACCEPTED = "images, each its bytes (data) or an s3:// uri"


def images_from_sources(sources: list[tuple[bytes, str, str]], fetch: Callable[[str], bytes], *,
                        limits: Limits = Limits(), max_images: int = 64) -> list[tuple[str, bytes | Exception]]:
    """A gRPC batch's images [(bytes, uri, name)] → [(name, bytes or the error that image alone
    answers with)], under ``images_from_batch_request``'s limits (the images' bytes together count
    as its body)."""
    total = sum(len(data) for data, _, _ in sources)
    if total > limits.max_request_bytes:
        raise PayloadTooLarge(f"the batch request's images are {total} bytes, over the limit of "
                              f"{limits.max_request_bytes}")
    return _gather([(name or uri, None, uri) if uri else (name or "image", data, "") for data, uri, name in sources],
                   fetch, max_images, GRPC_ACCEPTED)


def fetch_from_store(store: ObjectStore, uri: str) -> bytes:
    """The object an s3:// URI names in ``store``'s bucket: what a request may name (an image, a
    reference). ``RequestError`` for anything outside the bucket; the store's errors as they are
    (a missing key answers 404)."""
    prefix = store.uri("")
    if not uri.startswith(prefix) or uri == prefix:
        raise RequestError(f"{uri}: this server reads images from {prefix}... only")
    return store.get_bytes(store.key_from_uri(uri))


REFERENCE_WANTED = "pass ?reference=s3://... (gRPC: reference_uri; flawline predict --reference)"


def reference_policy(model: str, method: str, uses_reference: bool, given: bool) -> None:
    """Refuse (``ReferenceRefused``) a request for ``model`` without a reference image when its
    detector ``method`` compares each image with its reference, and one with a reference when it
    does not (a reference silently ignored would hide a client's mistake)."""
    if uses_reference and not given:
        raise ReferenceRefused(f"{model} compares each image with its defect-free reference: {REFERENCE_WANTED}")
    if given and not uses_reference:
        raise ReferenceRefused(f"{model} does not use a reference image ({method} scores each image alone): "
                               "leave out ?reference (gRPC: reference_uri)")


def reference_from_uri(uri: str, fetch: Callable[[str], bytes], *, limits: Limits = Limits()) -> CheckedImage:
    """The request's reference image: the s3:// ``uri`` fetched (``fetch`` decides which bucket it
    may name) and checked as images are (``check_image``). Every error names it ("reference
    <uri>...") and is ``ReferenceRefused`` with its status (400; 404 for a missing key; 413 over a limit)."""
    name = f"reference {uri}"
    if not uri.startswith("s3://"):
        raise ReferenceRefused(f"{name}: not an s3:// URI; name the golden image stored in this server's bucket")
    try:
        return check_image(fetch(uri), name, limits=limits)
    except FlawlineError as err:
        message = one_line(err)
        if not message.startswith(name):
            message = f"reference {message}" if message.startswith(uri) else f"{name}: {message}"
        raise ReferenceRefused(message, http_status(err)) from None


def check_image(data: bytes, name: str = "image", *, limits: Limits = Limits()) -> CheckedImage:
    """Header and whole-stream checks: size bound (413), format, mode, truncation (400)."""
    if not data:
        raise RequestError(f"{name}: empty body (0 bytes), expected an image")
    if len(data) > limits.max_request_bytes:
        raise PayloadTooLarge(f"{name}: {len(data)} bytes exceeds the limit of {limits.max_request_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we bound pixels ourselves
            with Image.open(io.BytesIO(data)) as img:
                (width, height), fmt, mode = img.size, img.format or "UNKNOWN", img.mode
    except Image.DecompressionBombError as err:
        raise PayloadTooLarge(f"{name}: {str(err).split(',')[0]}") from None
    except UnidentifiedImageError:
        raise RequestError(f"{name}: not an image (cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RequestError(f"{name}: unreadable image ({first})") from None
    if width * height > limits.max_image_pixels:
        raise PayloadTooLarge(f"{name}: {width}x{height} pixels exceeds the limit of {limits.max_image_pixels}")
    if min(width, height) < MIN_SIDE:
        raise RequestError(f"{name}: image is {width}x{height}, smaller than {MIN_SIDE} px a side")
    if mode not in SUPPORTED_MODES:  # the one decoding policy (flawline.data.images); pixels are checked at decode
        raise RequestError(f"{name}: image mode {mode} is not supported; send gray, RGB, palette, CMYK, 1-bit or "
                           "16-bit gray images (an alpha channel must be fully opaque)")
    verify_image(data, name, fmt)  # truncation: JPEG end marker, PNG chunk CRCs through IEND
    return CheckedImage(data, name, fmt, width, height)


def parse_flag(value: str | None, name: str) -> bool:
    """A query flag: true/1/yes/on or false/0/no/off (absent = false)."""
    if value is None or value == "":
        return False
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise RequestError(f"query parameter {name}={value!r}: expected true or false")
