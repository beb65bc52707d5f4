"""Batch scoring of an unlabelled pool as a Ray job: ``jobs/score.py`` runs ``main`` on the cluster
(Ray Data reads and decodes the images from S3; model actors score them); ``submit_scoring``
submits it from the loop and reads the stored scores back."""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from flawline.active.scoring import (
    annotate_on_ray,
    load_scores,
    model_tag,
    predictions_from_masks,
    save_scores,
    score_on_ray,
    scores_key,
)
from flawline.active.strategies import PoolScores
from flawline.catalog import ModelVersion
from flawline.catalog.model_versions import version_threshold
from flawline.config import Settings, get_settings
from flawline.data.records import ImageRecord, dump_records, load_records
from flawline.errors import FlawlineError, ServiceError
from flawline.labelstudio.convert import Prediction, prediction_version
from flawline.storage import ObjectStore


def run_scoring(rows_key: str, out_key: str, artifact_uri: str, image_size: int, threshold: float | None,
                workers: int, cpus_per_worker: float, gpus_per_worker: float, masks: bool = False,
                threshold_info: dict[str, Any] | None = None) -> str:
    import ray

    from flawline.context import open_store

    scratch = get_settings().data_dir.expanduser() / "jobs" / "scoring"  # a folder of our own, as in flawline.train.job
    scratch.mkdir(parents=True, exist_ok=True)
    os.chdir(scratch)
    store = open_store()
    rows = load_records(store.get_bytes(rows_key))
    ray.init(ignore_reinit_error=True, log_to_driver=True)
    started = time.perf_counter()
    if masks:  # pre-annotations: verdicts and region masks instead of embeddings
        out = annotate_on_ray(artifact_uri, rows, image_size, workers=workers, cpus_per_worker=cpus_per_worker,
                              gpus_per_worker=gpus_per_worker, threshold_info=threshold_info)
        buf = io.BytesIO()
        np.savez_compressed(buf, **out)
        store.put_bytes(out_key, buf.getvalue(), "application/octet-stream")
    else:
        pool = score_on_ray(artifact_uri, rows, image_size, threshold, workers=workers,
                            cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                            threshold_info=threshold_info)
        save_scores(store, pool, "", "", key=out_key)
    from flawline.monitoring.metrics import add_to_counter

    add_to_counter("flawline_images_scored", len(rows), {"model": model_tag(artifact_uri)})
    print(f"scored {len(rows)} images on {workers} actor(s) in {time.perf_counter() - started:.1f} s -> "
          f"{store.uri(out_key)}", flush=True)
    return out_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score an image pool with a registered model (Ray job).")
    parser.add_argument("--rows-key", required=True)
    parser.add_argument("--out-key", required=True)
    parser.add_argument("--artifact-uri", required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--threshold-json", type=json.loads, default=None, help="the catalog's threshold record")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--masks", action="store_true", help="verdicts and region masks (pre-annotations)")
    a = parser.parse_args(argv)
    try:
        run_scoring(a.rows_key, a.out_key, a.artifact_uri, a.image_size, a.threshold, a.workers, a.cpus_per_worker,
                    a.gpus_per_worker, masks=a.masks, threshold_info=a.threshold_json)
    except FlawlineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _run_job(settings: Settings, store: ObjectStore, model: ModelVersion, rows: list[ImageRecord], dataset: str,
             image_size: int, threshold: float | None, workers: int, cpus_per_worker: float, gpus_per_worker: float,
             timeout_s: float, poll_s: float, masks: bool, progress: Callable[[str], None] | None) -> str:
    """Submit one scoring job for ``rows``, wait for it, and return the S3 key of what it stored."""
    from flawline.cluster.resources import Request
    from flawline.train.submit import check_resources, job_client, submit_job

    ref = f"{model.name}:{model.version}"
    out_key = scores_key(ref, dataset)
    rows_key = out_key.removesuffix(".npz") + "-rows.json"
    client = job_client(settings)
    # Ray Data's actor pool starts with the model actors that fit: one must fit at least.
    bundle = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker > 0 else {})}
    waiting = check_resources(settings, client, Request(bundle, workers, min_count=1, unit="model actor"))
    store.put_bytes(rows_key, dump_records(rows), "application/json")
    job_id = f"flawline-score-{model.name}-v{model.version}-{secrets.token_hex(3)}"
    args = (f"--rows-key {rows_key} --out-key {out_key} --artifact-uri {model.artifact_uri} "
            f"--image-size {image_size} --workers {workers} --cpus-per-worker {cpus_per_worker} "
            f"--gpus-per-worker {gpus_per_worker}" + (f" --threshold {threshold}" if threshold is not None else "")
            + (" --masks" if masks else "")
            + (f" --threshold-json {shlex.quote(json.dumps(info))}" if (info := version_threshold(model)) else ""))
    try:
        submit_job(client, settings, job_id, "flawline.active.score_job", args,
                   {"flawline_scoring": ref, "dataset": dataset})
    except Exception as err:
        raise ServiceError(f"could not submit the scoring job to {settings.ray_dashboard_url}: "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if progress:
        progress(f"Ray job {job_id}: {len(rows)} image(s) on {workers} actor(s); dashboard {settings.ray_dashboard_url}")
        if waiting:
            progress(f"Ray job {job_id} is {waiting}")
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    while True:
        status = str(client.get_job_status(job_id))
        if status.endswith("SUCCEEDED"):
            break
        if status.endswith(("FAILED", "STOPPED")) or time.monotonic() > deadline:
            tail = client.get_job_logs(job_id).strip().splitlines()[-1:] or ["no log"]
            raise ServiceError(f"scoring job {job_id} {status.rsplit('.', 1)[-1].lower()}: {tail[0]}")
        time.sleep(poll_s)
    if progress:
        progress(f"Ray job {job_id} done in {time.monotonic() - started:.0f} s")
    return out_key


def submit_pre_annotation(settings: Settings, store: ObjectStore, model: ModelVersion, rows: list[ImageRecord],
                          dataset: str, image_size: int, workers: int = 2, cpus_per_worker: float = 1.0,
                          gpus_per_worker: float = 0.0, timeout_s: float = 3600.0,
                          progress: Callable[[str], None] | None = None) -> dict[int, Prediction]:
    """Pre-annotations for ``rows`` computed on the cluster (model actors in parallel)."""
    key = _run_job(settings, store, model, rows, dataset, image_size, None, workers, cpus_per_worker,
                   gpus_per_worker, timeout_s, 1.0, True, progress)
    with np.load(io.BytesIO(store.get_bytes(key))) as z:
        found = {int(i): k for k, i in enumerate(z["image_id"])}
        idx = [found[int(r.image_id)] for r in rows]
        return predictions_from_masks(rows, z["score"][idx], z["verdict"][idx], z["mask"][idx],
                                      prediction_version(f"{model.name}:{model.version}", version_threshold(model)),
                                      z["readable"][idx])


def submit_scoring(settings: Settings, store: ObjectStore, model: ModelVersion, rows: list[ImageRecord],
                   dataset: str, image_size: int, threshold: float | None, workers: int = 2,
                   cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, timeout_s: float = 3600.0,
                   poll_s: float = 1.0, progress: Callable[[str], None] | None = None) -> PoolScores:
    """Submit a scoring job for ``rows`` and wait for it; returns the scores in the rows' order."""
    out_key = _run_job(settings, store, model, rows, dataset, image_size, threshold, workers, cpus_per_worker,
                       gpus_per_worker, timeout_s, poll_s, False, progress)
    pool = load_scores(store, out_key)
    order = {int(i): k for k, i in enumerate(pool.image_ids)}
    idx = [order[int(r.image_id)] for r in rows]
    return PoolScores(image_ids=pool.image_ids[idx], scores=pool.scores[idx],
                      embeddings=pool.embeddings[idx] if pool.embeddings is not None else None,
                      threshold=pool.threshold)


if __name__ == "__main__":  # what the Ray job runs: python -m flawline.active.score_job
    sys.exit(main())
