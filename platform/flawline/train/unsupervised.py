"""Unsupervised (normal images only) and self-supervised (synthetic defects on normal images):
the detector library's detectors. In a Ray job each worker embeds its shard (``Detector.embed``);
gradient-trained detectors then train under DDP on every worker, the others fit on rank 0 over
the gathered embeddings (``flawline.train.distributed``)."""

from __future__ import annotations

from typing import Any

from flawline.models import Detector
from flawline.train.context import TrainContext
from flawline.train.data import BatchSource, RunData
from flawline.train.settings import TrainingSetting, register_setting
from flawline.train.spec import TrainSpec


class NormalOnly(TrainingSetting):
    gradient = False
    streams = ("normal",)

    def missing_labels(self, data: RunData, spec: TrainSpec) -> list[str]:
        if data.count("labelled", defect=False) == 0:
            return ["no normal images labelled in the train split (the detector learns what normal looks like)"]
        return []

    def select(self, data: RunData, spec: TrainSpec) -> dict[str, list[dict[str, Any]]]:
        return {"normal": [r for r in data.labelled if r.defect is False]}

    def train(self, detector: Detector, source: BatchSource, spec: TrainSpec, ctx: TrainContext,
              class_counts: list[int]) -> list[dict[str, Any]]:
        """Single process: embed and fit in one go (``distributed._normal_worker`` on Ray workers)."""
        detector.fit_embedded(detector.embed_images(b["image"]) for b in source.epoch("normal", 0))
        return [{"epoch": 1, "epochs": 1, "train_images": detector.info.get("train_images")}]


@register_setting
class Unsupervised(NormalOnly):
    name = "unsupervised"
    description = ("normal images only: a memory-bank, density, flow or reconstruction detector, or a "
                   "comparison of each image with its reference image")
    methods = ("patchcore", "padim", "flow", "reconstruction", "reference")


@register_setting
class SelfSupervised(NormalOnly):
    name = "selfsup"
    description = "normal images only, with synthetic defects (CutPaste, Perlin blobs) as positives"
    methods = ("selfsup", "ndpnet")
