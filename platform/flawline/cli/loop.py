"""``flawline loop``: the active-learning loop (run, status) and its query strategies."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from flawline.cli.app import FlawlineTyper, console, print_json
from flawline.config import get_settings
from flawline.context import open_catalog, open_store
from flawline.errors import InvalidInput

app = FlawlineTyper(help="Active learning: score the unlabelled pool, send the most useful images to Label Studio, "
                         "pull the labels back, retrain when enough arrived, promote a better model.")


@app.command()
def run(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset whose train split holds the unlabelled pool."),
    budget: int = typer.Option(10, min=1, help="Images sent to Label Studio per round."),
    rounds: int = typer.Option(3, min=1, help="Rounds to run."),
    retrain_after: int = typer.Option(10, min=1, help="Retrain once this many new labels arrived since the last "
                                                      "training run (the trigger `loop status` shows)."),
    strategy: str = typer.Option("hybrid", help="Query strategy; see `flawline loop strategies`."),
    task: str = typer.Option("classification", help="Label Studio task: classification, segmentation, polygons, boxes."),
    setting: str = typer.Option("mixed", help="Label setting the model is (re)trained in (`flawline train settings`). "
                                              "mixed: round 0 fits the label-free detector, each retrain refines it "
                                              "with the answers so far."),
    method: str = typer.Option("mixed", help="Detector trained in that setting."),
    base: str = typer.Option("padim", help="mixed only: the normal-only detector it builds on (patchcore, padim, "
                                           "flow)."),
    image_size: int = typer.Option(128, min=32, max=1024, help="Training and scoring image size."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Training epochs (default: the setting's)."),
    workers: int = typer.Option(2, min=1, help="Ray workers for training and scoring actors."),
    in_process: bool = typer.Option(False, "--in-process", help="Train and score in this process instead of as "
                                                                 "Ray jobs (no cluster needed)."),
    simulate: bool = typer.Option(False, "--simulate", help="Benchmarks and demos only: hold the train split's "
                                                            "imported labels back and let a simulated annotator "
                                                            "answer the tasks from them."),
    keep_labels: float = typer.Option(0.0, min=0.0, max=1.0, help="With --simulate: the share of train labels kept "
                                                                   "from the start (0: start with no labels)."),
    wait_hours: float = typer.Option(24.0, help="How long a round waits for people to finish its tasks."),
    seed: int = typer.Option(0, help="Seed for selection and training."),
    as_json: bool = typer.Option(False, "--json", help="Print the rounds as JSON."),
) -> str:
    """score → select → push (with pre-annotations) → wait → pull → retrain → evaluate → promote if
    better; each round is recorded in the catalog. Serve picks up a promoted model without a restart."""
    from flawline.active.loop import ActiveLoop, LoopSpec, local_scorer, ray_scorer
    from flawline.active.trainers import in_process_trainer, ray_job_trainer
    from flawline.labelstudio.client import LabelStudioClient

    settings = get_settings()
    catalog, store = open_catalog(settings), open_store(settings)
    train = {"setting": setting, "method": method, "image_size": image_size, "workers": workers}
    if method == "mixed":
        train["options"] = {"base_method": base}
    if epochs is not None:
        train["epochs"] = epochs
    spec = LoopSpec(dataset=dataset, budget=budget, rounds=rounds, retrain_after=retrain_after, strategy=strategy,
                    task=task, train=train, seed=seed, wait_timeout_s=wait_hours * 3600)
    client = LabelStudioClient.from_settings(settings)
    client.whoami()  # a wrong token or a server that is down stops here, before anything is pushed
    annotate = None
    if simulate:
        from flawline.active.simulation import hide_labels
        from flawline.labelstudio.annotator import SimulatedAnnotator, truth_from_catalog

        hidden = hide_labels(catalog, dataset, keep=keep_labels, seed=seed)
        console.print(f"simulation: {hidden['kept']} train labels kept, {hidden['hidden']} held back for the "
                      "simulated annotator")
        annotate = SimulatedAnnotator(client, store, truth_from_catalog(catalog, dataset)).answer
    trainer = in_process_trainer(catalog, store) if in_process else ray_job_trainer(catalog, settings)
    scorer = local_scorer(store) if in_process else ray_scorer(settings, store, workers=workers)
    loop = ActiveLoop(catalog, store, client, spec, trainer, annotate=annotate, scorer=scorer,
                      log=(lambda line: None) if as_json else console.print)
    results = loop.run()
    if as_json:
        print_json(results)
        return spec.model_name()
    from flawline.active.loop import loop_status

    _rounds_table([{**r, "queue": None} for r in loop_status(catalog, dataset)["rounds"]],
                  title=f"{dataset}: active learning (model {spec.model_name()})")
    return spec.model_name()


def _rounds_table(rounds: list[dict], title: str) -> None:
    """One row per round; the model column shows the version in production after the round."""
    with_queue = any(r.get("queue") for r in rounds)
    metric_name = next((r["metric_name"] for r in rounds if r.get("metric_name")), "metric")
    table = Table(title=title)
    for col in ("round", *(["queue"] if with_queue else []), "labels", "new / N", "retrained", "promoted",
                "version", metric_name):
        table.add_column(col)
    first = rounds[0] if rounds else {}
    if first.get("start_metric") is not None:  # the model the loop started from (label-free on a fresh loop)
        model = first.get("start_model")
        table.add_row("start", *(["-"] if with_queue else []), str(first.get("labels_start") or 0), "-", "-", "-",
                      f"v{model.rsplit(':', 1)[-1]}" if model else "-", f"{first['start_metric']:.4f}")
    for r in rounds:
        run = f"run {r.get('run_id')}" if r.get("retrained") else "no"
        model, metric = r.get("model"), r.get("metric")
        cells = [str(r.get("round"))]
        if with_queue:
            cells.append(", ".join(f"{k} {v}" for k, v in (r.get("queue") or {}).items()) or "-")
        cells += [str(r.get("labels_total")), f"{r.get('labels_new')} / {r.get('retrain_after')}", run,
                  "yes" if r.get("promoted") else "no", f"v{model.rsplit(':', 1)[-1]}" if model else "-",
                  f"{metric:.4f}" if metric is not None else "-"]
        table.add_row(*cells)
    console.print(table)


@app.command()
def status(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Where to write the learning curve PNG "
                                                              "(default: <data dir>/reports/"
                                                              "loop-<dataset>.png)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The loop's rounds: queue per round, labels gained, what triggers retraining (new labels since
    the last run against N) and the run it started, the model in production and its test metric.
    Also writes the learning curve (metric against labels from people) as a PNG."""
    from flawline.active.loop import loop_status

    settings = get_settings()
    data = loop_status(open_catalog(settings), dataset)
    curve, note = write_curve(dataset, data, plot)
    if as_json:
        print_json({**data, "curve": str(curve) if curve else None})
        return
    console.print(f"{dataset}: {data['labels']} images labelled by people")
    _rounds_table(data["rounds"], title=f"{dataset}: rounds")
    if data["rounds"]:
        console.print("labels: images labelled by people so far; new / N: labels since the last training run "
                      "against the retraining threshold", highlight=False)
        console.print(f"learning curve: {curve}" if curve else note, highlight=False, soft_wrap=True)


def write_curve(dataset: str, data: dict | None = None, plot: Path | None = None) -> tuple[Path | None, str]:
    """Write the loop's learning curve PNG (default ``<data dir>/reports/loop-<dataset>.png``);
    returns (its path, or None and why not)."""
    from flawline.active.curve import learning_curve_png
    from flawline.active.loop import loop_status

    settings = get_settings()
    data = data or loop_status(open_catalog(settings), dataset)
    if not data["rounds"]:
        return None, "no rounds yet"
    try:
        return learning_curve_png(data, plot or settings.data_dir.expanduser() / "reports" / f"loop-{dataset}.png"), ""
    except InvalidInput as err:  # rounds without a metric yet: the table still shows
        return None, str(err)


@app.command()
def strategies(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The registered query strategies."""
    from flawline.active import list_strategies

    items = list_strategies()
    if as_json:
        print_json([{"name": name, "description": text} for name, text in items])
        return
    table = Table()
    table.add_column("strategy")
    table.add_column("what it picks")
    for name, text in items:
        table.add_row(name, text)
    console.print(table)
