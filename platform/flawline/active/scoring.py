"""Score an unlabelled pool with a registered model: anomaly score (or p(defect)) per image and an
embedding for diversity-based selection, stored in S3 as one ``.npz`` per scoring pass.

``score_batch`` is the plain torch part (one decoded batch → scores, embeddings); ``score_local``
runs it in process; ``score_on_ray`` spreads it over Ray Data actors, each holding one copy of the
model, reading and decoding images from S3 in parallel."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from flawline.active.strategies import PoolScores
from flawline.data.records import ImageRecord, decode_images
from flawline.labelstudio.convert import Prediction
from flawline.models.base import Detector
from flawline.storage import ObjectStore

EMBED_DIM_CAP = 512  # embeddings are pooled backbone features; wider ones are projected down (seeded)


@dataclass
class ScoredPool:
    pool: PoolScores
    model: str  # name:version
    key: str | None = None  # where the npz lies in S3


@torch.no_grad()
def embed_batch(detector: Detector, x: torch.Tensor) -> torch.Tensor:
    """Global-average-pooled deepest backbone features, L2-normalised: a cheap, model-agnostic
    image embedding (for detectors without a backbone: a 16x16 thumbnail)."""
    prepared = detector.prepare(x)[:, :3]  # of an image/reference pair: the image
    if detector.uses_backbone:
        with detector.autocast():
            feats = detector.extractor(prepared)[-1].float()
        emb = feats.mean(dim=(2, 3))
    else:
        emb = torch.nn.functional.adaptive_avg_pool2d(prepared.float(), 16).flatten(1)
    if emb.shape[1] > EMBED_DIM_CAP:
        gen = torch.Generator().manual_seed(0)
        proj = torch.randn(emb.shape[1], EMBED_DIM_CAP, generator=gen) / EMBED_DIM_CAP ** 0.5
        emb = emb.cpu() @ proj
    return torch.nn.functional.normalize(emb.cpu(), dim=1)


def score_batch(detector: Detector, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(scores [B], embeddings [B, D]) for a batch of images in [0, 1]."""
    pred = detector.predict(x)
    return pred.scores.astype(np.float64), embed_batch(detector, x).numpy().astype(np.float32)


def _threshold(detector: Detector) -> float | None:
    return float(detector.threshold.value) if detector.threshold is not None else None


def score_local(detector: Detector, store: ObjectStore, rows: list[ImageRecord], image_size: int,
                batch_size: int = 16, progress: Callable[[int], None] | None = None) -> PoolScores:
    """Score ``rows`` (image records) in this process."""
    scores, embs = [], []
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        x = decode_images(store, part, image_size, detector.config.white, detector.uses_reference)
        s, e = score_batch(detector, x)
        scores.append(s)
        embs.append(e)
        if progress:
            progress(len(part))
    return PoolScores(image_ids=np.array([r.image_id for r in rows], dtype=np.int64),
                      scores=np.concatenate(scores), embeddings=np.concatenate(embs),
                      threshold=_threshold(detector))


