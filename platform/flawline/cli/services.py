"""``flawline up|down|status``: the embedded local services and a health table of all of them."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from flawline.cli.app import console, err_console, print_json
from flawline.cluster.local_ray import LocalRayCluster
from flawline.config import get_settings
from flawline.errors import ServiceError
from flawline.health import check_all

_STYLE = {"ok": "green", "idle": "cyan", "degraded": "yellow", "down": "red"}


def _haproxy_folder(dashboard_port: int) -> Path:
    """HAProxy's files of the local cluster in throughput-optimized mode (a short path: its sockets)."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"flawline-hap-{dashboard_port}"


def local_ray(settings, serve_throughput_optimized: bool = False) -> LocalRayCluster:  # noqa: ANN001
    """The local Ray cluster ``flawline up`` starts; with ``serve_throughput_optimized`` its
    processes get ``serve_throughput_env`` (HAProxy's files under /tmp/flawline-hap-<dashboard port>)."""
    from urllib.parse import urlparse

    from flawline.cluster.local_ray import serve_throughput_env

    dash = urlparse(settings.ray_dashboard_url)
    if dash.hostname not in ("127.0.0.1", "localhost") or not dash.port:
        raise ServiceError(f"FLAWLINE_RAY_DASHBOARD_URL={settings.ray_dashboard_url} is not a local address; "
                           "`flawline up` only starts a local Ray (use --no-ray with a remote cluster)")
    env = serve_throughput_env(_haproxy_folder(dash.port)) if serve_throughput_optimized else {}
    return LocalRayCluster(port=settings.local_ray_port, dashboard_port=dash.port, num_cpus=settings.local_ray_cpus,
                           log_file=settings.data_dir.expanduser() / "ray.log", env=env)


def up(timeout: float = typer.Option(60.0, help="Seconds to wait for each service."),
       ray: bool = typer.Option(True, help="Also start a local Ray head (dashboard + Jobs API) for training jobs."),
       label_studio: bool = typer.Option(
           False, "--label-studio/--no-label-studio",
           help="Also start a local Label Studio at FLAWLINE_LABELSTUDIO_URL (from .venv-labelstudio; about "
           "40 s and 1 GB of memory, so off by default)."),
       serve_throughput_optimized: bool = typer.Option(
           False, "--serve-throughput-optimized",
           help="Start Ray with Ray Serve's throughput-optimized mode (HAProxy ingress, direct ingress to the "
           "replicas, gRPC between deployments); in one run of docs/benchmarks/serve.md 12-25 % overhead against "
           "the raw model at concurrency 32 instead of 39-46 %. Set when Ray starts: `flawline down` first."),
       ) -> None:
    """Start the local S3 server (SeaweedFS on loopback) and a local Ray cluster, and bring the
    catalog schema up to date; with --label-studio also a local Label Studio for labelling."""
    settings = get_settings()
    ls = None
    if label_studio is True:  # `is True`: called as a function (quickstart) the default is an OptionInfo
        # A remote URL or a missing install stops here, before anything is started.
        from flawline.labelstudio.server import LocalLabelStudio, find_labelstudio_binary

        ls = LocalLabelStudio.from_settings(settings)
        if not ls.is_running():
            find_labelstudio_binary(ls.binary)
    from flawline.storage.local_s3 import LocalS3Server  # (minio: not loaded for --help)

    server = LocalS3Server.from_settings(settings)
    started = server.start(timeout=timeout)
    console.print(f"S3 server {'started' if started else 'already running'} at {server.endpoint} "
                  f"(bucket {server.bucket}, data {server.root}, log {server.log_file})")
    from flawline.catalog import db as catalog_db

    engine = catalog_db.make_engine(str(settings.catalog_url))
    catalog_db.upgrade(engine)
    console.print(f"catalog ready at {engine.url.render_as_string(hide_password=True)} "
                  f"(schema {catalog_db.current_revision(engine)})")
    if ray:
        cluster = local_ray(settings, serve_throughput_optimized is True)
        cluster.log_file.parent.mkdir(parents=True, exist_ok=True)
        started = cluster.start(timeout=max(timeout, 90))
        console.print(f"Ray {'started' if started else 'already running'} at {cluster.address}; "
                      f"dashboard and Jobs API {cluster.dashboard_url}"
                      + ("; Serve throughput-optimized (HAProxy ingress)" if started and cluster.env else ""))
        if cluster.env and not started:
            err_console.print("warning: --serve-throughput-optimized takes effect when Ray starts; Ray already runs "
                              "as it was started: `flawline down`, then `flawline up --serve-throughput-optimized`",
                              soft_wrap=True)
    if ls is not None:
        started = ls.start(timeout=max(timeout, 180))
        console.print(f"Label Studio {'started' if started else 'already running'} at {ls.url} (user {ls.username}; "
                      f"API token in {ls.root / 'token'}, password in {ls.root / 'password'}; flawline uses the "
                      f"token when FLAWLINE_LABELSTUDIO_TOKEN is unset; log {ls.log_file})", highlight=False,
                      soft_wrap=True)


def down(ray: bool = typer.Option(True, help="Also stop the local Ray cluster.")) -> None:
    """Stop the local S3 server, Ray cluster and Label Studio started by `flawline up` (data stays in
    the data directory)."""
    settings = get_settings()
    from flawline.storage.local_s3 import LocalS3Server  # (minio: not loaded for --help)

    server = LocalS3Server.from_settings(settings)
    console.print("S3 server stopped" if server.stop() else "S3 server was not running")
    if ray:
        cluster = local_ray(settings)
        console.print("Ray stopped" if cluster.stop() else "Ray was not running")
        import shutil

        shutil.rmtree(_haproxy_folder(cluster.dashboard_port), ignore_errors=True)
    from flawline.labelstudio.server import LocalLabelStudio

    try:
        ls = LocalLabelStudio.from_settings(settings)
    except ServiceError:  # a remote Label Studio: not ours to stop
        return
    console.print("Label Studio stopped" if ls.stop() else "Label Studio was not running")


