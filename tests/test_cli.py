"""The CLI end to end: help, up/down/status against a real local S3 server, data commands, and the
README's main job (quickstart) on a slice of the Magnetic Tile set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from flawline.cli.main import app
from flawline.config import get_settings
from flawline.storage.local_s3 import LocalS3Server


def _run(*args):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("args", [[], ["data"], ["db"], ["data", "import"], ["data", "split"], ["up"], ["status"]])
def test_help_explains(args):
    result = _run(*args, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_data_commands(settings_env, folder_tree):
    result = _run("data", "import", str(folder_tree), "--dataset", "parts", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["new_images"] == 8
    listing = json.loads(_run("data", "list", "--json").stdout)
    assert [d["name"] for d in listing] == ["parts"]
    assert _run("data", "split", "parts", "--seed", "7").exit_code == 0
    shown = json.loads(_run("data", "show", "parts", "--json").stdout)
    assert shown["split_info"]["seed"] == 7 and sum(shown["by_split"].values()) == 8
    table = _run("data", "show", "parts")
    assert "scratch 2" in table.stdout


@pytest.fixture
def local_env(monkeypatch, tmp_path):
    """Settings for `flawline up` on free ports with its own data directory."""
    ports = LocalS3Server.on_free_ports(tmp_path)
    env = {
        "FLAWLINE_DATA_DIR": str(tmp_path / "data"),
        "FLAWLINE_S3_ENDPOINT": f"127.0.0.1:{ports.s3_port}",
        "FLAWLINE_LOCAL_S3_MASTER_PORT": str(ports.master_port),
        "FLAWLINE_LOCAL_S3_VOLUME_PORT": str(ports.volume_port),
        "FLAWLINE_LOCAL_S3_FILER_PORT": str(ports.filer_port),
        "FLAWLINE_LABELSTUDIO_URL": "http://127.0.0.1:9",
        "FLAWLINE_RAY_DASHBOARD_URL": "http://127.0.0.1:9",
    }
    for key in list(os.environ):
        if key.startswith("FLAWLINE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield env
    LocalS3Server.from_settings(get_settings()).stop()
    get_settings.cache_clear()


def test_up_status_down(local_env):
    up = _run("up")
    assert up.exit_code == 0, up.output
    assert "S3 server started" in up.stdout and "schema 0002" in up.stdout
    again = _run("up")
    assert "already running" in again.stdout
    status = _run("status", "--json")
    assert status.exit_code == 0, status.output
    states = {r["service"]: r["state"] for r in json.loads(status.stdout)}
    assert states == {"S3": "ok", "catalog": "ok", "Ray": "idle", "Label Studio": "idle"}
    assert "stopped" in _run("down").stdout
    after = _run("status", "--json")
    assert after.exit_code == 1
    assert {r["service"]: r["state"] for r in json.loads(after.stdout)}["S3"] == "down"


def test_up_refuses_a_busy_port(local_env, s3_server, monkeypatch):
    monkeypatch.setenv("FLAWLINE_S3_ENDPOINT", s3_server.endpoint)
    get_settings.cache_clear()
    result = _run("up")
    assert result.exit_code == 1
    assert f"s3 port {s3_server.s3_port}" in result.stderr and "already in use" in result.stderr


def test_quickstart_main_job(local_env, magnetic_tile_slice):
    """The README's main command, as a user runs it (a real process), on a Magnetic Tile slice."""
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "flawline.cli", "quickstart", "--source", str(magnetic_tile_slice)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "7 new images" in proc.stdout
    assert "blowhole 2, crack 2" in proc.stdout
    assert "normal-only train" in proc.stdout


def test_data_survives_a_restart(local_env, folder_tree):
    from flawline.context import open_catalog, open_store
    from sqlalchemy import select
    from flawline.catalog import Image

    assert _run("up").exit_code == 0
    assert _run("data", "import", str(folder_tree), "--dataset", "kept").exit_code == 0
    assert _run("down").exit_code == 0
    assert _run("up").exit_code == 0
    with open_catalog().session() as s:
        keys = list(s.scalars(select(Image.object_key)))
    store = open_store()
    assert len(keys) == 8 and all(store.exists(k) for k in keys)
