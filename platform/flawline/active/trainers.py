"""How the loop retrains: a Ray job on the cluster (the platform's way), or in this process (tests,
benchmarks, a machine without a cluster). Both record a training run in the catalog and return
its metrics with ``model`` (name:version) and ``run_id``."""

from __future__ import annotations

from typing import Any

from flawline.catalog import Catalog, RunStatus
from flawline.config import Settings
from flawline.errors import FlawlineError
from flawline.storage import ObjectStore
from flawline.train.spec import TrainSpec


def in_process_trainer(catalog: Catalog, store: ObjectStore, device: str = "auto"):  # noqa: ANN201
    from flawline.train.runner import finish_run, plan_run, seed_everything, train_local
    from flawline.train.runs import create_run, update_run

    def train(spec: TrainSpec) -> dict[str, Any]:
        plan = plan_run(catalog, spec)
        run_id = create_run(catalog, spec, plan.method, plan.summary())
        update_run(catalog, run_id, status=RunStatus.running)
        try:
            seed_everything(spec.seed)
            detector, history = train_local(store, plan, device=device)
            metrics = finish_run(catalog, store, plan, detector, run_id=run_id, history=history)
        except Exception as err:
            update_run(catalog, run_id, status=RunStatus.failed, error=str(err).splitlines()[0][:500])
            raise
        update_run(catalog, run_id, status=RunStatus.succeeded, metrics=metrics)
        return {**metrics, "run_id": run_id}

    return train


def ray_job_trainer(catalog: Catalog, settings: Settings, timeout_s: float | None = None):  # noqa: ANN201
    from flawline.train.runs import get_run
    from flawline.train.submit import follow, submit_run

    def train(spec: TrainSpec) -> dict[str, Any]:
        run_id, _ = submit_run(catalog, settings, spec)
        for _ in follow(catalog, settings, run_id, timeout=timeout_s):
            pass
        row = get_run(catalog, run_id)
        if row.status is not RunStatus.succeeded:
            raise FlawlineError(f"training run {run_id} {row.status.value}: {row.error or 'see flawline runs logs'}")
        return {**(row.metrics or {}), "run_id": run_id}

    return train
