"""``flawline evaluate`` as one function: fit a detector on a dataset's normal training images,
choose its threshold on the calibration images, evaluate it on the test split, write the report
and register the model, streaming the images so memory does not grow with the dataset.

Three stages, each reported to a ``progress(stage, done, total)`` callback (``STAGES``):

- ``fit``: train images are downloaded and decoded in batches (``data.stream.stream_batches``, a
  bounded prefetch window) and fed to ``Detector.fit`` as an iterable of batches;
- ``calibrate``: the val images (or a held-out tenth of the train normals) are predicted batch by
  batch; per image only its score, label and, for ``max-area``, its ``thresholds.max_area_level``
  are kept, plus a bounded sample of map values that places the pixel-histogram bin edges;
- ``test``: predicted batch by batch; per image its score, label, class, name and verdict are kept
  (O(1) each), pixel metrics go to fixed-size accumulators (``evaluate.streaming``: pixel ROC-AUC
  and AUPRO from histograms, within error bounds the report states) and only the few worst
  misses and false alarms keep their maps (bounded heaps) for the report's heatmaps.

So memory is O(N) scalars plus O(batch x prefetch) images, whatever the number of images (the
detector's own state aside: PatchCore's memory bank grows with the training set, as it must).
``evaluate.run.evaluate`` stays the exact in-memory path (benchmarks need exact pixel metrics).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from flawline.catalog import Catalog, Split
from flawline.data.records import ImageRecord, image_records
from flawline.data.stream import stream_batches
from flawline.errors import InvalidInput
from flawline.evaluate import metrics as M
from flawline.evaluate import thresholds as th
from flawline.evaluate.report import Overlay, write_report
from flawline.evaluate.streaming import DEFAULT_BINS, SAMPLE_BUDGET, PixelAccumulator, TopK, bin_edges
from flawline.models.base import Detector
from flawline.storage import ObjectStore

STAGES = ("fit", "calibrate", "test")
Progress = Callable[[str, int, int], None]  # (stage, images done, images in the stage)
RESERVED = ("backbone", "image_size")  # detector settings with flags of their own


@dataclass
class EvaluateOptions:
    """What ``flawline evaluate`` takes. ``detector_options``: more detector settings
    (``--option KEY=VALUE``; checked against the detector's config). Threshold: ``threshold`` rule
    with ``p`` / ``k`` / ``max_area`` (pixels), or a manual ``threshold_value``. ``pixel_bins``:
    bins of the pixel histograms; ``worst``: images shown per heatmap figure; ``workers`` download
    threads; ``prefetch``: batches decoded ahead; ``out``: report folder (default
    ``<data dir>/reports/<dataset>-<method>-<time>``); ``save``: store and register the model."""

    method: str = "patchcore"
    backbone: str = "efficientnet_lite0"
    image_size: int = 256
    detector_options: dict[str, Any] = field(default_factory=dict)
    threshold: str = "auto"
    p: float = 0.99
    k: float = 3.0
    max_area: int = 64
    threshold_value: float | None = None
    pixel_bins: int = DEFAULT_BINS
    worst: int = 4
    workers: int = 8
    prefetch: int = 2
    out: Path | None = None
    save: bool = True


@dataclass
class EvaluationSplits:
    """The records each stage reads, and where the calibration images came from."""

    train: list[ImageRecord]
    calibration: list[ImageRecord]
    test: list[ImageRecord]
    calibration_note: str = "val"
    unpaired: int = 0  # images left out for having no reference image (reference detectors)


@dataclass
class StreamedEvaluation:
    """``run_streamed``'s result: the fitted ``detector`` (threshold set), ``metrics`` (the keys of
    ``evaluate.run.evaluate``, pixel ones from histograms with ``*_error_bound``s), per test image
    ``labels`` [N] bool, ``scores`` [N], ``names``, the ``worst`` images by kind and the heatmaps'
    ``display_range``; ``notes`` for the user."""

    detector: Detector
    metrics: dict[str, Any]
    labels: np.ndarray
    scores: np.ndarray
    names: list[str]
    worst: dict[str, list[Overlay]]
    display_range: tuple[float, float]
    notes: list[str] = field(default_factory=list)


@dataclass
class EvaluationResult:
    """``evaluate_dataset``'s result: metrics, the detector, context (what the report's header
    shows), report files by kind, the registered ``model`` ("name:version") and its
    ``artifact_uri`` when saved, and notes for the user."""

    detector: Detector
    metrics: dict[str, Any]
    context: dict[str, Any]
    files: dict[str, Path]
    model: str | None = None
    artifact_uri: str | None = None
    notes: list[str] = field(default_factory=list)


def select_splits(catalog: Catalog, dataset: str, threshold: str = "auto",
                  reference: bool = False) -> EvaluationSplits:
    """The normal train images, the calibration images (the labelled val split, normal ones only
    for the label-free threshold rules; without a val split a seeded tenth of the train normals)
    and the labelled test images of ``dataset``; with ``reference`` (a detector that compares each
    image with its reference) only images that name a reference (the references themselves and
    unpaired images are left out: ``EvaluationSplits.unpaired`` counts them). Raises
    ``InvalidInput`` when the train split has no normal image or the test split no labelled one;
    ``InvalidInput`` for an unknown dataset."""
    train = image_records(catalog, dataset, Split.train, normal_only=True)
    test = image_records(catalog, dataset, Split.test, labelled_only=True)
    val = image_records(catalog, dataset, Split.val, labelled_only=True,
                        normal_only=threshold not in ("auto", "best-f1", "youden"))
    unpaired = 0
    if reference:
        before = len(train) + len(test) + len(val)
        train, test, val = ([r for r in rows if r.reference_key] for rows in (train, test, val))
        unpaired = before - len(train) - len(test) - len(val)
        if not train or not test:
            raise InvalidInput(f"dataset {dataset!r} has no images with a reference image in its "
                               f"{'train' if not train else 'test'} split; the reference detector compares each "
                               "image with its defect-free reference (a `reference` column in the import manifest)")
    if not train:
        raise InvalidInput(f"dataset {dataset!r} has no normal images in its train split; run `flawline data split`")
    if not test:
        raise InvalidInput(f"dataset {dataset!r} has no labelled images in its test split; run `flawline data split`")
    if val:
        return EvaluationSplits(train, val, test, unpaired=unpaired)
    cut = max(1, len(train) // 10)  # hold out a tenth of the training normals for calibration
    order = np.random.default_rng(0).permutation(len(train))
    return EvaluationSplits([train[i] for i in order[cut:]], [train[i] for i in order[:cut]], test,
                            f"train ({cut} normals held out; no val split)", unpaired)


def detector_settings(options: EvaluateOptions, white: int | None = None) -> dict[str, Any]:
    """The settings the detector is built with: backbone, image size, white level and
    ``detector_options``, checked against the detector's config. Raises ``ConfigError`` for an
    unknown detector or setting (listing the detector's settings), a value of the wrong type, or
    ``backbone`` / ``image_size`` among the options (they have flags of their own)."""
    from flawline.errors import ConfigError
    from flawline.models import base

    clash = [k for k in RESERVED if k in options.detector_options]
    if clash:
        raise ConfigError(f"--option {clash[0]}: set it with --{clash[0].replace('_', '-')}")
    settings = {"backbone": options.backbone, "image_size": options.image_size, "white": white,
                **options.detector_options}
    base.check_settings(options.method, settings)
    return settings


def build_detector(options: EvaluateOptions, white: int | None = None) -> Detector:
    """The detector ``options`` name, built with ``detector_settings``. Raises as that does."""
    from flawline.models import create_detector

    return create_detector(options.method, **detector_settings(options, white))


def _counted(stage: str, total: int, batches: Iterator, progress: Progress | None) -> Iterator:
    """``batches`` unchanged, reporting the images consumed so far after each one."""
    done = 0
    if progress:
        progress(stage, 0, total)
    for batch in batches:
        yield batch
        done += len(batch)
        if progress:
            progress(stage, done, total)


def run_streamed(store: ObjectStore, splits: EvaluationSplits, options: EvaluateOptions,
                 progress: Progress | None = None, data: dict[str, Any] | None = None) -> StreamedEvaluation:
    """Fit, calibrate and test as the module docstring says. ``data``: what the threshold records
    it was chosen on (default: the calibration note and image count). Raises ``InvalidInput`` for
    an image that does not decode (naming it), a threshold rule the calibration images cannot
    serve (e.g. best-f1 without labelled defects), or a test split without both classes;
    ``ConfigError`` as ``build_detector``."""
    det = build_detector(options, white=splits.train[0].white)
    size, bs = options.image_size, det.config.batch_size

    def batches(records: list[ImageRecord], masks: bool):
        return stream_batches(store, records, size, bs, options.workers, options.prefetch, with_masks=masks,
                              reference=det.uses_reference)

    # -- fit -------------------------------------------------------------------------------------
    started = time.perf_counter()
    det.fit(b.images for b in _counted("fit", len(splits.train), batches(splits.train, False), progress))
    fit_seconds = time.perf_counter() - started

    # -- calibrate -------------------------------------------------------------------------------
    levels_needed = options.threshold_value is None and options.threshold == "max-area"
    n_cal = len(splits.calibration)
    per_image = int(min(size * size, max(256, SAMPLE_BUDGET // max(n_cal, 1))))
    rng = np.random.default_rng(0)
    cal_scores, cal_labels, levels, sample = [], [], [], []
    lo, hi = np.inf, -np.inf
    for b in _counted("calibrate", n_cal, batches(splits.calibration, False), progress):
        pred = det.predict(b.images)
        cal_scores.append(pred.scores)
        cal_labels.append(b.labels)
        for amap, defect in zip(pred.maps, b.labels):
            flat = amap.ravel()
            keep = flat if per_image >= flat.size else flat[rng.choice(flat.size, per_image, replace=False)]
            sample.append(keep.astype(np.float64))
            lo, hi = min(lo, float(flat.min())), max(hi, float(flat.max()))
            if levels_needed:
                levels.append(np.nan if defect else th.max_area_level(amap, options.max_area))
        del pred
    scores_v, labels_v = np.concatenate(cal_scores), np.concatenate(cal_labels)
    note = data or {"dataset": splits.train[0].dataset, "split": splits.calibration_note, "images": n_cal}
    if options.threshold_value is not None:
        det.set_threshold(th.manual(options.threshold_value, "given on the command line"))
    else:
        det.set_threshold(th.compute(options.threshold, scores=scores_v, labels=labels_v, data=note,
                                     area_levels=np.array(levels) if levels_needed else None,
                                     p=options.p, k=options.k, max_area=options.max_area))
    notes = []
    normals = ~labels_v
    if normals.sum() >= th.MIN_READABLE_NORMALS:  # what makes its scores readable (th.normal_percentile)
        det.info["normal_score_quantiles"] = th.normal_quantiles(scores_v[normals])
    else:
        notes.append(f"note: {int(normals.sum())} held-out normal image(s), fewer than {th.MIN_READABLE_NORMALS}: "
                     "the model keeps no normal score record, so pre-annotations will show no score "
                     "(a larger --val share in `flawline data split` gives one)")
    edges = bin_edges(np.concatenate(sample), options.pixel_bins, lo, hi)
    del sample

    # -- test ------------------------------------------------------------------------------------
    threshold = det.threshold
    acc = PixelAccumulator(edges, threshold=threshold.value)
    missed, alarms = TopK(options.worst), TopK(options.worst)
    scores, labels, verdicts, names, classes = [], [], [], [], []
    predict_s = 0.0
    for b in _counted("test", len(splits.test), batches(splits.test, True), progress):
        t0 = time.perf_counter()
        pred = det.predict(b.images)
        predict_s += time.perf_counter() - t0
        verdict = th.decide(threshold, pred.scores, pred.maps)
        for i, r in enumerate(b.records):
            score, defect = float(pred.scores[i]), bool(r.defect)
            acc.add(pred.maps[i], b.masks[i], defect, r.defect_class)
            heap, priority = (missed, -score) if defect and not verdict[i] else \
                (alarms, score) if not defect and verdict[i] else (None, 0.0)
            if heap is not None and heap.would_keep(priority):
                heap.push(priority, Overlay.of(r.origin, b.images[i, :3], pred.maps[i], b.masks[i], score, defect))
            scores.append(score)
            labels.append(defect)
            verdicts.append(bool(verdict[i]))
            names.append(r.origin)
            classes.append(r.defect_class)
        del pred
    y, s, v = np.array(labels, dtype=bool), np.array(scores, dtype=np.float64), np.array(verdicts, dtype=bool)
    metrics: dict[str, Any] = {
        "images": int(y.size), "defects": int(y.sum()),
        "image_auroc": M.roc_auc(y, s), "average_precision": M.average_precision(y, s),
        "predict_seconds": predict_s, "predict_images_per_s": y.size / predict_s if predict_s else None,
    }
    at = M.precision_recall_f1(y, v.astype(np.float64), 0.5)
    metrics.update(threshold=threshold.as_dict(), f1=at["f1"], precision=at["precision"], recall=at["recall"],
                   accuracy=at["accuracy"], confusion={k: at[k] for k in ("tp", "fp", "fn", "tn")})
    pixel = acc.metrics()
    if pixel:
        metrics.update({k: pixel[k] for k in ("pixel_auroc", "aupro", "iou") if k in pixel})
        metrics["pixel_metrics_note"] = (
            f"pixel AUROC and AUPRO from {pixel['pixel_bins']}-bin histograms of the map values (bin edges fixed "
            f"on the calibration maps), within {pixel['pixel_auroc_error_bound']:.1e} and "
            f"{pixel['aupro_error_bound']:.1e} of the exact values")
        metrics["pixel_error_bounds"] = {"pixel_auroc": pixel["pixel_auroc_error_bound"],
                                         "aupro": pixel["aupro_error_bound"], "bins": pixel["pixel_bins"]}
    if classes:
        metrics.update(M.per_class(y, classes, s))
        for key in ("pixel_auroc_per_class", "defect_pixel_share_per_class"):
            if key in pixel:
                metrics[key] = pixel[key]
    metrics["fit_seconds"] = fit_seconds
    return StreamedEvaluation(det, metrics, y, s, names,
                              {"false_negatives": missed.items(), "false_positives": alarms.items()},
                              (acc.percentile(1), acc.percentile(99.5)), notes)


def evaluate_dataset(catalog: Catalog, store: ObjectStore, dataset: str, options: EvaluateOptions,
                     progress: Progress | None = None) -> EvaluationResult:
    """``flawline evaluate``: ``select_splits``, ``run_streamed``, the report (JSON, Markdown, ROC,
    heatmaps of the worst misses and false alarms) in ``options.out``, and, with ``options.save``,
    the model stored at ``models/<dataset>/<method>/<time>/model.pt`` and registered as
    ``<dataset>-<method>``. Raises what those raise."""
    from flawline.catalog.model_versions import register_version
    from flawline.catalog.queries import get_dataset
    from flawline.config import get_settings
    from flawline.models.artifacts import detector_to_bytes

    started = time.perf_counter()
    detector_settings(options)  # a mistyped --option fails before any image is read
    from flawline.models.base import detector_class

    splits = select_splits(catalog, dataset, options.threshold, detector_class(options.method).uses_reference)
    run = run_streamed(store, splits, options, progress,
                       {"dataset": dataset, "split": splits.calibration_note, "images": len(splits.calibration)})
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = options.out or get_settings().data_dir / "reports" / f"{dataset}-{options.method}-{stamp}"
    det = run.detector
    context: dict[str, Any] = {
        "dataset": dataset, "method": options.method, "backbone": options.backbone, "image_size": options.image_size,
        **({"options": options.detector_options} if options.detector_options else {}),
        "train_images": len(splits.train), "calibration": splits.calibration_note,
        "seconds": round(time.perf_counter() - started, 1)}
    files = write_report(out, run.metrics, run.labels, run.scores, run.worst, context, run.display_range)
    result = EvaluationResult(det, run.metrics, context, files, notes=run.notes)
    if splits.unpaired:
        result.notes.append(f"{splits.unpaired} images without a reference image (the references themselves, or "
                            f"unpaired) were left out: {options.method} compares each image with its reference")
    if options.save:
        key = f"models/{dataset}/{options.method}/{stamp}/model.pt"
        store.put_bytes(key, detector_to_bytes(det))
        with catalog.session() as s:
            row = register_version(s, name=f"{dataset}-{options.method}", artifact_uri=store.uri(key),
                                   method=options.method, backbone=options.backbone,
                                   threshold=det.threshold.as_dict(),
                                   metrics={k: v for k, v in run.metrics.items() if k != "threshold"},
                                   dataset_id=get_dataset(s, dataset).id)
            result.model = context["model"] = f"{row.name}:{row.version}"
        result.artifact_uri = store.uri(key)
    return result
