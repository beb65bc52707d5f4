"""The embedded Label Studio for single-machine runs and tests: the ``label-studio`` server from its
own virtual environment (it pins many packages of its own), bound to loopback on an explicit port,
with SQLite and media under the data directory and an admin user whose legacy token is set at start.
Production points ``FLAWLINE_LABELSTUDIO_URL`` at a real server and never starts this."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from flawline.cluster.process import port_in_use, running_pid, spawn_service, stop_pid_file
from flawline.config import Settings
from flawline.errors import ServiceError

VENV_NAME = ".venv-labelstudio"  # beside the project's .venv; `.ci/install` makes it


def find_labelstudio_binary(explicit: Path | None = None) -> Path:
    """``label-studio`` from FLAWLINE_LABELSTUDIO_BIN, the venv beside ours, or PATH."""
    candidates = [explicit] if explicit else []
    candidates.append(Path(sys.prefix).parent / VENV_NAME / "bin" / "label-studio")
    if found := shutil.which("label-studio"):
        candidates.append(Path(found))
    for path in candidates:
        if path and path.is_file():
            return path
    raise ServiceError("Label Studio not found: install it in its own virtual environment "
                       f"(`python -m venv {VENV_NAME} && {VENV_NAME}/bin/pip install label-studio`, "
                       "which `.ci/install` does) or set FLAWLINE_LABELSTUDIO_BIN")


@dataclass
class LocalLabelStudio:
    """One Label Studio server on loopback."""

    root: Path
    port: int
    host: str = "127.0.0.1"
    username: str = "admin@flawline.local"
    binary: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalLabelStudio:
        url = urlparse(settings.labelstudio_url)
        if url.hostname not in ("127.0.0.1", "localhost") or not url.port:
            raise ServiceError(f"FLAWLINE_LABELSTUDIO_URL={settings.labelstudio_url} is not a local address "
                               "with a port; only a local Label Studio is started here")
        return cls(root=settings.data_dir.expanduser() / "labelstudio", port=url.port,
                   binary=settings.labelstudio_bin)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.root / "labelstudio.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "labelstudio.log"

    def _secret(self, name: str, nbytes: int) -> str:
        """A secret made once and kept (0600) beside the server's data, so restarts keep the same user."""
        path = self.root / name
        if not path.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(nbytes))
            path.chmod(0o600)
        return path.read_text().strip()

    @property
    def token(self) -> str:
        """The admin's legacy API token (40 hex characters, the length Label Studio's tokens have)."""
        return self._secret("token", 20)

    @property
    def password(self) -> str:
        return self._secret("password", 12)

    def pid(self) -> int | None:
        return running_pid(self.pid_file)

    def is_running(self) -> bool:
        return self.pid() is not None

    def command(self) -> list[str]:
        return [str(find_labelstudio_binary(self.binary)), "start", "--no-browser",
                "--data-dir", str(self.root / "data"), "--internal-host", self.host, "--port", str(self.port),
                "--username", self.username, "--password", self.password, "--user-token", self.token,
                "--enable-legacy-api-token", "--log-level", "WARNING"]

    def start(self, timeout: float = 180.0) -> bool:
        """Start the server unless it runs already; returns True if it was started now."""
        if self.is_running():
            self.wait_ready(timeout)
            return False
        if port_in_use(self.host, self.port):
            raise ServiceError(f"cannot start Label Studio: port {self.port} is already in use on {self.host}; "
                               "set FLAWLINE_LABELSTUDIO_URL to another port")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
                   LABEL_STUDIO_BASE_DATA_DIR=str(self.root / "data"), DJANGO_DB="sqlite",
                   # its webhooks call flawline on loopback, which SSRF protection refuses (this
                   # server itself listens on loopback only)
                   SSRF_PROTECTION_ENABLED="false")
        proc = spawn_service(self.command(), self.log_file, self.pid_file, self.root, env)
        try:
            self.wait_ready(timeout, proc=proc)
        except ServiceError:
            self.stop()
            raise
        return True

    def wait_ready(self, timeout: float, proc: subprocess.Popen | None = None) -> None:
        """Wait until the API answers with the admin's token (migrations run on a first start)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise ServiceError(f"Label Studio exited with code {proc.returncode}; see {self.log_file}")
            req = urllib.request.Request(f"{self.url}/api/current-user/whoami",
                                         headers={"Authorization": f"Token {self.token}"})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}"
            except (urllib.error.URLError, OSError) as err:
                last = type(err).__name__
            time.sleep(1.0)
        raise ServiceError(f"Label Studio did not become ready in {timeout:.0f}s ({last}); see {self.log_file}")

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the server (its whole process group); returns False if it was not running."""
        return stop_pid_file(self.pid_file, timeout)
