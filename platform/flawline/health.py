"""Health of every service the platform talks to, for ``flawline status``."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlparse

from flawline.config import Settings
from flawline.errors import FlawlineError


@dataclass
class ServiceHealth:
    service: str
    state: str  # ok | down | degraded | idle
    endpoint: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.state in ("ok", "idle")


SLOW_TIMEOUT_S = 30.0  # a server that accepted the connection but did not answer in time gets this long


def _http_json(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, object]:
    """(HTTP status, parsed body). A refused connection fails at once; a server that is up but slow
    (the ``timeout`` passes) is asked once more with ``SLOW_TIMEOUT_S``, so a busy machine's service
    is not reported down. Raises ``OSError`` / ``URLError`` when it cannot be reached."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 (URLs from settings)
        except (TimeoutError, urllib.error.URLError) as err:
            if not isinstance(getattr(err, "reason", err), TimeoutError) or timeout >= SLOW_TIMEOUT_S:
                raise
            resp = urllib.request.urlopen(req, timeout=SLOW_TIMEOUT_S)  # noqa: S310
        with resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        return err.code, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")[:200]


def check_s3(settings: Settings) -> ServiceHealth:
    from flawline.storage import ObjectStore

    endpoint = f"{settings.s3_url}/{settings.s3_bucket}"
    try:
        store = ObjectStore.from_settings(settings, retries=0)  # answer fast when it is down
        exists = store.bucket_exists()
    except FlawlineError as err:
        return ServiceHealth("S3", "down", endpoint, str(err))
    return ServiceHealth("S3", "ok", endpoint, "bucket exists" if exists else "reachable; bucket not created yet")


def check_catalog(settings: Settings) -> ServiceHealth:
    from flawline.catalog.db import current_revision, head_revision, make_engine

    shown = Settings.redacted(settings)["catalog_url"]
    try:
        engine = make_engine(str(settings.catalog_url))
        try:
            current, head = current_revision(engine), head_revision()
        finally:
            engine.dispose()
    except FlawlineError as err:
        return ServiceHealth("catalog", "down", shown, str(err))
    if current == head:
        return ServiceHealth("catalog", "ok", shown, f"schema {current} (current)")
    if current is None:
        return ServiceHealth("catalog", "degraded", shown, "no schema yet; run `flawline db upgrade`")
    return ServiceHealth("catalog", "degraded", shown, f"schema {current}, code needs {head}; run `flawline db upgrade`")


def _tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_ray(settings: Settings) -> ServiceHealth:
    dash = settings.ray_dashboard_url.rstrip("/")
    try:
        status, body = _http_json(f"{dash}/api/version")
    except (OSError, urllib.error.URLError):
        status, body = 0, None
    version = body.get("ray_version") if isinstance(body, dict) else None
    if settings.ray_address and settings.ray_address != "auto":
        parsed = urlparse(settings.ray_address if "://" in settings.ray_address else f"x://{settings.ray_address}")
        reachable = bool(parsed.hostname and parsed.port and _tcp_open(parsed.hostname, parsed.port))
        if not reachable:
            return ServiceHealth("Ray", "down", settings.ray_address, "cluster address not reachable")
        return ServiceHealth("Ray", "ok", settings.ray_address,
                             f"cluster reachable; dashboard {dash}" + (f" (Ray {version})" if version else ""))
    if status == 200:
        return ServiceHealth("Ray", "ok", dash, f"local cluster running (Ray {version}); dashboard {dash}")
    return ServiceHealth("Ray", "idle", "local", "no cluster running; `flawline up` starts a local one")


def check_labelstudio(settings: Settings) -> ServiceHealth:
    url = settings.labelstudio_url.rstrip("/")
    try:
        status, body = _http_json(f"{url}/health")
    except (OSError, urllib.error.URLError) as err:
        reason = getattr(err, "reason", err)
        if not settings.labelstudio_token:  # not set up yet: only labelling needs it
            return ServiceHealth("Label Studio", "idle", url, "not running; needed only for labelling")
        return ServiceHealth("Label Studio", "down", url, f"not reachable ({reason})")
    if status != 200:
        return ServiceHealth("Label Studio", "down", url, f"/health answered HTTP {status}")
    from flawline.errors import LabelStudioAuthError, LabelStudioError
    from flawline.labelstudio.client import LabelStudioClient

    try:  # the settings' token, or the local server's own when that is the URL configured
        client = LabelStudioClient.from_settings(settings)
    except LabelStudioAuthError:
        return ServiceHealth("Label Studio", "degraded", url, "up; no token set (FLAWLINE_LABELSTUDIO_TOKEN)")
    try:
        user = client.whoami()
    except LabelStudioAuthError as err:
        detail = "token refused" if "refused" in str(err) else f"token not usable ({err})"
        return ServiceHealth("Label Studio", "degraded", url, f"up; {detail}; check FLAWLINE_LABELSTUDIO_TOKEN")
    except LabelStudioError as err:
        return ServiceHealth("Label Studio", "degraded", url, f"up; token check failed: {err}")
    except Exception as err:  # noqa: BLE001 - a health table reports, it never crashes
        return ServiceHealth("Label Studio", "degraded", url, f"up; token check failed ({type(err).__name__})")
    return ServiceHealth("Label Studio", "ok", url, f"up; token accepted (user {user})")


def check_all(settings: Settings) -> list[ServiceHealth]:
    return [check_s3(settings), check_catalog(settings), check_ray(settings), check_labelstudio(settings)]
