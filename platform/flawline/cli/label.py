"""``flawline label``: Label Studio projects, pushing images with pre-annotations, pulling finished
annotations (polling or a webhook listener), the ledger's state, and a simulated annotator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.table import Table

from flawline.cli.app import FlawlineTyper, console, err_console, print_json
from flawline.config import Settings, get_settings
from flawline.context import open_catalog, open_store
from flawline.errors import InvalidInput, LabelStudioError, ServiceError

if TYPE_CHECKING:
    from flawline.catalog import Catalog, LabelProject
    from flawline.labelstudio.client import LabelStudioClient
    from flawline.storage import ObjectStore

# The catalog (SQLAlchemy), the object store client and rich.progress are imported by the commands
# that use them too: this module is loaded for `flawline --help`. The SQL behind the commands is in
# flawline.labelstudio.ledger.

# The Label Studio SDK takes seconds to import: it is imported by the commands that use it, so
# `flawline --help` and every other command stay fast. TASKS mirrors flawline.labelstudio.configs.
app = FlawlineTyper(help="Label Studio: projects, pushing images with pre-annotations, pulling finished annotations.")

TASKS = ("classification", "segmentation", "polygons", "boxes")
_TASKS = "|".join(TASKS)
DEFAULT_TASK = "segmentation"  # as flawline.labelstudio.ledger.DEFAULT_TASK (a test keeps them equal)

DatasetOpt = typer.Option(..., "--dataset", "-d", help="Dataset name in the catalog.")
TaskOpt = typer.Option(None, "--task", "-t", help=f"Labelling task: {_TASKS} (default: the dataset's only "
                       f"project's task, else {DEFAULT_TASK}).")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")


# -- helpers ------------------------------------------------------------------------------------
def check_task(task: str) -> str:
    """``task`` if it is a labelling task, else a one-line InvalidInput naming the choices."""
    from flawline.labelstudio.configs import check_task as check

    return check(task)


def _client(settings: Settings) -> LabelStudioClient:
    from flawline.labelstudio.client import LabelStudioClient

    return LabelStudioClient.from_settings(settings)


def _find(catalog: Catalog, client: LabelStudioClient, dataset: str, task: str) -> LabelProject:
    from flawline.labelstudio.projects import find_project

    return find_project(catalog, client, dataset, task)


@contextmanager
def _progress(label: str, total: int | None, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar on stderr, shown from the first step on (an early error prints nothing else)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err_console, transient=False)
    state: dict[str, Any] = {}

    def advance(n: int) -> None:
        if not state:
            bar.start()
            state["task"] = bar.add_task(label, total=total)
        bar.advance(state["task"], n)

    try:
        yield advance
    finally:
        if state:
            bar.stop()


def _context(settings: Settings) -> tuple[Catalog, ObjectStore, LabelStudioClient]:
    return open_catalog(settings), open_store(settings), _client(settings)


def resolve_task(catalog: Catalog, settings: Settings, dataset: str, task: str | None) -> str:
    """``task`` checked; when not given, the task of the dataset's only project on this server."""
    from flawline.labelstudio.ledger import resolve_task as resolve

    return resolve(catalog, settings, dataset, task)


# -- setup --------------------------------------------------------------------------------------
@app.command()
def setup(
    dataset: str = DatasetOpt,
    task: str = typer.Option(DEFAULT_TASK, "--task", "-t", help=f"Labelling task: {_TASKS}."),
    classes: Optional[str] = typer.Option(
        None, help="Defect classes, comma-separated (default: the dataset's classes). Used when the project "
        "is created; an existing project keeps its own."),
    as_json: bool = JsonOpt,
) -> None:
    """Create (or find again) the Label Studio project for a dataset and labelling task.

    One project per dataset, task and Label Studio server, remembered in the catalog; its labelling
    config has a verdict (normal or a defect class) and, except for classification, region tools
    (brush, polygons or boxes) labelled with the defect classes."""
    check_task(task)
    wanted = None if classes is None else [c.strip() for c in classes.split(",") if c.strip()]
    if classes is not None and not wanted:
        raise InvalidInput(f"--classes {classes!r} names no class; give e.g. --classes crack,blowhole")
    from flawline.labelstudio.projects import ensure_project

    settings = get_settings()
    catalog, client = open_catalog(settings), _client(settings)
    project = ensure_project(catalog, client, dataset, task, wanted)
    url = f"{client.url}/projects/{project.ls_project_id}"
    info = {"dataset": dataset, "task": task, "project": project.ls_project_id, "url": url,
            "classes": list(project.classes), "title": project.title}
    if as_json:
        print_json(info)
        return
    console.print(f"[bold]{project.title}[/]: {url}", highlight=False, soft_wrap=True)
    console.print(f"classes: {', '.join(project.classes) or 'defect'}", highlight=False, soft_wrap=True)
    if wanted is not None and sorted(wanted) != sorted(project.classes):
        err_console.print("note: the project existed already and keeps its classes; --classes applies only "
                          "when a project is created", highlight=False, soft_wrap=True)


