"""The Ray edge of training: Ray Data reads and decodes the run's images from S3 in parallel, Ray
Train's TorchTrainer runs the setting's plain torch loop on every worker under DDP (gloo on CPU,
NCCL on GPU) with checkpoints in S3, and normal-only detectors embed their images on a pool of
Ray Data actors. Everything here runs inside a Ray job (``jobs/train.py``)."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flawline.config import Settings, get_settings
from flawline.models import Detector
from flawline.models.artifacts import detector_from_bytes, detector_to_bytes
from flawline.train.data import TensorBatches, decode_rows, to_model
from flawline.train.runner import RunPlan
from flawline.train.spec import TrainSpec

STATE_FILE = "state.pt"
DETECTOR_FILE = "detector.pt"


def s3_filesystem(settings: Settings):  # noqa: ANN201  (pyarrow.fs.S3FileSystem)
    """Ray Train's checkpoint storage on the platform's S3 endpoint."""
    import pyarrow.fs

    scheme = "https" if settings.s3_secure else "http"
    return pyarrow.fs.S3FileSystem(
        endpoint_override=f"{scheme}://{settings.s3_endpoint}", scheme=scheme,
        access_key=settings.s3_access_key, secret_key=settings.s3_secret_key.get_secret_value(),
        region=settings.s3_region or "us-east-1")


def checkpoint_prefix(settings: Settings, run_id: int) -> str:
    return f"{settings.s3_bucket}/ray-train/run-{run_id}"


# -- Ray Data: catalog rows → decoded tensors ------------------------------------------------------
class DecodeRows:
    """Ray Data actor: fetch and decode a batch of rows from S3 (each actor keeps its connections)."""

    def __init__(self, image_size: int) -> None:
        from flawline.context import open_store

        self.store = open_store()
        self.image_size = image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [json.loads(r) for r in batch["row"]]
        return decode_rows(self.store, rows, self.image_size)


def rows_dataset(rows: list[dict[str, Any]], image_size: int, parallelism: int):  # noqa: ANN201
    """Rows → a materialised Ray dataset of decoded images (uint8; converted on the workers)."""
    import ray.data

    ds = ray.data.from_items([{"row": json.dumps(r)} for r in rows],
                             override_num_blocks=max(1, min(len(rows) // 16, 4 * parallelism)))
    ds = ds.map_batches(DecodeRows, fn_constructor_kwargs={"image_size": image_size}, batch_size=16,
                        concurrency=(1, max(1, parallelism)), num_cpus=0.5)
    return ds.materialize()  # decoded once, iterated every epoch


class RayShardBatches(TensorBatches):
    """This worker's shard of each stream (the whole stream where it was too small to split),
    read once into memory and then served like ``TensorBatches``: every epoch a seeded shuffle,
    and a setting may stop reading a stream part-way (streaming splits do not allow that)."""

    def __init__(self, streams: list[str], batch_size: int, seed: int, rank: int, device: torch.device) -> None:
        import ray.train

        data = {}
        for name in streams:
            parts = list(ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=256))
            data[name] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
        super().__init__(data, batch_size, seed + 7 * rank, rank=0, world=1, device=device)


class RayTrainContext:
    """``TrainContext`` inside a Ray Train worker: DDP, per-epoch checkpoints to S3, resume."""

    def __init__(self, run_id: int | None) -> None:
        import ray.train

        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()  # this worker's GPU (by local rank), or the CPU
        self.run_id = run_id
        self.resumed_from_epoch: int | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world_size

    def report(self, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        import ray.train

        metrics = dict(metrics, node_id=_node_id(), world_size=self.world_size)
        if self.resumed_from_epoch is not None:
            metrics["resumed_from_epoch"] = self.resumed_from_epoch
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if self.run_id is not None:
            from flawline.train.runs import record_progress

            record_progress(self.run_id, metrics)

    def resume(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            path = Path(d) / STATE_FILE
            state = torch.load(path, map_location=self.device, weights_only=False) if path.exists() else None
        if state is not None:  # carried in every later epoch's metrics: the run resumed, from here
            self.resumed_from_epoch = int(state["epoch"]) + 1
        return state


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    from flawline.train.settings import get_setting

    spec = TrainSpec.from_dict(config["spec"])
    setting = get_setting(spec.setting)
    ctx = RayTrainContext(config["run_id"])
    torch.set_num_threads(max(1, int(config["threads"])))
    source = RayShardBatches(config["streams"], spec.batch_size, spec.seed, ctx.rank, ctx.device)
    from flawline.train.data import RunData

    data = RunData(labelled=[], unlabelled=[], val=[], test=[], classes=config["classes"])
    detector = setting.build(spec, data, device=str(ctx.device))
    history = setting.train(detector, source, spec, ctx, config["class_counts"])
    nodes = [_node_id()] * ctx.world_size
    if ctx.world_size > 1:
        torch.distributed.all_gather_object(nodes, _node_id())
    # Last report: the whole trained detector, so the driver needs no knowledge of its parts.
    final = {"final": True, "epochs_run": len(history), "node_id": _node_id(), "world_size": ctx.world_size}
    if ctx.rank != 0:
        ray.train.report(final)
        return
    if config["run_id"] is not None:
        from flawline.train.runs import record_facts

        record_facts(config["run_id"], worker_nodes=nodes)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / DETECTOR_FILE).write_bytes(detector_to_bytes(detector))
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_on_ray(plan: RunPlan, run_id: int | None = None, settings: Settings | None = None) -> Detector:
    """Train the plan's gradient setting with TorchTrainer; returns the trained detector."""
    import ray.train
    from ray.train.torch import TorchTrainer

    settings = settings or get_settings()
    spec = plan.spec
    datasets = {name: rows_dataset(rows, spec.image_size, spec.workers) for name, rows in plan.streams.items()}
    # Streams too small to give every worker a batch (k few-shot defects) go whole to each worker.
    split = [name for name, rows in plan.streams.items() if len(rows) >= spec.workers * spec.batch_size]
    use_gpu = spec.gpus_per_worker > 0
    resources = {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"spec": spec.as_dict(), "run_id": run_id, "classes": plan.data.classes,
                           "class_counts": plan.class_counts, "threads": spec.cpus_per_worker,
                           "streams": list(plan.streams)},
        scaling_config=ray.train.ScalingConfig(
            # SPREAD: workers on different nodes where there is room (no job owns a machine).
            num_workers=spec.workers, use_gpu=use_gpu, resources_per_worker=resources, placement_strategy="SPREAD"),
        run_config=ray.train.RunConfig(
            name=f"run-{run_id}" if run_id is not None else None,
            storage_path=f"{settings.s3_bucket}/ray-train", storage_filesystem=s3_filesystem(settings),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split=split),
        # DDP backend: gloo on CPU, NCCL with use_gpu (Ray Train's TorchConfig default).
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        return detector_from_bytes((Path(d) / DETECTOR_FILE).read_bytes(), f"run {run_id} checkpoint")


