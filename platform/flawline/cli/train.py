"""``flawline train`` (submit runs as Ray jobs, list label settings) and ``flawline runs``
(list, show, logs, cancel, resume)."""

from __future__ import annotations

from typing import Optional

import typer
from rich import box
from rich.table import Column, Table

from flawline.cli.app import FlawlineTyper, console, err_console, print_json
from flawline.config import get_settings
from flawline.context import open_catalog
from flawline.errors import InvalidInput
from flawline.options import parse_options

app = FlawlineTyper(help="Train detectors as Ray jobs in every label setting.")
runs_app = FlawlineTyper(help="Training runs: list, show, logs, cancel, resume.")


def _resources(pairs: list[str]) -> dict[str, float]:
    """``NAME=AMOUNT`` pairs → custom Ray resources per worker."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = None
        if not sep or not key.strip() or amount is None:
            raise InvalidInput(f"--worker-resource {pair!r}: expected NAME=AMOUNT, e.g. inspection_gpu=1")
        out[key.strip()] = amount
    return out


@app.command()
def submit(
    dataset: list[str] = typer.Option(..., "--dataset", "-d", help="Dataset (repeat to train on several at once)."),
    setting: str = typer.Option(..., "--setting", "-s", help="Label setting; see `flawline train settings`."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="Detector; default: the setting's first."),
    workers: int = typer.Option(1, min=1, help="Ray Train workers: each embeds and trains on its share of the "
                                "images (DDP); memory-bank detectors fit on the first one. With --min-workers: the most."),
    min_workers: Optional[int] = typer.Option(
        None, min=1, help="Elastic run: start as soon as this many workers fit, grow to --workers as nodes come, "
        "and go on with fewer when a node is lost (each change resumes from the last checkpoint)."),
    worker_resource: list[str] = typer.Option(
        [], "--worker-resource", help="Custom Ray resource NAME=AMOUNT each worker asks for (repeatable), e.g. "
        "a label that your GPU nodes advertise: the run then trains only on those nodes."),
    cpus_per_worker: float = typer.Option(1.0, help="CPUs each worker asks Ray for."),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs each worker asks Ray for (NCCL when > 0)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs (default: the setting's)."),
    image_size: Optional[int] = typer.Option(
        None, min=32, max=1024, help="Images are resized to this square size (default: the detector's own, "
        "as `flawline evaluate` uses it: 256; classifier and fewshot 224)."),
    batch_size: int = typer.Option(16, min=1, help="Per-worker batch size."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the setting's)."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast)."),
    label_fraction: float = typer.Option(1.0, help="Use only this seeded share of the labels (0, 1]."),
    shots: int = typer.Option(5, help="few-shot: labelled defect images per dataset (1-10)."),
    seed: int = typer.Option(0, help="Random seed."),
    backbone: str = typer.Option("efficientnet_lite0", help="Pretrained encoder / feature backbone."),
    option: list[str] = typer.Option([], "--option", "-o", help="Detector setting KEY=VALUE (repeatable)."),
    name: Optional[str] = typer.Option(None, help="Model name (default <datasets>-<setting>-<method>)."),
    max_failures: int = typer.Option(2, min=0, help="Worker failures survived by resuming from the last checkpoint."),
    shard_cache_mb: float = typer.Option(
        1024.0, min=0, help="MiB of its share of the images each worker keeps in memory across epochs (decoded "
        "images for label settings; embeddings for flow, reconstruction, selfsup). A larger share streams from "
        "Ray Data again every epoch: memory stays bounded, epochs get slower."),
    wait: bool = typer.Option(False, "--wait", help="Follow the run until it ends."),
    in_process: bool = typer.Option(
        False, "--in-process", help="Train from this process instead of submitting a Ray job: for an entrypoint "
        "that already is a Ray job's driver (a KubeRay RayJob). The run is recorded in the catalog the same way."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check the run against the catalog (labels the setting needs, images, method), then submit
    it to the Ray cluster at FLAWLINE_RAY_DASHBOARD_URL through the Job Submission API (or, with
    --in-process, train it from this process on the Ray cluster it is connected to)."""
    from flawline.train import TrainSpec
    from flawline.train.submit import submit_run

    settings = get_settings()
    spec = TrainSpec(datasets=dataset, setting=setting, method=method, workers=workers,
                     cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, epochs=epochs,
                     image_size=image_size, batch_size=batch_size, lr=lr, precision=precision,
                     label_fraction=label_fraction, shots=shots, seed=seed, backbone=backbone,
                     options=parse_options(option), model_name=name, max_failures=max_failures,
                     min_workers=min_workers, worker_resources=_resources(worker_resource),
                     shard_cache_mb=shard_cache_mb)
    catalog = open_catalog(settings)
    if in_process:
        from flawline.train.submit import run_in_process

        _show(run_in_process(catalog, settings, spec), as_json)
        return
    waits: list[str] = []
    notes: list[str] = []
    run_id, job_id = submit_run(catalog, settings, spec, on_wait=waits.append, on_note=notes.append)
    if as_json and not wait:
        print_json({"run": run_id, "ray_job_id": job_id, "dashboard": settings.ray_dashboard_url,
                    "waiting": waits[0] if waits else None, "notes": notes})
        return
    console.print(f"run {run_id} submitted as Ray job {job_id}; watch it at {settings.ray_dashboard_url} "
                  f"or with `flawline runs show {run_id}`")
    for note in notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    for line in waits:
        console.print(f"run {run_id} is {line}; it starts when they are free", highlight=False, soft_wrap=True)
    if not wait:
        return
    _follow(catalog, settings, run_id, as_json)


