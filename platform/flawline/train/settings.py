"""Label settings (survey, sections 3.1 and 3.3) and the registry they add themselves to.

A setting says which labels it needs (checked before anything reaches the cluster), which detector
methods it can train, which row streams feed it, and how one worker trains. Adding a setting =
one module in ``flawline/train/`` with a ``@register_setting`` class, imported in ``train/__init__``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from flawline.errors import ConfigError
from flawline.models import Detector, create_detector
from flawline.models.base import detector_class
from flawline.registry import Registry
from flawline.train.context import TrainContext
from flawline.train.data import BatchSource, RunData
from flawline.train.loop import OptimConfig
from flawline.train.spec import TrainSpec

if TYPE_CHECKING:
    from flawline.catalog import Catalog
    from flawline.storage import ObjectStore
    from flawline.train.runner import RunPlan


class TrainingSetting(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    methods: ClassVar[tuple[str, ...]]  # detectors it trains; the first is the default
    gradient: ClassVar[bool] = True  # the setting's own loop (False: the detector fits on its embeddings)
    streams: ClassVar[tuple[str, ...]] = ("labelled",)  # which RunData rows feed the workers
    optional_streams: ClassVar[tuple[str, ...]] = ()  # streams that may be empty
    refine_streams: ClassVar[tuple[str, ...]] = ()  # streams ``refine`` reads after a non-gradient fit
    default_epochs: ClassVar[int] = 10
    default_lr: ClassVar[float] = 1e-3

    @abstractmethod
    def missing_labels(self, data: RunData, spec: TrainSpec) -> list[str]:
        """What the run's data lacks for this setting (empty = can train)."""

    def method(self, spec: TrainSpec) -> str:
        method = spec.method or self.methods[0]
        if method not in self.methods:
            raise ConfigError(f"setting {self.name!r} trains {', '.join(self.methods)}; not {method!r}")
        return method

    def model_name(self, spec: TrainSpec) -> str:
        """The registered model's name (``spec.model_name``, else ``<datasets>-<setting>-<method>``)."""
        return spec.name(self.method(spec))

    def build(self, spec: TrainSpec, data: RunData, device: str = "auto") -> Detector:
        """A fresh, untrained detector for this run (same on every worker), on ``device``."""
        settings: dict[str, Any] = {"backbone": spec.backbone, "image_size": spec.image_size,
                                    "seed": spec.seed, "device": device, **spec.options}
        fields = {f.name for f in dataclasses.fields(detector_class(self.method(spec)).Config)}
        for key, value in (("epochs", spec.epochs), ("lr", spec.lr)):  # a trained detector's own loop
            if value is not None and key in fields and not self.gradient:
                settings.setdefault(key, value)
        if self.method(spec) == "classifier":
            settings.setdefault("classes", data.classes)
        return create_detector(self.method(spec), **settings)

    def optim(self, spec: TrainSpec) -> OptimConfig:
        return OptimConfig(epochs=spec.epochs or self.default_epochs, lr=spec.lr or self.default_lr,
                           precision=spec.precision, seed=spec.seed)

    def select(self, data: RunData, spec: TrainSpec) -> dict[str, list[dict[str, Any]]]:
        """Rows per stream (the default: each stream is the RunData field of that name)."""
        return {s: getattr(data, s) for s in self.streams}

    @abstractmethod
    def train(self, detector: Detector, source: BatchSource, spec: TrainSpec, ctx: TrainContext,
              class_counts: list[int]) -> list[dict[str, Any]]:
        """Train ``detector`` in place on this worker's shard; returns per-epoch metrics.
        ``class_counts``: labelled training rows per class index (all workers together)."""

    def refine(self, detector: Detector, source: BatchSource, spec: TrainSpec) -> dict[str, Any]:
        """Non-gradient settings, after the fit on embeddings (on rank 0 of the run's Ray Train workers): learn
        what needs the fitted model from ``refine_streams`` (e.g. a head and its threshold);
        returns facts for the run's metrics. Default: nothing."""
        return {}

    def after_training(self, catalog: Catalog, store: ObjectStore, plan: RunPlan, detector: Detector,
                       model_name: str) -> dict[str, Any]:
        """Once, where the run finishes (rank 0 of its workers in a Ray job), after the model version
        is registered (``runner.finish_run``):
        write what the run learned back to the catalog (e.g. pseudo-labels); returns metrics to
        add to the run's. Default: nothing."""
        return {}


SETTINGS: Registry[type[TrainingSetting]] = Registry("training setting", ConfigError)
register_setting = SETTINGS.register
setting_names = SETTINGS.names


def missing_verdicts(data: RunData) -> list[str]:
    """What a setting that learns both verdicts lacks: labelled defects and labelled normals."""
    missing = []
    if data.count("labelled", defect=True) == 0:
        missing.append("no labelled defect images in the train split")
    if data.count("labelled", defect=False) == 0:
        missing.append("no labelled normal images in the train split")
    return missing


def get_setting(name: str) -> TrainingSetting:
    return SETTINGS.get(name)()
