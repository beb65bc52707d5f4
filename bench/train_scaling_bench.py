"""Training placement and scaling benchmark: runs submitted as Ray jobs to a local two-node Ray
cluster, exactly as `flawline train submit` does (``train.submit.submit_run``), and read back from
their run rows.

Protocol:

- Services: a fresh local S3 server (SeaweedFS) and SQLite catalog in a temp dir; a local Ray
  cluster of two nodes on this machine (head + one more raylet, 2 logical CPUs each, one custom
  "slot" each so that each node takes at most one worker). Every run asks for 1 CPU per worker.
- Speed: the whole Magnetic Tile set (``../shared/datasets/magnetic-tile``), split 75/0/25
  (seed 0). For flow, feature reconstruction, PatchCore (unsupervised: the train normals) and the
  supervised classifier (every labelled train image; 15 % held back per verdict for its
  threshold): one run with 1 worker and one with 2 workers (one per node), side by side in one
  process, in that order. ``images/s`` = the run's training images / ``fit_seconds``, where
  ``fit_seconds`` is what the worker group spent reading, decoding, embedding and training
  (rank 0's clock, from the worker function's start to the trained model; finishing, i.e. the
  threshold, test metrics and registration, is not in it). Epochs: flow and reconstruction their
  defaults (16, 12) unless ``--epochs``; classifier 2.
- Memory: synthetic textures (64 px PNGs made by this script, 8 % with a bright scratch labelled
  defective) at 1,000, 4,000 and 16,000 images, imported with the folder layout; a flow run
  (2 workers, 2 epochs) per size. Peak resident memory (ru_maxrss) of the job's driver and of each
  worker process as the run records them (``driver_peak_rss_mb``, ``placement[].peak_rss_mb``;
  the worker's peak is taken when training ends).
- ``--object-store-mb N``: each node's Ray object store (Ray's minimum is 75 MiB), so that the
  largest memory-part dataset, decoded, is several times the cluster's object store; the Markdown
  gives the ratio.
- Where the time goes: each run's ``fit_phases`` (rank 0's seconds: ``model`` building the
  detector and backbone, ``embed`` the first pass over the stream, ``epochs`` the gradient
  epochs, ``report`` per-epoch checkpoints and Ray Train's reports); ``epoch images/s`` = training
  images x epochs / epoch seconds, the steady-state rate without the fixed costs.
- The bound (unless ``--no-ddp-bound``), per gradient-trained detector of the run: its training
  step (batch 16, image size as above; flow and reconstruction on the embeddings of random
  images, the classifier on random images with its augmentation and its encoder fine-tuning)
  timed in one process, and in two processes under torch DDP (gloo) with nothing else running,
  each with one thread; the speed-up two workers could reach on this machine's cores for that
  step is 2 x one / two.
- This machine has 2 cores: the two "nodes" share them, so 2 workers can at best double a
  1-worker run that uses one core, and Ray Data's decoding, Ray's own processes and the S3
  server compete with the workers for the same cores.

    python bench/train_scaling_bench.py [--image-size 128] [--methods flow reconstruction patchcore classifier]
                                        [--sizes 1000 4000 16000] [--epochs N] [--out DIR]

Writes train_scaling.json and train_scaling.md under docs/benchmarks/ (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as std_platform
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = REPO.parent / "shared" / "datasets" / "magnetic-tile"
METHODS = {
    "flow": {"setting": "unsupervised", "method": "flow"},
    "reconstruction": {"setting": "unsupervised", "method": "reconstruction"},
    "patchcore": {"setting": "unsupervised", "method": "patchcore"},
    "classifier": {"setting": "supervised", "method": "classifier", "epochs": 2},
}
GRADIENT = ("flow", "reconstruction", "classifier")  # trained by gradient descent (the aim's detectors)
AIM_SPEEDUP = 1.6
AIM_MEMORY = 0.25


def synthetic_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 64 px gray textures in normal/ and defect/scratch/ (the folder layout; 8 % defective: a
    bright scratch)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("normal", "defect/scratch"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(60, 200, (8, 8), dtype=np.uint8)
        img = np.kron(small, np.ones((8, 8), dtype=np.uint8)) + rng.integers(0, 20, (64, 64), dtype=np.uint8)
        defect = i % 25 < 2
        if defect:
            r = int(rng.integers(8, 56))
            img[r:r + 2, 8:56] = 255
        Image.fromarray(img).save(root / ("defect/scratch" if defect else "normal") / f"t{i:05d}.png")
    return root


def wait_run(catalog, settings, run_id: int, timeout: float = 3600) -> Any:  # noqa: ANN001
    from flawline.train.runs import get_run
    from flawline.train.submit import refresh

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        refresh(catalog, settings, [run_id])
        row = get_run(catalog, run_id)
        if row.status.value in ("succeeded", "failed", "cancelled"):
            return row
        time.sleep(2)
    raise TimeoutError(f"run {run_id} did not end within {timeout:.0f} s")


def one_run(catalog, settings, dataset: str, method: str, workers: int, image_size: int,  # noqa: ANN001
            epochs: int | None, shard_cache_mb: float = 1024.0) -> dict[str, Any]:
    from flawline.train.spec import TrainSpec
    from flawline.train.submit import submit_run

    m = METHODS[method]
    spec = TrainSpec(datasets=[dataset], setting=m["setting"], method=m["method"], workers=workers,
                     cpus_per_worker=1.0, image_size=image_size, batch_size=16,
                     epochs=m.get("epochs", epochs), worker_resources={"slot": 1.0},
                     shard_cache_mb=shard_cache_mb,
                     model_name=f"{dataset}-{method}-w{workers}-{image_size}-c{shard_cache_mb:g}")
    started = time.perf_counter()
    run_id, _ = submit_run(catalog, settings, spec)
    row = wait_run(catalog, settings, run_id)
    if row.status.value != "succeeded":
        raise RuntimeError(f"{method} with {workers} worker(s): run {run_id} {row.status.value}: {row.error}")
    mt, plan = row.metrics, row.config["plan"]
    images = sum(plan["streams"].values())
    return {"run": run_id, "workers": workers, "train_images": images, "epochs": (mt.get("progress") or {}).get("epochs", 1),
            "fit_seconds": mt["fit_seconds"], "images_per_second": round(images / mt["fit_seconds"], 2),
            "fit_phases": mt.get("fit_phases"),
            "job_seconds": round(time.perf_counter() - started, 1), "image_auroc": mt.get("image_auroc"),
            "nodes": sorted({p["node_id"][:8] for p in mt["placement"]}),
            "driver_peak_rss_mb": mt.get("driver_peak_rss_mb"),
            "worker_peak_rss_mb": [p["peak_rss_mb"] for p in mt["placement"]],
            "shard_cache_mb": shard_cache_mb, "embedding_cache": mt.get("embedding_cache")}


def _step_fn(method: str, image_size: int, rank: int) -> tuple[Any, Any]:
    """(network, loss()) of ``method``'s training step on batch 16 of random images at ``image_size``:
    flow and reconstruction on their embeddings (cached by the platform, as here), the classifier on
    images (its encoder fine-tunes, so every step runs it), with its augmentation."""
    import torch
    import torch.nn.functional as F

    from flawline.models import create_detector

    torch.manual_seed(0)
    images = torch.rand(16, 3, image_size, image_size)
    gen = torch.Generator().manual_seed(rank)
    if method == "classifier":
        from flawline.data import augment

        detector = create_detector("classifier", image_size=image_size, device="cpu")
        net = detector.net.train()
        target = torch.randint(0, 2, (16,), generator=gen)

        def loss(model: Any) -> Any:
            (x,) = augment.geometric(images, gen)
            return F.cross_entropy(model(augment.photometric(x, gen))[0], target)
        return net, loss
    detector = create_detector(method, image_size=image_size, device="cpu")
    with torch.no_grad():
        embedded = detector.embed_images(images)
    net = detector.begin_training(embedded, lambda t: t)
    return net, lambda model: detector.training_loss(model, embedded, gen)


def _ddp_step(method: str, rank: int, world: int, image_size: int, port: int, steps: int, out: Any) -> None:
    """One process of the DDP bound: median seconds of ``method``'s training step (see the docstring)."""
    import torch

    torch.set_num_threads(1)
    if world > 1:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    net, loss_of = _step_fn(method, image_size, rank)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-4)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = loss_of(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    if rank == 0:
        out.put(median(times[3:]))


def ddp_bound(method: str, image_size: int, steps: int = 25) -> dict[str, Any]:
    """``method``'s step: median seconds in 1 process and in 2 DDP processes, and the speed-up bound."""
    import socket

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    seconds = {}
    for world in (1, 2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        queue = ctx.Queue()
        procs = [ctx.Process(target=_ddp_step, args=(method, r, world, image_size, port, steps, queue))
                 for r in range(world)]
        for proc in procs:
            proc.start()
        seconds[str(world)] = round(queue.get(timeout=900), 4)
        for proc in procs:
            proc.join(60)
    return {"step_seconds": seconds, "speedup_bound": round(2 * seconds["1"] / seconds["2"], 3)}


def epoch_rate(r: dict[str, Any]) -> float | None:
    """Training images x epochs per second of gradient epochs (None without epoch timings)."""
    epochs_s = (r.get("fit_phases") or {}).get("epochs")
    return round(r["train_images"] * r["epochs"] / epochs_s, 1) if epochs_s else None


def busy_cores(seconds: float = 20.0) -> float:
    """Cores' worth of CPU the whole machine used over ``seconds`` (from /proc/stat), e.g. with the
    cluster up and idle: what Ray's own processes and this machine's other services take."""
    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return round((busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1), 3)


def core_share(r: dict[str, Any]) -> float | None:
    """Rank 0's CPU seconds / wall seconds in the gradient epochs (None without both timings)."""
    phases = r.get("fit_phases") or {}
    return phases["epochs_cpu"] / phases["epochs"] if phases.get("epochs") and phases.get("epochs_cpu") else None


def write_markdown(out: Path, result: dict[str, Any]) -> None:
    cfg = result["config"]
    lines = ["# Training placement and scaling", "",
             f"Measured {result['measured']} on {cfg['machine']}; every run a Ray job on a local two-node cluster "
             f"(one worker per node, 1 CPU each), image size {cfg['image_size']}. Script: "
             "`bench/train_scaling_bench.py` (protocol in its docstring).", "",
             "## Speed: whole Magnetic Tile set", "",
             "| detector | images | epochs | 1 worker: fit s | images/s | 2 workers: fit s | images/s | speed-up | "
             f"aim ≥ {AIM_SPEEDUP} | image ROC-AUC (1 / 2) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    methods = {m: r for m, r in result["speed"].items() if m not in ("measured", "ddp_bound", "ddp_bound_measured",
                                                                         "idle_busy_cores")}
    for method, r in methods.items():
        one, two = r["1"], r["2"]
        gradient = method in GRADIENT
        aim = ("met" if r["speedup"] >= AIM_SPEEDUP else "not met") if gradient else "(not a gradient detector)"
        lines.append(f"| {method} | {one['train_images']} | {one['epochs']} | {one['fit_seconds']:.1f} | "
                     f"{one['images_per_second']:.1f} | {two['fit_seconds']:.1f} | {two['images_per_second']:.1f} | "
                     f"{r['speedup']:.2f}x | {aim} | {one['image_auroc']:.4f} / {two['image_auroc']:.4f} |")
    if any(r["1"].get("fit_phases") for r in methods.values()):
        lines += ["", "Where the fit time went (rank 0's seconds, 1 worker → 2 workers), and the steady-state rate of "
                      "the gradient epochs:", "",
                  "| detector | model | embed | epochs | report | epoch images/s (1 / 2) | epochs speed-up | "
                  "rank 0's core share in epochs (1 / 2) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for method, r in methods.items():
            p1, p2 = r["1"].get("fit_phases") or {}, r["2"].get("fit_phases") or {}
            cells = [f"{p1.get(k, 0):.1f} → {p2.get(k, 0):.1f}" if k in p1 or k in p2 else "–"
                     for k in ("model", "embed", "epochs", "report")]
            e1, e2 = epoch_rate(r["1"]), epoch_rate(r["2"])
            rate = f"{e1:.0f} / {e2:.0f} | {e2 / e1:.2f}x" if e1 and e2 else "– | –"
            c1, c2 = core_share(r["1"]), core_share(r["2"])
            share = f"{c1:.0%} / {c2:.0%}" if c1 is not None and c2 is not None else "–"
            lines.append(f"| {method} | {' | '.join(cells)} | {rate} | {share} |")
        if any(core_share(r["2"]) is not None for r in methods.values()):
            lines += ["", "Core share: the worker process's CPU seconds over the wall seconds of its gradient epochs "
                          "(every thread of it; 100 % = one core to itself). With 2 workers the two cores also run "
                          "Ray's own processes and this machine's other services, and each DDP step waits for the "
                          "slower worker."]
            idle = result["speed"].get("idle_busy_cores")
            if idle is not None:
                lines[-1] += (f" Before the runs, with the cluster up and idle, the machine kept {idle:.2f} of its "
                              f"{cfg['machine'].split()[0]} cores busy.")
    bounds = result["speed"].get("ddp_bound")
    if bounds and "step_seconds" in bounds:  # measured before every detector had one: the flow's
        bounds = {"flow": bounds}
    if bounds:
        when = result["speed"].get("ddp_bound_measured")
        lines += ["", ("Measured " + when + ", after the runs above (`--ddp-bound-only`). " if when else "")
                  + "The bound on these cores: each detector's training step (batch 16) alone, in one process and "
                      "in each of two torch DDP processes (gloo, one thread each, nothing else running); two workers "
                      "can at most be 2 x one / two as fast as one in the gradient epochs here, before Ray, "
                      "decoding and the S3 server take their share of the same two cores.", "",
                  "| detector | step ms, 1 process | step ms, each of 2 DDP | bound | measured epochs speed-up |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for method, bound in bounds.items():
            s1, s2 = bound["step_seconds"]["1"], bound["step_seconds"]["2"]
            r = methods.get(method)
            e1, e2 = (epoch_rate(r["1"]), epoch_rate(r["2"])) if r else (None, None)
            lines.append(f"| {method} | {s1 * 1000:.0f} | {s2 * 1000:.0f} | {bound['speedup_bound']:.2f}x | "
                         f"{f'{e2 / e1:.2f}x' if e1 and e2 else '–'} |")
    measured = result["memory"].get("measured")
    lines += ["", "## Memory: flow, 2 workers, synthetic 64 px images", "",
              *([f"Measured {measured} (the flow as it was built then).", ""] if measured
                and measured != result["speed"].get("measured") else []),
              "| images | --shard-cache-mb | embeddings | fit s | driver peak MiB | worker peaks MiB |",
              "| ---: | ---: | --- | ---: | ---: | --- |"]
    for n, r in result["memory"]["runs"].items():
        lines.append(f"| {n.split('-')[0]} | {r.get('shard_cache_mb', 1024):g} | {r.get('embedding_cache') or '?'} | "
                     f"{r['fit_seconds']:.1f} | {r['driver_peak_rss_mb']:.0f} | "
                     f"{', '.join(f'{v:.0f}' for v in r['worker_peak_rss_mb'])} |")
    mem = result["memory"]
    if mem.get("growth") is not None:
        lines += ["", f"Largest worker peak at {mem['largest']} images vs {mem['smallest']}: "
                      f"{mem['growth'] * 100:+.1f} % (aim within {AIM_MEMORY * 100:.0f} %: "
                      f"{'met' if abs(mem['growth']) <= AIM_MEMORY else 'not met'}); driver "
                      f"{mem['driver_growth'] * 100:+.1f} %."]
        if mem.get("growth_streamed") is not None:
            lines += ["", f"With --shard-cache-mb 0 (every epoch streams) at {mem['largest']} images: "
                          f"{mem['growth_streamed'] * 100:+.1f} % against the cached run at {mem['smallest']}."]
    if mem.get("object_store_mb"):
        largest = max(mem["decoded_mb"], key=int)
        lines += ["", f"The cluster's object store: {mem['object_store_mb']:.0f} MiB (both nodes); the {largest} images "
                      f"decoded: {mem['decoded_mb'][largest]:.0f} MiB "
                      f"({mem['decoded_mb'][largest] / mem['object_store_mb']:.1f}x the store)."]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    (out / "train_scaling.md").write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                   help="detectors for the speed part (none: keep the last speed measurement)")
    p.add_argument("--sizes", nargs="*", type=int, default=[1000, 4000, 16000],
                   help="images for the memory part (none: keep the last memory measurement)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=None, help="flow/reconstruction epochs (default: theirs)")
    p.add_argument("--shard-cache-mb", type=float, default=1024.0,
                   help="memory part: each worker's embedding cache (the platform's default); the largest "
                        "size also runs with 0 (embedded again every epoch)")
    p.add_argument("--object-store-mb", type=int, default=None,
                   help="each node's Ray object store in MiB (default: Ray's, 30 %% of memory; minimum 75)")
    p.add_argument("--no-ddp-bound", dest="ddp_bound", action="store_false",
                   help="skip timing each gradient detector's step under bare torch DDP (the bound on this machine)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    p.add_argument("--markdown-only", action="store_true",
                   help="rewrite train_scaling.md from the saved train_scaling.json (no runs)")
    p.add_argument("--ddp-bound-only", action="store_true",
                   help="only time each gradient detector's bare DDP step; the saved runs stay as they are")
    args = p.parse_args()
    if args.ddp_bound_only:
        saved = json.loads((args.out / "train_scaling.json").read_text())
        saved["speed"]["ddp_bound"] = {m: ddp_bound(m, saved["config"]["image_size"]) for m in GRADIENT}
        saved["speed"]["ddp_bound_measured"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (args.out / "train_scaling.json").write_text(json.dumps(saved, indent=2) + "\n")
        write_markdown(args.out, saved)
        return
    if args.markdown_only:
        write_markdown(args.out, json.loads((args.out / "train_scaling.json").read_text()))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from flawline.catalog import Catalog
    from flawline.catalog.db import make_engine, upgrade
    from flawline.cluster.local_ray import LocalRayCluster
    from flawline.config import get_settings
    from flawline.data.ingest import import_dataset
    from flawline.data.split import SplitSpec, assign_splits
    from flawline.storage import ObjectStore
    from flawline.storage.local_s3 import LocalS3Server

    started = time.perf_counter()
    result: dict[str, Any] = {"speed": {}, "memory": {"runs": {}}}
    with tempfile.TemporaryDirectory(prefix="flawline-scaling-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server = LocalS3Server.on_free_ports(tmp / "s3")
        server.start(timeout=90)
        cluster = LocalRayCluster.on_free_ports(num_cpus=2, log_file=tmp / "ray.log")
        cluster.object_store_mb = args.object_store_mb
        try:
            cluster.start(resources='{"slot": 1}')
            cluster.add_node(num_cpus=2, resources='{"slot": 1}')
            url = f"sqlite:///{tmp / 'catalog.db'}"
            os.environ.update({"FLAWLINE_CATALOG_URL": url, "FLAWLINE_S3_ENDPOINT": server.endpoint,
                               "FLAWLINE_S3_ACCESS_KEY": server.access_key, "FLAWLINE_S3_SECRET_KEY": server.secret_key,
                               "FLAWLINE_S3_BUCKET": "scaling-bench", "FLAWLINE_DATA_DIR": str(tmp / "data"),
                               "FLAWLINE_RAY_DASHBOARD_URL": cluster.dashboard_url})
            get_settings.cache_clear()
            settings = get_settings()
            upgrade(make_engine(url))
            catalog = Catalog(url)
            store = ObjectStore(server.endpoint, server.access_key, server.secret_key, "scaling-bench")
            store.ensure_bucket()

            def log(msg: str) -> None:
                print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)

            try:  # a failure keeps what was measured before it (written below, with the error)
                if args.methods:
                    import_dataset(catalog, store, MAGNETIC_TILE, layout="magnetic-tile", dataset="mt", workers=16)
                    split = assign_splits(catalog, "mt", SplitSpec(train=0.75, val=0.0, test=0.25, seed=0))
                    log(f"Magnetic Tile imported and split {split}")
                    result["speed"]["idle_busy_cores"] = busy_cores()
                    log(f"with the cluster idle, the machine keeps {result['speed']['idle_busy_cores']:.2f} cores busy")
                for method in args.methods:
                    runs = {}
                    for workers in (1, 2):
                        runs[str(workers)] = one_run(catalog, settings, "mt", method, workers, args.image_size, args.epochs)
                        r = runs[str(workers)]
                        log(f"{method} x{workers}: {r['train_images']} images, fit {r['fit_seconds']:.1f}s {r['fit_phases']} "
                            f"({r['images_per_second']:.1f}/s), nodes {r['nodes']}, AUROC {r['image_auroc']:.4f}")
                    runs["speedup"] = round(runs["2"]["images_per_second"] / runs["1"]["images_per_second"], 3)
                    result["speed"][method] = runs
                if args.sizes:
                    import ray

                    from flawline.train.distributed import decoded_bytes

                    with ray.init(address=cluster.address):
                        store_mb = ray.cluster_resources()["object_store_memory"] / 2**20
                    result["memory"].update(object_store_mb=round(store_mb, 1), decoded_mb={
                        str(n): round(n * decoded_bytes(64) / 2**20, 1) for n in args.sizes})
                    log(f"the cluster's object store: {store_mb:.0f} MiB")
                for n in args.sizes:
                    name = f"synthetic-{n}"
                    folder = synthetic_folder(tmp / name, n)
                    import_dataset(catalog, store, folder, layout="folder", dataset=name, workers=16)
                    assign_splits(catalog, name, SplitSpec(train=0.8, val=0.0, test=0.2, seed=0))
                    spec_epochs = 2
                    caches = [args.shard_cache_mb] + ([0.0] if n == max(args.sizes) and args.shard_cache_mb else [])
                    for cache in caches:  # the largest size also with nothing kept: every epoch streams
                        r = one_run(catalog, settings, name, "flow", 2, 64, spec_epochs, cache)
                        result["memory"]["runs"][str(n) if cache == args.shard_cache_mb else f"{n}-streamed"] = r
                        log(f"memory {n} (cache {cache:g} MiB: {r['embedding_cache']}): driver "
                            f"{r['driver_peak_rss_mb']:.0f} MiB, workers {r['worker_peak_rss_mb']} MiB, "
                            f"fit {r['fit_seconds']:.1f}s")
            except Exception as err:  # noqa: BLE001
                result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                log(f"stopped: {result['error']}")
            catalog.dispose()
        finally:
            cluster.stop()
            server.stop()

    runs = {k: v for k, v in result["memory"]["runs"].items() if k.isdigit()}
    if len(runs) >= 2:
        small, large = min(runs, key=int), max(runs, key=int)
        result["memory"].update(
            smallest=int(small), largest=int(large),
            growth=round(max(runs[large]["worker_peak_rss_mb"]) / max(runs[small]["worker_peak_rss_mb"]) - 1, 4),
            driver_growth=round(runs[large]["driver_peak_rss_mb"] / runs[small]["driver_peak_rss_mb"] - 1, 4))
        streamed = result["memory"]["runs"].get(f"{large}-streamed")
        if streamed:
            result["memory"]["growth_streamed"] = round(
                max(streamed["worker_peak_rss_mb"]) / max(runs[small]["worker_peak_rss_mb"]) - 1, 4)
    if args.ddp_bound and not result.get("error"):
        gradient = [m for m in args.methods if m in GRADIENT]
        if gradient:
            print("timing the bare DDP step of " + ", ".join(gradient), flush=True)
            result["speed"]["ddp_bound"] = {m: ddp_bound(m, args.image_size) for m in gradient}
    result["config"] = {"image_size": args.image_size, "epochs": args.epochs, "sizes": args.sizes,
                        "machine": f"{os.cpu_count()} CPUs, {std_platform.machine()}",
                        "seconds": round(time.perf_counter() - started, 1)}
    result["measured"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "train_scaling.json"
    if previous.exists():  # a part not run now keeps its last measurement, dated
        old = json.loads(previous.read_text())
        for part, ran in (("speed", bool(args.methods)), ("memory", bool(args.sizes))):
            if not ran and part in old:
                result[part] = dict(old[part], measured=old[part].get("measured", old.get("measured")))
    for part in ("speed", "memory"):
        result[part].setdefault("measured", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    speedups = [r["speedup"] for m, r in result["speed"].items() if m in GRADIENT]
    result["notes"] = ([f"The run stopped early: {result['error']}"] if result.get("error") else []) + [
        f"Gradient detectors' median speed-up with 2 workers: {median(speedups):.2f}x" if speedups else "no speed runs",
        "Both nodes share this machine's 2 cores; Ray Data's decoding actors, Ray's own processes and the S3 "
        "server run on the same cores.",
        "Flow, reconstruction and selfsup keep each worker's embeddings in memory up to "
        "--shard-cache-mb (default 1024 MiB per worker) and beyond it embed the streamed shard again "
        "every epoch; PatchCore and PaDiM gather every embedding on rank 0, which grows with the set.",
    ]
    (args.out / "train_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.out, result)
    print(f"wrote {args.out / 'train_scaling.json'} and .md", flush=True)
    if result.get("error"):
        sys.exit(1)


if __name__ == "__main__":
    main()
