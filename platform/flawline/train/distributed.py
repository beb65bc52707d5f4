"""The Ray edge of training. Everything a run computes happens on its Ray Train workers, with the
resources the run asked for (``--workers``, ``--cpus-per-worker``, ``--gpus-per-worker``,
``--worker-resource``); the job's driver (``train/job.py``) only plans, submits and records.

- Ray Data reads the run's rows, fetches and decodes their images from S3 on its own actors and
  streams them into the workers (decoding overlaps the workers' compute).
- Label settings: the setting's torch loop on every worker under DDP (gloo on CPU, NCCL on GPU).
- Normal-only settings: each worker embeds its stream shard on its device; gradient-trained
  detectors (``models.base.TrainedDetector``: flow, reconstruction, self-supervised) then train
  their network under DDP with the same loop; memory-bank detectors (PatchCore, PaDiM) and
  ``mixed`` gather the embeddings and fit on rank 0 (coreset, covariance on its GPU if it has one).
- Every gradient epoch leaves a checkpoint in S3 (``<bucket>/ray-train/run-<id>-<token>``): a worker or
  node that dies resumes from it (``--max-failures``), and ``flawline runs resume`` continues a
  failed or cancelled run from it as a new Ray job (same trainer name and storage path).
- Rank 0 finishes the run (threshold, test metrics, artifact, model version: ``runner.finish_run``)
  and records where each part ran (``placement``: node, device, rank) in the run's row.
- ``--min-workers`` makes the run elastic (Ray Train V2): it starts once that many workers fit,
  grows to ``--workers`` when more come, and goes on with fewer when a node is lost.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flawline.config import Settings, get_settings
from flawline.data.records import ImageRecord, decode_rows
from flawline.models import Detector
from flawline.models.artifacts import detector_from_bytes, detector_to_bytes
from flawline.train.data import TensorBatches, to_model
from flawline.train.runner import RunPlan

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


# -- Ray Data: image records → decoded tensors ------------------------------------------------------
class DecodeRows:
    """Ray Data actor: fetch and decode a batch of image records from S3 (each actor keeps its connections)."""

    def __init__(self, image_size: int, reference: bool = False) -> None:
        from flawline.context import open_store

        self.store = open_store()
        self.image_size, self.reference = image_size, reference

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return decode_rows(self.store, [ImageRecord.from_json(r) for r in batch["record"]], self.image_size,
                           reference=self.reference)


def rows_dataset(rows: list[ImageRecord], image_size: int, parallelism: int,
                 materialize: bool = True, reference: bool = False):  # noqa: ANN201
    """Rows → a Ray dataset of decoded images (uint8 [3, S, S], or pairs [6, S, S] with their
    references for ``reference``; converted on the workers).
    ``materialize``: decoded once into the object store, for settings that read it every epoch;
    else streamed: decoded in blocks while the workers consume them, memory bounded by Ray Data's
    backpressure instead of growing with the dataset."""
    import ray.data

    ds = ray.data.from_items([{"record": r.to_json()} for r in rows],
                             override_num_blocks=max(1, min(len(rows) // 16, max(4 * parallelism, len(rows) // 64))))
    # Streamed: decoding runs while Ray Train holds its workers' CPUs, and Ray Data only gets what
    # Train leaves (none when the workers take every CPU, e.g. 2 workers on a 2-CPU node, or an
    # elastic run after a node loss): the decoders then ask for no CPU of their own and share the
    # workers' (decoding is a small share of a step). Materialised: decoded before Train reserves.
    ds = ds.map_batches(DecodeRows, fn_constructor_kwargs={"image_size": image_size, "reference": reference}, batch_size=16,
                        concurrency=(1, max(1, parallelism)), num_cpus=0.5 if materialize else 0)
    return ds.materialize() if materialize else ds


def decoded_bytes(image_size: int, reference: bool = False) -> int:
    """Bytes one decoded row takes in a worker (``decode_rows``: uint8 image (3 channels, 6 for an
    image/reference pair), mask and region, and the per-row scalars)."""
    return ((6 if reference else 3) + 1 + 1) * image_size * image_size + 32


class RayShardBatches:
    """This worker's shard of each label-setting stream (the whole stream where it was too small
    to split), as a ``BatchSource``. A shard that fits ``spec.shard_cache_mb`` (with the others
    read before it) is read once into memory and served like ``TensorBatches``: every epoch a
    seeded shuffle. A larger one streams from Ray Data every epoch (a seeded local shuffle), so
    the worker's memory does not grow with the dataset. A setting may stop reading a stream
    part-way: what it left of a streamed epoch is read (and dropped) before that stream's next
    epoch starts, as Ray Data's streaming split wants every split to finish its epoch. Every rank
    makes the same choices (same sizes), so DDP's ranks take the same number of steps."""

    def __init__(self, plan: RunPlan, split: list[str], rank: int, world: int, device: torch.device) -> None:
        import ray.train

        spec = plan.spec
        self.batch_size, self.seed, self.device = spec.batch_size, spec.seed + 7 * rank, device
        self.sizes = {name: len(rows) // world if name in split else len(rows) for name, rows in plan.streams.items()}
        self.shards = {name: ray.train.get_dataset_shard(name) for name in plan.streams}
        budget, used, memory = spec.shard_cache_mb * 2 ** 20, 0, {}
        for name in sorted(plan.streams, key=lambda n: self.sizes[n]):  # small streams first
            need = self.sizes[name] * decoded_bytes(spec.image_size, plan.reference)
            if used + need <= budget:
                parts = list(self.shards[name].iter_torch_batches(batch_size=256))
                memory[name] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
                used += need
        self.memory = TensorBatches(memory, spec.batch_size, self.seed, rank=0, world=1, device=device)
        self.streamed = sorted(set(plan.streams) - set(memory))
        self._open: dict[str, Any] = {}

    def size(self, stream: str) -> int:
        return self.memory.size(stream) if stream not in self.streamed else self.sizes[stream]

    def epoch(self, stream: str, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        if stream not in self.streamed:
            yield from self.memory.epoch(stream, epoch)
            return
        for _ in self._open.pop(stream, ()):  # the rest of this stream's last epoch
            pass
        batches = iter(self.shards[stream].iter_torch_batches(
            batch_size=self.batch_size, prefetch_batches=2, local_shuffle_buffer_size=4 * self.batch_size,
            local_shuffle_seed=self.seed * 100_003 + epoch))
        self._open[stream] = batches
        for batch in batches:
            yield to_model(batch, self.device)
        if self._open.get(stream) is batches:
            del self._open[stream]


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
        # Where this worker's time went (seconds): "setup" (process start to training), "model"
        # (building the detector and its backbone), "embed" (normal-only: the first embedding
        # pass), "epochs" (gradient epochs), "report" (per-epoch checkpoints and Ray Train's
        # reports, which wait for every rank); "epochs_cpu": this process's CPU seconds in the
        # gradient epochs (against "epochs": the share of a core the loop got).
        self.phases: dict[str, float] = {}
        self._stage: tuple[str | None, float] = (None, 0.0)  # the last recorded stage, when (monotonic s)
        self._epochs_reported = False  # after an epoch's report, stages no longer replace its progress

    def timed(self, phase: str, seconds: float) -> None:
        self.phases[phase] = round(self.phases.get(phase, 0.0) + seconds, 2)

    STAGE_EVERY_S = 10.0  # a stage's counts reach the catalog at most this often (a changed stage at once)

    def stage(self, name: str, **counts: int) -> None:
        """Rank 0 records the stage a run without epochs is in (``runs show`` and ``train submit
        --wait`` print it): ``stage("embedding", images=320, of=762)``, ``stage("fitting")``."""
        if self.rank != 0 or self.run_id is None or self._epochs_reported:
            return  # a run with epochs shows its last epoch's metrics (world size, resumed from) instead
        now = time.monotonic()
        if name == self._stage[0] and now - self._stage[1] < self.STAGE_EVERY_S:
            return
        self._stage = (name, now)
        from flawline.train.runs import record_progress

        record_progress(self.run_id, {"stage": name, **counts}, checkpoint=False)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # A network whose steps leave some parameters out (a detector's training phases) says so.
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                       find_unused_parameters=bool(getattr(model, "ddp_find_unused", False)))

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world_size

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        t = tensor.detach().to(self.device).clone()
        torch.distributed.all_reduce(t)
        return t.to(tensor.device)

    def report(self, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        import ray.train

        started = time.perf_counter()
        self._epochs_reported = True
        if "epoch_seconds" in metrics:
            self.timed("epochs", metrics["epoch_seconds"])
            self.timed("epochs_cpu", metrics.get("epoch_cpu_seconds", 0.0))
        metrics = dict(metrics, node_id=_node_id(), world_size=self.world_size)
        if self.resumed_from_epoch is not None:
            metrics["resumed_from_epoch"] = self.resumed_from_epoch
        if self.rank != 0:
            ray.train.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(state, Path(tmp) / STATE_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            if self.run_id is not None:
                from flawline.train.runs import record_progress

                record_progress(self.run_id, metrics)
        self.timed("report", time.perf_counter() - started)

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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _placement(ctx: RayTrainContext) -> list[dict[str, Any]]:
    """Where every rank ran (node id, host, device), gathered on every rank."""
    import socket

    mine = {"rank": ctx.rank, "node_id": _node_id(), "host": socket.gethostname(), "device": _device_name(ctx.device)}
    everyone = [mine] * ctx.world_size
    if ctx.world_size > 1:
        torch.distributed.all_gather_object(everyone, mine)
    return everyone


def _peak_rss_mb() -> float:
    """This process's peak resident memory (MiB; Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _finished_detector() -> Detector | None:
    """The trained detector in the run's last checkpoint, when training had already ended before a
    restart (a failure while finishing): finishing again needs no new training."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        path = Path(d) / DETECTOR_FILE
        return detector_from_bytes(path.read_bytes(), "run checkpoint") if path.exists() else None


def _finish(config: dict[str, Any], ctx: RayTrainContext, detector: Detector, history: list[dict[str, Any]],
            placement: list[dict[str, Any]], started: float) -> None:
    """Every rank's last step: rank 0 checkpoints the trained detector (a restart then only
    finishes), records where the run ran, finishes the run (``runner.finish_run``) and reports its
    metrics; the other ranks report that they are done."""
    import ray.train

    from flawline.context import open_catalog, open_store
    from flawline.train.runner import finish_run
    from flawline.train.runs import record_facts

    final = {"final": True, "epochs_run": len(history), "world_size": ctx.world_size}
    peaks = [_peak_rss_mb()] * ctx.world_size  # each worker's peak memory so far (MiB)
    if ctx.world_size > 1:
        torch.distributed.all_gather_object(peaks, peaks[0])
    for p, peak in zip(placement, peaks):
        p["peak_rss_mb"] = peak
    if ctx.rank != 0:  # every rank reports as often as rank 0 (each report is a round of all workers)
        ray.train.report(dict(final, stage="trained"))
        ray.train.report(dict(final, stage="finished"))
        return
    run_id, plan = config["run_id"], config["plan"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / DETECTOR_FILE).write_bytes(detector_to_bytes(detector))
        ray.train.report(dict(final, stage="trained"), checkpoint=ray.train.Checkpoint.from_directory(tmp))
    from flawline.models.base import TrainedDetector

    if not plan.setting.gradient and not isinstance(detector, TrainedDetector):  # runs with epochs keep theirs
        ctx.stage("evaluating")  # threshold, test metrics, artifact, model version
    catalog = open_catalog()
    # fit_seconds: this worker group's reading, decoding, embedding and training (not finishing);
    # fit_phases: where rank 0's share of it went.
    record_facts(run_id, catalog, placement=placement, worker_nodes=[p["node_id"] for p in placement],
                 fit_seconds=round(time.perf_counter() - started, 2), fit_phases=ctx.phases,
                 **{k: detector.info[k] for k in ("embedding_cache", "shard_cache") if k in detector.info})
    metrics = finish_run(catalog, open_store(), plan, detector, run_id, history if config["keep_history"] else None)
    metrics["finished_on"] = {"node_id": _node_id(), "device": _device_name(ctx.device)}
    # The run's row carries the result to the driver (Ray's Result keeps checkpointed reports only).
    record_facts(run_id, catalog, **json.loads(json.dumps(metrics, default=str)))
    ray.train.report(dict(final, stage="finished"))


def _worker(config: dict[str, Any]) -> None:
    """Every Ray Train worker: where it runs, then the setting's training (unless the last
    checkpoint already holds the trained detector), then ``_finish``."""
    started = time.perf_counter()
    plan = config["plan"]
    ctx = RayTrainContext(config["run_id"])
    torch.set_num_threads(max(1, int(plan.spec.cpus_per_worker)))
    placement = _placement(ctx)
    detector, history = _finished_detector(), []
    ctx.timed("setup", time.perf_counter() - started)
    if detector is None:
        detector, history = (_train_label if plan.setting.gradient else _fit_normal)(plan, ctx)
    _finish(config, ctx, detector, history, placement, started)


def _train_label(plan: RunPlan, ctx: RayTrainContext) -> tuple[Detector, list[dict[str, Any]]]:
    """A label setting: its torch loop under DDP on this worker's shards."""
    spec = plan.spec
    source = RayShardBatches(plan, split_streams(plan), ctx.rank, ctx.world_size, ctx.device)
    detector = plan.setting.build(spec, plan.data, device=str(ctx.device))
    detector.info["shard_cache"] = (f"streamed every epoch: {', '.join(source.streamed)} (over --shard-cache-mb "
                                    f"{spec.shard_cache_mb:g})" if source.streamed else "in memory")
    return detector, plan.setting.train(detector, source, spec, ctx, plan.class_counts)


def _fit_normal(plan: RunPlan, ctx: RayTrainContext) -> tuple[Detector, list[dict[str, Any]]]:
    """A normal-only setting: embed this worker's streamed shard on its device; a
    ``TrainedDetector`` trains its network under DDP, any other detector's embeddings are gathered
    and fitted on rank 0. Then rank 0 refines (``mixed``).

    A ``TrainedDetector`` keeps its shard's embeddings while they fit ``spec.shard_cache_mb``;
    beyond that it keeps a sample for ``begin_training`` and embeds the streamed shard again each
    epoch (``models.training.fit_network_streamed``), so a worker's memory does not grow with the
    dataset. Every rank takes the same decision (same shapes, same rows per rank)."""
    import ray.train

    from flawline.models.base import TrainedDetector
    from flawline.models.training import concat, embedded_bytes, fit_network, fit_network_streamed, take

    spec = plan.spec
    history: list[dict[str, Any]] = []
    build_start = time.perf_counter()
    detector = plan.setting.build(spec, plan.data, device=str(ctx.device))
    torch.manual_seed(spec.seed)
    if detector.uses_backbone:
        detector.extractor  # noqa: B018  (built first, as Detector.fit_embedded does)
    ctx.timed("model", time.perf_counter() - build_start)
    shard = ray.train.get_dataset_shard("normal")
    trained = isinstance(detector, TrainedDetector)
    rows_per_rank = -(-len(plan.streams["normal"]) // ctx.world_size) * detector.tiles_per_image
    budget = spec.shard_cache_mb * 2 ** 20

    def embedded(epoch: int | None = None):  # noqa: ANN202  (an iterator of embedded batches)
        shuffle = {} if epoch is None else {"local_shuffle_buffer_size": 4 * spec.batch_size,
                                            "local_shuffle_seed": spec.seed * 10_007 + epoch}
        for batch in shard.iter_torch_batches(batch_size=spec.batch_size, prefetch_batches=2, **shuffle):
            if epoch is None:
                # one id per embedded row: a tiled detector embeds tiles_per_image rows per image
                ids.append(batch["image_id"].cpu().repeat_interleave(detector.tiles_per_image))
            with torch.no_grad(), detector.autocast():  # not held across the yield
                out = detector.embed_images(to_model({"image": batch["image"]}, detector.device)["image"])
            yield tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()

    ids: list[torch.Tensor] = []
    cached: list[Any] = []
    count, streamed, kept = 0, False, 0
    embed_start = time.perf_counter()
    images = len(plan.streams["normal"])
    ctx.stage("embedding", images=0, of=images)
    for y in embedded():
        n = (y[0] if isinstance(y, tuple) else y).shape[0]
        count += n
        ctx.stage("embedding", images=count * ctx.world_size // detector.tiles_per_image, of=images)  # rank 0's pace
        size = embedded_bytes(y)
        if trained and not streamed and size / n * rows_per_rank > budget:
            streamed = True  # from now on keep only a statistics sample
        if not streamed or kept + size <= min(budget / 4, 128 * 2 ** 20) or not cached:
            cached.append(y)
            kept += size
    ctx.timed("embed", time.perf_counter() - embed_start)
    total = int(ctx.total(torch.tensor([float(count)], dtype=torch.float64)).item())  # rows: images or tiles
    if total == 0:
        raise ValueError(f"{spec.setting}: no normal images reached the workers")
    if trained and not cached:
        raise ValueError(f"{spec.setting}: worker {ctx.rank} received no images (fewer images than workers)")
    if trained and streamed:
        steps = max(1, (total // ctx.world_size) // spec.batch_size)  # equal shards: the same on every rank
        history = fit_network_streamed(detector, concat(cached), embedded, steps, ctx)
        detector.info.update(train_images=total // detector.tiles_per_image, embedding_cache="streamed: embedded again each epoch "
                             f"(shard over --shard-cache-mb {spec.shard_cache_mb:g})")
        detector.fitted = True
        return _refine(plan, ctx, detector, history)
    # Blocks arrive in any order: image-id order makes a run (and a resumed one) repeatable.
    mine = (torch.cat(ids), concat(cached)) if cached else None
    if trained:
        history = fit_network(detector, take(mine[1], torch.argsort(mine[0], stable=True), torch.device("cpu")), ctx)
        detector.info.update(train_images=total // detector.tiles_per_image,
                             embedding_cache=f"in memory: {kept / 2 ** 20:.1f} MiB on rank {ctx.rank}")
        detector.fitted = True
    else:  # memory bank, covariance, mixed: one fit on rank 0 over every worker's embeddings
        everyone = [mine] * ctx.world_size
        if ctx.world_size > 1:
            torch.distributed.gather_object(mine, everyone if ctx.rank == 0 else None, dst=0)
        if ctx.rank == 0:
            ctx.stage("fitting", images=total // detector.tiles_per_image)
            parts = [p for p in everyone if p is not None]
            order = torch.argsort(torch.cat([p[0] for p in parts]), stable=True)
            bank = concat([p[1] for p in parts])
            fit_start = time.perf_counter()
            detector.fit_embedded(take(bank, order[i:i + spec.batch_size], torch.device("cpu"))
                                  for i in range(0, len(order), spec.batch_size))
            history = [{"epoch": 1, "epochs": 1, "train_images": total // detector.tiles_per_image,
                        "fit_seconds": round(time.perf_counter() - fit_start, 2)}]
    return _refine(plan, ctx, detector, history)


def _refine(plan: RunPlan, ctx: RayTrainContext, detector: Detector,
            history: list[dict[str, Any]]) -> tuple[Detector, list[dict[str, Any]]]:
    """Rank 0 refines with the setting's small streams (held-back normals, defects; ``mixed``)."""
    spec = plan.spec
    if ctx.rank == 0 and plan.setting.refine_streams:  # small streams: held-back normals, defects
        from flawline.context import open_store
        from flawline.train.data import decode_all

        store = open_store()
        decoded = {name: decode_all(store, plan.streams[name], spec.image_size, reference=plan.reference)
                   for name in plan.setting.refine_streams if plan.streams.get(name)}
        facts = plan.setting.refine(detector, TensorBatches(decoded, spec.batch_size, spec.seed,
                                                            device=ctx.device), spec)
        detector.info.update(refine=facts)
    return detector, history


def split_streams(plan: RunPlan) -> list[str]:
    """The label-setting streams Ray Train splits over the workers (each worker reads its share);
    a stream smaller than one batch per worker goes whole to every worker."""
    return [name for name, rows in plan.streams.items() if len(rows) >= plan.spec.workers * plan.spec.batch_size]


def trainer_for(plan: RunPlan, run_id: int, name: str | None = None,
                settings: Settings | None = None):  # noqa: ANN201
    """The run's TorchTrainer: its worker function, streams, scaling (fixed or elastic), resources,
    checkpoint storage and failure policy. ``name``: the run's trainer name (``runs.trainer_name``);
    the same name and storage path is what lets ``runs resume`` continue from the last checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    settings = settings or get_settings()
    spec = plan.spec
    if plan.setting.gradient:
        # Label settings read every stream each epoch: decoded once into Ray's object store.
        datasets = {name: rows_dataset(rows, spec.image_size, spec.workers, reference=plan.reference)
                    for name, rows in plan.streams.items()}
        split = split_streams(plan)
    else:
        datasets = {"normal": rows_dataset(plan.streams["normal"], spec.image_size, spec.workers, materialize=False,
                                           reference=plan.reference)}
        split = ["normal"]
    use_gpu = spec.gpus_per_worker > 0
    resources = spec.worker_bundle()  # what submission checked against the cluster
    workers = spec.workers if spec.min_workers is None else (spec.min_workers, spec.workers)
    return TorchTrainer(
        _worker,
        train_loop_config={"plan": plan, "run_id": run_id, "keep_history": plan.setting.gradient},
        scaling_config=ray.train.ScalingConfig(
            # SPREAD: workers on different nodes where there is room (no job owns a machine).
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources, placement_strategy="SPREAD",
            **({"elastic_resize_monitor_interval_s": 10.0} if spec.min_workers is not None else {})),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=f"{settings.s3_bucket}/ray-train", storage_filesystem=s3_filesystem(settings),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split=split),
        # DDP backend: gloo on CPU, NCCL with use_gpu (Ray Train's TorchConfig default).
    )


def run_on_ray(plan: RunPlan, run_id: int, name: str | None = None, settings: Settings | None = None) -> None:
    """Train and finish the run on the cluster's workers; rank 0 records the run's metrics (model
    name, test metrics, where it ran) in its row. Raises the workers' error when the run fails for
    good."""
    result = trainer_for(plan, run_id, name, settings).fit()
    if result.error:
        raise result.error
