"""``flawline db``: catalog schema migrations."""

from __future__ import annotations

import typer

from flawline.cli.app import FlawlineTyper, console
from flawline.config import get_settings

app = FlawlineTyper(help="Catalog schema: apply or roll back Alembic migrations.")


def _engine():
    from flawline.catalog.db import make_engine

    return make_engine(str(get_settings().catalog_url))


@app.command()
def upgrade(revision: str = typer.Option("head", help="Target revision.")) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from flawline.catalog import db as catalog_db

    engine = _engine()
    before = catalog_db.current_revision(engine)
    catalog_db.upgrade(engine, revision)
    after = catalog_db.current_revision(engine)
    console.print(f"catalog {engine.url.render_as_string(hide_password=True)}: {before or 'empty'} → {after}")


@app.command()
def downgrade(revision: str = typer.Option("-1", help="Target revision, or -N steps back, or 'base'.")) -> None:
    """Roll migrations back to REVISION (drops what later revisions added)."""
    from flawline.catalog import db as catalog_db

    engine = _engine()
    before = catalog_db.current_revision(engine)
    catalog_db.downgrade(engine, revision)
    console.print(f"catalog: {before} → {catalog_db.current_revision(engine) or 'base'}")


@app.command()
def current() -> None:
    """Show the catalog's schema revision and the one this code needs."""
    from flawline.catalog import db as catalog_db

    engine = _engine()
    console.print(f"current: {catalog_db.current_revision(engine) or 'none'}  head: {catalog_db.head_revision()}")
