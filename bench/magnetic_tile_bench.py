"""Every detector on the Magnetic Tile set, by the protocol in ../shared/README.md.

Per seed: a random 80 % of the defect-free images for training, the other 20 % plus every
defective image for testing; image ROC-AUC, pixel ROC-AUC and AUPRO (from the masks), fit time and
prediction throughput, on this machine's CPU. Images are decoded once with flawline's loader.

    python bench/magnetic_tile_bench.py [--seeds 0 1 2] [--detectors patchcore padim] [--size 256]
                                        [--ablation flow reconstruction] [--keep]

A detector is NAME or NAME:key=value,... (the detector's settings, values as ``--option``).
``--ablation flow``: ValidFlow as published and with each published component switched off (and
the earlier flawline flow: all off, 4 blocks); ``--ablation reconstruction``: FRAD as published,
without GFE, without feature recombination, and the earlier compact network. ``--keep``: merge
into the saved results (rows measured now replace rows of the same name; the others keep their
date) instead of replacing them.

Writes docs/benchmarks/magnetic_tile.json and magnetic_tile.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as std_platform
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from flawline.catalog import Label
from flawline.data.importers import get_importer
from flawline.data.loading import decode_image, decode_mask, stack_rgb
from flawline.data.records import LabelledImages
from flawline.evaluate.run import evaluate
from flawline.evaluate.thresholds import quantile
from flawline.models import create_detector, normal_only_detectors
from flawline.options import parse_options

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = {"DifferNet": 0.977, "CS-Flow": 0.993, "ValidFlow": 0.996}
# Each published component switched off in turn (the first row: all on, the paper's network).
ABLATIONS = {
    "flow": ["flow", "flow:actnorm=false", "flow:cbam=false", "flow:far_branches=false", "flow:strided_down=false",
             "flow:separable_out=false", "flow:blocks=4",
             "flow:blocks=4,actnorm=false,cbam=false,far_branches=false,strided_down=false,separable_out=false"],
    "reconstruction": ["reconstruction", "reconstruction:global_feature=false", "reconstruction:ssl_weight=0",
                       "reconstruction:ssl_weight=1.0", "reconstruction:arch=compact,ssl_weight=1.0"],
}


def load(source: Path, size: int):
    items = list(get_importer("magnetic-tile").scan(source))
    images = stack_rgb([decode_image(i.image.read(), size, i.image.name) for i in items])
    masks = np.stack([decode_mask(i.mask.read() if i.mask else None, size) for i in items])
    labels = np.array([i.label is Label.defect for i in items])
    names = [i.image.name for i in items]
    classes = [i.defect_class for i in items]
    return images, masks, labels, names, classes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=REPO.parent / "shared" / "datasets" / "magnetic-tile")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--detectors", nargs="+", default=None)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--ablation", nargs="+", default=[], choices=sorted(ABLATIONS),
                   help="the variants of each named detector's ablation (instead of --detectors)")
    p.add_argument("--keep", action="store_true", help="merge into the saved results instead of replacing them")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = p.parse_args()
    # By default every detector that fits on normal images alone (the label-trained ones refuse to);
    # a variant is NAME or NAME:key=value,...; bf16 PatchCore shows the AMX speed-up on this CPU.
    detectors = ([v for a in args.ablation for v in ABLATIONS[a]] if args.ablation
                 else args.detectors or [*normal_only_detectors(), "patchcore:precision=bf16"])

    t0 = time.perf_counter()
    images, masks, labels, names, classes = load(args.source, args.size)
    decode_s = time.perf_counter() - t0
    normal_idx = np.flatnonzero(~labels)
    defect_idx = np.flatnonzero(labels)
    print(f"decoded {len(names)} images in {decode_s:.1f}s", flush=True)

    results: dict[str, dict] = {}
    for name in detectors:
        method, _, extra = name.partition(":")
        overrides = parse_options([kv for kv in extra.split(",") if kv], flag=name)
        runs = []
        for seed in args.seeds:
            order = normal_idx.copy()
            random.Random(seed).shuffle(order)
            n_train = int(round(0.8 * len(order)))
            train, test = order[:n_train], np.r_[order[n_train:], defect_idx]
            det = create_detector(method, image_size=args.size, seed=seed, **overrides)
            started = time.perf_counter()
            det.fit(images[train])
            fit_s = time.perf_counter() - started
            # Threshold from training normals only (no test labels): the 99th percentile.
            det.set_threshold(quantile(det.predict(images[train[:64]]).scores, 0.99,
                                       data={"dataset": "magnetic-tile", "split": "train", "normal_images": 64}))
            data = LabelledImages(images[test], labels[test], masks[test], [names[i] for i in test],
                                  [classes[i] for i in test])
            m, _ = evaluate(det, data)
            run = {"seed": seed, "train_images": int(len(train)), "test_images": int(len(test)),
                   "fit_seconds": fit_s, **{k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro",
                                                                 "average_precision", "f1",
                                                                 "predict_images_per_s")},
                   "image_auroc_per_class": m["image_auroc_per_class"],
                   "pixel_auroc_per_class": m.get("pixel_auroc_per_class"),
                   "defect_pixel_share_per_class": m.get("defect_pixel_share_per_class"), "fit_info": det.info}
            runs.append(run)
            print(f"{name} seed {seed}: image AUROC {run['image_auroc']:.4f} pixel {run['pixel_auroc']:.4f} "
                  f"AUPRO {run['aupro']:.4f} fit {fit_s:.0f}s predict {run['predict_images_per_s']:.1f} img/s",
                  flush=True)

        def agg(key: str, fn=statistics.mean) -> float:
            return fn([r[key] for r in runs])

        results[name] = {
            "image_auroc_mean": agg("image_auroc"), "image_auroc_std": agg("image_auroc", statistics.pstdev),
            "pixel_auroc_mean": agg("pixel_auroc"), "aupro_mean": agg("aupro"),
            "average_precision_mean": agg("average_precision"), "f1_at_threshold_mean": agg("f1"),
            "fit_seconds": agg("fit_seconds", statistics.median),
            "fit_images_per_s": statistics.median([r["train_images"] / r["fit_seconds"] for r in runs]),
            "predict_images_per_s": agg("predict_images_per_s", statistics.median),
            "pixel_auroc_per_class_mean": {c: statistics.mean(r["pixel_auroc_per_class"][c] for r in runs)
                                           for c in runs[0]["pixel_auroc_per_class"] or {}},
            "defect_pixel_share_per_class": runs[0]["defect_pixel_share_per_class"],
            "seeds": args.seeds, "image_size": args.size,
            "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "runs": runs,
        }

    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "magnetic_tile.json"
    if args.keep and saved.exists():  # rows measured now replace their namesakes; the others stay, dated
        old = json.loads(saved.read_text())
        kept = {n: dict(r, measured=r.get("measured", old.get("date"))) for n, r in old["detectors"].items()}
        results = {**kept, **results}
    out = {
        "protocol": {"dataset": "Magnetic Tile Defect (MTD)", "train": "random 80% of MT_Free (seeded)",
                     "test": "remaining 20% of MT_Free + all 392 defective images", "seeds": args.seeds,
                     "image_size": args.size, "threshold": "99th percentile of 64 training normals",
                     "metrics": "image ROC-AUC, pixel ROC-AUC, AUPRO@30% FPR, AP, F1 at threshold"},
        "detectors": results,
        "ablations": {k: [v for v in variants if v in results] for k, variants in ABLATIONS.items()},
        "published_image_auroc": PUBLISHED,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": std_platform.python_version(), "device": "cpu"},
        "decode_seconds": decode_s,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    saved.write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "magnetic_tile.md").write_text(markdown(out))
    print(markdown(out))


def _row(label: str, r: dict) -> str:
    seeds = r.get("seeds") or [run["seed"] for run in r.get("runs", [])]
    fit_rate = f"{r['fit_images_per_s']:.1f}" if r.get("fit_images_per_s") else "–"
    return (f"| {label} | {r['image_auroc_mean']:.4f} ± {r['image_auroc_std']:.4f} | {r['pixel_auroc_mean']:.4f} | "
            f"{r['aupro_mean']:.4f} | {r['fit_seconds']:.0f} | {fit_rate} | "
            f"{r['predict_images_per_s']:.1f} | {seeds} | {str(r.get('measured', ''))[:10]} |")


HEADER = ["| detector | image AUROC (mean ± std) | pixel AUROC | AUPRO | fit s (median) | fit img/s | predict img/s "
          "| seeds | measured |", "|---|---|---|---|---|---|---|---|---|"]


def markdown(out: dict) -> str:
    """The report: every detector, then each ablation (its first row: everything on, as published)."""
    results, p = out["detectors"], out["protocol"]
    variants = {v for vs in ABLATIONS.values() for v in vs[1:]}
    lines = ["# Magnetic Tile benchmark", "",
             f"Written {out['date']} on {out['machine']['cpus']} CPUs (no GPU); images resized to {p['image_size']}px; "
             "protocol in `../shared/README.md` (train: a seeded random 80 % of MT_Free; test: the other 20 % and "
             "every defective image; threshold: the 99th percentile of 64 training normals). Each row's seeds and "
             "date are its own. Script: `bench/magnetic_tile_bench.py`.", "", *HEADER]
    lines += [_row(n, r) for n, r in results.items() if n not in variants]
    lines += ["", "Published image AUROC on MTD: " + ", ".join(f"{k} {v:.3f}" for k, v in PUBLISHED.items())]
    per_class = {n: r for n, r in results.items() if r.get("pixel_auroc_per_class_mean") and n not in variants}
    if per_class:
        share = next(iter(per_class.values()))["defect_pixel_share_per_class"]
        classes = sorted(share)
        lines += ["", "## Pixel ROC-AUC per defect class", "",
                  "Pooled over every pixel, pixel ROC-AUC weighs each defect class by its area. Each class against "
                  "the test normals (mean over the row's seeds); the last line is each class's share of all defect "
                  "pixels in the test set:", "",
                  "| detector | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        lines += [f"| {n} | " + " | ".join(f"{r['pixel_auroc_per_class_mean'].get(c, float('nan')):.4f}"
                                             for c in classes) + " |" for n, r in per_class.items()]
        lines.append("| share of defect pixels | " + " | ".join(f"{share[c] * 100:.1f} %" for c in classes) + " |")
    for key, names in out.get("ablations", {}).items():
        if not names:
            continue
        lines += ["", f"## Ablation: {key}", "", *HEADER]
        lines += [_row("as published" if n == key else n.split(":", 1)[1], results[n]) for n in names]
        lines += [f"\n{n}: {results[n]['note']}." for n in names if results[n].get("note")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
