"""What a training run is asked to do: one plain, serialisable record (stored in the run's row)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from flawline.errors import ConfigError


@dataclass
class TrainSpec:
    datasets: list[str]  # one run may train on several datasets / product lines at once
    setting: str  # unsupervised | selfsup | supervised | fewshot | semisupervised | weakly
    method: str | None = None  # detector name; None = the setting's default
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    backbone: str = "efficientnet_lite0"
    image_size: int | None = None  # None = the detector's own default (256; classifier and fewshot 224)
    epochs: int | None = None  # None = the setting's default
    batch_size: int = 16
    lr: float | None = None
    precision: str = "fp32"  # or "bf16" (autocast)
    label_fraction: float = 1.0  # keep this seeded, stratified share of the labels (ablations, benchmarks)
    shots: int = 5  # few-shot: labelled defect images per dataset
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # detector settings (e.g. coreset_ratio)
    model_name: str | None = None  # default "<datasets>-<setting>-<method>"
    max_failures: int = 2  # worker deaths survived by resuming from the last checkpoint
    # Elastic (Ray Train V2): start once this many workers fit, grow to ``workers``, go on with
    # fewer when a node is lost; None = exactly ``workers``.
    min_workers: int | None = None
    # Custom Ray resources each worker asks for besides CPU/GPU (e.g. {"inspection_gpu": 1}):
    # pins the run to the nodes that advertise them.
    worker_resources: dict[str, float] = field(default_factory=dict)
    # MiB of its shard each Ray Train worker keeps in memory across epochs: decoded images for the
    # label settings, embeddings for gradient-trained normal-only detectors (flow, reconstruction,
    # selfsup). A larger shard streams from Ray Data again every epoch (embedded again, for the
    # latter), so a worker's memory does not grow with the dataset.
    shard_cache_mb: float = 1024.0

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str):
            self.datasets = [self.datasets]
        if not self.datasets:
            raise ConfigError("no dataset given")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.workers:
            raise ConfigError(f"min-workers must lie in 1..workers ({self.workers}), got {self.min_workers}")
        for key, amount in self.worker_resources.items():
            if key in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ConfigError(f"worker resource {key!r}: use --cpus-per-worker / --gpus-per-worker for it")
            if not isinstance(amount, (int, float)) or amount <= 0:
                raise ConfigError(f"worker resource {key!r} must ask for an amount > 0, got {amount!r}")
        if self.shard_cache_mb < 0:
            raise ConfigError(f"shard-cache-mb must be >= 0, got {self.shard_cache_mb}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ConfigError("cpus-per-worker must be > 0 and gpus-per-worker >= 0")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"label fraction {self.label_fraction} must lie in (0, 1]")
        if not 1 <= self.shots <= 10:
            raise ConfigError(f"shots must be between 1 and 10 (few-shot), got {self.shots}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision {self.precision!r} must be 'fp32' or 'bf16'")
        if self.image_size is None:
            self.image_size = default_image_size(self)
        if not 32 <= self.image_size <= 1024:
            raise ConfigError(f"image size {self.image_size} must lie in 32..1024")

    def worker_bundle(self) -> dict[str, float]:
        """The Ray resources each Ray Train worker asks for (its ScalingConfig.resources_per_worker)."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker > 0 else {}),
                **self.worker_resources}

    def name(self, method: str) -> str:
        return self.model_name or f"{'+'.join(self.datasets)}-{self.setting}-{method}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(**values)


def default_image_size(spec: TrainSpec) -> int:
    """The image size a run of ``spec`` trains at when it names none: its detector's own default
    (the setting's ``method``: ``spec.method`` or the setting's first), the size ``flawline
    evaluate`` uses for it too. Raises ``ConfigError`` as ``get_setting`` and ``Setting.method`` do."""
    from flawline.models.base import detector_class
    from flawline.train.settings import get_setting

    return int(detector_class(get_setting(spec.setting).method(spec)).Config().image_size)