# -- normal-only detectors: embeddings on an actor pool, one fit on the driver ---------------------
class EmbedRows:
    """Ray Data actor: decode rows and run ``Detector.embed`` (one detector per actor)."""

    def __init__(self, spec: dict[str, Any], threads: float) -> None:
        from flawline.context import open_store
        from flawline.train.data import RunData
        from flawline.train.settings import get_setting

        self.spec = TrainSpec.from_dict(spec)
        torch.set_num_threads(max(1, int(threads)))
        self.detector = get_setting(self.spec.setting).build(self.spec, RunData([], [], [], []))
        self.store = open_store()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [json.loads(r) for r in batch["row"]]
        x = to_model({"image": torch.from_numpy(decode_rows(self.store, rows, self.spec.image_size)["image"])},
                     self.detector.device)["image"]
        with torch.no_grad(), self.detector.autocast():
            emb = self.detector.embed(self.detector.prepare(x))
        buf = io.BytesIO()  # tuples, fp16: keep them exactly as embed made them
        torch.save(tuple(e.cpu() for e in emb) if isinstance(emb, tuple) else emb.cpu(), buf)
        return {"embedded": [buf.getvalue()]}


def fit_on_ray(plan: RunPlan) -> Detector:
    """Normal-only settings: embeddings spread over ``spec.workers`` actors, then one fit."""
    import ray.data

    spec = plan.spec
    rows = plan.streams["normal"]
    ds = ray.data.from_items([{"row": json.dumps(r)} for r in rows],
                             override_num_blocks=max(1, min(len(rows) // spec.batch_size, 8 * spec.workers)))
    embedded = ds.map_batches(
        EmbedRows, fn_constructor_kwargs={"spec": spec.as_dict(), "threads": spec.cpus_per_worker},
        batch_size=spec.batch_size, concurrency=spec.workers, num_cpus=spec.cpus_per_worker,
        num_gpus=spec.gpus_per_worker or None)
    detector = plan.setting.build(spec, plan.data)

    def batches():  # noqa: ANN202
        for batch in embedded.iter_batches(batch_size=1, batch_format="numpy"):
            for blob in batch["embedded"]:
                yield torch.load(io.BytesIO(blob), weights_only=True)

    detector.fit_embedded(batches())
    if plan.setting.refine_streams:  # small streams (held-back normals, labelled defects): on the driver
        from flawline.context import open_store
        from flawline.train.data import TensorBatches, decode_all

        store = open_store()
        decoded = {name: decode_all(store, plan.streams[name], spec.image_size)
                   for name in plan.setting.refine_streams if plan.streams.get(name)}
        facts = plan.setting.refine(detector, TensorBatches(decoded, spec.batch_size, spec.seed), spec)
        detector.info.update(refine=facts)
    return detector