def _stage(progress: dict) -> str:
    """`` embedding 320/762 images``, `` fitting 762 images``, `` evaluating`` (runs without epochs)."""
    if "stage" not in progress:
        return ""
    n, of = progress.get("images"), progress.get("of")
    return f" {progress['stage']}" + (f" {n}/{of} images" if of else f" {n} images" if n else "")


def _follow(catalog, settings, run_id: int, as_json: bool) -> None:  # noqa: ANN001
    from flawline.train.runs import get_run
    from flawline.train.submit import follow

    last = None
    for state in follow(catalog, settings, run_id):
        p = state["progress"] or {}
        live = state["status"] in ("pending", "running")  # a finished run's last stage is history
        line = state["status"] + (f" epoch {p['epoch']}/{p['epochs']} loss {p.get('loss', float('nan')):.4f}"
                                  if "epoch" in p else _stage(p) if live else "") + (
            f": {state['waiting']}" if state.get("waiting") else "")
        if line != last:
            err_console.print(line)
            last = line
    _show(run_id, as_json)
    if get_run(catalog, run_id).status.value != "succeeded":
        raise typer.Exit(1)


@app.command("settings")
def settings_(as_json: bool = typer.Option(False, "--json")) -> None:
    """The label settings, the detectors each trains, and what each needs."""
    from flawline.train.settings import SETTINGS

    items = [{"setting": cls.name, "methods": list(cls.methods), "description": cls.description}
             for cls in SETTINGS.values()]
    if as_json:
        print_json(items)
        return
    table = Table("setting", "methods (first = default)", "what it learns from")
    for i in items:
        table.add_row(i["setting"], ", ".join(i["methods"]), i["description"])
    console.print(table)


def _run_dict(row, models: list[str]) -> dict:  # noqa: ANN001
    m = row.metrics or {}
    return {"run": row.id, "status": row.status.value, "setting": row.setting, "method": row.method,
            "datasets": row.config.get("spec", {}).get("datasets"), "ray_job_id": row.ray_job_id,
            "created_at": row.created_at, "started_at": row.started_at, "finished_at": row.finished_at,
            "ray_job_ids": row.config.get("ray_job_ids", [row.ray_job_id] if row.ray_job_id else []),
            "progress": m.get("progress"), "checkpoints": m.get("checkpoints"), "worker_nodes": m.get("worker_nodes"),
            "placement": m.get("placement"), "driver_node": m.get("driver_node"),
            "metrics": {k: v for k, v in m.items() if k not in ("progress", "checkpoints", "worker_nodes", "placement",
                                                                 "driver_node")},
            "models": models, "error": row.error, "spec": row.config.get("spec"), "plan": row.config.get("plan")}


