"""A Label Studio connection whose failures are one-line flawline errors.

The SDK (label-studio-sdk 2.x) takes either kind of token: a legacy API token is sent as
``Authorization: Token …``; a personal access token (a JWT refresh token) is exchanged for
short-lived access tokens, refreshed as they expire."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from flawline.config import Settings
from flawline.errors import LabelStudioAuthError, LabelStudioError, LabelStudioUnavailable, NotFound

T = TypeVar("T")


def _detail(body: Any) -> str:
    if isinstance(body, dict):
        if errors := body.get("validation_errors"):
            return "; ".join(f"{k}: {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in errors.items())
        return str(body.get("detail") or body)
    return str(body)[:300]


class LabelStudioClient:
    """The SDK client plus ``call``, which names the action and the server in every error."""

    def __init__(self, url: str, token: str, *, timeout: float = 60.0, max_retries: int = 2) -> None:
        if not token:
            raise LabelStudioAuthError(f"no Label Studio token for {url}; set FLAWLINE_LABELSTUDIO_TOKEN "
                                       "(a personal access token or a legacy API token)")
        self.url = url.rstrip("/")
        self.sdk = LabelStudio(base_url=self.url, api_key=token, timeout=timeout, max_retries=max_retries)

    @classmethod
    def from_settings(cls, settings: Settings) -> LabelStudioClient:
        token = settings.labelstudio_token.get_secret_value() if settings.labelstudio_token else None
        if token is None:  # the embedded server's own admin token, when that is the one configured
            from flawline.labelstudio.server import LocalLabelStudio

            try:
                local = LocalLabelStudio.from_settings(settings)
                token = local.token if (local.root / "token").is_file() else None
            except Exception:  # noqa: BLE001 - not a local URL: the token must come from the settings
                token = None
        return cls(settings.labelstudio_url, token or "")

    def call(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ApiError as err:
            where = f"Label Studio at {self.url}"
            if err.status_code == 401:
                raise LabelStudioAuthError(f"{where} refused the token during {action}; check "
                                           "FLAWLINE_LABELSTUDIO_TOKEN") from None
            if err.status_code == 403:
                raise LabelStudioAuthError(f"{where}: the token has no rights to {action} "
                                           f"({_detail(err.body)})") from None
            if err.status_code == 404:
                raise NotFound(f"{where}: not found during {action} ({_detail(err.body)})") from None
            raise LabelStudioError(f"{where} failed {action}: HTTP {err.status_code} {_detail(err.body)}") from None
        except httpx.TransportError as err:
            raise LabelStudioUnavailable(
                f"Label Studio at {self.url} is not reachable ({type(err).__name__}) during {action}; is it "
                "running? (`flawline up --label-studio` starts the local one)") from None
        except LabelStudioError:
            raise
        except Exception as err:  # token exchange and parsing errors surface as plain exceptions
            if "401" in str(err) or "token" in str(err).lower():
                raise LabelStudioAuthError(f"Label Studio at {self.url} refused the token during {action}: "
                                           f"{err}") from None
            raise

    def whoami(self) -> str:
        user = self.call("check the token", lambda: self.sdk.users.whoami())
        return str(user.email or user.username)

    def iter_tasks(self, project_id: int, action: str = "list tasks", fields: str = "all") -> Iterator[Any]:
        """Every task of a project (``fields="all"``: with its annotations), pages fetched as read."""
        pages = self.call(action, lambda: self.sdk.tasks.list(project=project_id, fields=fields, page_size=100))
        iterator = iter(pages)
        while True:
            try:
                item = self.call(action, lambda: next(iterator))
            except StopIteration:
                return
            yield item
