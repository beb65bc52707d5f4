"""One training run from start to finish, wherever it executes:

1. ``plan_run``: catalog rows for the spec's datasets; the setting checks the labels it needs (this
   runs before submission too, so a bad configuration never reaches the cluster);
2. train: in-process (``train_local``) or on the cluster (``flawline.train.distributed``);
3. ``finish_run``: calibrate the threshold on the validation rows, evaluate on the test split,
   store the model in S3 and register a model version with its metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from flawline.catalog import Catalog
from flawline.catalog.model_versions import register_version
from flawline.catalog.queries import get_dataset
from flawline.data.records import ImageRecord, LabelledImages, fetch
from flawline.errors import InvalidInput
from flawline.evaluate import thresholds as th
from flawline.evaluate.run import evaluate
from flawline.models import Detector
from flawline.models.artifacts import detector_to_bytes
from flawline.models.base import check_settings, detector_class
from flawline.storage import ObjectStore
from flawline.train.context import LocalContext
from flawline.train.data import RunData, TensorBatches, decode_all, gather, run_white
from flawline.train.settings import TrainingSetting, get_setting
from flawline.train.spec import TrainSpec


@dataclass
class RunPlan:
    spec: TrainSpec
    setting: TrainingSetting
    method: str
    data: RunData
    streams: dict[str, list[ImageRecord]]  # records per stream the workers read
    unpaired: int = 0  # images left out for having no reference image (reference detectors)

    @property
    def reference(self) -> bool:
        """Whether the method compares each image with its reference: its images decode as pairs."""
        return detector_class(self.method).uses_reference

    @property
    def class_counts(self) -> list[int]:
        counts = [0] * len(self.data.classes)
        for r in self.data.labelled:
            counts[r.target] += 1
        return counts

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "classes": self.data.classes, "class_counts": self.class_counts,
                "streams": {k: len(v) for k, v in self.streams.items()},
                "val": len(self.data.val), "test": len(self.data.test),
                **({"unpaired_left_out": self.unpaired} if self.unpaired else {})}

    def notes(self) -> list[str]:
        """What the plan left out, one line each, for the submitter and the job's log."""
        return [f"{self.unpaired} image(s) without a reference image (the references themselves among them) "
                f"were left out: {self.method} compares each image with its reference"] if self.unpaired else []


CALIBRATION_FRACTION = 0.15  # of labelled train images, held back to calibrate label-trained detectors


