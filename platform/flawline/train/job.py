"""The Ray job's driver (``jobs/train.py`` calls ``main``): plan → train on the cluster →
evaluate, register; the run's row follows every step, and a failure is recorded in one line."""

from __future__ import annotations

import argparse
import os
import sys
import time

from flawline.catalog import RunStatus
from flawline.config import get_settings
from flawline.context import open_catalog, open_store
from flawline.errors import FlawlineError
from flawline.train.runner import finish_run, plan_run
from flawline.train.runs import get_run, run_spec, update_run


def run_training_job(run_id: int) -> dict:
    import ray

    from flawline.train.distributed import fit_on_ray, train_on_ray

    # Ray unpacks the job's working_dir under its runtime-env cache and may garbage-collect it once
    # the trainer's actors are gone; a driver standing in a deleted folder breaks later imports.
    scratch = get_settings().data_dir.expanduser() / "jobs" / f"run-{run_id}"
    scratch.mkdir(parents=True, exist_ok=True)
    os.chdir(scratch)
    catalog, store = open_catalog(), open_store()
    spec = run_spec(get_run(catalog, run_id))
    update_run(catalog, run_id, status=RunStatus.running)
    started = time.perf_counter()
    try:
        plan = plan_run(catalog, spec)
        ray.init(ignore_reinit_error=True, log_to_driver=True)
        print(f"run {run_id}: {spec.setting}/{plan.method} on {'+'.join(spec.datasets)}, {spec.workers} worker(s); "
              f"{plan.summary()['streams']}", flush=True)
        detector = train_on_ray(plan, run_id) if plan.setting.gradient else fit_on_ray(plan)
        recorded = get_run(catalog, run_id).metrics or {}  # progress, checkpoints, worker nodes
        metrics = {**recorded, **finish_run(catalog, store, plan, detector, run_id),
                   "train_seconds": round(time.perf_counter() - started, 1)}
        update_run(catalog, run_id, status=RunStatus.succeeded, metrics=metrics)
        print(f"run {run_id}: model {metrics['model']} registered; "
              f"accuracy {metrics.get('accuracy', float('nan')):.4f} f1 {metrics.get('f1', float('nan')):.4f} "
              f"image AUROC {metrics['image_auroc']:.4f}", flush=True)
        return metrics
    except BaseException as err:
        if get_run(catalog, run_id).status is RunStatus.cancelled:  # stopped on purpose: keep that
            raise
        message = str(err) if isinstance(err, FlawlineError) else f"{type(err).__name__}: {err}"
        update_run(catalog, run_id, status=RunStatus.failed, error=message.splitlines()[0][:2000] if message else
                   type(err).__name__)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="flawline training job (submitted by `flawline train submit`)")
    parser.add_argument("--run-id", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        run_training_job(args.run_id)
    except FlawlineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
