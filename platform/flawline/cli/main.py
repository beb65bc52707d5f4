"""The ``flawline`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flawline import __version__
from flawline.cli import data as data_cli
from flawline.cli import db as db_cli
from flawline.cli import label as label_cli
from flawline.cli import loop as loop_cli
from flawline.cli import models as models_cli
from flawline.cli import monitor as monitor_cli
from flawline.cli import serve as serve_cli
from flawline.cli import services
from flawline.cli import train as train_cli
from flawline.cli.app import FlawlineTyper, console, print_json
from flawline.config import get_settings

app = FlawlineTyper(
    help="flawline: defect-detection datasets, training, serving and labelling on Ray.\n\n"
    "Settings come from FLAWLINE_* environment variables or a TOML file (FLAWLINE_CONFIG); "
    "`flawline config show` prints them.",
)
app.add_typer(db_cli.app, name="db")
app.add_typer(data_cli.app, name="data")
app.add_typer(models_cli.app, name="models")
app.add_typer(train_cli.app, name="train")
app.add_typer(train_cli.runs_app, name="runs")
app.add_typer(label_cli.app, name="label")
app.add_typer(loop_cli.app, name="loop")
app.add_typer(monitor_cli.app, name="monitor")
app.command()(models_cli.evaluate)
app.add_typer(serve_cli.app, name="serve")
predict = app.command()(serve_cli.predict)  # quickstart calls it too: leaving out an option gives its default

config_app = FlawlineTyper(help="Show the effective settings (secrets masked).")
app.add_typer(config_app, name="config")

app.command()(services.up)
app.command()(services.down)
app.command()(services.status)


@config_app.command("show")
def config_show(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print every setting and its value; secrets are shown as ********."""
    values = get_settings().redacted()
    if as_json:
        print_json(values)
        return
    for key, value in values.items():
        console.print(f"{key:24} {value}", highlight=False)


@app.command()
def version() -> None:
    """Print flawline's version."""
    console.print(__version__)


DEFAULT_MT = Path(__file__).resolve().parents[3].parent / "shared" / "datasets" / "magnetic-tile"


@app.command()
def quickstart(
    source: Path = typer.Option(DEFAULT_MT, help="Magnetic Tile folder to import."),
    dataset: str = typer.Option("magnetic-tile", help="Dataset name."),
    seed: int = typer.Option(0, help="Split and loop seed."),
    loop: bool = typer.Option(True, help="Run the active-learning loop (off: import and split only)."),
    rounds: int = typer.Option(3, min=1, help="Active-learning rounds."),
    budget: int = typer.Option(20, min=1, help="Images sent to Label Studio per round."),
    retrain_after: int = typer.Option(20, min=1, help="Retrain after this many new labels."),
    keep_labels: float = typer.Option(0.0, min=0.0, max=1.0, help="Share of the train split's labels known at the "
                                                                   "start (0: the loop starts from no labels)."),
    base: str = typer.Option("padim", help="The normal-only detector the labels refine (patchcore, padim, flow)."),
    image_size: int = typer.Option(128, min=32, max=1024, help="Training and scoring image size."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Training epochs (label-trained settings only)."),
    serve: bool = typer.Option(True, help="Deploy the production model with Ray Serve and predict one held-out "
                                          "image through the HTTP API."),
) -> None:
    """The main job on the embedded default: start the local services (S3, catalog, Ray, Label
    Studio), import the Magnetic Tile set, split it (75 % train, stratified), then run the
    active-learning loop with the simulated annotator from no labels: round 0 fits the label-free
    detector, each round scores the unlabelled pool as a Ray job, sends the chosen images to Label
    Studio with pre-annotations, pulls the answers back, refines the detector with them (mixed
    supervision) as a Ray job and promotes it if its test metric is better. It prints the metric
    per round, then deploys the production model with Ray Serve and predicts one held-out test
    image through the HTTP API (verdict and overlay PNG)."""
    from flawline.cli import loop as loop_cli
    from flawline.cli.data import import_, show, split

    services.up(timeout=60.0, ray=True, label_studio=loop)
    import_(path=source, layout="magnetic-tile", dataset=dataset, category=None, workers=None, limit=None,
            skip_invalid=False, full_decode=False, readd_removed=False, as_json=False)
    split(name=dataset, train=0.75, val=0.0, test=0.25, seed=seed, normal_only_train=False, stratify_by=None)
    show(name=dataset, as_json=False)
    services.status(as_json=False)
    if not loop:
        return
    model = loop_cli.run(dataset=dataset, budget=budget, rounds=rounds, retrain_after=retrain_after, strategy="hybrid",
                 task="segmentation", setting="mixed", method="mixed", base=base, image_size=image_size,
                 epochs=epochs, workers=2, in_process=False, simulate=True, keep_labels=keep_labels,
                 wait_hours=1.0, seed=seed, as_json=False)
    curve, why = loop_cli.write_curve(dataset)
    console.print(f"learning curve: {curve} (test metric against labels, from the label-free start)" if curve else why,
                  highlight=False, soft_wrap=True)
    if serve:
        _serve_and_predict(dataset, model, seed)


def _serve_and_predict(dataset: str, model: str, seed: int) -> None:
    """Deploy the Serve app and ask it for one held-out (test split) image's verdict."""
    from flawline.context import open_catalog, open_store
    from flawline.data.records import held_out_image

    settings = get_settings()
    name, data, truth = held_out_image(open_catalog(settings), open_store(settings), dataset, seed)
    folder = settings.data_dir.expanduser() / "reports" / "quickstart"
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / name
    image.write_bytes(data)
    console.print(f"deploying the production model {model} with Ray Serve …")
    serve_cli.up(config=serve_cli.DEFAULT_CONFIG, app_dir=serve_cli.REPO, port=None, timeout=300.0, wait=True)
    console.print(f"predicting the held-out test image {image} (labelled {truth} in the catalog) through "
                  f"{settings.serve_url}:")
    predict(images=[image], model=model, local=False, out=folder, url=None, timeout=120.0, as_json=False)


def main() -> None:
    app()


