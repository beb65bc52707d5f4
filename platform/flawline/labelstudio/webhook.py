"""The webhook endpoint Label Studio calls when annotations are created, updated or deleted.

A call only names what changed: the endpoint re-reads those tasks from Label Studio and applies
them like a pull does (so a forged or stale payload cannot write labels, and repeats are harmless).
A deletion whose payload names no task, and a deletion of tasks, fall back to a pull since the
watermark (which also drops deleted tasks from the ledger: ``pull.forget_deleted_tasks``)."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from flawline.catalog import Catalog, LabelProject
from flawline.labelstudio.client import LabelStudioClient
from flawline.labelstudio.pull import PullReport, fetch_and_apply, pull_annotations
from flawline.storage import ObjectStore

ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "ANNOTATIONS_CREATED", "TASKS_DELETED"]
SECRET_HEADER = "X-Flawline-Webhook-Secret"


def task_ids_of(payload: dict[str, Any]) -> list[int]:
    """Task ids a webhook payload names, wherever Label Studio put them."""
    ids: list[int] = []
    if isinstance(payload.get("task"), dict) and payload["task"].get("id") is not None:
        ids.append(int(payload["task"]["id"]))
    for item in [payload.get("annotation")] + list(payload.get("annotations") or []):
        if isinstance(item, dict):
            task = item.get("task")
            task = task.get("id") if isinstance(task, dict) else task
            if task is not None:
                ids.append(int(task))
    return list(dict.fromkeys(ids))


def handle_event(catalog: Catalog, store: ObjectStore, client: LabelStudioClient,
                 payload: dict[str, Any]) -> PullReport:
    project_id = (payload.get("project") or {}).get("id") if isinstance(payload.get("project"), dict) else None
    with catalog.session() as s:
        query = select(LabelProject).where(LabelProject.ls_url == client.url)
        if project_id is not None:
            query = query.where(LabelProject.ls_project_id == int(project_id))
        projects = list(s.scalars(query))
        for p in projects:
            s.expunge(p)
    report = PullReport()
    if not projects:
        report.errors.append(f"no flawline project for Label Studio project {project_id}")
        return report
    # A task deletion names tasks that can no longer be read: a pull lists what exists and forgets the rest.
    ids = [] if payload.get("action") == "TASKS_DELETED" else task_ids_of(payload)
    for project in projects:
        part = fetch_and_apply(catalog, store, client, project, ids) if ids else \
            pull_annotations(catalog, store, client, project)
        for key, value in part.__dict__.items():
            if isinstance(value, int):
                setattr(report, key, getattr(report, key) + value)
            elif isinstance(value, list):
                getattr(report, key).extend(value)
    return report


def make_app(catalog: Catalog, store: ObjectStore, client: LabelStudioClient, secret: str | None = None) -> FastAPI:
    """A FastAPI app with ``POST /labelstudio/webhook`` (and ``GET /healthz``)."""
    app = FastAPI(title="flawline Label Studio webhook")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/labelstudio/webhook")
    async def webhook(request: Request) -> dict[str, Any]:
        if secret is not None and not hmac.compare_digest(request.headers.get(SECRET_HEADER, ""), secret):
            raise HTTPException(status_code=403, detail=f"missing or wrong {SECRET_HEADER}")
        try:
            payload = await request.json()
        except ValueError:
            raise HTTPException(status_code=400, detail="the webhook body is not JSON") from None
        if not isinstance(payload, dict):
            raise HTTPException(status_code=400, detail="the webhook body is not a JSON object")
        report = await run_in_threadpool(handle_event, catalog, store, client, payload)
        return {"action": payload.get("action"), **report.as_dict()}

    return app


def register_webhook(catalog: Catalog, client: LabelStudioClient, project: LabelProject, url: str,
                     secret: str | None = None) -> int:
    """Point the project's webhook at ``url`` (one per project: re-registering replaces it)."""
    headers = {SECRET_HEADER: secret} if secret else {}
    with catalog.session() as s:
        row = s.get(LabelProject, project.id)
        if row.webhook_id is not None:
            try:
                client.call("remove the old webhook", lambda: client.sdk.webhooks.delete(id=row.webhook_id))
            except Exception:  # noqa: BLE001 - already gone in Label Studio
                pass
        hook = client.call("create a webhook", lambda: client.sdk.webhooks.create(
            url=url, project=row.ls_project_id, send_payload=True, send_for_all_actions=False, actions=ACTIONS,
            headers=headers, is_active=True))
        row.webhook_id = hook.id
        return int(hook.id)
