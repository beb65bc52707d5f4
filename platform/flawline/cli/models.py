"""``flawline evaluate`` and ``flawline models``: fit and evaluate a detector on a catalogued
dataset, register the model version, inspect it, set its threshold, export it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Optional

import typer
from rich import box
from rich.table import Column, Table

from flawline.cli.app import FlawlineTyper, console, err_console, print_json
from flawline.config import get_settings
from flawline.context import open_catalog, open_store
from flawline.errors import InvalidInput

if TYPE_CHECKING:
    from rich.progress import Task

app = FlawlineTyper(help="Model versions: list, show, set thresholds, export.")


class _StageProgress:
    """``evaluate_dataset``'s progress callback on stderr: a rich progress bar per stage (count,
    rate, elapsed) on a terminal; elsewhere (logs, CI, pipes) one line per stage when it ends."""

    LABELS: ClassVar[dict[str, str]] = {"fit": "fit (fetch + fit)", "calibrate": "calibrate", "test": "test"}

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        class Rate(ProgressColumn):
            def render(self, task: Task) -> str:
                return f"{task.speed:.1f} images/s" if task.speed else ""

        self.live = err_console.is_terminal
        self.bar = Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), Rate(),
                            TimeElapsedColumn(), console=err_console, disable=not self.live)
        self.tasks: dict[str, int] = {}
        self.started: dict[str, float] = {}

    def __enter__(self) -> _StageProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(self.LABELS.get(stage, stage), total=total)
            self.started[stage] = time.perf_counter()
        self.bar.update(self.tasks[stage], completed=done)
        if done == total and not self.live:
            seconds = time.perf_counter() - self.started[stage]
            rate = f", {done / seconds:.1f} images/s" if seconds > 0 and done else ""
            err_console.print(f"{self.LABELS.get(stage, stage)}: {done}/{total} images in {seconds:.1f} s{rate}",
                              highlight=False)


def evaluate(
    dataset: str = typer.Argument(..., help="Dataset with a train/test split (`flawline data split`)."),
    method: str = typer.Option("patchcore", "--method", "-m", help="Detector, e.g. patchcore, padim, flow (an unknown name lists "
                                                                  "every one)."),
    backbone: str = typer.Option("efficientnet_lite0", help="Feature backbone."),
    image_size: int = typer.Option(256, min=32, max=1024, help="Images are resized to this square size."),
    option: list[str] = typer.Option([], "--option", "-o", help="Detector setting KEY=VALUE (repeatable), e.g. "
                                     "coreset_ratio=0.05, blur_sigma=2, batch_size=32; an unknown key lists "
                                     "the detector's settings."),
    threshold: str = typer.Option("auto", help="How to choose the threshold on the validation images: auto "
                                  "(best-f1 when val holds labelled defects, else quantile; the report says which); "
                                  "from normal images alone: max, quantile, k-sigma, max-area; or best-f1 / youden "
                                  "(balanced accuracy; both need labelled defects in val)."),
    p: float = typer.Option(0.99, help="quantile: the p-quantile of normal scores."),
    k: float = typer.Option(3.0, help="k-sigma: mean + k * std."),
    max_area: int = typer.Option(64, help="max-area: largest tolerated anomalous region (pixels)."),
    threshold_value: Optional[float] = typer.Option(None, help="A manual threshold; overrides --threshold."),
    out: Optional[Path] = typer.Option(None, help="Report folder (default: <data dir>/reports/<dataset>-<method>-<time>)."),
    save: bool = typer.Option(True, help="Save the fitted model to S3 and register it in the catalog."),
) -> None:
    """Fit a detector on the dataset's normal training images, choose its threshold on the
    validation images (by default best F1 when they hold labelled defects, else the 0.99-quantile of
    the normal ones; it prints which rule it took), evaluate on the test split and write a report
    (JSON, Markdown, ROC curve, heatmaps of the worst misses and false alarms). Images stream in
    batches (memory does not grow with the dataset); pixel AUROC and AUPRO come from histograms,
    and the report states their error bound."""
    from flawline.evaluate.pipeline import EvaluateOptions, evaluate_dataset
    from flawline.options import parse_options

    settings = get_settings()
    options = EvaluateOptions(method=method, backbone=backbone, image_size=image_size,
                              detector_options=parse_options(option), threshold=threshold, p=p, k=k,
                              max_area=max_area, threshold_value=threshold_value, out=out, save=save,
                              workers=settings.upload_workers)
    with _StageProgress() as progress:
        result = evaluate_dataset(open_catalog(settings), open_store(settings), dataset, options, progress)
    for note in result.notes:
        err_console.print(note, highlight=False)
    metrics = result.metrics
    console.print(f"image AUROC {metrics['image_auroc']:.4f}  AP {metrics['average_precision']:.4f}  "
                  f"F1 {metrics.get('f1', 0):.4f}" + (f"  pixel AUROC {metrics['pixel_auroc']:.4f}  "
                                                     f"AUPRO {metrics['aupro']:.4f}" if "aupro" in metrics else ""))
    console.print(f"threshold {result.detector.threshold.describe()}")
    if result.model:
        console.print(f"model {result.model} saved to {result.artifact_uri}")
    console.print(f"report: {result.files['markdown']}")


def _load(ref: str):
    """A detector from a model name[:version], a local file, or an s3:// URI."""
    from flawline.models.artifacts import detector_from_bytes

    if ref.startswith("s3://"):
        store = open_store()
        return detector_from_bytes(store.get_bytes(store.key_from_uri(ref)), ref), None
    path = Path(ref)
    if path.is_file():
        return detector_from_bytes(path.read_bytes(), str(path)), None
    from flawline.catalog.model_versions import load_version

    return load_version(open_catalog(), open_store(), ref), ref  # the catalog's threshold is authoritative


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json")) -> None:
    """Registered model versions with their threshold and test metrics."""
    from sqlalchemy import select

    from flawline.catalog import ModelVersion

    with open_catalog().session() as s:
        rows = s.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)).all()
        items = [{"model": f"{r.name}:{r.version}", "method": r.method, "stage": r.stage.value,
                  "threshold": r.threshold, "threshold_method": (r.threshold_info or {}).get("method"),
                  "image_auroc": (r.metrics or {}).get("image_auroc"), "artifact": r.artifact_uri} for r in rows]
    if as_json:
        print_json(items)
        return
    if not items:
        console.print("no registered models yet: `flawline evaluate DATASET --method padim` or "
                      "`flawline train submit --dataset DATASET` trains and registers one", highlight=False)
        return
    # the names people type never shrink to "…"; the artifact URI only where the terminal has room
    # for it (`models show` and --json always give it)
    wide = console.width >= 120
    table = Table(*(Column(c, no_wrap=True) for c in ("model", "method", "stage")), "threshold", "image AUROC",
                  *([Column("artifact", overflow="fold")] if wide else []), box=box.SIMPLE_HEAD)
    for i in items:
        table.add_row(i["model"], i["method"], i["stage"],
                      f"{i['threshold']:.4g} ({i['threshold_method']})" if i["threshold"] is not None else "-",
                      f"{i['image_auroc']:.4f}" if i["image_auroc"] is not None else "-",
                      *([i["artifact"]] if wide else []))
    console.print(table)