def _spec_line(spec: dict) -> str:
    """``spec: 256 px, batch 16, 1 worker × 1 CPU, epochs: the setting's, seed 0, efficientnet_lite0``
    and the detector options, from a run's stored spec."""
    workers = spec.get("workers", 1)
    if spec.get("min_workers"):
        workers = f"{spec['min_workers']}-{workers}"
    bundle = f"{spec.get('cpus_per_worker', 1):g} CPU" + (f" + {spec['gpus_per_worker']:g} GPU"
                                                        if spec.get("gpus_per_worker") else "")
    parts = [f"{spec.get('image_size')} px", f"batch {spec.get('batch_size')}", f"{workers} worker(s) × {bundle}",
             f"epochs {spec['epochs']}" if spec.get("epochs") else "epochs: the setting's",
             f"seed {spec.get('seed')}", str(spec.get("backbone"))]
    if spec.get("precision", "fp32") != "fp32":
        parts.append(spec["precision"])
    if spec.get("options"):
        parts.append("options " + ", ".join(f"{k}={v}" for k, v in spec["options"].items()))
    return "spec: " + ", ".join(parts)


def _models_of(run_id: int) -> list[str]:
    from sqlalchemy import select

    from flawline.catalog import ModelVersion

    with open_catalog().session() as s:
        return [f"{n}:{v}" for n, v in s.execute(select(ModelVersion.name, ModelVersion.version)
                                                 .where(ModelVersion.run_id == run_id))]


def _show(run_id: int, as_json: bool, settings=None) -> None:  # noqa: ANN001
    from flawline.train.runs import FINAL, get_run

    row = get_run(open_catalog(), run_id)
    info = _run_dict(row, _models_of(run_id))
    if settings is not None and row.status not in FINAL:  # are its workers' resources pending?
        from flawline.train.submit import waiting

        info["waiting"] = waiting(settings, row.ray_job_id)
    if as_json:
        print_json(info)
        return
    console.print(f"[bold]run {info['run']}[/] {info['status']}: {info['setting']}/{info['method']} on "
                  f"{'+'.join(info['datasets'] or [])} (Ray job {info['ray_job_id'] or '-'})")
    if info["spec"]:
        console.print(_spec_line(info["spec"]), highlight=False, soft_wrap=True)
    if info.get("waiting"):
        console.print(f"[yellow]{info['waiting']}[/]", highlight=False, soft_wrap=True)
    if info["progress"] and ("epoch" in info["progress"] or info["status"] in ("pending", "running")):
        p = info["progress"]
        console.print(f"progress: epoch {p.get('epoch')}/{p.get('epochs')}, loss {p.get('loss', float('nan')):.4f}, "
                      f"{info['checkpoints']} checkpoint(s)" if "epoch" in p else f"progress:{_stage(p)}")
    if info["placement"]:
        where = ", ".join(f"rank {p['rank']} on {p['host']} node {p['node_id'][:8]} ({p['device']})"
                          for p in info["placement"])
        same = info["driver_node"] in {p["node_id"] for p in info["placement"]}
        console.print(f"workers: {where}; driver node {str(info['driver_node'])[:8]} "
                      f"({'also hosts a worker' if same else 'trained nothing'})")
    elif info["worker_nodes"]:
        console.print(f"workers on {len(set(info['worker_nodes']))} node(s)")
    for key, what in (("embedding_cache", "embeddings"), ("shard_cache", "decoded images")):
        if info["metrics"].get(key):
            console.print(f"{what}: {info['metrics'][key]}")
    if len(info["ray_job_ids"]) > 1:
        console.print(f"Ray jobs: {', '.join(info['ray_job_ids'])} (resumed {len(info['ray_job_ids']) - 1}x)")
    for key in ("accuracy", "f1", "image_auroc", "average_precision", "pixel_auroc"):
        if key in info["metrics"]:
            console.print(f"{key}: {info['metrics'][key]:.4f}")
    if info["models"]:
        console.print("model: " + ", ".join(info["models"]))
    if info["error"]:
        console.print(f"[red]error:[/] {info['error']}")