def status(as_json: bool = typer.Option(False, "--json", help="Print JSON."),
           brief: bool = typer.Option(False, "--brief", help="Only the service health table.")) -> None:
    """Everything at a glance: health of S3, the catalog, Ray and Label Studio; then the cluster's
    nodes with free and total CPUs/GPUs, who holds them and what waits for them, recent Ray jobs
    (training, scoring, monitor), Serve deployments, Label Studio queues and training runs. Exits 1
    if a service is down."""
    settings = get_settings()
    results = check_all(settings)
    state = {r.service: r.state for r in results}
    view: dict = {}
    if not brief:
        from flawline.context import open_catalog
        from flawline.monitoring.overview import overview

        catalog = open_catalog(settings) if state.get("catalog") == "ok" else None
        view = overview(settings, catalog, ray_up=state.get("Ray") == "ok")
    if as_json:
        print_json({"services": [r.__dict__ | {"ok": r.ok} for r in results], **view})
    else:
        table = Table("service", "state", "endpoint", "detail", title="services")
        for r in results:
            table.add_row(r.service, f"[{_STYLE.get(r.state, 'white')}]{r.state}[/]", r.endpoint, r.detail)
        console.print(table)
        _print_overview(view)
    if any(r.state == "down" for r in results):
        raise typer.Exit(1)


def _error_line(part: dict) -> bool:
    if "error" in part:
        console.print(f"[yellow]{part['error']}[/]", highlight=False)
        return True
    return False


def _free(part: dict, key: str) -> str:
    """``0.5/2``: free of total (``?/2`` when the cluster reports no usage)."""
    free = part.get(f"{key}_free")
    return f"{'?' if free is None else f'{free:g}'}/{part[key]:g}"


def _bundles(bundles: list[dict]) -> str:
    from flawline.cluster.resources import Pending

    return Pending("", "", bundles).describe()


def _print_overview(view: dict) -> None:
    cluster = view.get("cluster")
    if cluster and not _error_line(cluster):
        table = Table("node", "role", "state", "CPUs free/total", "GPUs free/total",
                      title=f"cluster: {cluster['alive']} node(s) alive, {_free(cluster, 'cpus')} CPUs free, "
                            f"{_free(cluster, 'gpus')} GPUs free")
        for n in cluster["nodes"]:
            table.add_row(f"{n['node_ip']} {n['node_id'][:8]}", "head" if n["head"] else "worker", n["state"],
                          _free(n, "cpus"), _free(n, "gpus"))
        console.print(table)
        held = cluster.get("held_by") or {}
        used = sorted(((r.get("CPU", 0.0), r.get("GPU", 0.0), who) for who, r in held.items()), reverse=True)
        if used:
            console.print("held by: " + ", ".join(f"{who} {cpu:g} CPU" + (f" {gpu:g} GPU" if gpu else "")
                                                  for cpu, gpu, who in used), highlight=False)
        if cluster.get("pending"):
            table = Table("job", "what", "waits for", "CPUs", "GPUs",
                          title="pending demand (waits for free resources)")
            for p in cluster["pending"]:
                table.add_row(p["holder"].removeprefix("job "), p.get("what") or "",
                              f"{p['kind']}: {_bundles(p['bundles'])}", f"{p['cpus']:g}", f"{p['gpus']:g}")
            console.print(table)
        elif cluster.get("demand"):
            console.print("pending demand: " + "; ".join(f"{d['count']} × {_bundles([d['bundle']])} ({d['kind']})"
                                                         for d in cluster["demand"]), highlight=False)
    jobs = view.get("jobs")
    if jobs and not _error_line(jobs):
        table = Table("Ray job", "status", "what", "started",
                      title=f"jobs: {jobs['active']} active, {jobs['total']} in all (newest shown)")
        for j in jobs["jobs"]:
            table.add_row(j["id"], j["status"], j["kind"], j["started"] or "")
        console.print(table)
    serve = view.get("serve")
    if serve and not _error_line(serve):
        if serve["deployments"]:
            table = Table("application", "deployment", "status", "replicas",
                          title=f"deployments (HTTP {serve['address']})")
            for d in serve["deployments"]:
                table.add_row(d["application"], d["deployment"], d["status"] or "",
                              f"{d['replicas_running']}/{d['replicas_target']}")
            console.print(table)
        else:
            console.print("deployments: Ray Serve runs no application (`flawline serve up`)")
    queues = view.get("queues")
    if queues and not _error_line(queues):
        if queues["label_projects"]:
            table = Table("dataset", "task", "waiting", "labelled", "skipped", "orphaned", "pulled until",
                          "AL rounds", title="label queues (Label Studio)")
            for p in queues["label_projects"]:
                table.add_row(p["dataset"], p["task"], str(p["pushed"]), str(p["labelled"]), str(p["skipped"]),
                              str(p["orphaned"]), p["pulled_until"] or "never",
                              str(queues["loop_rounds"].get(p["dataset"], 0)))
            console.print(table)
        else:
            console.print("label queues: none yet (`flawline label push` or `flawline loop run`)")
        runs = queues["runs"]
        console.print("training runs: " + ", ".join(f"{n} {st}" for st, n in runs.items() if n) if any(runs.values())
                      else "training runs: none yet (`flawline train submit`)", highlight=False)
