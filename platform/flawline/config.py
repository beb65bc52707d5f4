"""One typed configuration for the whole platform.

Values come, highest priority first, from: keyword arguments, ``FLAWLINE_*`` environment
variables, a TOML config file (``FLAWLINE_CONFIG``, else ``~/.config/flawline/config.toml``), and
the defaults below, which describe the embedded single-machine setup (local S3 server started by
``flawline up``, SQLite catalog, local Ray).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from flawline.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("~/.config/flawline/config.toml").expanduser()


def _config_file() -> Path | None:
    explicit = os.environ.get("FLAWLINE_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} (from FLAWLINE_CONFIG) does not exist")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


class Settings(BaseSettings):
    """Platform settings. Secrets are ``SecretStr`` so they never print."""

    model_config = SettingsConfigDict(env_prefix="FLAWLINE_", extra="forbid", validate_default=True)

    data_dir: Path = Field(
        default=Path("~/.flawline"), description="Local state: SQLite catalog, S3 server data, logs."
    )
    catalog_url: str | None = Field(
        default=None, repr=False,  # may carry a password; redacted() shows it masked
        description="SQLAlchemy URL of the catalog; default SQLite in data_dir.",
    )

    s3_endpoint: str = Field(default="127.0.0.1:9000", description="host:port of the S3 server.")
    s3_access_key: str = "flawline"
    s3_secret_key: SecretStr = SecretStr("flawline-local-secret")
    s3_bucket: str = "flawline"
    s3_secure: bool = Field(default=False, description="Use https for S3.")
    s3_region: str | None = None
    s3_public_url: str | None = Field(
        default=None, description="Base URL (http[s]://host:port) at which browsers reach the S3 server, for the "
        "presigned image URLs Label Studio shows annotators; default: the endpoint flawline uses. Set it when "
        "that endpoint is a cluster-internal name (minio:9000).")

    # Ports of the embedded SeaweedFS server that `flawline up` starts (S3 port comes from
    # s3_endpoint). Set explicitly: its defaults (8080, 9333, 8888) collide with other services.
    local_s3_master_port: int = 19333
    local_s3_volume_port: int = 18081
    local_s3_filer_port: int = 18888

    ray_address: str | None = Field(
        default=None, description="Ray cluster (GCS) address for drivers; unset: the local cluster."
    )
    ray_dashboard_url: str = Field(
        default="http://127.0.0.1:8265", description="Ray dashboard and Job Submission API (jobs go here)."
    )
    # The local Ray head that `flawline up` starts; 6390, not Ray's 6379, which Redis often holds.
    local_ray_port: int = 6390
    local_ray_cpus: int | None = Field(default=None, description="Logical CPUs of the local Ray head.")
    ray_autoscaling: bool = Field(
        default=False, description="The Ray cluster adds nodes on demand (an autoscaling KubeRay cluster): a job "
        "asking for what no node has now is submitted to wait for one instead of being refused.")
    jobs_dir: Path | None = Field(
        default=None, description="Folder with the jobs/ entry scripts, for running a job by hand or from "
        "another scheduler; flawline's own submissions run the installed package's modules and do not read it."
    )

    # Ray Serve's HTTP proxy (`flawline serve up`; `flawline predict` calls it). Set explicitly: Serve's
    # default 8000 collides with other services. When set, it overrides the port in serve/config.yaml.
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(default=18000, ge=1, le=65535)
    # Its gRPC proxy (serve/flawline.proto; `flawline predict --grpc`), when the config turns gRPC on.
    # When set, it overrides grpc_options.port in serve/config.yaml.
    serve_grpc_port: int = Field(default=18001, ge=1, le=65535)

    labelstudio_url: str = "http://127.0.0.1:18080"
    labelstudio_token: SecretStr | None = Field(
        default=None, description="Legacy API token or personal access token (refresh token)."
    )
    labelstudio_bin: Path | None = Field(
        default=None, description="The `label-studio` program `flawline up --label-studio` starts "
        "(default: .venv-labelstudio beside flawline's venv, then PATH)."
    )

    upload_workers: int = Field(default=16, ge=1, le=256, description="Parallel S3 uploads.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @model_validator(mode="after")
    def _derive(self) -> "Settings":
        if self.s3_public_url:
            from urllib.parse import urlparse

            url = urlparse(self.s3_public_url)
            if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
                raise ValueError(f"s3_public_url must look like http://host:port, not {self.s3_public_url!r}")
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.catalog_url:
            self.catalog_url = f"sqlite:///{self.data_dir / 'catalog.db'}"
        return self

    @property
    def serve_url(self) -> str:
        return f"http://{self.serve_host}:{self.serve_port}"

    @property
    def serve_grpc_address(self) -> str:
        return f"{self.serve_host}:{self.serve_grpc_port}"

    @property
    def s3_url(self) -> str:
        return f"{'https' if self.s3_secure else 'http'}://{self.s3_endpoint}"

    def redacted(self) -> dict[str, Any]:
        """Settings as plain values with every secret masked, for display."""
        out: dict[str, Any] = {}
        for name, value in self:
            if isinstance(value, SecretStr):
                out[name] = "********" if value.get_secret_value() else ""
            elif value is None:
                out[name] = None
            else:
                out[name] = str(value) if isinstance(value, Path) else value
        out["catalog_url"] = _mask_url_password(str(self.catalog_url))
        return out


def _mask_url_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is reported when it is used, not here
        return url


def load_settings(**overrides: Any) -> Settings:
    """Build settings, turning validation problems into one-line ConfigErrors."""
    try:
        return Settings(**overrides)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"invalid setting {where} (FLAWLINE_{where.upper()}): {first['msg']}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return load_settings()
