"""Alembic environment. flawline passes its engine in ``config.attributes['engine']``;
the alembic CLI may instead give ``sqlalchemy.url`` (or FLAWLINE_CATALOG_URL)."""

from __future__ import annotations

from alembic import context

from flawline.catalog.models import Base

config = context.config
target_metadata = Base.metadata


def _engine():
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    from flawline.catalog.db import make_engine
    from flawline.config import get_settings

    url = config.get_main_option("sqlalchemy.url") or get_settings().catalog_url
    return make_engine(url)


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = _engine()
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite alters tables by copy-and-move
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
