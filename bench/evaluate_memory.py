"""Peak memory of ``flawline evaluate`` against the number of test images: before (every split
fetched into one float tensor, exact in-memory metrics) and after (streamed in batches).

Makes a synthetic dataset (smooth-noise images with bright spots and their masks, PNG) in a fresh
local S3 server (SeaweedFS) and SQLite catalog: 60 normal train images, 40 normal + 10 defect val
images and a test split of the largest size asked for (about 20 % defects). Each measurement runs
in a fresh subprocess (its peak RSS, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, is its own),
on the first N test images of a seeded shuffle:

- ``before``: the old ``flawline evaluate`` path: ``records.fetch`` of train, val and test, fit,
  predict val, threshold, ``evaluate.run.evaluate`` (exact pixel metrics on every map at once);
  the old report's plots are left out (they only added copies of the maps);
- ``after``: ``evaluate.pipeline.run_streamed`` and ``report.write_report`` (heatmaps included).

PaDiM, efficientnet_lite0, images of --size pixels; 2 torch threads.

    python bench/evaluate_memory.py [--sizes 500 1000 2000] [--size 64] [--out docs/benchmarks]

Writes evaluate_memory.json and evaluate_memory.md into --out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform as std_platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TRAIN, VAL_NORMAL, VAL_DEFECT = 60, 40, 10


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_source(root: Path, test: int, size: int, seed: int = 0) -> None:
    """normal/ and defect/spot/ (with masks/) PNGs, named train-*, val-*, test-* for their split."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]

    def image(defect: bool) -> tuple[np.ndarray, np.ndarray | None]:
        base = ndimage.gaussian_filter(rng.normal(0.5, 0.25, (size, size)), 2.0) * 0.6 + 0.2
        base += rng.normal(0, 0.02, (size, size))  # every image distinct (the import deduplicates)
        if not defect:
            return (np.clip(base, 0, 1) * 255).astype(np.uint8), None
        cy, cx = rng.integers(size // 8, size - size // 8, 2)
        r = rng.uniform(size / 24, size / 10)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        base[mask] += rng.uniform(0.2, 0.5)
        return (np.clip(base, 0, 1) * 255).astype(np.uint8), (mask * 255).astype(np.uint8)

    plan = [("train", False)] * TRAIN + [("val", False)] * VAL_NORMAL + [("val", True)] * VAL_DEFECT
    plan += [("test", bool(rng.random() < 0.2)) for _ in range(test)]
    for i, (split, defect) in enumerate(plan):
        img, mask = image(defect)
        folder = "defect/spot" if defect else "normal"
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / f"{split}-{i:05d}.png").write_bytes(_png(img))
        if mask is not None:
            (root / "masks" / folder).mkdir(parents=True, exist_ok=True)
            (root / "masks" / folder / f"{split}-{i:05d}.png").write_bytes(_png(mask))


def setup(tmp: Path, server, test: int, size: int) -> dict:  # noqa: ANN001
    from sqlalchemy import update

    from flawline.catalog import Catalog, Image, Split, upgrade
    from flawline.catalog.db import make_engine
    from flawline.data.ingest import import_dataset
    from flawline.storage import ObjectStore

    make_source(tmp / "src", test, size)
    url = f"sqlite:///{tmp / 'catalog.db'}"
    upgrade(make_engine(url))
    catalog = Catalog(url)
    store = ObjectStore(server.endpoint, server.access_key, server.secret_key, "bench-eval")
    store.ensure_bucket()
    report = import_dataset(catalog, store, tmp / "src", layout="folder", dataset="synth", workers=8)
    with catalog.session() as s:
        for split in Split:
            s.execute(update(Image).where(Image.origin.like(f"%/{split.value}-%")).values(split=split))
    catalog.dispose()
    return {"catalog_url": url, "endpoint": server.endpoint, "access_key": server.access_key,
            "secret_key": server.secret_key, "bucket": "bench-eval", "images": report.new_images}


