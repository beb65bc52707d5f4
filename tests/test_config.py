"""Settings: environment, config file, derived defaults, secrets never printed."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flawline.cli.main import app
from flawline.config import get_settings, load_settings
from flawline.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for key in list(__import__("os").environ):
        if key.startswith("FLAWLINE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_defaults_describe_the_embedded_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAWLINE_DATA_DIR", str(tmp_path / "d"))
    s = load_settings()
    assert s.catalog_url == f"sqlite:///{tmp_path / 'd' / 'catalog.db'}"
    assert s.s3_endpoint.startswith("127.0.0.1:")
    assert s.ray_address is None


def test_environment_and_config_file(tmp_path, monkeypatch):
    cfg = tmp_path / "flawline.toml"
    cfg.write_text('s3_bucket = "from-file"\ns3_endpoint = "minio.example:9000"\nupload_workers = 7\n')
    monkeypatch.setenv("FLAWLINE_CONFIG", str(cfg))
    monkeypatch.setenv("FLAWLINE_S3_BUCKET", "from-env")
    s = load_settings()
    assert s.s3_bucket == "from-env"  # environment beats the file
    assert s.s3_endpoint == "minio.example:9000"
    assert s.upload_workers == 7


def test_missing_config_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAWLINE_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="nope.toml.*does not exist"):
        load_settings()


def test_invalid_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("FLAWLINE_UPLOAD_WORKERS", "lots")
    with pytest.raises(ConfigError, match="FLAWLINE_UPLOAD_WORKERS"):
        load_settings()


def test_secrets_never_printed(monkeypatch, tmp_path):
    monkeypatch.setenv("FLAWLINE_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("FLAWLINE_S3_SECRET_KEY", "very-secret-s3")
    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_TOKEN", "very-secret-token")
    monkeypatch.setenv("FLAWLINE_CATALOG_URL", "postgresql://u:very-secret-pw@db/flawline")
    for args in (["config", "show"], ["config", "show", "--json"]):
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 0, out.output
        assert "very-secret" not in out.output
        assert "********" in out.output or "***" in out.output
    assert "very-secret" not in repr(load_settings())


def test_presigned_urls_use_the_public_s3_url(settings_env, store, monkeypatch, s3_server):
    """Label Studio's browsers reach S3 by another name than the cluster (minio:9000 inside,
    a public host outside): presigned URLs are signed for that name and work there."""
    import urllib.request

    from flawline.storage import ObjectStore

    store.put_bytes("probe.txt", b"seen", "text/plain")
    port = s3_server.endpoint.rsplit(":", 1)[1]
    monkeypatch.setenv("FLAWLINE_S3_PUBLIC_URL", f"http://localhost:{port}")
    public = ObjectStore.from_settings(load_settings())
    url = public.presigned_get("probe.txt")
    assert url.startswith(f"http://localhost:{port}/")
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"seen"
    assert store.presigned_get("probe.txt").startswith(f"http://{s3_server.endpoint}/")
    monkeypatch.setenv("FLAWLINE_S3_PUBLIC_URL", "minio:9000")
    with pytest.raises(ConfigError, match="s3_public_url must look like http://host:port"):
        load_settings()
