"""Migrations: upgrade, downgrade and upgrade again on SQLite and on the machine's PostgreSQL,
and the models never drift from what the migrations build."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect

from flawline.catalog import Catalog, current_revision, downgrade, head_revision, upgrade
from flawline.catalog.db import alembic_config, make_engine
from flawline.errors import SchemaOutOfDate

TABLES = {"datasets", "images", "annotations", "training_runs", "model_versions", "al_rounds",
          "al_queue_items", "ls_projects", "ls_tasks", "data_changes"}


def _round_trip(url: str) -> None:
    engine = make_engine(url)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert TABLES <= set(inspect(engine).get_table_names())
    command.check(alembic_config(engine))  # models and migrations agree

    downgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    assert {"datasets", "images", "annotations"} <= set(inspect(engine).get_table_names())
    assert "model_versions" not in inspect(engine).get_table_names()

    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert not (TABLES & set(inspect(engine).get_table_names()))

    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_sqlite_upgrade_downgrade_upgrade(tmp_path):
    _round_trip(f"sqlite:///{tmp_path / 'c.db'}")


def test_schema_checks_leave_no_alembic_chatter_in_logs(tmp_path, caplog):
    """Every Ray worker checks the schema; Alembic's INFO lines used to repeat in every run's log."""
    import logging

    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    with caplog.at_level(logging.DEBUG):
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    assert not [r for r in caplog.records if r.name.startswith("alembic") and r.levelno < logging.WARNING]
    engine.dispose()


@pytest.mark.postgres
def test_postgres_upgrade_downgrade_upgrade(pg_url):
    _round_trip(pg_url)


@pytest.mark.postgres
def test_postgres_catalog_writes_and_reads(pg_url, store, magnetic_tile_slice):
    from flawline.catalog.queries import get_dataset, summarize_dataset
    from flawline.data.ingest import import_dataset

    upgrade(make_engine(pg_url))
    catalog = Catalog(pg_url)
    report = import_dataset(catalog, store, magnetic_tile_slice, layout="magnetic-tile", workers=4)
    assert report.new_images == 7
    with catalog.session() as s:
        summary = summarize_dataset(s, get_dataset(s, "magnetic-tile"))
    assert summary.by_label == {"normal": 3, "defect": 4}
    catalog.dispose()


def test_older_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    upgrade(engine, "0001")
    with pytest.raises(SchemaOutOfDate, match=r"schema 0001, this flawline needs .*flawline db upgrade"):
        Catalog(url)


def test_empty_catalog_is_refused(tmp_path):
    with pytest.raises(SchemaOutOfDate, match="is empty; run `flawline db upgrade`"):
        Catalog(f"sqlite:///{tmp_path / 'empty.db'}")
