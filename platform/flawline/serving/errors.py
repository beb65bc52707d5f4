"""What a serving request can fail with, and the HTTP status each failure answers with (and, for
the gRPC API, the gRPC status code that status maps to).

Every error is a ``FlawlineError`` with a one-line message; the server answers
``{"error": message, "status": code}`` (gRPC: that code and the message as its details) and keeps
serving.
"""

from __future__ import annotations

from flawline.errors import FlawlineError, InvalidInput, NotFound, StorageError, StorageUnavailable


class RequestError(InvalidInput):
    """The request cannot be used (400 unless a subclass says otherwise)."""

    status = 400


class PayloadTooLarge(RequestError):
    status = 413


class UnsupportedMediaType(RequestError):
    status = 415


class ReferenceRefused(RequestError):
    """The request's reference image cannot be used (none for a model that compares each image with
    its reference, one for a model that does not, one that cannot be read or decoded): it is shared by
    every image of the request, so the request fails as a whole. 400 unless ``status`` says otherwise
    (404: a missing S3 key)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ModelUnavailable(FlawlineError):
    """A registered model version whose artifact cannot be loaded: 503 for that model only."""

    status = 503


def http_status(err: BaseException) -> int:
    """The status a serving error answers with (500: a bug or an unexpected failure)."""
    status = getattr(err, "status", None)
    if isinstance(status, int):
        return status
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, InvalidInput):
        return 400
    if isinstance(err, StorageUnavailable):
        return 503
    if isinstance(err, StorageError):
        # A missing object is the client's key; anything else is the S3 server's trouble.
        return 404 if "does not exist" in str(err) else 502
    return 500


# A bad image or request (400, 413 over a limit, 415) is the client's argument; 502/503: S3 or the
# model cannot serve now.
_GRPC_CODES = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT",
               415: "INVALID_ARGUMENT", 502: "UNAVAILABLE", 503: "UNAVAILABLE"}


def grpc_code(status: int) -> str:
    """The name of the ``grpc.StatusCode`` an HTTP status answers with over gRPC."""
    return _GRPC_CODES.get(status, "INTERNAL")


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__
