"""The monitor as a Ray job: ``jobs/monitor.py`` runs :func:`main` on the cluster and publishes the
catalog gauges until stopped; ``start_monitor`` / ``stop_monitor`` / ``monitor_jobs`` manage it
through the Job Submission API (what ``flawline monitor …`` and ``flawline status`` call)."""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Any

from flawline.config import Settings
from flawline.errors import ServiceError

MONITOR_METADATA = "flawline_monitor"
ACTIVE = ("PENDING", "RUNNING")


def job_status(job: Any) -> str:
    """A Ray job's status as its plain name (PENDING, RUNNING, SUCCEEDED, ...)."""
    return str(job.status).rsplit(".", 1)[-1]


def monitor_jobs(settings: Settings, active_only: bool = True) -> list[Any]:
    """The cluster's monitor jobs (``JobDetails``), newest first."""
    from flawline.train.submit import job_client

    jobs = [j for j in job_client(settings).list_jobs() if (j.metadata or {}).get(MONITOR_METADATA)]
    if active_only:
        jobs = [j for j in jobs if job_status(j) in ACTIVE]
    return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)


def start_monitor(settings: Settings, interval_s: float = 15.0) -> tuple[str, bool]:
    """Submit the monitor job unless one is already running; returns (submission id, started)."""
    from flawline.train.submit import job_client, submit_job

    running = monitor_jobs(settings)
    if running:
        return running[0].submission_id, False
    job_id = f"flawline-monitor-{secrets.token_hex(3)}"
    try:
        # num_cpus 0: it sleeps most of the time and must never hold a slot training needs.
        submit_job(job_client(settings), settings, job_id, "flawline.monitoring.job", f"--interval {interval_s}",
                   {MONITOR_METADATA: "1"}, entrypoint_num_cpus=0)
    except Exception as err:
        raise ServiceError(f"could not submit the monitor job to {settings.ray_dashboard_url}: "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return job_id, True


def stop_monitor(settings: Settings) -> list[str]:
    """Stop every running monitor job; returns their submission ids."""
    from flawline.train.submit import job_client

    client = job_client(settings)
    stopped = []
    for job in monitor_jobs(settings):
        client.stop_job(job.submission_id)
        stopped.append(job.submission_id)
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Publish flawline's catalog gauges as Ray metrics (Ray job).")
    parser.add_argument("--interval", type=float, default=15.0, help="Seconds between readings.")
    parser.add_argument("--rounds", type=int, default=None, help="Stop after this many readings (tests).")
    a = parser.parse_args(argv)
    import ray

    from flawline.context import open_catalog
    from flawline.monitoring.catalog_gauges import run_monitor

    ray.init(ignore_reinit_error=True)
    catalog = open_catalog()
    print(f"publishing catalog gauges every {a.interval:g} s", flush=True)

    def warn(err: Exception) -> None:
        print(f"catalog reading failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); retrying",
              file=sys.stderr, flush=True)

    run_monitor(catalog, a.interval, a.rounds, on_error=warn)
    return 0


if __name__ == "__main__":  # what the Ray job runs: python -m flawline.monitoring.job
    sys.exit(main())
