"""Import throughput against raw parallel put_object, measured side by side in one run.

Imports the whole Magnetic Tile set (1,344 images with masks) into a fresh local S3 server and
SQLite catalog, and puts the very same bytes with plain parallel ``put_object`` calls (same client
settings, same number of threads). Runs alternate (raw, import, raw, import, ...) so both see the
same machine state; each run writes to a bucket of its own. Medians are reported.

    python bench/import_bench.py [--repeats 3] [--workers 16] [--source ../shared/datasets/magnetic-tile]

Writes docs/benchmarks/import.json and docs/benchmarks/import.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform as std_platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from flawline.catalog import Catalog, upgrade  # noqa: E402
from flawline.catalog.db import make_engine  # noqa: E402
from flawline.data.importers import get_importer  # noqa: E402
from flawline.data.ingest import import_dataset  # noqa: E402
from flawline.storage import ObjectStore  # noqa: E402
from flawline.storage.local_s3 import LocalS3Server  # noqa: E402


def source_bytes(source: Path) -> list[bytes]:
    """The bytes the import stores: every image and its mask, as files on disk."""
    blobs = []
    for item in get_importer("magnetic-tile").scan(source):
        blobs.append(item.image.read())
        if item.mask is not None:
            blobs.append(item.mask.read())
    return blobs


def raw_put(server: LocalS3Server, bucket: str, blobs: list[bytes], workers: int) -> float:
    store = ObjectStore(server.endpoint, server.access_key, server.secret_key, bucket,
                        max_connections=max(32, workers * 2))
    store.ensure_bucket()

    def put(i: int) -> None:
        data = blobs[i]
        store.client.put_object(bucket, f"raw/{i:06d}", io.BytesIO(data), len(data))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(put, range(len(blobs))))
    return time.perf_counter() - started


def flawline_import(server: LocalS3Server, bucket: str, source: Path, workers: int, tmp: Path) -> dict:
    url = f"sqlite:///{tmp / (bucket + '.db')}"
    upgrade(make_engine(url))
    catalog = Catalog(url)
    store = ObjectStore(server.endpoint, server.access_key, server.secret_key, bucket,
                        max_connections=max(32, workers * 2))
    started = time.perf_counter()
    report = import_dataset(catalog, store, source, layout="magnetic-tile", dataset="magnetic-tile",
                            workers=workers)
    seconds = time.perf_counter() - started
    catalog.dispose()
    return {"seconds": seconds, "images": report.new_images, "objects": report.objects_uploaded,
            "bytes": report.bytes_uploaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "datasets" / "magnetic-tile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--settle", type=float, default=2.0, help="Idle seconds before each timed run.")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args()

    blobs = source_bytes(args.source)
    with tempfile.TemporaryDirectory(prefix="flawline-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server = LocalS3Server.on_free_ports(tmp / "s3")
        server.start()
        try:
            raw_runs, import_runs = [], []
            for r in range(args.repeats):
                time.sleep(args.settle)  # let the server finish background work from the last run
                raw_s = raw_put(server, f"bench-raw-{r}", blobs, args.workers)
                raw_runs.append(len(blobs) / raw_s)
                time.sleep(args.settle)
                imp = flawline_import(server, f"bench-import-{r}", args.source, args.workers, tmp)
                import_runs.append(imp)
                time.sleep(args.settle)
                print(f"run {r}: raw {len(blobs) / raw_s:.0f} objects/s, import "
                      f"{imp['objects'] / imp['seconds']:.0f} objects/s ({imp['seconds']:.2f}s)", file=sys.stderr)
        finally:
            server.stop()

    seconds = statistics.median(r["seconds"] for r in import_runs)
    objects = import_runs[0]["objects"]
    import_rate = statistics.median(r["objects"] / r["seconds"] for r in import_runs)
    raw_rate = statistics.median(raw_runs)
    result = {
        "images": import_runs[0]["images"],
        "objects": objects,
        "bytes": import_runs[0]["bytes"],
        "seconds": round(seconds, 3),
        "objects_per_s": round(import_rate, 1),
        "raw_put_objects_per_s": round(raw_rate, 1),
        "import_to_raw_ratio": round(import_rate / raw_rate, 3),
        "workers": args.workers,
        "repeats": args.repeats,
        "runs": {"import_objects_per_s": [round(r["objects"] / r["seconds"], 1) for r in import_runs],
                 "import_seconds": [round(r["seconds"], 3) for r in import_runs],
                 "raw_put_objects_per_s": [round(x, 1) for x in raw_runs]},
        "what": "median over alternating runs; import = check + hash + upload + catalog rows, raw = put_object "
                "of the same bytes with the same thread count; local SeaweedFS on loopback, SQLite catalog",
        "machine": {"cpus": os.cpu_count(), "python": std_platform.python_version(),
                    "system": std_platform.platform()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "import.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "import.md").write_text(
        "# Import benchmark (Magnetic Tile)\n\n"
        f"Measured {result['date']} on {result['machine']['cpus']} CPUs; {args.repeats} alternating runs, "
        f"{args.workers} upload threads, local SeaweedFS on loopback, SQLite catalog.\n\n"
        "| what | median | runs |\n|---|---|---|\n"
        f"| flawline import (objects/s) | {import_rate:.0f} | {', '.join(f'{x:.0f}' for x in result['runs']['import_objects_per_s'])} |\n"
        f"| raw parallel put_object (objects/s) | {raw_rate:.0f} | {', '.join(f'{x:.0f}' for x in raw_runs)} |\n"
        f"| import / raw | {import_rate / raw_rate:.2f} | |\n\n"
        f"{result['images']} images, {objects} objects ({result['bytes'] / 2**20:.1f} MiB) per import; "
        f"median import time {seconds:.2f} s.\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
