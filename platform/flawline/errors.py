"""Errors a user sees. Each carries a one-line message that names the file or cause."""

from __future__ import annotations


class FlawlineError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits non-zero."""

    exit_code = 1

    def __str__(self) -> str:  # always one line, whatever the cause's text held
        return " ".join(super().__str__().split())


class ConfigError(FlawlineError):
    """The settings are missing or malformed."""


class StorageError(FlawlineError):
    """The S3 server failed a request."""


class StorageUnavailable(StorageError):
    """The S3 server cannot be reached."""


class StorageAuthError(StorageError):
    """The S3 server refused the access keys."""


class CatalogError(FlawlineError):
    """The SQL catalog cannot be used."""


class SchemaOutOfDate(CatalogError):
    """The catalog's schema is older (or newer) than this code."""


class InvalidInput(FlawlineError):
    """A file or argument given by the user cannot be used."""


class ImportConflict(InvalidInput):
    """The same image appears with conflicting labels."""


class NotFound(FlawlineError):
    """A named dataset, run or model does not exist."""


class ServiceError(FlawlineError):
    """A local service (S3 server, ...) failed to start or stop."""


class LabelStudioError(FlawlineError):
    """Label Studio refused or failed a request."""


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio cannot be reached."""


class LabelStudioAuthError(LabelStudioError):
    """Label Studio refused the token, or the token lacks the rights for the request."""