def plan_run(catalog: Catalog, spec: TrainSpec) -> RunPlan:
    """Gather the rows and check them against the setting; raises a one-line InvalidInput naming
    what is missing."""
    setting = get_setting(spec.setting)
    method = setting.method(spec)
    check_settings(method, {"image_size": spec.image_size, **spec.options})  # a bad --option fails here, not on the cluster
    data = gather(catalog, spec.datasets, spec.label_fraction, spec.seed)
    where = "+".join(spec.datasets)
    unpaired = 0
    if detector_class(method).uses_reference:  # only images paired with a reference (not the references)
        for name in ("labelled", "unlabelled", "val", "test"):
            rows = getattr(data, name)
            setattr(data, name, [r for r in rows if r.reference_key])
            unpaired += len(rows) - len(getattr(data, name))
        if not data.labelled and not data.unlabelled:
            raise InvalidInput(f"{where}: no train images with a reference image; {method} compares each image "
                               "with its defect-free reference (a `reference` column in the import manifest)")
    if not data.labelled and not data.unlabelled:
        raise InvalidInput(f"{where}: no images in the train split; import images and run `flawline data split`")
    missing = setting.missing_labels(data, spec)
    if missing:
        raise InvalidInput(f"{where} cannot train {spec.setting!r}: " + "; ".join(missing))
    if setting.gradient and not _both_verdicts(data.val):
        # Label-trained detectors output p(defect) that is not a calibrated probability: hold back a
        # seeded share of each verdict's labelled train images to choose the threshold on.
        held = hold_back(data.labelled, CALIBRATION_FRACTION, spec.seed)
        if not _both_verdicts(held):
            raise InvalidInput(f"{where}: cannot calibrate {spec.setting!r}: it needs a validation split with both "
                               "verdicts, or at least 2 labelled train images of each verdict to hold one back")
        ids = {r.image_id for r in held}
        data.val = data.val + held
        data.labelled = [r for r in data.labelled if r.image_id not in ids]
        missing = setting.missing_labels(data, spec)
        if missing:
            raise InvalidInput(f"{where} cannot train {spec.setting!r} once images are held back for its "
                               "threshold: " + "; ".join(missing))
    if not data.test:
        raise InvalidInput(f"{where}: no labelled images in the test split to evaluate on; run `flawline data split`")
    streams = setting.select(data, spec)
    empty = [name for name, rows in streams.items() if not rows and name not in setting.optional_streams]
    if empty:
        raise InvalidInput(f"{where}: nothing to train on for {spec.setting!r} (empty: {', '.join(empty)})")
    if not setting.gradient and "calibration" not in streams and not [r for r in data.val if r.defect is False]:
        # Normal-only detectors calibrate on normal images they did not see: hold out a tenth.
        normal = streams["normal"]
        rng = np.random.default_rng(spec.seed)
        cut = set(rng.permutation(len(normal))[:max(1, len(normal) // 10)].tolist()) if len(normal) > 1 else set()
        data.val = data.val + [r for i, r in enumerate(normal) if i in cut]
        streams["normal"] = [r for i, r in enumerate(normal) if i not in cut]
    return RunPlan(spec, setting, method, data, streams, unpaired)


def _both_verdicts(rows: list[ImageRecord]) -> bool:
    return any(r.defect is True for r in rows) and any(r.defect is False for r in rows)


def hold_back(rows: list[ImageRecord], fraction: float, seed: int) -> list[ImageRecord]:
    """A seeded share of labelled rows per verdict: at least one, never the last one of a verdict
    (a verdict with a single image keeps it for training)."""
    rng = np.random.default_rng([seed, 7])
    held = []
    for verdict in (False, True):
        group = [r for r in rows if r.defect is verdict]
        if len(group) >= 2:
            n = min(len(group) - 1, max(1, round(fraction * len(group))))
            held += [group[i] for i in sorted(rng.permutation(len(group))[:n].tolist())]
    return held


def train_local(store: ObjectStore, plan: RunPlan, device: str = "auto",
                ctx: LocalContext | None = None) -> tuple[Detector, list[dict[str, Any]]]:
    """Train in this process (tests, benchmarks, a machine without a cluster)."""
    spec = plan.spec
    decoded = {name: decode_all(store, rows, spec.image_size, reference=plan.reference)
               for name, rows in plan.streams.items()}
    detector = plan.setting.build(spec, plan.data)
    ctx = ctx or LocalContext(detector.device if device == "auto" else device)
    source = TensorBatches(decoded, spec.batch_size, spec.seed, device=ctx.device)
    history = plan.setting.train(detector, source, spec, ctx, plan.class_counts)
    return detector, history


def calibrate(detector: Detector, plan: RunPlan, val: LabelledImages | None,
              val_scores: np.ndarray | None = None) -> th.Threshold:
    """Every threshold is chosen on images the model was not fitted on: best F1 on validation
    images with both verdicts (the split's, or labelled train images held back by ``plan_run``);
    else the threshold the setting chose on its own held-out images (``mixed``: out-of-fold
    scores); else the 0.99-quantile of normal validation scores, saying that no defect was there
    to calibrate on. Never p(defect) >= 0.5 on an uncalibrated score."""
    note = {"datasets": plan.spec.datasets, "split": "val", "images": 0 if val is None else len(val)}
    if val is not None and len(val) and val_scores is None:
        val_scores = detector.predict(val.images).scores
    if val is not None and len(val) and val.labels.any() and not val.labels.all():
        return th.best_f1(val.labels, val_scores, note)
    if detector.threshold is not None:
        return detector.threshold
    if val is not None and len(val) and not val.labels.any():
        note["note"] = f"no labelled defects to calibrate on: 0.99-quantile of {len(val)} normal images alone"
        return th.quantile(val_scores, 0.99, note)
    raise InvalidInput("no held-out images to calibrate the threshold on: label a few normal images, "
                       "or add a validation split (flawline data split --val)")


def finish_run(catalog: Catalog, store: ObjectStore, plan: RunPlan, detector: Detector,
               run_id: int | None = None, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Threshold, test metrics, artifact in S3, model version row; returns the run's metrics."""
    spec = plan.spec
    started = time.perf_counter()
    val = fetch(store, plan.data.val, spec.image_size, reference=plan.reference) if plan.data.val else None
    detector.config.white = run_white(plan.data)  # prediction decodes as the run's images were decoded
    val_scores = detector.predict(val.images).scores if val is not None and len(val) else None  # once
    detector.set_threshold(calibrate(detector, plan, val, val_scores))
    held_normals = getattr(detector, "calibration_scores", None)  # the setting's own held-out normals
    if val_scores is not None and (~val.labels.astype(bool)).any():
        held_normals = val_scores[~val.labels.astype(bool)]
    if held_normals is not None and len(held_normals) >= th.MIN_READABLE_NORMALS:  # readable scores
        detector.info["normal_score_quantiles"] = th.normal_quantiles(held_normals)
    test = fetch(store, plan.data.test, spec.image_size, reference=plan.reference)
    metrics, _ = evaluate(detector, test)
    metrics["evaluate_seconds"] = round(time.perf_counter() - started, 2)
    if history:
        metrics["epochs"] = history
    name = plan.setting.model_name(spec)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    key = f"models/{name}/{f'run-{run_id}' if run_id else stamp}/model.pt"
    store.put_bytes(key, detector_to_bytes(detector))
    with catalog.session() as s:
        row = register_version(s, name=name, artifact_uri=store.uri(key), method=plan.method,
                               backbone=spec.backbone, threshold=detector.threshold.as_dict(),
                               metrics={k: v for k, v in metrics.items() if k not in ("threshold", "epochs")},
                               dataset_id=get_dataset(s, spec.datasets[0]).id, run_id=run_id)
        metrics["model"] = f"{row.name}:{row.version}"
    metrics.update(plan.setting.after_training(catalog, store, plan, detector, name))
    return metrics


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