# -- push ---------------------------------------------------------------------------------------
@app.command()
def push(
    dataset: str = DatasetOpt,
    task: Optional[str] = TaskOpt,
    split: str = typer.Option("train", help="Split whose images are pushed: train, val, test or all."),
    limit: Optional[int] = typer.Option(None, min=1, help="Push at most N images new to the project."),
    all_: bool = typer.Option(False, "--all", help="Also push images that have a human annotation already."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Pre-annotate with this registered model "
                                        "(NAME: its production version, else its newest; or NAME:V): verdict, "
                                        "score, regions."),
    on_cluster: bool = typer.Option(False, "--on-cluster", help="Compute the pre-annotations as a Ray job: model "
                                    "actors in parallel on the cluster (for large batches)."),
    workers: int = typer.Option(2, min=1, help="With --on-cluster: model actors."),
    as_json: bool = JsonOpt,
) -> None:
    """Send a dataset's images to its Label Studio project as tasks.

    By default: the split's images with no human annotation yet. Images the project has already
    are not sent again (the catalog's task ledger), and tasks a lost answer left untracked are
    found and recorded first (reconciled), so pushing twice duplicates nothing."""
    from flawline.labelstudio.ledger import images_to_push
    from flawline.labelstudio.push import push_tasks

    settings = get_settings()
    catalog, store, client = _context(settings)
    task = resolve_task(catalog, settings, dataset, task)
    project = _find(catalog, client, dataset, task)
    image_ids, new = images_to_push(catalog, project, dataset, split, all_, limit)
    predictions = _pre_annotations(catalog, store, settings, dataset, image_ids, model, not as_json,
                                   workers if on_cluster else 0) if model else None
    with _progress("push", new, not as_json) as progress:
        report = push_tasks(catalog, store, client, project, image_ids, predictions, progress=progress)
    info = {"dataset": dataset, "task": task, "project": project.ls_project_id, "created": report.created,
            "already_there": report.already_there, "reconciled": report.reconciled, "tasks_gone": report.tasks_gone,
            "predictions_updated": report.predictions_updated, "model_version": report.model_version,
            "stale_open_tasks": report.stale_open_tasks,
            "url": f"{client.url}/projects/{project.ls_project_id}"}
    if as_json:
        print_json(info)
        return
    console.print(f"{report.created} task(s) created, {report.already_there} already there, "
                  f"{report.reconciled} reconciled, {report.tasks_gone} deleted in Label Studio (dropped from the "
                  f"ledger); {info['url']}", highlight=False, soft_wrap=True)
    if report.model_version:
        console.print(f"the labelling queue shows {report.model_version}'s pre-annotations (project model version); "
                      f"{report.predictions_updated} open task(s) got them in place of an older model's",
                      highlight=False, soft_wrap=True)
    if report.stale_open_tasks:
        err_console.print(f"note: {report.stale_open_tasks} other open task(s) of the project carry another version's "
                          "pre-annotation, which the queue no longer shows; push their images again with this "
                          "--model (e.g. --split val) to update them", highlight=False, soft_wrap=True)
    if not image_ids:
        hint = "" if split == "all" else f" (has the dataset a {split} split? `flawline data split` makes one)"
        err_console.print(f"no {split} images of {dataset!r} to push{hint}", highlight=False, soft_wrap=True)


