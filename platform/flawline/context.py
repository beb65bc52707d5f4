"""Builds the platform's parts from settings: one place that knows how they are wired.

Each part's module is imported when it is opened: a command that reads only the catalog does not
load the S3 client, and one that only stores objects does not load SQLAlchemy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flawline.config import Settings, get_settings

if TYPE_CHECKING:
    from flawline.catalog import Catalog
    from flawline.storage import ObjectStore


def open_catalog(settings: Settings | None = None, *, check: bool = True) -> Catalog:
    """The catalog, refusing a schema that differs from this code's (unless ``check=False``)."""
    from flawline.catalog import Catalog

    settings = settings or get_settings()
    return Catalog(str(settings.catalog_url), check=check)


def open_store(settings: Settings | None = None) -> ObjectStore:
    from flawline.storage import ObjectStore

    return ObjectStore.from_settings(settings or get_settings())
