"""Submitting training runs as Ray jobs (Job Submission API) and following them.

``submit_run`` checks the run against the catalog first (unknown method, no images, a setting
without its labels), then its workers' resources against the cluster (``check_resources``: a
CPU count, GPU or custom resource no node has): such runs fail here with a one-line error and
never reach the cluster. A run that fits the cluster but not what is free now is submitted and
said to wait ("waiting for 1 CPU (free: 0.5 of 2 CPU; held by: Serve replicas 1.5 CPU)");
``follow`` and ``waiting`` say so while its workers' resources stay pending.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

from flawline.catalog import Catalog, RunStatus
from flawline.config import Settings
from flawline.errors import InvalidInput, ServiceError
from flawline.train.runner import plan_run
from flawline.train.runs import FINAL, create_run, get_run, list_runs, run_spec, update_run
from flawline.train.spec import TrainSpec

RAY_FINAL = {"SUCCEEDED": RunStatus.succeeded, "FAILED": RunStatus.failed, "STOPPED": RunStatus.cancelled}


def job_env(settings: Settings) -> dict[str, str]:
    """The settings a job needs to reach the same catalog and S3 (passed as its runtime_env)."""
    env = {"FLAWLINE_CATALOG_URL": str(settings.catalog_url), "FLAWLINE_S3_ENDPOINT": settings.s3_endpoint,
           "FLAWLINE_S3_ACCESS_KEY": settings.s3_access_key,
           "FLAWLINE_S3_SECRET_KEY": settings.s3_secret_key.get_secret_value(),
           "FLAWLINE_S3_BUCKET": settings.s3_bucket, "FLAWLINE_S3_SECURE": str(settings.s3_secure).lower(),
           "FLAWLINE_DATA_DIR": str(settings.data_dir)}
    if settings.s3_region:
        env["FLAWLINE_S3_REGION"] = settings.s3_region
    return env


def submit_job(client: Any, settings: Settings, job_id: str, module: str, args: str, metadata: dict[str, str],
               **options: Any) -> None:
    """Submit one flawline Ray job through ``client`` (a ``JobSubmissionClient``): its entrypoint
    is ``python -m <module> <args>`` (``flawline.train.job``, ``flawline.active.score_job``,
    ``flawline.monitoring.job``: the functions jobs/*.py call), with the catalog/S3 settings in its
    ``runtime_env``. ``options``: more ``submit_job`` arguments. Raises what the client raises.

    No working_dir: flawline is installed on every node (the workers import it), so a job needs
    no package. Shipping jobs/ as a working_dir package made every job's workers download it from
    the GCS on their node, and under load those downloads failed ("Failed to download runtime_env
    file package") or a driver found its folder half unpacked ("can't open file 'train.py'")."""
    client.submit_job(entrypoint=f"python -m {module} {args}".rstrip(), submission_id=job_id, metadata=metadata,
                      runtime_env={"env_vars": job_env(settings)}, **options)


def job_client(settings: Settings):  # noqa: ANN201  (ray.job_submission.JobSubmissionClient)
    from ray.job_submission import JobSubmissionClient

    url = settings.ray_dashboard_url
    try:
        return JobSubmissionClient(url)
    except Exception as err:  # connection refused, wrong address, version mismatch
        raise ServiceError(f"no Ray cluster answers at {url} ({type(err).__name__}); start one with `flawline up` "
                           "or point FLAWLINE_RAY_DASHBOARD_URL at a cluster's dashboard") from None


def check_resources(settings: Settings, client: Any, request: Any) -> str | None:
    """Check ``request`` (a ``cluster.resources.Request``) against the cluster at the dashboard:
    raises a one-line InvalidInput when no node set can ever hold it (unless
    ``settings.ray_autoscaling``); returns "waiting for …" when it fits but not in what is free
    now, else None. A cluster whose resources cannot be read is not checked (Ray still is)."""
    from flawline.cluster.resources import check, read_cluster

    try:
        cluster = read_cluster(settings.ray_dashboard_url, client=client)
    except Exception:  # noqa: BLE001 - an unreadable status never blocks a submission
        return None
    verdict = check(cluster, request, autoscaling=settings.ray_autoscaling)
    if not verdict.ever:
        raise InvalidInput(f"the Ray cluster at {settings.ray_dashboard_url} can never run this: {verdict.message}")
    if verdict.now is not False:
        return None
    try:  # who holds what: only worth the extra state API calls when the job will wait
        cluster = read_cluster(settings.ray_dashboard_url, holders=True, client=client)
    except Exception:  # noqa: BLE001 - the line without "held by"
        return verdict.message
    return check(cluster, request, autoscaling=settings.ray_autoscaling).message or verdict.message


def run_request(spec: TrainSpec) -> Any:
    """What a run asks the cluster for: one bundle per Ray Train worker (an elastic run starts
    with ``min_workers``); the driver and Ray Train's controller ask for no CPU."""
    from flawline.cluster.resources import Request

    return Request(spec.worker_bundle(), spec.workers, spec.min_workers)


def submit_run(catalog: Catalog, settings: Settings, spec: TrainSpec,
               on_wait: Callable[[str], None] | None = None,
               on_note: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Check, record and submit one run; returns (run id, Ray job id). ``on_wait`` gets the
    "waiting for …" line when the cluster has not enough free for the run now; ``on_note`` each
    line of what the plan left out (``RunPlan.notes``)."""
    plan = plan_run(catalog, spec)  # raises before anything is recorded or submitted
    for note in plan.notes() if on_note else ():
        on_note(note)
    client = job_client(settings)
    waiting = check_resources(settings, client, run_request(spec))  # raises before anything is recorded
    run_id = create_run(catalog, spec, plan.method, plan.summary())
    job_id = _submit_job(catalog, settings, client, run_id, spec, plan.method)
    if waiting and on_wait:
        on_wait(waiting)
    return run_id, job_id


def _submit_job(catalog: Catalog, settings: Settings, client: Any, run_id: int, spec: TrainSpec, method: str) -> str:
    """Submit the run's Ray job (``flawline.train.job --run-id``) and record its id; every job a run
    had stays listed in its config (``ray_job_ids``: the first submission, then each resume)."""
    job_id = f"flawline-run-{run_id}-{secrets.token_hex(3)}"
    try:
        submit_job(client, settings, job_id, "flawline.train.job", f"--run-id {run_id}",
                   {"flawline_run_id": str(run_id), "setting": spec.setting, "method": method})
    except Exception as err:
        update_run(catalog, run_id, status=RunStatus.failed, error=f"submission failed: {err}".splitlines()[0])
        raise ServiceError(f"could not submit run {run_id} to {settings.ray_dashboard_url}: "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    config = dict(get_run(catalog, run_id).config)
    config["ray_job_ids"] = [*config.get("ray_job_ids", []), job_id]
    update_run(catalog, run_id, ray_job_id=job_id, config=config)
    return job_id


RESUMABLE = (RunStatus.failed, RunStatus.cancelled)


def resume_run(catalog: Catalog, settings: Settings, run_id: int,
               on_wait: Callable[[str], None] | None = None) -> str:
    """Continue a failed or cancelled run as a new Ray job on the same run row. Its trainer has the
    same name and checkpoint storage, so Ray Train starts from the run's last checkpoint (the
    last finished epoch; a normal-only fit without epochs starts its fit again). Returns the new
    job id; the row keeps every job id it had."""
    refresh(catalog, settings, [run_id])
    row = get_run(catalog, run_id)
    if row.status not in RESUMABLE:
        raise InvalidInput(f"run {run_id} is {row.status.value}: only a failed or cancelled run can be resumed")
    spec = run_spec(row)
    plan_run(catalog, spec)  # the catalog may have changed: the same checks as a new run, first
    client = job_client(settings)
    if row.ray_job_id:  # a cancelled job may still be stopping: never two drivers on one run
        try:
            status = str(client.get_job_info(row.ray_job_id).status).rsplit(".", 1)[-1]
        except Exception:
            status = "GONE"
        if status in ("PENDING", "RUNNING"):
            raise InvalidInput(f"run {run_id}: its Ray job {row.ray_job_id} is still {status.lower()}; "
                               "wait for it to stop, then resume")
    waiting = check_resources(settings, client, run_request(spec))
    metrics = {k: v for k, v in (row.metrics or {}).items() if k in ("progress", "checkpoints", "placement",
                                                                       "worker_nodes", "driver_node")}
    metrics["resumed"] = int((row.metrics or {}).get("resumed", 0)) + 1
    update_run(catalog, run_id, status=RunStatus.pending, error=None, finished_at=None, metrics=metrics)
    job_id = _submit_job(catalog, settings, client, run_id, spec, row.method)
    if waiting and on_wait:
        on_wait(waiting)
    return job_id


def current_submission_id() -> str | None:
    """The Ray job submission id when this process is a Ray job's driver (Ray passes the job's
    config, metadata included, to the driver in an environment variable)."""
    import json
    import os

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return (json.loads(raw).get("metadata") or {}).get("job_submission_id")
    except ValueError:
        return None


def run_in_process(catalog: Catalog, settings: Settings, spec: TrainSpec) -> int:
    """Check and record a run, then train it from this process: for a driver that already is a
    Ray job (a KubeRay RayJob's entrypoint), where submitting another job would nest two."""
    from flawline.train.job import run_training_job

    plan = plan_run(catalog, spec)  # the same checks as submit_run, before anything is recorded
    run_id = create_run(catalog, spec, plan.method, plan.summary())
    update_run(catalog, run_id, ray_job_id=current_submission_id())
    run_training_job(run_id)
    return run_id


def refresh(catalog: Catalog, settings: Settings, run_ids: list[int] | None = None) -> None:
    """Bring unfinished runs in line with Ray: a job that died without its driver updating the row
    (killed, cancelled, cluster restarted) gets its final status here."""
    rows = [r for r in list_runs(catalog, 500) if r.status not in FINAL and r.ray_job_id
            and (run_ids is None or r.id in run_ids)]
    if not rows:
        return
    try:
        client = job_client(settings)
    except ServiceError:
        return  # nothing to compare with; the rows stay as they are
    for r in rows:
        try:
            info = client.get_job_info(r.ray_job_id)
        except Exception:  # the cluster forgot the job (restarted)
            continue
        status = RAY_FINAL.get(str(info.status))
        if status is not None:
            current = get_run(catalog, r.id)
            if current.status not in FINAL:
                update_run(catalog, r.id, status=status, error=current.error or (info.message or None))


def cancel_run(catalog: Catalog, settings: Settings, run_id: int) -> bool:
    row = get_run(catalog, run_id)
    if row.status in FINAL:
        raise InvalidInput(f"run {run_id} already {row.status.value}")
    stopped = False
    if row.ray_job_id:
        stopped = job_client(settings).stop_job(row.ray_job_id)
    update_run(catalog, run_id, status=RunStatus.cancelled, error="cancelled by the user")
    return stopped


def run_logs(catalog: Catalog, settings: Settings, run_id: int) -> str:
    row = get_run(catalog, run_id)
    if not row.ray_job_id:
        raise InvalidInput(f"run {run_id} was never submitted to Ray (status {row.status.value})")
    return job_client(settings).get_job_logs(row.ray_job_id)


def waiting(settings: Settings, ray_job_id: str | None) -> str | None:
    """"waiting for …" while the Ray job's requests (its workers' placement group, its actors or
    tasks) are pending for resources; None when nothing of it waits or the cluster cannot be read."""
    if not ray_job_id:
        return None
    from flawline.cluster.resources import job_waiting

    try:
        return job_waiting(settings.ray_dashboard_url, ray_job_id)
    except Exception:  # noqa: BLE001 - the state API is a convenience here, never fatal
        return None


WAIT_CHECK_S = 10.0  # how often follow asks the state API whether the run's resources are pending


def follow(catalog: Catalog, settings: Settings, run_id: int, poll: float = 2.0,
           timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """Yield the run's progress whenever it changes, until it ends (the CLI's --wait); while its
    resources are pending, ``waiting`` says for what (checked every ``WAIT_CHECK_S``)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    pending, checked = None, -math.inf
    while True:
        refresh(catalog, settings, [run_id])
        row = get_run(catalog, run_id)
        if row.status not in FINAL and time.monotonic() - checked >= WAIT_CHECK_S:
            pending, checked = waiting(settings, row.ray_job_id), time.monotonic()
        state = {"status": row.status.value, "progress": (row.metrics or {}).get("progress"), "error": row.error,
                 "waiting": None if row.status in FINAL else pending}
        if state != last:
            yield state
            last = state
        if row.status in FINAL:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise ServiceError(f"run {run_id} still {row.status.value} after {timeout:.0f} s")
        time.sleep(poll)