@app.command()
def show(model: str = typer.Argument(..., help="name, name:version, a file or an s3:// URI"),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """A model's method, settings, threshold (value, how and on what data it was chosen) and metrics."""
    det, ref = _load(model)
    info = det.describe()
    if ref:
        from flawline.catalog.model_versions import get_version

        with open_catalog().session() as s:
            row = get_version(s, ref)
            info.update(model=f"{row.name}:{row.version}", stage=row.stage.value, artifact=row.artifact_uri,
                        metrics=row.metrics, threshold_history=(row.threshold_info or {}).get("history", []))
    if as_json:
        print_json(info)
        return
    c = info["config"]
    tiled = f", tiles of {c['tile']}px overlapping {c['tile_overlap']:.0%}" if c.get("tile") else ""
    console.print(f"[bold]{info.get('model', model)}[/] {info['method']} ({c['backbone']}, {c['image_size']}px{tiled})")
    console.print("threshold: " + (det.threshold.describe() if det.threshold else "none"))
    for key in ("image_auroc", "average_precision", "f1", "pixel_auroc", "aupro"):
        if info.get("metrics") and key in info["metrics"]:
            console.print(f"{key}: {info['metrics'][key]:.4f}")


@app.command("threshold")
def threshold_(model: str = typer.Argument(..., help="name or name:version"),
               value: float = typer.Option(..., help="The new threshold: images scoring at or above it are defects."),
               note: str = typer.Option("", help="Why (kept with the threshold).")) -> None:
    """Set a manual threshold on a registered model version; the previous one is kept in its history."""
    from flawline.catalog.model_versions import get_version, set_threshold
    from flawline.evaluate import thresholds as th

    with open_catalog().session() as s:
        row = get_version(s, model)
        old = row.threshold
        set_threshold(s, row, th.manual(value, note).as_dict())
        console.print(f"{row.name}:{row.version} threshold {old} → {value} (manual)")


@app.command()
def promote(model: str = typer.Argument(..., help="name (its newest version) or name:version")) -> None:
    """Put a model version into production; the version in production until now is archived."""
    from flawline.catalog.model_versions import get_version, production_version
    from flawline.catalog.model_versions import promote as promote_version

    with open_catalog().session() as s:
        row = get_version(s, model)
        stage, before = row.stage.value, production_version(s, row.name)
        if before is not None and before.id == row.id:
            console.print(f"{row.name}:{row.version} is already in production; nothing changed")
            return
        replaced = None if before is None else before.version
        promote_version(s, f"{row.name}:{row.version}")
        console.print(f"{row.name}:{row.version} {stage} → production"
                      + (f"; {row.name}:{replaced} production → archived" if replaced else ""))


@app.command()
def rollback(name: str = typer.Argument(..., help="model name")) -> None:
    """Archive the production version of a model and put back the archived version before it."""
    from flawline.catalog.model_versions import production_version
    from flawline.catalog.model_versions import rollback as rollback_version

    with open_catalog().session() as s:
        before = production_version(s, name)
        was = None if before is None else before.version
        row = rollback_version(s, name)
        console.print(f"{name}:{was} production → archived; {name}:{row.version} archived → production")


@app.command()
def export(model: str = typer.Argument(..., help="name, name:version, a file or an s3:// URI"),
           format: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
           out: Path = typer.Option(..., "--out", "-o", help="Output file."),
           probe: int = typer.Option(8, help="Random probe images used to check the export.")) -> None:
    """Export the whole prediction path; checks that the exported scores match the model's."""
    if format != "onnx":
        raise InvalidInput(f"export format {format!r} is not supported; use onnx")
    det, _ = _load(model)
    import torch

    from flawline.models.export import check_export, export_onnx

    path = export_onnx(det, out)
    drift = check_export(det, path, torch.rand(probe, 3, det.config.image_size, det.config.image_size,
                                               generator=torch.Generator().manual_seed(0)))
    console.print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB); max score drift "
                  f"{drift['max_abs_score_diff']:.2e} (relative {drift['max_rel_score_diff']:.2e})")


