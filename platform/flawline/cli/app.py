"""Typer plumbing shared by every command group: one-line errors, consoles, JSON output."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from flawline.errors import FlawlineError

# Retries are ours to report: urllib3's own retry warnings would break the one-line error rule.
logging.getLogger("urllib3").setLevel(logging.ERROR)
# Ray's job client logs every package upload at INFO ("... already exists, skipping upload"), in the
# middle of the CLI's own output; flawline says what its jobs do itself.
logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)

console = Console()
err_console = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    # Plain echo, not rich: one line, never re-wrapped.
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class FlawlineTyper(typer.Typer):
    """A Typer whose commands turn flawline errors into ``error: <one line>`` and exit code 1."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("no_args_is_help", True)
        kwargs.setdefault("pretty_exceptions_enable", False)
        kwargs.setdefault("rich_markup_mode", "rich")
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def wrapper(*a: Any, **kw: Any) -> Any:
                try:
                    return fn(*a, **kw)
                except FlawlineError as err:
                    _fail(str(err), err.exit_code)
                except KeyboardInterrupt:
                    _fail("interrupted", 130)

            register(wrapper)
            return _with_real_defaults(fn)

        return decorator


def _with_real_defaults(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as other commands call it from Python (``quickstart`` runs ``data split``, ``serve
    predict``, …): a parameter the caller leaves out gets its ``typer.Option``/``typer.Argument``
    default, never the ``OptionInfo`` object itself. Raises ``TypeError`` for a required one left out."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def direct(*a: Any, **kw: Any) -> Any:
        bound = signature.bind_partial(*a, **kw)
        for name, param in signature.parameters.items():
            if name in bound.arguments:
                continue
            default = param.default
            if isinstance(default, typer.models.ParameterInfo):
                default = default.default
            if default is inspect.Parameter.empty or default is ...:
                raise TypeError(f"{fn.__name__}() needs {name!r}")
            bound.arguments[name] = default
        return fn(*bound.args, **bound.kwargs)

    return direct


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
