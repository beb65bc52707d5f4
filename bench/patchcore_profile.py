"""Where PatchCore's prediction time goes, per image, on this machine: backbone, patch features,
nearest-neighbour search and map upsampling, in fp32 and bf16, with the bank of a real fit
(seed-0 Magnetic Tile training split, as in magnetic_tile_bench.py).

    python bench/patchcore_profile.py [--size 256] [--batches 6]

Writes docs/benchmarks/patchcore_profile.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from flawline.models import create_detector
from flawline.models.features import patch_features, upsample_map
from flawline.models.neighbors import nearest_distances

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=REPO.parent / "shared" / "datasets" / "magnetic-tile")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = p.parse_args()

    import magnetic_tile_bench as mtb  # same loader and split as the accuracy benchmark

    images, _masks, labels, _names, _classes = mtb.load(args.source, args.size)
    normal = np.flatnonzero(~labels)
    random.Random(0).shuffle(normal)
    n_train = int(round(0.8 * len(normal)))
    det = create_detector("patchcore", image_size=args.size).fit(images[normal[:n_train]])
    test = images[np.r_[normal[n_train:], np.flatnonzero(labels)]]
    bs = det.config.batch_size
    batches = [det.prepare(test[i * bs:(i + 1) * bs]) for i in range(args.batches)]
    bank = det.bank

    sigma = det.config.blur_sigma
    result = {}
    for precision in ("fp32", "bf16"):
        parts: dict[str, list[float]] = {k: [] for k in ("backbone_ms", "patch_features_ms", "nearest_neighbour_ms",
                                                         "map_upsample_blur_ms", "whole_predict_ms")}
        with torch.no_grad(), det.autocast(precision):
            det._predict_batch(batches[0])  # warm-up
            for b in batches:
                n = b.shape[0]
                t0 = time.perf_counter()
                maps = det.extractor(b)
                t1 = time.perf_counter()
                f = patch_features(maps)
                t2 = time.perf_counter()
                d = nearest_distances(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), bank, 1, det.config.search_chunk)
                t3 = time.perf_counter()
                upsample_map(d.reshape(n, *f.shape[-2:]).float(), b.shape[-2:], sigma)
                t4 = time.perf_counter()
                det._predict_batch(b)
                t5 = time.perf_counter()
                for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                    parts[key].append(dt * 1000 / n)
        result[precision] = {k: statistics.median(v) for k, v in parts.items()}
        result[precision]["whole_images_per_s"] = 1000 / result[precision]["whole_predict_ms"]
    out = {"bank": int(bank.shape[0]), "feature_dim": int(bank.shape[1]), "image_size": args.size,
           "batch_size": bs, "timed_batches": args.batches, "stat": "median ms per image over batches",
           "profile": result, "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "patchcore_profile.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Where PatchCore's prediction time goes", "",
             f"Measured {out['date']}, {os.cpu_count()} CPUs, {args.size}px, bank {out['bank']} x {out['feature_dim']}, "
             f"median ms per image over {args.batches} batches of {bs}.", "",
             "| part | fp32 ms | bf16 ms |", "|---|---|---|"]
    for key in ("backbone_ms", "patch_features_ms", "nearest_neighbour_ms", "map_upsample_blur_ms", "whole_predict_ms"):
        lines.append(f"| {key[:-3].replace('_', ' ')} | {result['fp32'][key]:.1f} | {result['bf16'][key]:.1f} |")
    lines.append(f"| images/s | {result['fp32']['whole_images_per_s']:.1f} | {result['bf16']['whole_images_per_s']:.1f} |")
    (args.out / "patchcore_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