@runs_app.command("list")
def list_(limit: int = typer.Option(20, min=1, help="Newest N runs."),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Recent training runs with their status (reconciled with Ray) and headline metric."""
    from flawline.train.runs import list_runs
    from flawline.train.submit import refresh

    settings = get_settings()
    catalog = open_catalog(settings)
    refresh(catalog, settings)
    rows = [_run_dict(r, []) for r in list_runs(catalog, limit)]
    if as_json:
        print_json(rows)
        return
    # the names people type never shrink to "…": short headers, no accuracy column unless a run has one
    accuracy = any("accuracy" in r["metrics"] for r in rows)
    table = Table("run", *(Column(c, no_wrap=True) for c in ("status", "setting", "method")),
                  Column("datasets", overflow="fold"),
                  *(Column(c, no_wrap=True) for c in ("epoch", *(["acc."] if accuracy else []), "AUROC", "created")), box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for r in rows:
        p, m = r["progress"] or {}, r["metrics"]
        table.add_row(str(r["run"]), r["status"], r["setting"], r["method"], "+".join(r["datasets"] or []),
                      f"{p['epoch']}/{p['epochs']}" if "epoch" in p else "-",
                      *([f"{m['accuracy']:.3f}" if "accuracy" in m else "-"] if accuracy else []),
                      f"{m['image_auroc']:.3f}" if "image_auroc" in m else "-", f"{r['created_at']:%m-%d %H:%M}")
    console.print(table)


@runs_app.command()
def show(run: int = typer.Argument(..., help="Run id."), as_json: bool = typer.Option(False, "--json")) -> None:
    """One run: spec, status, progress, metrics, the model version it produced, its error; while
    its workers' resources are pending, what it waits for (free CPUs, who holds them)."""
    from flawline.train.submit import refresh

    settings = get_settings()
    refresh(open_catalog(settings), settings, [run])
    _show(run, as_json, settings)


@runs_app.command()
def logs(run: int = typer.Argument(..., help="Run id.")) -> None:
    """The run's Ray job logs (driver and workers)."""
    from flawline.train.submit import run_logs

    settings = get_settings()
    typer.echo(run_logs(open_catalog(settings), settings, run), nl=False)


@runs_app.command()
def resume(run: int = typer.Argument(..., help="Run id of a failed or cancelled run."),
           wait: bool = typer.Option(False, "--wait", help="Follow the run until it ends."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Continue a failed or cancelled run from its last checkpoint (its last finished epoch) as a
    new Ray job on the same run: same spec, same checkpoint storage; `runs show` lists both jobs."""
    from flawline.train.submit import resume_run

    settings = get_settings()
    catalog = open_catalog(settings)
    waits: list[str] = []
    job_id = resume_run(catalog, settings, run, on_wait=waits.append)
    if as_json and not wait:
        print_json({"run": run, "ray_job_id": job_id, "waiting": waits[0] if waits else None})
        return
    console.print(f"run {run} resumed as Ray job {job_id}")
    for line in waits:
        console.print(f"run {run} is {line}; it starts when they are free", highlight=False, soft_wrap=True)
    if wait:
        _follow(catalog, settings, run, as_json)


@runs_app.command()
def cancel(run: int = typer.Argument(..., help="Run id.")) -> None:
    """Stop the run's Ray job and mark the run cancelled."""
    from flawline.train.submit import cancel_run

    settings = get_settings()
    cancel_run(open_catalog(settings), settings, run)
    console.print(f"run {run} cancelled")
