"""``flawline data``: import, list, inspect, split and repair (remove, relabel) datasets."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import typer
from rich.table import Table

from flawline.cli.app import FlawlineTyper, console, err_console, human_bytes, print_json
from flawline.config import get_settings
from flawline.context import open_catalog, open_store
from flawline.data.importers import importer_names

if TYPE_CHECKING:
    from flawline.data.ingest import ImportReport, ProgressFn

# The catalog queries, the object store client, ingest and rich.progress are imported inside the
# commands that use them: `flawline --help` loads this module too.

app = FlawlineTyper(help="Datasets: import images into S3 + catalog, list them, split them, repair them.")

_LAYOUTS = ", ".join(["auto", *importer_names()])


@contextmanager
def _progress(enabled: bool) -> Iterator[ProgressFn | None]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err_console, transient=False)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()  # only once there is work to show: an early error prints nothing else
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


@app.command("import")
def import_(
    path: Optional[Path] = typer.Argument(None, help="Folder to import (optional for --layout elpv)."),
    layout: str = typer.Option("auto", "--layout", "-l", help=f"Source layout: {_LAYOUTS}."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset name (default from the layout)."),
    category: Optional[str] = typer.Option(None, help="MVTec AD category, when PATH holds several."),
    manifest: Optional[Path] = typer.Option(
        None, "--manifest", exists=True, dir_okay=False, resolve_path=True,
        help="The manifest file (CSV or JSONL), when it is not PATH/manifest.csv or PATH/manifest.jsonl; "
             "implies --layout manifest. Its files are relative to its own folder."),
    workers: Optional[int] = typer.Option(None, min=1, max=256, help="Parallel uploads (default from settings)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Import only the first N images found."),
    skip_invalid: bool = typer.Option(False, help="Skip unreadable files instead of stopping; lists them."),
    full_decode: bool = typer.Option(False, help="Decode every pixel of every file (slower; default checks stream integrity)."),
    readd_removed: bool = typer.Option(False, help="Import again images `flawline data remove` took out (recorded)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Import images (and masks and labels) into object storage and the catalog.

    Layouts: folder (normal/, defect/<class>/, unlabeled/, masks/ mirroring them), mvtec (MVTec AD),
    magnetic-tile (MT_<Class>/Imgs), elpv (the elpv-dataset package), manifest (manifest.csv or
    manifest.jsonl at PATH: one row per image with file, label, class, group, reference, split,
    mask and any other column as an image attribute; auto-detected before the other layouts);
    annotation files: coco (one COCO JSON: bbox → boxes, polygons and RLE → masks), voc
    (Annotations/*.xml, 1-based boxes), yolo (images/ + labels/, normalised; names in data.yaml or
    classes.txt), labelstudio (a Label Studio JSON export), boxes (NAME.txt 'x1,y1,x2,y2,class' per
    image; never auto-detected: pass --layout boxes). Boxes are stored in pixels; an annotated image
    without regions is normal, one without an annotation file unlabeled. Re-running is safe: images
    already in the dataset are recognised by content hash and skipped.
    """
    from flawline.data.ingest import import_dataset

    settings = get_settings()
    options: dict[str, object] = {"category": category} if category else {}
    if manifest is not None:
        options["manifest"] = manifest
    with _progress(not as_json) as progress:
        report = import_dataset(
            open_catalog(settings), open_store(settings), path, layout=layout, dataset=dataset,
            workers=workers or settings.upload_workers, skip_invalid=skip_invalid, full_decode=full_decode,
            readd_removed=readd_removed, limit=limit,
            options=options, progress=progress,
        )
    if as_json:
        print_json(report.as_dict())
    else:
        _print_report(report)


