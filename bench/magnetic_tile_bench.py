"""Every detector on the Magnetic Tile set, by the protocol in ../shared/README.md.

Per seed: a random 80 % of the defect-free images for training, the other 20 % plus every
defective image for testing; image ROC-AUC, pixel ROC-AUC and AUPRO (from the masks), fit time and
prediction throughput, on this machine's CPU. Images are decoded once with flawline's loader.

    python bench/magnetic_tile_bench.py [--seeds 0 1 2] [--detectors patchcore padim] [--size 256]

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

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = {"DifferNet": 0.977, "CS-Flow": 0.993, "ValidFlow": 0.996}


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
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = p.parse_args()
    # By default every detector that fits on normal images alone (the label-trained ones refuse to);
    # a variant is NAME or NAME:key=value,...; bf16 PatchCore shows the AMX speed-up on this CPU.
    detectors = args.detectors or [*normal_only_detectors(), "patchcore:precision=bf16"]

    t0 = time.perf_counter()
    images, masks, labels, names, classes = load(args.source, args.size)
    decode_s = time.perf_counter() - t0
    normal_idx = np.flatnonzero(~labels)
    defect_idx = np.flatnonzero(labels)
    print(f"decoded {len(names)} images in {decode_s:.1f}s", flush=True)

    results: dict[str, dict] = {}
    for name in detectors:
        method, _, extra = name.partition(":")
        overrides = {k: v for k, v in (kv.split("=", 1) for kv in extra.split(",") if kv)}
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
                   "image_auroc_per_class": m["image_auroc_per_class"], "fit_info": det.info}
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
            "predict_images_per_s": agg("predict_images_per_s", statistics.median),
            "runs": runs,
        }

    out = {
        "protocol": {"dataset": "Magnetic Tile Defect (MTD)", "train": "random 80% of MT_Free (seeded)",
                     "test": "remaining 20% of MT_Free + all 392 defective images", "seeds": args.seeds,
                     "image_size": args.size, "threshold": "99th percentile of 64 training normals",
                     "metrics": "image ROC-AUC, pixel ROC-AUC, AUPRO@30% FPR, AP, F1 at threshold"},
        "detectors": results,
        "published_image_auroc": PUBLISHED,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": std_platform.python_version(), "device": "cpu"},
        "decode_seconds": decode_s,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "magnetic_tile.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Magnetic Tile benchmark", "",
             f"Measured {out['date']} on {os.cpu_count()} CPUs (no GPU); seeds {args.seeds}; images resized to "
             f"{args.size}px; protocol in `../shared/README.md`.", "",
             "| detector | image AUROC (mean ± std) | pixel AUROC | AUPRO | fit s (median) | predict img/s |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['image_auroc_mean']:.4f} ± {r['image_auroc_std']:.4f} | {r['pixel_auroc_mean']:.4f} | "
                     f"{r['aupro_mean']:.4f} | {r['fit_seconds']:.0f} | {r['predict_images_per_s']:.1f} |")
    lines += ["", "Published image AUROC on MTD: " + ", ".join(f"{k} {v:.3f}" for k, v in PUBLISHED.items()), ""]
    (args.out / "magnetic_tile.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
