"""``flawline up|down|status``: the embedded local services and a health table of all of them."""

from __future__ import annotations

import typer
from rich.table import Table

from flawline.catalog import db as catalog_db
from flawline.cli.app import console, print_json
from flawline.config import get_settings
from flawline.health import check_all
from flawline.cluster.local_ray import LocalRayCluster
from flawline.errors import ServiceError
from flawline.storage.local_s3 import LocalS3Server

_STYLE = {"ok": "green", "idle": "cyan", "degraded": "yellow", "down": "red"}


def local_ray(settings) -> LocalRayCluster:  # noqa: ANN001
    from urllib.parse import urlparse

    dash = urlparse(settings.ray_dashboard_url)
    if dash.hostname not in ("127.0.0.1", "localhost") or not dash.port:
        raise ServiceError(f"FLAWLINE_RAY_DASHBOARD_URL={settings.ray_dashboard_url} is not a local address; "
                           "`flawline up` only starts a local Ray (use --no-ray with a remote cluster)")
    return LocalRayCluster(port=settings.local_ray_port, dashboard_port=dash.port, num_cpus=settings.local_ray_cpus,
                           log_file=settings.data_dir.expanduser() / "ray.log")


def up(timeout: float = typer.Option(60.0, help="Seconds to wait for each service."),
       ray: bool = typer.Option(True, help="Also start a local Ray head (dashboard + Jobs API) for training jobs."),
       label_studio: bool = typer.Option(
           False, "--label-studio/--no-label-studio",
           help="Also start a local Label Studio at FLAWLINE_LABELSTUDIO_URL (from .venv-labelstudio; about "
           "40 s and 1 GB of memory, so off by default)."),
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
    server = LocalS3Server.from_settings(settings)
    started = server.start(timeout=timeout)
    console.print(f"S3 server {'started' if started else 'already running'} at {server.endpoint} "
                  f"(bucket {server.bucket}, data {server.root}, log {server.log_file})")
    engine = catalog_db.make_engine(str(settings.catalog_url))
    catalog_db.upgrade(engine)
    console.print(f"catalog ready at {engine.url.render_as_string(hide_password=True)} "
                  f"(schema {catalog_db.current_revision(engine)})")
    if ray:
        cluster = local_ray(settings)
        cluster.log_file.parent.mkdir(parents=True, exist_ok=True)
        started = cluster.start(timeout=max(timeout, 90))
        console.print(f"Ray {'started' if started else 'already running'} at {cluster.address}; "
                      f"dashboard and Jobs API {cluster.dashboard_url}")
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
    server = LocalS3Server.from_settings(settings)
    console.print("S3 server stopped" if server.stop() else "S3 server was not running")
    if ray:
        console.print("Ray stopped" if local_ray(settings).stop() else "Ray was not running")
    from flawline.labelstudio.server import LocalLabelStudio

    try:
        ls = LocalLabelStudio.from_settings(settings)
    except ServiceError:  # a remote Label Studio: not ours to stop
        return
    console.print("Label Studio stopped" if ls.stop() else "Label Studio was not running")


def status(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Health of S3, the catalog, Ray and Label Studio in one table; exits 1 if any is down."""
    results = check_all(get_settings())
    if as_json:
        print_json([r.__dict__ | {"ok": r.ok} for r in results])
    else:
        table = Table("service", "state", "endpoint", "detail")
        for r in results:
            table.add_row(r.service, f"[{_STYLE.get(r.state, 'white')}]{r.state}[/]", r.endpoint, r.detail)
        console.print(table)
    if any(r.state == "down" for r in results):
        raise typer.Exit(1)
