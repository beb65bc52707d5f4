"""Mixed supervision (``--setting mixed``): the normal-only detector a user picks, refined by
whatever labels the train split has (``flawline.models.mixed``).

1. ``normal``: what the base detector embeds and fits on (on Ray Data actors in a Ray job, like the
   unsupervised setting). With an unlabelled pool larger than the labelled normals (the active-
   learning loop; its first round has no label at all) the pool: defects are rare, and the pool
   extends the normal model far beyond what people labelled; since it may hold defects, the
   detector cross-fits two halves and leaves the ``pool_trim`` most anomalous images of each half
   out (semi-supervised: confidently normal images extend the normal model, confident outliers
   stay out of it). Otherwise the labelled normal images less a seeded ``calibration_fraction``
   held back.
2. ``calibration``: images the base never saw: every labelled normal image in the first case
   (with a tenth of the pool added when there are fewer than ``MIN_HOLDOUT_NORMALS``), the
   held-back normals in the second. All of them give the normal statistics; the labelled ones are
   the head's negatives, without the optimism of scoring fitted images.
3. ``defects``: every labelled defect image (image verdicts, with or without boxes or masks).
4. The head is chosen and fitted by cross-validation (``flawline.models.head``), and the threshold
   is the best balanced accuracy (Youden's J) of its out-of-fold scores: labelled sets are skewed
   towards defects (active learning, few-shot), so a prior-free criterion. With no labelled defect
   the threshold is the 0.99-quantile of the held-back normals' scores, and its record says so.

5. After the model is registered, the unlabelled pool's confident outliers are stored as ``pseudo``
   defect annotations (``after_training``): at or above the threshold, and with a conformal
   confidence of at least ``tau`` against the held-out normal images' scores.

A validation split with both verdicts, where there is one, overrides that threshold (the runner
calibrates on it, as for every setting).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flawline.catalog import Catalog, Label
from flawline.errors import ConfigError
from flawline.evaluate import thresholds as th
from flawline.models import Detector
from flawline.models.mixed import HeadInputs, MixedDetector
from flawline.storage import ObjectStore
from flawline.train.context import TrainContext
from flawline.train.data import BatchSource, RunData
from flawline.train.pseudo import PseudoVerdict, conformal_confidence, predict_and_store
from flawline.train.settings import TrainingSetting, register_setting
from flawline.train.spec import TrainSpec

if TYPE_CHECKING:
    from flawline.train.runner import RunPlan

MIN_NORMALS = 3  # labelled normal images without a pool: at least one to fit on, two to check on
MIN_HOLDOUT_NORMALS = 10  # with fewer normal images none are held back (stated in the threshold's record)
QUANTILE = 0.99


def head_threshold(result: dict[str, Any], normal_z: np.ndarray, defects: int) -> th.Threshold:
    """The threshold for a fitted head (``MixedDetector.fit_head``'s result): the best balanced
    accuracy (Youden's J) of its out-of-fold scores, which does not depend on how many of the
    labelled images are defects; with no labelled defects the 0.99-quantile of the normal images'
    z-scores ``normal_z`` (the head is then z itself)."""
    n_cal = len(normal_z)
    where = f"{n_cal} images the base detector was not fitted on"
    if defects and not result["oof_labels"].all():
        how = "in-sample" if "not cross-validated" in result["chosen"] else "out-of-fold"
        return th.youden(result["oof_labels"], result["oof_scores"],
                         {"images": len(result["oof_labels"]), "defects": defects, "normal_images": n_cal,
                          "note": f"{how} scores of {defects} labelled defects and {where}"})
    return th.quantile(normal_z, QUANTILE, {"normal_images": n_cal,
                                            "note": f"no labelled defects: calibrated on {where} alone"})


def _regions(batch: dict) -> tuple:  # noqa: ANN001
    """A batch's masks, else its rasterised boxes, per image (None where it has neither)."""
    if "mask" not in batch:
        return None, None
    has_mask, has_region = batch["has_mask"].bool(), batch["has_region"].bool()
    regions = torch.where(has_mask.view(-1, 1, 1), batch["mask"].float(), batch["region"].float())
    return regions, has_mask | has_region


@register_setting
class MixedSupervision(TrainingSetting):
    name = "mixed"
    description = ("mixed supervision: a normal-only detector (--option base_method=patchcore|padim|flow) refined by "
                   "whatever labels exist (verdicts, boxes, masks, k defects); no labels needed to start")
    methods = ("mixed",)
    gradient = False
    streams = ("normal", "calibration", "defects")
    refine_streams = ("calibration", "defects")
    optional_streams = ("defects",)  # no labelled defect yet: the base detector alone, calibrated on normals
    calibration_fraction = 0.2

    tau = 0.99  # conformal confidence a pseudo-annotation needs (after_training)
    pool_trim = 0.2  # share of an unlabelled pool left out of the normal model as outliers (cross-fitting)

    @staticmethod
    def fits_on_pool(data: RunData) -> bool:
        """The base fits on the unlabelled pool when it outnumbers the labelled normal images."""
        return len(data.unlabelled) > data.count("labelled", defect=False)

    def model_name(self, spec: TrainSpec) -> str:
        """``<datasets>-mixed-<base>``: models on different bases are different models."""
        return spec.model_name or f"{'+'.join(spec.datasets)}-mixed-{spec.options.get('base_method', 'padim')}"

    def build(self, spec: TrainSpec, data: RunData, device: str = "auto") -> Detector:
        """The mixed detector; fitting on an unlabelled pool, it leaves the pool's ``pool_trim``
        most anomalous images out of the normal model (``MixedDetector._trimmed``), unless the
        run's options set ``trim``."""
        if self.fits_on_pool(data) and "trim" not in spec.options:
            spec = dataclasses.replace(spec, options={**spec.options, "trim": self.pool_trim})
        return super().build(spec, data, device)

    def missing_labels(self, data: RunData, spec: TrainSpec) -> list[str]:
        if not self.fits_on_pool(data) and data.count("labelled", defect=False) < MIN_NORMALS:
            return [f"fewer than {MIN_NORMALS} labelled normal images and no larger unlabelled pool (the normal "
                    "model needs images to fit on and others to be checked on)"]
        return []

    def select(self, data: RunData, spec: TrainSpec) -> dict[str, list[dict[str, Any]]]:
        rng = np.random.default_rng(spec.seed)
        normal = [r for r in data.labelled if r.defect is False]
        pool = list(data.unlabelled)
        defects = [r for r in data.labelled if r.defect is True]
        if self.fits_on_pool(data):
            # An unlabelled pool (the active-learning loop): defects are rare, so the base fits on the
            # pool; every labelled normal image stays out of that fit, for the head and the statistics.
            calibration = list(normal)
            if len(normal) < MIN_HOLDOUT_NORMALS:  # too few for the statistics: a tenth of the pool too
                k = min(max(MIN_HOLDOUT_NORMALS, len(pool) // 10), len(pool) // 2)  # the fit keeps half at least
                cut = set(rng.permutation(len(pool))[:k].tolist())
                calibration += [r for i, r in enumerate(pool) if i in cut]
                pool = [r for i, r in enumerate(pool) if i not in cut]
            return {"normal": pool, "calibration": calibration, "defects": defects}
        n = min(len(normal) - 1, max(2, round(self.calibration_fraction * len(normal))))
        held = set(rng.permutation(len(normal))[:n].tolist())
        return {"normal": [r for i, r in enumerate(normal) if i not in held],
                "calibration": [r for i, r in enumerate(normal) if i in held], "defects": defects}

    def train(self, detector: Detector, source: BatchSource, spec: TrainSpec, ctx: TrainContext,
              class_counts: list[int]) -> list[dict[str, Any]]:
        """Single process: fit the base, then refine (on Ray: ``distributed._normal_worker``)."""
        detector.fit_embedded(detector.embed_images(b["image"]) for b in source.epoch("normal", 0))
        facts = self.refine(detector, source, spec)
        return [{"epoch": 1, "epochs": 1, "train_images": detector.info.get("train_images"), **facts}]

    def refine(self, detector: Detector, source: BatchSource, spec: TrainSpec) -> dict[str, Any]:
        """Normal statistics, head and threshold from the ``calibration`` and ``defects`` streams."""
        if not isinstance(detector, MixedDetector):
            raise ConfigError(f"setting 'mixed' trains the mixed detector, not {detector.name!r}")
        parts, labelled = [], []
        for b in source.epoch("calibration", 0):
            parts.append(detector.head_inputs(b["image"]))
            labelled.append(b["target"].cpu().numpy() == 0)  # labelled normal (unlabelled pool rows: -1)
        calibration = HeadInputs.concat(parts)
        detector.set_normal_stats(calibration.scores, calibration.patch_map)
        normal = calibration.take(np.flatnonzero(np.concatenate(labelled))) if parts else calibration
        defects = HeadInputs.concat([detector.head_inputs(b["image"], *_regions(b))
                                     for b in source.epoch("defects", 0)])
        result = detector.fit_head(normal, defects)
        normal_z = detector.z((normal if len(normal) else calibration).scores)
        threshold = head_threshold(result, normal_z, len(defects))
        detector.set_threshold(threshold)
        # the held-out normal images' final scores: what a pseudo-annotation's confidence is measured against
        oof_normal = result["oof_scores"][result["oof_labels"] == 0] if len(defects) else normal_z
        detector.calibration_scores = np.sort(np.asarray(oof_normal, dtype=np.float64))
        detector.info["calibration"] = threshold.data.get("note")
        return {"head": result["chosen"], "cv_auroc": result["cv_auroc"], "calibration": threshold.data.get("note")}

    @torch.no_grad()
    def after_training(self, catalog: Catalog, store: ObjectStore, plan: RunPlan, detector: Detector,
                       model_name: str) -> dict[str, Any]:
        """Confident outliers of the unlabelled pool become ``pseudo`` defect annotations
        (``flawline.train.pseudo``; annotator ``flawline:<model name>``): images at or above the
        model's threshold whose conformal confidence against the held-out normal images' scores
        (``flawline.train.pseudo.conformal_confidence``) reaches ``tau``. With fewer than
        ``tau / (1 - tau)`` held-out normals (99 at 0.99) no score can reach it: none are stored."""
        normals = getattr(detector, "calibration_scores", None)
        if not plan.data.unlabelled or normals is None or not isinstance(detector, MixedDetector):
            return {}
        threshold = detector.threshold.value

        def verdicts(ids: list[int], images: torch.Tensor) -> list[PseudoVerdict]:
            scores = np.asarray(detector.predict(images).scores, dtype=np.float64)
            confidence = conformal_confidence(normals, scores)
            return [PseudoVerdict(i, Label.defect, round(float(c), 4))
                    for i, s, c in zip(ids, scores, confidence) if s >= threshold and c >= self.tau]

        stored = predict_and_store(catalog, store, plan.data.unlabelled, plan.spec.image_size,
                                   f"flawline:{model_name}", verdicts)
        return {"pseudo_defects": stored, "pseudo_tau": self.tau}
