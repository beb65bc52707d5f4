"""Catalog connection, sessions and schema migrations (Alembic, scripts in ``migrations/``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from flawline.errors import CatalogError, SchemaOutOfDate

# Alembic's INFO lines ("Will assume non-transactional DDL.", "Context impl SQLiteImpl.") come with
# every schema check, so every Ray worker's log repeated them; flawline says what it migrated itself.
# A level the user set on the "alembic" logger is kept.
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)


def migrations_dir() -> Path:
    """Where the Alembic scripts live: ``migrations/`` at the repository root."""
    explicit = os.environ.get("FLAWLINE_MIGRATIONS_DIR")
    path = Path(explicit) if explicit else Path(__file__).resolve().parents[3] / "migrations"
    if not (path / "env.py").is_file():
        raise CatalogError(
            f"migration scripts not found at {path}; install flawline from its source tree "
            "(pip install -e .) or set FLAWLINE_MIGRATIONS_DIR"
        )
    return path


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get their folder created and foreign keys enforced."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise CatalogError(f"catalog URL {url!r} is not a valid SQLAlchemy URL") from None
    kwargs: dict = {"future": True, "pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the importer's writer
            cur.close()

    return engine


def alembic_config(engine: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(migrations_dir())).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as err:
        raise CatalogError(f"cannot reach the catalog at {_shown(engine)}: {_reason(err)}") from None


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    try:
        command.upgrade(alembic_config(engine), revision)
    except OperationalError as err:
        raise CatalogError(f"cannot migrate the catalog at {_shown(engine)}: {_reason(err)}") from None


def downgrade(engine: Engine, revision: str = "-1") -> None:
    from alembic import command

    command.downgrade(alembic_config(engine), revision)


def check_schema(engine: Engine) -> None:
    """Refuse to work on a catalog whose schema differs from the code's migrations head."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None:
        has_tables = bool(inspect(engine).get_table_names())
        what = "has tables but no schema version" if has_tables else "is empty"
        raise SchemaOutOfDate(f"catalog at {_shown(engine)} {what}; run `flawline db upgrade`")
    raise SchemaOutOfDate(
        f"catalog at {_shown(engine)} is at schema {current}, this flawline needs {head}; "
        "run `flawline db upgrade`"
    )


class Catalog:
    """The catalog database: an engine plus a session factory, schema-checked on first use."""

    def __init__(self, url: str, *, check: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if check:
            check_schema(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back if it raises."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as err:
            session.rollback()
            raise CatalogError(f"catalog write failed at {_shown(self.engine)}: {_reason(err)}") from err
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def ping(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except OperationalError as err:
            raise CatalogError(f"cannot reach the catalog at {_shown(self.engine)}: {_reason(err)}") from None

    def dispose(self) -> None:
        self.engine.dispose()


def _shown(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _reason(err: Exception) -> str:
    orig = getattr(err, "orig", None) or err
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
