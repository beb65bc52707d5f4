"""One registry shape for every pluggable part (importers, detectors, backbones, and later query
strategies): register by name with a decorator, look up by name with a helpful error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from flawline.errors import FlawlineError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, error: type[FlawlineError], key: Callable[[T], str] = lambda c: c.name) -> None:
        self.kind = kind
        self.error = error
        self.key = key
        self._items: dict[str, T] = {}

    def register(self, item: T) -> T:
        """Decorator (or call): add ``item`` under its name; a name may be taken only once."""
        name = self.key(item)
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = item
        return item

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise self.error(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None

    def values(self) -> list[T]:
        return [self._items[n] for n in self.names()]
