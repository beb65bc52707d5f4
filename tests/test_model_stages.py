"""Model stages: promote a version to production (archiving the one it replaces), roll back to the
version before, in the catalog and through `flawline models promote / rollback`."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from flawline.catalog import Catalog, ModelStage, ModelVersion
from flawline.catalog.model_versions import production_version, promote, register_version, rollback
from flawline.cli.main import app
from flawline.errors import InvalidInput, NotFound


def _register(catalog: Catalog, name: str, n: int) -> None:
    with catalog.session() as s:
        for _ in range(n):
            register_version(s, name=name, artifact_uri=f"s3://b/models/{name}.pt", method="patchcore",
                             backbone=None, threshold=None, metrics=None)


def _stages(catalog: Catalog, name: str) -> dict[int, str]:
    with catalog.session() as s:
        return {r.version: r.stage.value for r in s.scalars(select(ModelVersion).where(ModelVersion.name == name))}


def test_promote_archives_the_previous_production_version(catalog):
    _register(catalog, "m", 3)
    _register(catalog, "other", 1)
    with catalog.session() as s:
        assert production_version(s, "m") is None
        assert promote(s, "m:1").stage is ModelStage.production
    with catalog.session() as s:
        row = promote(s, "m")  # bare name: the newest version
        assert (row.version, row.stage) == (3, ModelStage.production)
    assert _stages(catalog, "m") == {1: "archived", 2: "candidate", 3: "production"}
    with catalog.session() as s:
        promote(s, "m:3")  # promoting the production version changes nothing
        promote(s, "other")  # another name's stages are its own
    assert _stages(catalog, "m") == {1: "archived", 2: "candidate", 3: "production"}
    assert _stages(catalog, "other") == {1: "production"}


def test_rollback_returns_to_the_version_before(catalog):
    _register(catalog, "m", 4)
    with catalog.session() as s:
        for v in (1, 3, 4):
            promote(s, f"m:{v}")
    with catalog.session() as s:
        row = rollback(s, "m")
        assert (row.version, row.stage) == (3, ModelStage.production)
    assert _stages(catalog, "m") == {1: "archived", 2: "candidate", 3: "production", 4: "archived"}
    with catalog.session() as s:  # candidates were never in production: skipped
        assert rollback(s, "m").version == 1
    assert _stages(catalog, "m") == {1: "production", 2: "candidate", 3: "archived", 4: "archived"}
    with catalog.session() as s, pytest.raises(InvalidInput, match=r"cannot roll back m:1: no earlier version"):
        rollback(s, "m")


def test_stage_errors(catalog):
    _register(catalog, "m", 2)
    with catalog.session() as s:
        with pytest.raises(NotFound, match="no model 'm:7'; m has version\\(s\\) 1, 2$"):
            promote(s, "m:7")
        with pytest.raises(NotFound, match="no model 'nope'"):
            promote(s, "nope")
        with pytest.raises(NotFound, match="no model 'nope'"):
            rollback(s, "nope")
        with pytest.raises(InvalidInput, match="model 'm' has no production version to roll back"):
            rollback(s, "m")
    assert _stages(catalog, "m") == {1: "candidate", 2: "candidate"}


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_promote_and_rollback_cli(settings_env):
    catalog = Catalog(settings_env.catalog_url)
    try:
        _register(catalog, "tiles", 2)
    finally:
        catalog.dispose()
    result = _run("models", "promote", "tiles:1")
    assert result.exit_code == 0, result.output
    assert "tiles:1 candidate → production" in result.stdout
    result = _run("models", "promote", "tiles")
    assert result.exit_code == 0, result.output
    assert "tiles:2 candidate → production; tiles:1 production → archived" in result.stdout
    assert "already in production" in _run("models", "promote", "tiles:2").stdout
    listed = {i["model"]: i["stage"] for i in json.loads(_run("models", "list", "--json").stdout)}
    assert listed == {"tiles:1": "archived", "tiles:2": "production"}

    result = _run("models", "rollback", "tiles")
    assert result.exit_code == 0, result.output
    assert "tiles:2 production → archived; tiles:1 archived → production" in result.stdout
    listed = {i["model"]: i["stage"] for i in json.loads(_run("models", "list", "--json").stdout)}
    assert listed == {"tiles:1": "production", "tiles:2": "archived"}

    result = _run("models", "rollback", "tiles")
    assert result.exit_code == 1
    assert result.stderr.strip() == ("error: cannot roll back tiles:1: no earlier version of 'tiles' was in "
                                     "production (none archived below it)")
    result = _run("models", "promote", "tiles:9")
    assert result.exit_code == 1 and "error: no model 'tiles:9'" in result.stderr
