"""ELPV benchmark: test accuracy and F1 as the labelled fraction of the training split varies, for
the supervised, semi-supervised and few-shot label settings.

Protocol: the ELPV solar-cell set (``elpv-dataset`` package, 2,624 cells, 300x300 gray; defect
probability >= 0.5 counts as defective) is imported into a fresh local S3 server and SQLite
catalog with ``import_dataset(layout="elpv")`` and split once, seeded, 75 % train / 25 % test,
stratified by label and cell type (mono / poly); the test split is the same for every point. Each
point is one run through the platform's own training code: ``plan_run`` (the seeded, stratified
``label_fraction`` of the training labels; the rest become the unlabelled pool) → ``train_local``
→ ``finish_run`` (threshold, test metrics, model version). There is no validation split, so the
threshold is the runner's fallback for models trained from labels: score >= 0.5.

Few-shot learns from ``shots`` labelled defect images rather than a fraction of the defects: at
fraction F it gets the labelled normal images of that fraction and shots = min(10, labelled defects
at F) (10 is the setting's maximum). Semi-supervised needs an unlabelled pool, so it has no 100 %
point (the run is planned and the platform's refusal is recorded).

    python bench/elpv_bench.py [--settings supervised semisupervised fewshot]
                               [--fractions 0.01 0.05 0.1 0.25 1.0] [--quick] [--out DIR]

``--quick``: a smoke run (64 px, one epoch, few steps), written to /tmp/elpv-bench-quick unless
``--out`` is given. Writes elpv.json, elpv.md and elpv.png under docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform as std_platform
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

from flawline.catalog import Catalog, upgrade  # noqa: E402
from flawline.catalog.db import make_engine  # noqa: E402
from flawline.data.ingest import import_dataset  # noqa: E402
from flawline.data.split import SplitSpec, assign_splits  # noqa: E402
from flawline.errors import InvalidInput  # noqa: E402
from flawline.storage import ObjectStore  # noqa: E402
from flawline.storage.local_s3 import LocalS3Server  # noqa: E402
from flawline.train import TrainSpec  # noqa: E402
from flawline.train.data import gather  # noqa: E402
from flawline.train.runner import RunPlan, finish_run, plan_run, train_local  # noqa: E402

DATASET = "elpv"
SETTINGS = ("supervised", "semisupervised", "fewshot")
FRACTIONS = (0.01, 0.05, 0.1, 0.25, 1.0)
SPLIT = SplitSpec(train=0.75, val=0.0, test=0.25, seed=0, stratify_by="cell_type")
MAX_SHOTS = 10  # TrainSpec accepts 1..10
BUDGET_MINUTES = 40  # the whole benchmark, on this 2-core machine
# Deitsch et al. 2019, "Automatic classification of defective photovoltaic module cells in
# electroluminescence images" (Solar Energy 185): all training labels, binary at p >= 0.5.
PUBLISHED = {"CNN (Deitsch et al. 2019)": 0.8842, "SVM (Deitsch et al. 2019)": 0.8244}

# The recipe, chosen by short supervised runs at the 25 % point on this machine; "why" says why.
CONFIG: dict[str, Any] = {
    "backbone": "efficientnet_lite0",
    "image_size": 128,
    "batch_size": 32,
    "precision": "fp32",
    "seed": 0,
    "lr": 1e-3,
    "supervised": {"steps": 150, "options": {"freeze_blocks": 2, "class_weighted": False}},
    "semisupervised": {"epochs": 1, "batch_size": 16, "options": {"freeze_blocks": 2}},
    "fewshot": {"steps": 20, "options": {}},
    "why": {
        "image_size": "128 px: 160 and 224 px were no better at the 25 % point in short tuning runs "
                      "(within one seed's noise) and cost much more per step on these 2 CPU cores",
        "precision": "fp32: this CPU has AVX2 only (no AMX / AVX512-BF16); bf16 autocast was much "
                     "slower than fp32",
        "freeze_blocks": "2 (the classifier's default): stem and the first two stages keep their "
                         "ImageNet weights",
        "class_weighted": "False for supervised: with inverse-frequency class weights the model's "
                          "p(defect) is biased upwards and p >= 0.5 (the threshold without a validation "
                          "split) costs accuracy; plain cross-entropy makes p >= 0.5 the accuracy-optimal "
                          "verdict. Semi-supervised keeps its class-weighted labelled loss (its own code).",
        "steps": "supervised: the same budget of optimisation steps at every fraction (epochs = steps / "
                 "batches an epoch; 10 epochs at 25 %); few-shot: at least this many segmenter steps "
                 "(one epoch at 100 %)",
        "semisupervised": "one epoch = one pass over the unlabelled pool (FixMatch, mu 2: each step 3 "
                          "batches); batch 16 doubles its steps at the same cost; more epochs did not fit "
                          "the budget",
        "budget": "all 15 runs in about 40 minutes on 2 CPU cores shared with other work",
    },
}
QUICK: dict[str, Any] = {
    "image_size": 64,
    "supervised": {"steps": 2, "options": {"freeze_blocks": 4, "class_weighted": False}},
    "semisupervised": {"epochs": 1, "batch_size": 64, "options": {"freeze_blocks": 4}},
    "fewshot": {"steps": 1, "options": {}},
}


def key(fraction: float) -> str:
    return repr(float(fraction))  # 0.01 -> "0.01", 1 -> "1.0"


def fmt_pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def plan_point(catalog: Catalog, setting: str, fraction: float, cfg: dict[str, Any]) -> tuple[RunPlan, dict]:
    """The run's plan (``plan_run`` on the spec) and what was derived for it (epochs, shots, steps).
    Raises InvalidInput when the setting cannot train on this data."""
    s = cfg[setting]
    batch = s.get("batch_size", cfg["batch_size"])
    derived: dict[str, Any] = {}
    shots = 5
    if setting == "fewshot":
        data = gather(catalog, [DATASET], fraction, cfg["seed"])
        shots = max(1, min(MAX_SHOTS, data.count("labelled", defect=True)))
    spec = TrainSpec(datasets=[DATASET], setting=setting, backbone=cfg["backbone"],
                     image_size=cfg["image_size"], epochs=s.get("epochs") or 1, batch_size=batch,
                     lr=cfg["lr"], precision=cfg["precision"],
                     label_fraction=fraction, shots=shots, seed=cfg["seed"], options=dict(s["options"]),
                     model_name=f"elpv-{setting}-{key(fraction)}")
    plan = plan_run(catalog, spec)
    if "steps" in s:
        # A budget of optimisation steps, the same at every fraction: epochs = steps / batches an epoch
        # (1 % of the labels is under one batch: one step an epoch).
        stream = "labelled" if setting == "supervised" else "normal"
        per_epoch = max(1, math.ceil(len(plan.streams[stream]) / batch))
        plan.spec = dataclasses.replace(spec, epochs=max(1, math.ceil(s["steps"] / per_epoch)))
        derived["steps"] = plan.spec.epochs * per_epoch
    elif setting == "semisupervised":
        unlabelled, labelled = len(plan.streams["unlabelled"]), len(plan.streams["labelled"])
        mu = plan.setting.mu
        per_epoch = max(math.ceil(unlabelled / (mu * batch)), math.ceil(labelled / batch), 1)
        derived["steps"] = spec.epochs * per_epoch
    return plan, derived


def run_point(catalog: Catalog, store: ObjectStore, setting: str, fraction: float,
              cfg: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    plan, derived = plan_point(catalog, setting, fraction, cfg)
    spec = plan.spec
    t0 = time.perf_counter()
    detector, history = train_local(store, plan, device="cpu")
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = finish_run(catalog, store, plan, detector, history=history)
    finish_s = time.perf_counter() - t0
    labelled = plan.data.labelled
    return {
        "accuracy": m["accuracy"], "f1": m["f1"], "precision": m["precision"], "recall": m["recall"],
        "image_auroc": m["image_auroc"], "average_precision": m["average_precision"],
        "confusion": m["confusion"], "threshold": m["threshold"],
        "labelled_images": len(labelled), "labelled_defects": sum(1 for r in labelled if r.defect),
        "streams": {k: len(v) for k, v in plan.streams.items()}, "test_images": m["images"],
        "spec": {"epochs": spec.epochs, "batch_size": spec.batch_size,
                 "shots": spec.shots if setting == "fewshot" else None, "options": spec.options},
        "steps": derived.get("steps"),
        "loss": [round(h["loss"], 4) for h in history],
        "pseudo_label_rate": [h["pseudo_label_rate"] for h in history if "pseudo_label_rate" in h] or None,
        "pseudo_labels_stored": m.get("pseudo_labels"),
        "train_seconds": round(train_s, 1), "finish_seconds": round(finish_s, 1),
        "seconds": round(time.perf_counter() - started, 1), "model": m["model"],
    }


def write_plot(out: Path, curves: dict[str, dict[str, dict]], fractions: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    panels = ((axes[0], "accuracy", "Test accuracy"), (axes[1], "f1", "Test F1 (defective class)"))
    for ax, metric, title in panels:
        for setting, points in curves.items():
            xs = [f for f in fractions if key(f) in points]
            ax.plot(xs, [100 * points[key(f)][metric] for f in xs], marker="o", label=setting)
        if metric == "accuracy":
            for (name, value), style in zip(PUBLISHED.items(), ("--", ":"), strict=True):
                ax.axhline(100 * value, color="gray", linestyle=style, linewidth=1,
                           label=f"{name.split(' (')[0]}, all labels ({100 * value:.2f} %)")
            ax.set_ylim(top=max(ax.get_ylim()[1], 100 * max(PUBLISHED.values()) + 2))
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{100 * f:g} %" for f in fractions])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("labelled fraction of the training split (log scale)")
        ax.set_ylabel("accuracy (%)" if metric == "accuracy" else "F1 (%)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("ELPV (test split, 655 cells; p(defect) >= 0.5 is defective)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_markdown(out: Path, result: dict[str, Any], fractions: list[float]) -> None:
    curves, runs, cfg = result["curves"], result["runs"], result["config"]
    lines = ["# ELPV benchmark: accuracy and F1 vs labelled fraction", "",
             (f"Measured {result['date']} on {result['machine']['cpus']} CPU cores (no GPU), "
              f"{result['total_seconds'] / 60:.1f} min in all. Protocol: {result['protocol']['split']}; "
              f"{result['protocol']['test_images']} test cells "
              f"({result['protocol']['test_defects']} defective), "
              "the same for every point. Each point is one run of the platform's training code "
              "(`plan_run` → `train_local` → `finish_run`); no validation split, so the threshold is "
              "p(defect) >= 0.5. Figures: accuracy / F1 of the defective class on the test split."), "",
             "| setting | " + " | ".join(f"{100 * f:g} %" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for setting, points in curves.items():
        cells = []
        for f in fractions:
            p = points.get(key(f))
            cells.append("n/a" if p is None else f"{fmt_pct(p['accuracy'])} / {p['f1']:.3f}")
        lines.append(f"| {setting} (acc / F1) | " + " | ".join(cells) + " |")
    lines += ["", "Labelled images per point (defects in brackets; few-shot: normal images + shots):", "",
              "| setting | " + " | ".join(f"{100 * f:g} %" for f in fractions) + " |",
              "|---|" + "---|" * len(fractions)]
    for setting in curves:
        cells = []
        for f in fractions:
            r = runs.get(setting, {}).get(key(f))
            if r is None or "accuracy" not in r:
                cells.append("n/a")
            elif setting == "fewshot":
                cells.append(f"{r['streams'].get('normal', 0) + r['streams'].get('calibration', 0)} + "
                             f"{r['spec']['shots']} shots")
            else:
                cells.append(f"{r['labelled_images']} ({r['labelled_defects']})")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines += ["", "Image ROC-AUC on the test split (threshold-free: how well the score ranks the cells):", "",
              "| setting | " + " | ".join(f"{100 * f:g} %" for f in fractions) + " |",
              "|---|" + "---|" * len(fractions)]
    for setting in curves:
        cells = []
        for f in fractions:
            r = runs.get(setting, {}).get(key(f))
            cells.append("n/a" if r is None else f"{r['image_auroc']:.3f}")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per run (train + threshold/evaluate/store):", "",
              "| setting | " + " | ".join(f"{100 * f:g} %" for f in fractions) + " |",
              "|---|" + "---|" * len(fractions)]
    for setting in curves:
        cells = []
        for f in fractions:
            r = runs.get(setting, {}).get(key(f))
            cells.append("n/a" if r is None or "seconds" not in r else f"{r['seconds']:.0f}")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    published = ", ".join(f"{k.split(' (')[0]} {fmt_pct(v)}" for k, v in PUBLISHED.items())
    lines += ["", f"Published with all training labels (Deitsch et al. 2019): {published} accuracy.", ""]
    lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    lines += ["## Config", "", "```json", json.dumps(cfg, indent=2), "```", "",
              "![accuracy and F1 vs labelled fraction](elpv.png)", ""]
    out.write_text("\n".join(lines))


def notes_for(result: dict[str, Any]) -> list[str]:
    curves, runs, cfg = result["curves"], result["runs"], result["config"]
    cnn = PUBLISHED["CNN (Deitsch et al. 2019)"]
    notes = []
    sup = curves.get("supervised", {})
    if key(0.25) in sup:
        acc = sup[key(0.25)]["accuracy"]
        verdict = "passes" if acc > cnn else "does not pass"
        notes.append(f"Supervised with 25 % of the labels: {fmt_pct(acc)} accuracy, which {verdict} the "
                     f"published CNN's {fmt_pct(cnn)} (trained on all labels at 300 px with a VGG-19).")
    if key(1.0) in sup:
        notes.append(f"Supervised with all labels: {fmt_pct(sup[key(1.0)]['accuracy'])} accuracy.")
    for setting, points in runs.items():
        for f, r in points.items():
            c = r["confusion"]
            called = (c["tp"] + c["fp"]) / max(sum(c.values()), 1)
            if called >= 0.9:
                notes.append(f"{setting} at {100 * float(f):g} %: p >= 0.5 calls {c['tp'] + c['fp']} of "
                             f"{sum(c.values())} test cells defective (image ROC-AUC "
                             f"{r['image_auroc']:.3f}); "
                             "its score is not a calibrated probability, and with no validation split the "
                             "runner has nothing to calibrate a threshold on.")
    semi, sup_runs = runs.get("semisupervised", {}), runs.get("supervised", {})
    both = [f for f in semi if f in sup_runs]
    if both:
        below = all(semi[f]["image_auroc"] < sup_runs[f]["image_auroc"] for f in both)
        steps = lambda pts: sorted(r["steps"] for r in pts.values())  # noqa: E731
        notes.append(f"Semi-supervised trained for {steps(semi)[0]}–{steps(semi)[-1]} steps (one pass over "
                     f"the unlabelled pool) against supervised's {steps(sup_runs)[0]}–{steps(sup_runs)[-1]}; "
                     + ("its image ROC-AUC is below supervised's at every fraction both ran: it is "
                        "under-trained within this budget, and its curve says little about FixMatch itself."
                        if below else "compare the curves with that in mind."))
    rates = {st: [r["train_seconds"] / r["steps"] for r in pts.values() if r.get("steps")]
             for st, pts in runs.items()}
    spread = {st: (min(v), max(v)) for st, v in rates.items() if len(v) > 1}
    if spread:
        per_step = "; ".join(f"{st}: {lo:.1f}–{hi:.1f}" for st, (lo, hi) in spread.items())
        notes.append(f"Training seconds per optimisation step ({per_step}) varied with the load other work "
                     "put on the 2 shared cores, not only with the step's size: seconds are indicative.")
    for setting, points in result.get("skipped", {}).items():
        for f, why in points.items():
            notes.append(f"{setting} at {100 * float(f):g} % was not run: the platform refuses it ({why}).")
    shots = ", ".join(f"{100 * float(f):g} %: k={r['spec']['shots']}"
                      for f, r in runs.get("fewshot", {}).items())
    notes.append("Few-shot uses k labelled defect images, not a fraction of them: at fraction F it trains "
                 "on the labelled normal images of F and k = min(10, labelled defects at F) "
                 f"({shots or 'not run'}); "
                 "its score mixes a PaDiM z-score with a segmenter's defect probability, so p >= 0.5 is a "
                 "coarser operating point for it than for the classifiers.")
    steps = {st: ", ".join(f"{100 * float(f):g} %: {r['steps']}" for f, r in pts.items())
             for st, pts in runs.items()}
    notes.append("Optimisation steps per run (" + "; ".join(f"{st}: {v}" for st, v in steps.items()) + "). "
                 f"Supervised gets {cfg['supervised']['steps']} steps at every fraction; semi-supervised "
                 f"(FixMatch, tau 0.95, mu 2) {cfg['semisupervised']['epochs']} epoch(s), one epoch being "
                 "one pass over the unlabelled pool, each step a labelled batch plus two unlabelled batches "
                 f"seen twice (weak and strong views); few-shot at least {cfg['fewshot']['steps']} segmenter "
                 "steps. Budget: the whole benchmark on 2 shared CPU cores in about 40 minutes.")
    notes.append("Semi-supervised trains its labelled batches with inverse-frequency class weights (its own "
                 "loss), so its p >= 0.5 verdict leans towards 'defective' (higher recall, lower accuracy) "
                 "where the supervised runs here use plain cross-entropy (config.why.class_weighted).")
    full_run = not result.get("quick") and not result.get("partial")
    if full_run and result["total_seconds"] > BUDGET_MINUTES * 60:
        notes.append(f"This run took {result['total_seconds'] / 60:.1f} min, over the "
                     f"{BUDGET_MINUTES}-minute budget the recipe was chosen for: the cores were shared "
                     "(see the seconds per step).")
    notes.append("One seed (0) per point: differences of a point or two between neighbouring points are "
                 "within run-to-run noise.")
    return notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 64 px, a few steps; output to /tmp unless --out")
    p.add_argument("--out", type=Path, default=None, help="output folder (default docs/benchmarks)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only re-render elpv.md and elpv.png from an elpv.json written by this script")
    args = p.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        fractions = sorted({float(f) for pts in result["curves"].values() for f in pts})
        result["notes"] = notes_for(result)
        args.render.write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(args.render.parent / "elpv.md", result, fractions)
        write_plot(args.render.parent / "elpv.png", result["curves"], fractions)
        return
    # A SIGTERM (timeout, kill) still stops the S3 server started below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    quick_out = Path(tempfile.gettempdir()) / "elpv-bench-quick"
    out = args.out or (quick_out if args.quick else REPO / "docs" / "benchmarks")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = json.loads(json.dumps(CONFIG))
    if args.quick:
        cfg.update(json.loads(json.dumps(QUICK)))
        cfg["why"] = {"quick": "smoke run of the code paths; figures mean nothing"}
    fractions = sorted(set(args.fractions))

    started = time.perf_counter()
    curves: dict[str, dict[str, dict]] = {}
    runs: dict[str, dict[str, dict]] = {}
    skipped: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="flawline-elpv-") as tmp_name:
        tmp = Path(tmp_name)
        server = LocalS3Server.on_free_ports(tmp / "s3")
        server.start(timeout=90)
        try:
            url = f"sqlite:///{tmp / 'catalog.db'}"
            upgrade(make_engine(url))
            catalog = Catalog(url)
            store = ObjectStore(server.endpoint, server.access_key, server.secret_key, "elpv-bench")
            store.ensure_bucket()
            t0 = time.perf_counter()
            imported = import_dataset(catalog, store, None, layout="elpv", dataset=DATASET)
            split = assign_splits(catalog, DATASET, SPLIT)
            import_s = time.perf_counter() - t0
            everything = gather(catalog, [DATASET])
            print(f"imported {imported.new_images} images in {import_s:.1f}s; split {split}", flush=True)
            for setting in args.settings:
                for fraction in fractions:
                    print(f"{setting} {100 * fraction:g} % ...", flush=True)
                    try:
                        r = run_point(catalog, store, setting, fraction, cfg)
                    except InvalidInput as err:
                        skipped.setdefault(setting, {})[key(fraction)] = str(err)
                        print(f"  skipped: {err}", flush=True)
                        continue
                    runs.setdefault(setting, {})[key(fraction)] = r
                    curves.setdefault(setting, {})[key(fraction)] = {"accuracy": r["accuracy"], "f1": r["f1"]}
                    print(f"  {setting} {100 * fraction:g} %: accuracy {100 * r['accuracy']:.2f} % "
                          f"F1 {r['f1']:.3f} AUROC {r['image_auroc']:.3f} | {r['labelled_images']} labelled "
                          f"({r['labelled_defects']} defects), epochs {r['spec']['epochs']}, train "
                          f"{r['train_seconds']:.0f}s, total {r['seconds']:.0f}s "
                          f"[{(time.perf_counter() - started) / 60:.1f} min elapsed]", flush=True)
            catalog.dispose()
        finally:
            server.stop()

    total_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "curves": curves,
        "dataset": "ELPV (elpv-dataset package): 2,624 EL images of solar cells, 300x300 gray",
        "protocol": {
            "split": "seeded (0) 75 % train / 25 % test, stratified by label, defect class and cell type",
            "split_counts": split, "train_images": len(everything.labelled),
            "test_images": len(everything.test),
            "test_defects": sum(1 for r in everything.test if r.defect),
            "defective": "defect probability >= 0.5",
            "label_fraction": "seeded share of the training labels, stratified by label and cell type, "
                              "at least one per stratum; the rest of the training split is the unlabelled "
                              "pool",
            "threshold": "p(defect) >= 0.5 (runner.calibrate's fallback: no validation split)",
            "metrics": "accuracy; F1 of the defective class", "seed": cfg["seed"],
        },
        "published_accuracy": PUBLISHED,
        "config": cfg,
        "quick": args.quick,
        "partial": sorted(args.settings) != sorted(SETTINGS) or fractions != sorted(FRACTIONS),
        "skipped": skipped,
        "runs": runs,
        "seconds_per_run": {s: {f: r["seconds"] for f, r in pts.items()} for s, pts in runs.items()},
        "labelled_per_point": {s: {f: r["labelled_images"] for f, r in pts.items()}
                               for s, pts in runs.items()},
        "import_seconds": round(import_s, 1),
        "total_seconds": round(total_s, 1),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu",
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                    "python": std_platform.python_version(), "system": std_platform.platform(),
                    "note": "2 cores shared with other work while it ran: seconds are indicative"},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    result["notes"] = notes_for(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "elpv.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out / "elpv.md", result, fractions)
    write_plot(out / "elpv.png", curves, fractions)
    print((out / "elpv.md").read_text())
    print(f"wrote {out / 'elpv.json'}, elpv.md, elpv.png in {total_s / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
