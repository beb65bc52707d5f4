"""Builds the platform's parts from settings: one place that knows how they are wired."""

from __future__ import annotations

from flawline.catalog import Catalog
from flawline.config import Settings, get_settings
from flawline.storage import ObjectStore


def open_catalog(settings: Settings | None = None, *, check: bool = True) -> Catalog:
    """The catalog, refusing a schema that differs from this code's (unless ``check=False``)."""
    settings = settings or get_settings()
    return Catalog(str(settings.catalog_url), check=check)


def open_store(settings: Settings | None = None) -> ObjectStore:
    return ObjectStore.from_settings(settings or get_settings())