def _print_report(r: ImportReport) -> None:
    rate = r.objects_uploaded / r.seconds if r.seconds else 0.0
    console.print(
        f"[bold]{r.dataset}[/] ({r.layout}): {r.scanned} files scanned, {r.new_images} new images, "
        f"{r.already_present} already present, {r.duplicates} duplicate files, {r.masks} with masks; "
        f"{r.objects_uploaded} objects ({human_bytes(r.bytes_uploaded)}) uploaded in {r.seconds:.1f}s "
        f"({rate:.0f} objects/s)"
    )
    if r.boxes:
        console.print(f"{r.boxes} boxes from annotation files")
    if r.labels_added:
        console.print(f"labels added to {r.labels_added} images that had none")
    if r.by_label:
        console.print("labels: " + ", ".join(f"{k} {v}" for k, v in sorted(r.by_label.items())))
    if r.skipped:
        err_console.print(f"[yellow]skipped {len(r.skipped)} invalid files:[/]")
        for line in r.skipped:
            err_console.print(f"  {line}", highlight=False, soft_wrap=True)
    if r.removed:
        err_console.print(f"[yellow]{len(r.removed)} image(s) left out: removed from the dataset earlier "
                          "(--readd-removed imports them again):[/]")
        for line in r.removed:
            err_console.print(f"  {line}", highlight=False, soft_wrap=True)
    if r.references_dropped:
        err_console.print(f"[yellow]{len(r.references_dropped)} image(s) imported without their reference:[/]")
        for line in r.references_dropped:
            err_console.print(f"  {line}", highlight=False, soft_wrap=True)
    if r.unused:
        err_console.print(f"[yellow]{len(r.unused)} files of the source were not used:[/]")
        for line in r.unused:
            err_console.print(f"  {line}", highlight=False, soft_wrap=True)


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List datasets with image counts by label and split."""
    from flawline.catalog.queries import list_summaries
    with open_catalog().session() as session:
        summaries = list_summaries(session)
    if as_json:
        print_json([s.as_dict() for s in summaries])
        return
    if not summaries:
        console.print("no datasets yet; `flawline data import PATH` adds one")
        return
    table = Table("dataset", "layout", "images", "size", "labels", "splits")
    for s in summaries:
        table.add_row(s.name, s.layout or "", str(s.images), human_bytes(s.bytes),
                      ", ".join(f"{k} {v}" for k, v in sorted(s.by_label.items())),
                      ", ".join(f"{k} {v}" for k, v in sorted(s.by_split.items())))
    console.print(table)


@app.command()
def show(name: str = typer.Argument(..., help="Dataset name."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show one dataset: counts by label, defect class and split, masks, boxes, groups, references,
    preset splits, source and split seed."""
    from flawline.catalog.queries import get_dataset, summarize_dataset
    with open_catalog().session() as session:
        s = summarize_dataset(session, get_dataset(session, name), detail=True)
    if as_json:
        print_json(s.as_dict())
        return
    table = Table(show_header=False, title=f"dataset {s.name}")
    rows = [
        ("layout", s.layout or ""), ("source", s.source or ""), ("created", s.created_at or ""),
        ("images", str(s.images)), ("size", human_bytes(s.bytes)), ("with masks", str(s.masks)),
        ("labels", ", ".join(f"{k} {v}" for k, v in sorted(s.by_label.items()))),
        ("defect classes", ", ".join(f"{k} {v}" for k, v in sorted(s.by_class.items())) or "-"),
        ("boxes", f"{s.boxes} on {s.with_boxes} images" if s.boxes else "-"),
        ("groups", f"{s.groups} (image attribute 'group')" if s.groups else "-"),
        ("references", f"{s.with_reference} images name a reference image" if s.with_reference else "-"),
        ("splits", ", ".join(f"{k} {v}" for k, v in sorted(s.by_split.items()))),
        ("preset splits", ", ".join(f"{k} {v}" for k, v in sorted((s.by_preset or {}).items())) or "-"),
        ("split seed", "-" if not s.split_info else
         f"seed {s.split_info['seed']} train/val/test {s.split_info['train']}/{s.split_info['val']}/"
         f"{s.split_info['test']}" + (" (normal-only train)" if s.split_info.get("normal_only_train") else "")
         + (f" grouped by {s.split_info['group_by']}" if s.split_info.get("group_by") else "")
         + (" presets kept" if s.split_info.get("keep_preset") else "")),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@app.command()
def split(
    name: str = typer.Argument(..., help="Dataset name."),
    train: float = typer.Option(0.7, min=0.0, max=1.0, help="Fraction for training."),
    val: float = typer.Option(0.1, min=0.0, max=1.0, help="Fraction for validation (thresholds)."),
    test: float = typer.Option(0.2, min=0.0, max=1.0, help="Fraction for testing."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same split."),
    normal_only_train: bool = typer.Option(
        False, help="Anomaly-detection protocol: train on normal images only; defects go to val/test."),
    stratify_by: Optional[str] = typer.Option(
        None, help="Also stratify by this image attribute (e.g. cell_type for ELPV)."),
    group_by: Optional[str] = typer.Option(
        None, "--group-by", metavar="ATTR",
        help="Keep images that share this image attribute's value (e.g. group, a board id from a manifest) in "
             "one split; groups are stratified by whether they hold a defect (and its class). Images with no "
             "value for ATTR are each a group of their own."),
    keep_preset: bool = typer.Option(
        False, "--keep-preset",
        help="Images with a preset split from their import (a manifest's split column, MVTec's train/test) "
             "keep it, and so does the rest of their group; the other images are split by the fractions and "
             "options above. Error when no image has one."),
) -> None:
    """Assign a seeded train/val/test split, stratified by label and defect class, in the catalog.

    An image and its reference image (a manifest's reference column) always go to the same split,
    with or without --group-by, so no test image is judged against a reference seen in training.
    With --normal-only-train a group holding any defect goes to val/test only.
    """
    from flawline.catalog.queries import get_dataset
    from flawline.data.split import SplitSpec, assign_splits

    catalog = open_catalog()
    counts = assign_splits(catalog, name, SplitSpec(train, val, test, seed, normal_only_train, stratify_by,
                                                    group_by, keep_preset))
    with catalog.session() as session:
        info = get_dataset(session, name).split_info or {}
    line = f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (seed {seed})"
    groups = info.get("group_counts") or {}
    if group_by or groups != counts:
        line += "; groups: " + ", ".join(f"{k} {v}" for k, v in groups.items())
    if keep_preset:
        line += f"; {info.get('preset_kept', 0)} images kept their preset split"
    console.print(line, highlight=False)
    asked = {"train": train, "val": val, "test": test}
    empty = [k for k, share in asked.items() if share > 0 and not counts.get(k)]
    if empty:
        err_console.print(f"[yellow]warning:[/] {' and '.join(empty)} got no image ({sum(counts.values())} images at "
                          f"train {train:g} / val {val:g} / test {test:g}): raise "
                          + " / ".join(f"--{k}" for k in empty) + " or import more images", highlight=False)


_NAMES = typer.Argument(None, help="Images: file names (as imported), content hashes (8+ hex digits) or origins.",
                        show_default=False)
_LIST = typer.Option(None, "--from-file", exists=False, help="A file with one image (file name, content hash or origin) per line.")
_REASON = typer.Option(None, "--reason", help="Why (required): recorded with the change (flawline data changes).")
_BY = typer.Option(None, "--by", help="Who makes the change (default: $FLAWLINE_USER, else the login name).")


@app.command()
def remove(
    name: str = typer.Argument(..., help="Dataset name."),
    images: Optional[list[str]] = _NAMES,
    from_file: Optional[Path] = _LIST,
    reason: Optional[str] = _REASON,
    by: Optional[str] = _BY,
    force: bool = typer.Option(False, help="Also remove images a registered model version was trained or "
                                           "tested on (recorded)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Take images out of a dataset, recorded with who, when and why.

    Their rows and annotations go, and their objects when nothing else uses them. Images a
    registered model version was trained or tested on are refused unless --force. A name that
    matches no image, or several, changes nothing. A later `data import` of the same source leaves
    removed images out (pass --readd-removed there to bring them back)."""
    from flawline.data.repair import read_selectors, remove_images

    settings = get_settings()
    report = remove_images(open_catalog(settings), open_store(settings), name, read_selectors(images or [], from_file),
                           reason=reason, actor=by, force=force)
    if as_json:
        print_json(report.as_dict())
        return
    console.print(f"removed {len(report.images)} image(s) from {name}: {report.objects_deleted} object(s) deleted, "
                  f"{report.objects_kept} kept (used elsewhere)", highlight=False, soft_wrap=True)
    if report.forced:
        err_console.print(f"[yellow]forced: used by {', '.join(sorted(set(report.forced)))}[/]", highlight=False)
    for line in report.objects_failed:
        err_console.print(f"[yellow]object not deleted (no row names it; delete it by hand):[/] {line}",
                          highlight=False, soft_wrap=True)


@app.command()
def relabel(
    name: str = typer.Argument(..., help="Dataset name."),
    images: Optional[list[str]] = _NAMES,
    label: str = typer.Option(..., "--label", help="normal or defect."),
    defect_class: Optional[str] = typer.Option(None, "--class", help="The defect class (with --label defect)."),
    from_file: Optional[Path] = _LIST,
    reason: Optional[str] = _REASON,
    by: Optional[str] = _BY,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Correct images' labels, recorded with who, when and why.

    The new label is a human annotation that decides from now on; the annotations it overrides
    stay in the catalog, marked superseded. --label defect without --class: a defect of no class.
    An image that has that label already is left as it is (and said so)."""
    from flawline.data.repair import read_selectors, relabel_images

    report = relabel_images(open_catalog(get_settings()), name, read_selectors(images or [], from_file), label,
                            reason=reason, defect_class=defect_class, actor=by)
    if as_json:
        print_json(report.as_dict())
        return
    target = label + (f"/{defect_class}" if defect_class else "")
    console.print(f"relabelled {len(report.images)} image(s) of {name} as {target}"
                  + (f"; {len(report.unchanged)} had that label already" if report.unchanged else ""), highlight=False)


@app.command()
def changes(name: str = typer.Argument(..., help="Dataset name."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The repairs made to a dataset (data remove, data relabel): what, who, when, why.

    The table shows file names; --json has the whole origin path and the content hash."""
    from flawline.data.repair import data_changes

    rows = data_changes(open_catalog(get_settings()), name)
    if as_json:
        print_json(rows)
        return
    table = Table("when (UTC)", "action", "image", "by", "why", "detail")
    for r in rows:
        detail = f"{r.get('from')} -> {r.get('to')}" if r["action"] == "relabel" else (r.get("label") or "")
        table.add_row(r["at"][:16].replace("T", " "), r["action"], r["image"].replace("\\", "/").rsplit("/", 1)[-1],
                      r["actor"], r["reason"], str(detail))
    console.print(table if rows else f"no changes recorded for {name}")