def verdicts_and_masks(detector: Detector, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """Each image's verdict (its threshold, else p >= 0.5) and its anomaly regions above the
    threshold at the model's map size (uint8 0/1; empty for images judged normal)."""
    from flawline.evaluate.regions import defect_mask

    threshold = detector.threshold.as_dict() if detector.threshold is not None else None
    verdicts = np.asarray(pred.is_defect if threshold is not None else pred.scores >= 0.5, dtype=bool)
    masks = np.stack([defect_mask(m, threshold, bool(v)) for m, v in zip(pred.maps, verdicts)]).astype(np.uint8)
    return verdicts, masks


class ScoreRows:
    """Ray Data actor: one model per actor, loaded from S3 once; decodes and scores row batches
    (``with_masks``: also the verdicts and region masks pre-annotations are made from)."""

    def __init__(self, artifact_uri: str, image_size: int, threads: float, with_masks: bool = False,
                 threshold: dict[str, Any] | None = None) -> None:
        from flawline.context import open_store
        from flawline.evaluate.thresholds import Threshold
        from flawline.models.artifacts import load_detector

        torch.set_num_threads(max(1, int(threads)))
        self.store = open_store()
        self.detector = load_detector(self.store, self.store.key_from_uri(artifact_uri))
        if threshold:  # the catalog's (catalog.model_versions.version_threshold): it may postdate the artifact
            self.detector.set_threshold(Threshold.from_dict(threshold))
        self.image_size = image_size
        self.with_masks = with_masks

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [ImageRecord.from_json(r) for r in batch["record"]]
        x = decode_images(self.store, rows, self.image_size, self.detector.config.white, self.detector.uses_reference)
        ids = np.array([r.image_id for r in rows], dtype=np.int64)
        if self.with_masks:
            pred = self.detector.predict(x)
            verdicts, masks = verdicts_and_masks(self.detector, pred)
            return {"image_id": ids, "score": pred.scores.astype(np.float64), "verdict": verdicts, "mask": masks,
                    "readable": readable_scores(self.detector, pred.scores)}
        scores, embs = score_batch(self.detector, x)
        return {"image_id": ids, "score": scores, "embedding": embs}


def model_tag(artifact_uri: str) -> str:
    """The metrics' ``model`` tag of an artifact at ``.../models/<model name>/<run>/model.pt``."""
    parts = artifact_uri.split("/")
    return parts[parts.index("models") + 1] if "models" in parts[:-1] else "unknown"


def score_on_ray(artifact_uri: str, rows: list[ImageRecord], image_size: int, threshold: float | None,
                 workers: int = 2, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                 batch_size: int = 16, threshold_info: dict[str, Any] | None = None) -> PoolScores:
    """Score ``rows`` on ``workers`` Ray Data actors (the driver must be connected to Ray)."""
    import ray.data

    ds = ray.data.from_items([{"record": r.to_json()} for r in rows],
                             override_num_blocks=max(1, min(len(rows) // batch_size, 8 * workers)))
    scored = ds.map_batches(ScoreRows, fn_constructor_kwargs={"artifact_uri": artifact_uri,
                                                              "image_size": image_size,
                                                              "threads": cpus_per_worker,
                                                              "with_masks": False, "threshold": threshold_info},
                            batch_size=batch_size, concurrency=workers, num_cpus=cpus_per_worker,
                            num_gpus=gpus_per_worker or None)
    ids, scores, embs = [], [], []
    for batch in scored.iter_batches(batch_size=256, batch_format="numpy"):
        ids.append(batch["image_id"])
        scores.append(batch["score"])
        embs.append(np.stack(list(batch["embedding"])))
    order = np.argsort(np.concatenate(ids), kind="stable")  # the pool's order, whatever the actors' order
    return PoolScores(image_ids=np.concatenate(ids)[order], scores=np.concatenate(scores)[order],
                      embeddings=np.concatenate(embs)[order], threshold=threshold)


def scores_key(model: str, dataset: str) -> str:
    """``scores/<dataset>/<model>/<UTC stamp>.npz``: where a scoring pass is stored."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"scores/{dataset}/{model.replace(':', '-v')}/{stamp}.npz"


def annotate_on_ray(artifact_uri: str, rows: list[ImageRecord], image_size: int, workers: int = 2,
                    cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                    batch_size: int = 16, threshold_info: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Scores, verdicts and region masks for ``rows`` on ``workers`` Ray Data actors, in id order."""
    import ray.data

    ds = ray.data.from_items([{"record": r.to_json()} for r in rows],
                             override_num_blocks=max(1, min(len(rows) // batch_size, 8 * workers)))
    done = ds.map_batches(ScoreRows, fn_constructor_kwargs={"artifact_uri": artifact_uri, "image_size": image_size,
                                                            "threads": cpus_per_worker, "with_masks": True,
                                                            "threshold": threshold_info},
                          batch_size=batch_size, concurrency=workers, num_cpus=cpus_per_worker,
                          num_gpus=gpus_per_worker or None)
    parts: dict[str, list[np.ndarray]] = {"image_id": [], "score": [], "verdict": [], "mask": [], "readable": []}
    for batch in done.iter_batches(batch_size=256, batch_format="numpy"):
        for k in parts:
            parts[k].append(np.stack(list(batch[k])) if k == "mask" else batch[k])
    out = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(out["image_id"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def save_scores(store: ObjectStore, pool: PoolScores, model: str, dataset: str, key: str | None = None) -> str:
    """Store a scoring pass (at ``key``, default ``scores_key``); returns its key."""
    key = key or scores_key(model, dataset)
    buf = io.BytesIO()
    np.savez_compressed(buf, image_ids=pool.image_ids, scores=pool.scores,
                        embeddings=pool.embeddings if pool.embeddings is not None else np.zeros((0, 0)),
                        threshold=np.array(np.nan if pool.threshold is None else pool.threshold))
    store.put_bytes(key, buf.getvalue(), "application/octet-stream")
    return key


def load_scores(store: ObjectStore, key: str) -> PoolScores:
    with np.load(io.BytesIO(store.get_bytes(key))) as z:
        emb = z["embeddings"]
        threshold = float(z["threshold"])
        return PoolScores(image_ids=z["image_ids"], scores=z["scores"], embeddings=emb if emb.size else None,
                          threshold=None if np.isnan(threshold) else threshold)


def predictions_from_masks(rows: list[ImageRecord], scores: np.ndarray, verdicts: np.ndarray,
                           masks: np.ndarray, ref: str, readable: np.ndarray | None = None) -> dict[int, Prediction]:
    """Pre-annotations from per-row scores, verdicts, map-size masks (resized to each image) and
    readable scores (``readable_scores``; NaN or None: none)."""
    from PIL import Image as PILImage

    out: dict[int, Prediction] = {}
    shown = np.full(len(rows), np.nan) if readable is None else np.asarray(readable, dtype=np.float64)
    for r, score, verdict, small, easy in zip(rows, scores, verdicts, masks, shown):
        mask = np.asarray(PILImage.fromarray(small.astype(np.uint8) * 255).resize(
            (r.width, r.height), PILImage.NEAREST)) > 0
        out[r.image_id] = Prediction(ref, float(score), bool(verdict), None, mask if mask.any() else None,
                                        None if np.isnan(easy) else float(easy))
    return out


def readable_scores(detector: Detector, scores: np.ndarray) -> np.ndarray:
    """Scores people can read (``thresholds.normal_percentile`` against the held-out normal images
    kept with the model); NaN where the model kept none."""
    from flawline.evaluate.thresholds import normal_percentile

    shown = normal_percentile(detector.info.get("normal_score_quantiles"), scores)
    return np.full(len(scores), np.nan) if shown is None else shown


def pre_annotations(detector: Detector, store: ObjectStore, rows: list[ImageRecord], ref: str,
                    batch_size: int = 16) -> dict[int, Prediction]:
    """What the model says of each row's image, for annotators to correct: score, verdict (its
    threshold, else p >= 0.5) and the anomaly regions above the threshold at the image's own size.
    In this process; ``score_job.submit_pre_annotation`` does the same on the cluster."""
    out: dict[int, Prediction] = {}
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        x = decode_images(store, part, detector.config.image_size, detector.config.white, detector.uses_reference)
        pred = detector.predict(x)
        verdicts, masks = verdicts_and_masks(detector, pred)
        out.update(predictions_from_masks(part, pred.scores, verdicts, masks, ref,
                                          readable_scores(detector, pred.scores)))
    return out
