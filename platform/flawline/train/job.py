"""The Ray job's driver (``jobs/train.py`` calls ``main``): plan → train on the cluster →
evaluate, register; the run's row follows every step, and a failure is recorded in one line."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

from flawline.catalog import RunStatus
from flawline.config import get_settings
from flawline.context import open_catalog
from flawline.errors import FlawlineError
from flawline.train.runner import plan_run
from flawline.train.runs import get_run, run_spec, trainer_name, update_run


def run_training_job(run_id: int) -> dict:
    import ray

    from flawline.train.distributed import run_on_ray
    from flawline.train.runs import record_facts

    # A scratch folder of the run's own (the job's working directory is Ray's, not ours).
    scratch = get_settings().data_dir.expanduser() / "jobs" / f"run-{run_id}"
    scratch.mkdir(parents=True, exist_ok=True)
    os.chdir(scratch)
    catalog = open_catalog()
    row = get_run(catalog, run_id)
    spec = run_spec(row)
    update_run(catalog, run_id, status=RunStatus.running)
    started = time.perf_counter()
    try:
        plan = plan_run(catalog, spec)
        ray.init(ignore_reinit_error=True, log_to_driver=True)
        # The driver only plans, submits and records: training and finishing run on the workers.
        record_facts(run_id, catalog, driver_node=ray.get_runtime_context().get_node_id())
        workers = spec.workers if spec.min_workers is None else f"{spec.min_workers}-{spec.workers}"
        print(f"run {run_id}: {spec.setting}/{plan.method} on {'+'.join(spec.datasets)}, {workers} worker(s); "
              f"{plan.summary()['streams']}", flush=True)
        for note in plan.notes():
            print(f"run {run_id}: {note}", flush=True)
        run_on_ray(plan, run_id, trainer_name(row))
        recorded = get_run(catalog, run_id).metrics or {}  # progress, placement and the workers' result
        if "model" not in recorded:
            raise RuntimeError("the workers ended without registering a model (see `flawline runs logs`)")
        metrics = {**recorded, "train_seconds": round(time.perf_counter() - started, 1),
                   "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
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


if __name__ == "__main__":  # what the Ray job runs: python -m flawline.train.job
    sys.exit(main())
