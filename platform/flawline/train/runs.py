"""Training runs in the catalog: one row per run with its spec, status, Ray job id, progress and
final metrics; the model version it produced points back at it (``ModelVersion.run_id``)."""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select

from flawline.catalog import Catalog, RunStatus, TrainingRun
from flawline.catalog.queries import get_dataset
from flawline.errors import NotFound
from flawline.train.spec import TrainSpec

FINAL = (RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled)


def create_run(catalog: Catalog, spec: TrainSpec, method: str, plan_summary: dict[str, Any]) -> int:
    with catalog.session() as s:
        row = TrainingRun(dataset_id=get_dataset(s, spec.datasets[0]).id, method=method, setting=spec.setting,
                          config={"spec": spec.as_dict(), "plan": plan_summary}, status=RunStatus.pending)
        s.add(row)
        s.flush()
        # Ray Train's name for the run: its checkpoints live under <bucket>/ray-train/<name>, and a
        # trainer with the same name resumes from them (``runs resume``). Unique, so a new catalog
        # on an old bucket never resumes another run's checkpoints.
        row.config = {**row.config, "trainer_name": f"run-{row.id}-{secrets.token_hex(4)}"}
        return row.id


def get_run(catalog: Catalog, run_id: int) -> TrainingRun:
    with catalog.session() as s:
        row = s.get(TrainingRun, run_id)
        if row is None:
            raise NotFound(f"no training run {run_id}")
        s.expunge(row)
        return row


def trainer_name(row: TrainingRun) -> str:
    """The run's Ray Train name (its checkpoint folder); runs recorded before it was kept: run-<id>."""
    return (row.config or {}).get("trainer_name") or f"run-{row.id}"


def run_spec(row: TrainingRun) -> TrainSpec:
    return TrainSpec.from_dict(row.config["spec"])


def update_run(catalog: Catalog, run_id: int, **values: Any) -> None:
    """Set fields; a status moving to running/final also stamps started_at/finished_at."""
    now = datetime.now(timezone.utc)
    with catalog.session() as s:
        row = s.get(TrainingRun, run_id)
        if row is None:
            raise NotFound(f"no training run {run_id}")
        status = values.get("status")
        if status is RunStatus.running and row.started_at is None:
            row.started_at = now
        if status in FINAL:
            row.finished_at = now
        for key, value in values.items():
            setattr(row, key, value)


def record_progress(run_id: int, metrics: dict[str, Any], catalog: Catalog | None = None,
                    checkpoint: bool = True) -> None:
    """Called by rank 0 after each checkpoint: the run's latest epoch metrics and checkpoint count;
    ``checkpoint=False``: a stage without a checkpoint (``{"stage": "embedding", "images": 320}``)."""
    from flawline.context import open_catalog

    catalog = catalog or open_catalog()
    with catalog.session() as s:
        row = s.get(TrainingRun, run_id)
        if row is None:
            return
        current = dict(row.metrics or {})
        current["progress"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        if checkpoint:
            current["checkpoints"] = int(current.get("checkpoints", 0)) + 1
        row.metrics = current


def record_facts(run_id: int, catalog: Catalog | None = None, **facts: Any) -> None:
    """Merge facts about the run (e.g. the nodes its workers ran on) into its metrics."""
    from flawline.context import open_catalog

    catalog = catalog or open_catalog()
    with catalog.session() as s:
        row = s.get(TrainingRun, run_id)
        if row is not None:
            row.metrics = {**(row.metrics or {}), **facts}


def list_runs(catalog: Catalog, limit: int = 50) -> list[TrainingRun]:
    with catalog.session() as s:
        rows = s.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)).all()
        for r in rows:
            s.expunge(r)
        return list(rows)