def _pre_annotations(catalog, store, settings, dataset: str, image_ids: list[int], model: str, show: bool,  # noqa: ANN001
                     workers: int) -> dict:
    """The model's predictions for the images to push (push sends them with the new tasks): in
    this process, or with ``workers`` > 0 as a Ray job on the cluster."""
    from flawline.active.scoring import pre_annotations
    from flawline.catalog.model_versions import load_version
    from flawline.data.records import image_records
    from flawline.labelstudio.convert import prediction_version
    from flawline.serving.models import resolve

    ref = resolve(catalog, model)
    detector = load_version(catalog, store, f"{ref.name}:{ref.version}")  # with the catalog's threshold
    wanted = set(image_ids)
    rows = [r for r in image_records(catalog, dataset) if r.image_id in wanted]
    name = f"{ref.name}:{ref.version}"
    say = (lambda line: err_console.print(line, highlight=False, soft_wrap=True)) if show else None
    if say:
        say(f"pre-annotating {len(rows)} image(s) with {name}" + (f" as a Ray job ({workers} actors)" if workers else ""))
    if say and not detector.info.get("normal_score_quantiles"):
        say(f"note: {name} keeps no scores of held-out normal images (fewer than 10 when it was made), so "
            "annotators see no score, only verdicts and regions; a model trained or evaluated with a larger "
            "validation share has them")
    if not workers:
        return pre_annotations(detector, store, rows, prediction_version(name, detector.threshold))
    from flawline.active.score_job import submit_pre_annotation
    from flawline.catalog.model_versions import get_version

    with catalog.session() as s:
        row = get_version(s, name)
        s.expunge(row)
    return submit_pre_annotation(settings, store, row, rows, dataset, detector.config.image_size, workers=workers,
                                 progress=say)


# -- pull ---------------------------------------------------------------------------------------
@app.command()
def pull(
    dataset: str = DatasetOpt,
    task: Optional[str] = TaskOpt,
    full: bool = typer.Option(False, "--full", help="Re-read every task, not only those updated since the "
                              "last pull (the watermark)."),
    as_json: bool = JsonOpt,
) -> None:
    """Bring finished annotations from Label Studio into the catalog (as human annotations).

    Reads the tasks updated since the project's watermark: new and updated annotations replace
    what the catalog had from that task, deleted ones are removed, skipped tasks go back to the
    unlabelled pool. A task that cannot be read (malformed or contradictory result) is listed
    and left as it was; the rest are applied. Exit code: 0, or 2 when any task had an error."""
    from flawline.labelstudio.pull import pull_annotations

    settings = get_settings()
    catalog, store, client = _context(settings)
    task = resolve_task(catalog, settings, dataset, task)
    project = _find(catalog, client, dataset, task)
    with _progress("pull", None, not as_json) as progress:
        report = pull_annotations(catalog, store, client, project, full=full, progress=progress)
    if as_json:
        print_json({"dataset": dataset, "task": task, "project": project.ls_project_id, **report.as_dict()})
    else:
        console.print(f"{report.seen} task(s) read: {report.labelled} labelled, {report.removed} removed, "
                      f"{report.skipped} skipped, {report.unchanged} unchanged, {report.orphaned} orphaned, "
                      f"{report.tasks_gone} deleted in Label Studio, "
                      f"{len(report.errors)} error(s); watermark "
                      f"{report.watermark.isoformat() if report.watermark else '-'}", highlight=False, soft_wrap=True)
        for line in report.errors:
            err_console.print(f"error: {line}", highlight=False, soft_wrap=True)
    if report.errors:
        raise typer.Exit(2)


# -- status -------------------------------------------------------------------------------------
@app.command()
def status(dataset: str = DatasetOpt, task: Optional[str] = TaskOpt, as_json: bool = JsonOpt) -> None:
    """The project's tasks by state, its pull watermark, and the dataset's human annotations.

    Task states: pushed (waiting for a person), labelled (its annotation is in the catalog),
    skipped (back in the unlabelled pool), orphaned (annotated after its image was deleted).
    Reads only the catalog: Label Studio need not be running."""
    from flawline.labelstudio.ledger import label_status

    settings = get_settings()
    catalog = open_catalog(settings)
    info = label_status(catalog, settings, dataset, resolve_task(catalog, settings, dataset, task))
    if as_json:
        print_json(info)
        return
    table = Table(show_header=False, title=f"{dataset} ({info['task']}) in Label Studio")
    rows = [("project", info["url"]), ("classes", ", ".join(info["classes"]) or "defect"),
            ("tasks", f"{info['total']}: " + ", ".join(f"{k} {v}" for k, v in info["tasks"].items())),
            ("watermark", info["watermark"] or "- (never pulled)"),
            ("webhook", "-" if info["webhook"] is None else f"id {info['webhook']}"),
            ("human annotations", str(info["human_annotations"]))]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


# -- listen -------------------------------------------------------------------------------------
@dataclass
class Listener:
    """The webhook app and what it was registered as."""

    app: Any  # fastapi.FastAPI
    project: LabelProject
    url: str
    webhook_id: int | None


