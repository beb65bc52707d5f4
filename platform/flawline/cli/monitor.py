"""``flawline monitor …``: the job that publishes the catalog's state as Ray metrics."""

from __future__ import annotations

import typer
from rich.table import Table

from flawline.cli.app import FlawlineTyper, console, print_json
from flawline.config import get_settings

app = FlawlineTyper(help="Metrics: publish the label queues, labels pulled, runs and production metrics from the "
                         "catalog as Ray metrics (with serving, scoring and training metrics recorded where they "
                         "happen) for the Ray dashboard's Prometheus and Grafana.")


@app.command()
def start(interval: float = typer.Option(15.0, min=1.0, help="Seconds between catalog readings.")) -> None:
    """Submit the monitor job to the cluster at FLAWLINE_RAY_DASHBOARD_URL (nothing happens when one
    already runs). It holds no CPU and reads a few counts from the catalog each interval."""
    from flawline.monitoring.job import start_monitor

    settings = get_settings()
    job_id, started = start_monitor(settings, interval)
    console.print(f"monitor {'started as' if started else 'already runs as'} Ray job {job_id} on "
                  f"{settings.ray_dashboard_url}; metrics: see `flawline monitor metrics`")


@app.command()
def stop() -> None:
    """Stop the monitor job."""
    from flawline.monitoring.job import stop_monitor

    stopped = stop_monitor(get_settings())
    console.print(f"stopped {', '.join(stopped)}" if stopped else "no monitor job was running")


@app.command()
def metrics(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The metrics flawline exports: Prometheus name, kind, tags and what each one counts."""
    from flawline.monitoring.metrics import METRICS, prometheus_names

    rows = [{"name": prometheus_names(m)[0].removesuffix("_bucket"), "kind": m.kind, "tags": list(m.tag_keys),
             "description": m.description} for m in METRICS.values()]
    if as_json:
        print_json(rows)
        return
    table = Table("Prometheus name", "kind", "tags", "what")
    for r in rows:
        table.add_row(r["name"], r["kind"], ", ".join(r["tags"]), r["description"])
    console.print(table)
