"""``KEY=VALUE`` settings as users type them (``--option``, benchmark variants): one parser."""

from __future__ import annotations

import json
from typing import Any

from flawline.errors import InvalidInput


def parse_options(pairs: list[str], flag: str = "--option") -> dict[str, Any]:
    """``["k=v", ...]`` → ``{k: v}``; values parse as JSON where they can (``1e-3``, ``true``,
    ``[1,2]``), else stay strings. Raises ``InvalidInput`` naming ``flag`` for a pair without ``=``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{flag} {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
