"""``flawline up|down|status``: the embedded local services and a health table of all of them."""

from __future__ import annotations

import typer
from rich.table import Table

from flawline.catalog import db as catalog_db
from flawline.cli.app import console, print_json
from flawline.config import get_settings
from flawline.health import check_all
from flawline.storage.local_s3 import LocalS3Server

_STYLE = {"ok": "green", "idle": "cyan", "degraded": "yellow", "down": "red"}


def up(timeout: float = typer.Option(60.0, help="Seconds to wait for the S3 server.")) -> None:
    """Start the local S3 server (SeaweedFS on loopback) and bring the catalog schema up to date."""
    settings = get_settings()
    server = LocalS3Server.from_settings(settings)
    started = server.start(timeout=timeout)
    console.print(f"S3 server {'started' if started else 'already running'} at {server.endpoint} "
                  f"(bucket {server.bucket}, data {server.root}, log {server.log_file})")
    engine = catalog_db.make_engine(str(settings.catalog_url))
    catalog_db.upgrade(engine)
    console.print(f"catalog ready at {engine.url.render_as_string(hide_password=True)} "
                  f"(schema {catalog_db.current_revision(engine)})")


def down() -> None:
    """Stop the local S3 server started by `flawline up` (its data stays in the data directory)."""
    server = LocalS3Server.from_settings(get_settings())
    console.print("S3 server stopped" if server.stop() else "S3 server was not running")


def status(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Health of S3, the catalog, Ray and Label Studio in one table; exits 1 if any is down."""
    results = check_all(get_settings())
    if as_json:
        print_json([r.__dict__ | {"ok": r.ok} for r in results])
    else:
        table = Table("service", "state", "endpoint", "detail")
        for r in results:
            table.add_row(r.service, f"[{_STYLE.get(r.state, 'white')}]{r.state}[/]", r.endpoint, r.detail)
        console.print(table)
    if any(r.state == "down" for r in results):
        raise typer.Exit(1)
