"""Cluster, jobs, deployments and queues at a glance: what ``flawline status`` shows below the
service health table. Each part is read independently, so a cluster that is down still leaves the
catalog's queues and runs visible (and the other way round)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select

from flawline.catalog import (
    ActiveLearningRound,
    Catalog,
    Dataset,
    LabelProject,
    LabelTask,
    LabelTaskStatus,
    RunStatus,
    TrainingRun,
)
from flawline.config import Settings
from flawline.monitoring.job import ACTIVE, job_status

RECENT_JOBS = 8


def _fail(part: str, err: Exception) -> dict[str, Any]:
    text = " ".join(str(err).split()) or type(err).__name__
    return {"error": f"{part}: {text[:200]}"}


def cluster_nodes(settings: Settings) -> dict[str, Any]:
    """Alive nodes with their free and total CPUs and GPUs, who holds the used ones, and the
    demand pending per job (``flawline.cluster.resources``: the state API and the autoscaler's
    report on the dashboard)."""
    from flawline.cluster.resources import JOB_PREFIX, read_cluster
    from flawline.train.submit import job_client

    try:
        client = job_client(settings)
        cluster = read_cluster(settings.ray_dashboard_url, holders=True, timeout=5, client=client)
        kinds = {j.submission_id: job_kind(j.metadata) for j in client.list_jobs() if j.submission_id}
    except Exception as err:  # noqa: BLE001 - reported in the table, never fatal
        return _fail("nodes", err)
    rows = [{"node_id": n.node_id, "node_ip": n.ip, "head": n.head, "state": "ALIVE",
             "cpus": n.total.get("CPU", 0.0), "gpus": n.total.get("GPU", 0.0),
             "cpus_free": None if n.free is None else round(n.free.get("CPU", 0.0), 4),
             "gpus_free": None if n.free is None else round(n.free.get("GPU", 0.0), 4)} for n in cluster.nodes]
    rows += [{"node_id": n.node_id, "node_ip": n.ip, "head": n.head, "state": "DEAD", "cpus": n.total.get("CPU", 0.0),
              "gpus": n.total.get("GPU", 0.0), "cpus_free": None, "gpus_free": None} for n in cluster.dead]
    out = {"nodes": rows, "alive": len(cluster.nodes), **cluster.summary()}
    for p in out.get("pending", []):
        sid = p["holder"].removeprefix(JOB_PREFIX) if p["holder"].startswith(JOB_PREFIX) else None
        p["what"] = kinds.get(sid, "other") if sid else p["holder"]
    return out


def job_kind(metadata: dict[str, str] | None) -> str:
    """What a Ray job is for flawline, from the metadata it was submitted with."""
    m = metadata or {}
    if "flawline_run_id" in m:
        return f"train run {m['flawline_run_id']} ({m.get('setting', '?')}/{m.get('method', '?')})"
    if "flawline_scoring" in m:
        return f"scoring {m['flawline_scoring']} on {m.get('dataset', '?')}"
    if "flawline_monitor" in m:
        return "monitor (catalog gauges)"
    return "other"


def recent_jobs(settings: Settings, limit: int = RECENT_JOBS) -> dict[str, Any]:
    """The newest Ray jobs, running ones first."""
    from flawline.train.submit import job_client

    try:
        jobs = job_client(settings).list_jobs()
    except Exception as err:  # noqa: BLE001
        return _fail("jobs", err)
    jobs = sorted(jobs, key=lambda j: (job_status(j) not in ACTIVE, -(j.start_time or 0)))
    rows = [{"id": j.submission_id or j.job_id, "status": job_status(j),
             "kind": job_kind(j.metadata),
             "started": (datetime.fromtimestamp(j.start_time / 1000, timezone.utc).isoformat(timespec="seconds")
                         if j.start_time else None)} for j in jobs]
    active = sum(1 for r in rows if r["status"] in ACTIVE)
    return {"jobs": rows[:limit], "active": active, "total": len(rows)}


def deployments(settings: Settings) -> dict[str, Any]:
    """Serve applications and deployments with their replicas."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from flawline.serving.status import serve_address, serve_running, serve_summary

    logging.getLogger("ray").setLevel(logging.ERROR)
    try:
        details = ServeSubmissionClient(settings.ray_dashboard_url).get_serve_details()
    except Exception as err:  # noqa: BLE001
        return _fail("serve", err)
    return {"address": serve_address(details) if serve_running(details) else None,
            "deployments": serve_summary(details)}


def queues(catalog: Catalog) -> dict[str, Any]:
    """Label Studio queues per dataset and task, active-learning rounds, and training runs."""
    try:
        with catalog.session() as s:
            counts: dict[int, dict[str, int]] = {}
            for pid, status, n in s.execute(select(LabelTask.project_id, LabelTask.status, func.count())
                                            .group_by(LabelTask.project_id, LabelTask.status)):
                counts.setdefault(pid, {})[status.value] = n
            projects = []
            for p, ds in s.execute(select(LabelProject, Dataset.name).join(Dataset, Dataset.id == LabelProject.dataset_id)
                                   .order_by(Dataset.name, LabelProject.task)):
                c = counts.get(p.id, {})
                projects.append({"dataset": ds, "task": p.task, "ls_project": p.ls_project_id,
                                 **{st.value: c.get(st.value, 0) for st in LabelTaskStatus},
                                 "pulled_until": p.watermark.isoformat(timespec="seconds") if p.watermark else None})
            rounds = dict(s.execute(select(Dataset.name, func.count()).join(
                ActiveLearningRound, ActiveLearningRound.dataset_id == Dataset.id).group_by(Dataset.name)).all())
            runs = {st.value: n for st, n in s.execute(select(TrainingRun.status, func.count())
                                                       .group_by(TrainingRun.status))}
    except Exception as err:  # noqa: BLE001
        return _fail("catalog", err)
    return {"label_projects": projects, "loop_rounds": rounds,
            "runs": {st.value: runs.get(st.value, 0) for st in RunStatus}}


def overview(settings: Settings, catalog: Catalog | None, ray_up: bool) -> dict[str, Any]:
    """Everything ``flawline status`` shows below the health table (Ray parts only when it is up)."""
    out: dict[str, Any] = {}
    if ray_up:
        out["cluster"] = cluster_nodes(settings)
        out["jobs"] = recent_jobs(settings)
        out["serve"] = deployments(settings)
    if catalog is not None:
        out["queues"] = queues(catalog)
    return out