def child(args: argparse.Namespace) -> None:
    """One measurement: prints one JSON line (peak RSS in MiB, seconds, metrics)."""
    import torch

    torch.set_num_threads(2)
    from flawline.catalog import Catalog
    from flawline.evaluate.pipeline import EvaluateOptions, run_streamed, select_splits
    from flawline.storage import ObjectStore

    env = json.loads(args.child)
    catalog = Catalog(env["catalog_url"])
    store = ObjectStore(env["endpoint"], env["access_key"], env["secret_key"], env["bucket"])
    splits = select_splits(catalog, "synth", "auto")
    order = np.random.default_rng(0).permutation(len(splits.test))[:args.test]
    splits.test = [splits.test[i] for i in sorted(order)]
    options = EvaluateOptions(method="padim", image_size=args.size, workers=8, save=False)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if args.mode == "after":
        from flawline.evaluate.report import write_report

        run = run_streamed(store, splits, options)
        with tempfile.TemporaryDirectory() as out:
            write_report(Path(out), run.metrics, run.labels, run.scores, run.worst, {"method": "padim"},
                         run.display_range)
        metrics = run.metrics
    else:  # the old flawline evaluate, step for step (cli/models.py before streaming)
        from flawline.data.records import fetch
        from flawline.evaluate import thresholds as th
        from flawline.evaluate.run import evaluate
        from flawline.models import create_detector

        train = fetch(store, splits.train, args.size, 8)
        val = fetch(store, splits.calibration, args.size, 8)
        test = fetch(store, splits.test, args.size, 8)
        det = create_detector("padim", backbone=options.backbone, image_size=args.size,
                              white=splits.train[0].white)
        det.fit(train.images)
        vp = det.predict(val.images)
        det.set_threshold(th.compute("auto", scores=vp.scores, maps=vp.maps, labels=val.labels, data={}))
        metrics, _ = evaluate(det, test)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"mode": args.mode, "test_images": len(splits.test), "peak_rss_mib": round(peak, 1),
                      "baseline_rss_mib": round(baseline, 1), "seconds": round(seconds, 1),
                      "pixel_auroc": metrics.get("pixel_auroc"), "aupro": metrics.get("aupro"),
                      "image_auroc": metrics.get("image_auroc"),
                      "error_bounds": metrics.get("pixel_error_bounds")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000], help="Test-set sizes.")
    parser.add_argument("--size", type=int, default=64, help="Image and model input size (pixels).")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("before", "after"), help=argparse.SUPPRESS)
    parser.add_argument("--test", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from flawline.storage.local_s3 import LocalS3Server

    began = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="flawline-evalmem-") as tmp_name:
        tmp = Path(tmp_name)
        server = LocalS3Server.on_free_ports(tmp / "s3")
        server.start()
        try:
            env = setup(tmp, server, max(args.sizes), args.size)
            print(f"dataset: {env['images']} images in {time.perf_counter() - began:.0f} s", file=sys.stderr)
            for n in args.sizes:
                for mode in ("before", "after"):
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", json.dumps(env), "--mode", mode, "--test", str(n),
                         "--size", str(args.size)],
                        check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    print(f"{mode:6s} {n:5d} test images: peak {row['peak_rss_mib']:.0f} MiB "
                          f"({row['seconds']:.0f} s)", file=sys.stderr)
        finally:
            server.stop()

    result = {
        "what": "peak RSS (ru_maxrss) of one evaluate run in a fresh process, by number of test images; "
                "before = fetch everything + exact in-memory metrics, after = streamed (evaluate.pipeline)",
        "detector": "padim", "backbone": "efficientnet_lite0", "image_size": args.size,
        "train_images": TRAIN, "calibration_images": VAL_NORMAL + VAL_DEFECT, "rows": rows,
        "total_seconds": round(time.perf_counter() - began, 1),
        "command": "python bench/evaluate_memory.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": std_platform.python_version(),
                    "system": std_platform.platform()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluate_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    by = {(r["mode"], r["test_images"]): r for r in rows}
    lines = ["# `flawline evaluate`: peak memory vs test images", "",
             f"Measured {result['date']} on {os.cpu_count()} CPUs: PaDiM (efficientnet_lite0) at {args.size} px, "
             f"{TRAIN} train and {VAL_NORMAL + VAL_DEFECT} calibration images, synthetic PNGs in a local "
             "SeaweedFS; each run in a fresh process, peak RSS from `ru_maxrss` (baseline: after imports). "
             "Before = every split fetched as one float tensor and exact in-memory metrics (the old "
             "command, report plots left out); after = streamed in batches (`evaluate.pipeline`, report "
             "included), pixel metrics from histograms.", "", f"Command: `{result['command']}`.", "",
             "| test images | before: peak MiB | after: peak MiB | before s | after s | "
             "pixel AUROC before / after | AUPRO before / after |", "|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        b, a = by[("before", n)], by[("after", n)]
        lines.append(f"| {n} | {b['peak_rss_mib']:.0f} | {a['peak_rss_mib']:.0f} | {b['seconds']:.0f} | "
                     f"{a['seconds']:.0f} | {_f(b['pixel_auroc'])} / {_f(a['pixel_auroc'])} | "
                     f"{_f(b['aupro'])} / {_f(a['aupro'])} |")
    if len(args.sizes) > 1:
        n0, n1 = args.sizes[0], args.sizes[-1]
        slope = {m: (by[(m, n1)]["peak_rss_mib"] - by[(m, n0)]["peak_rss_mib"]) / (n1 - n0) * 1000
                 for m in ("before", "after")}
        lines += ["", f"Growth from {n0} to {n1} test images: before {slope['before']:.0f} MiB, after "
                  f"{slope['after']:.0f} MiB per 1,000 images."]
    (args.out / "evaluate_memory.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result, indent=2))


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


if __name__ == "__main__":
    main()