def build_listener(settings: Settings, dataset: str, task: str | None, url: str, secret: str | None = None,
                   register: bool = True) -> Listener:
    """The webhook endpoint's app for the dataset's project; with ``register`` Label Studio is told
    to call ``url`` (replacing the project's earlier webhook)."""
    from flawline.labelstudio.webhook import make_app, register_webhook

    catalog, store, client = _context(settings)
    task = resolve_task(catalog, settings, dataset, task)
    project = _find(catalog, client, dataset, task)
    hook = None
    if register:
        try:
            hook = register_webhook(catalog, client, project, url, secret)
        except LabelStudioError as err:
            if "reserved network address" not in str(err):
                raise
            raise LabelStudioError(
                f"Label Studio at {client.url} refuses to call {url}: a local address, which its SSRF protection "
                "blocks; start Label Studio with SSRF_PROTECTION_ENABLED=false (a server only you can reach), give "
                "--url an address it may call, or poll with `flawline label pull` instead") from None
    return Listener(make_app(catalog, store, client, secret), project, url, hook)


@app.command()
def listen(
    dataset: str = DatasetOpt,
    task: Optional[str] = TaskOpt,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(18090, min=1, max=65535, help="Port to listen on."),
    url: Optional[str] = typer.Option(None, help="URL Label Studio should call, when it is not "
                                      "http://HOST:PORT/labelstudio/webhook (a proxy, or HOST 0.0.0.0)."),
    secret: Optional[str] = typer.Option(None, envvar="FLAWLINE_LABELSTUDIO_WEBHOOK_SECRET",
                                         help="Shared secret Label Studio sends in X-Flawline-Webhook-Secret; "
                                         "calls without it are refused."),
    register: bool = typer.Option(True, "--register/--no-register", help="Register the webhook with Label "
                                  "Studio first (replaces the project's earlier one)."),
) -> None:
    """Serve the webhook Label Studio calls on new, updated and deleted annotations; runs until Ctrl-C.

    Each call is applied to the catalog as it happens (instead of polling with `label pull`); the
    endpoint re-reads the tasks it names from Label Studio, so a forged payload writes nothing.
    A `label pull` afterwards catches anything sent while it was not running."""
    import uvicorn

    from flawline.storage.local_s3 import port_in_use

    check_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if port_in_use(check_host, port):
        raise ServiceError(f"cannot listen on {host}:{port}: the port is already in use; choose another with --port")
    settings = get_settings()
    listener = build_listener(settings, dataset, task, url or f"http://{host}:{port}/labelstudio/webhook", secret,
                              register)
    hook = f"webhook {listener.webhook_id} registered" if listener.webhook_id is not None else "webhook not registered"
    console.print(f"listening on http://{host}:{port}/labelstudio/webhook for {listener.project.title} "
                  f"(Label Studio project {listener.project.ls_project_id}; {hook} → {listener.url}); "
                  "Ctrl-C stops", highlight=False, soft_wrap=True)
    try:
        uvicorn.run(listener.app, host=host, port=port, log_level="warning")
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C it caught
        pass
    console.print("stopped")


# -- simulate -----------------------------------------------------------------------------------
@app.command()
def simulate(
    dataset: str = DatasetOpt,
    task: Optional[str] = TaskOpt,
    limit: Optional[int] = typer.Option(None, min=1, help="Answer at most N open tasks."),
    truth_dataset: Optional[str] = typer.Option(
        None, help="Take the answers from this dataset's imported labels, matched to the images by content "
        "hash (default: the dataset's own)."),
    as_json: bool = JsonOpt,
) -> None:
    """For benchmarks and tests only: a simulated annotator answers open tasks from imported labels.

    It annotates through the same Label Studio API a person's annotations take, from the
    catalog's imported (or held-back oracle) labels; `flawline label pull` then brings the
    answers in."""
    from flawline.labelstudio.annotator import SimulatedAnnotator
    from flawline.labelstudio.ledger import truth_for

    settings = get_settings()
    catalog, store, client = _context(settings)
    task = resolve_task(catalog, settings, dataset, task)
    project = _find(catalog, client, dataset, task)
    answered = SimulatedAnnotator(client, store, truth_for(catalog, dataset, truth_dataset)).answer(project, limit)
    if as_json:
        print_json({"dataset": dataset, "task": task, "project": project.ls_project_id, "answered": answered})
        return
    console.print(f"{answered} task(s) answered by the simulated annotator; `flawline label pull --dataset "
                  f"{dataset} --task {task}` brings them in", highlight=False, soft_wrap=True)
