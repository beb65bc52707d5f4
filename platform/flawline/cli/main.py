"""The ``flawline`` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from flawline import __version__
from flawline.cli import data as data_cli
from flawline.cli import db as db_cli
from flawline.cli import models as models_cli
from flawline.cli import services
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
app.command()(models_cli.evaluate)

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
    seed: int = typer.Option(0, help="Split seed."),
) -> None:
    """The main job on the embedded default: start local services, import the Magnetic Tile set,
    split it (normal-only training, the MTD protocol) and print a summary."""
    from flawline.cli.data import import_, show, split

    services.up(timeout=60.0)
    import_(path=source, layout="magnetic-tile", dataset=dataset, category=None, workers=None, limit=None,
            skip_invalid=False, full_decode=False, as_json=False)
    split(name=dataset, train=0.8, val=0.0, test=0.2, seed=seed, normal_only_train=True)
    show(name=dataset, as_json=False)
    services.status(as_json=False)


def main() -> None:
    app()


