"""Few-shot detector: a handful of labelled defects plus normal images (``--setting fewshot``).

Two parts, scored together:

- a normal-only detector (``normal_method``, PaDiM by default) fitted on the normal images; it
  finds anything unusual, including defect kinds nobody labelled;
- a ``segmenter`` (U-Net on a fine-tuned encoder) trained on the few real defects and on
  synthetic defects (CutPaste, Perlin blobs) pasted onto normal images; it learns what *these*
  defects look like. A real defect with a mask teaches it pixels; one without a mask only says
  "somewhere in this image": its loss pushes the mean of the top ``weak_top_fraction`` pixel
  logits towards "defect" (multiple-instance learning on the segmenter's own top-k score) and
  says nothing about the other pixels.

The normal-only detector's scores are on their own scale, so they are turned into a z-score
with the mean and standard deviation of its scores on normal images it was not fitted on (held
back by the setting), and squashed with a sigmoid. Image score = ``(1 - defect_weight) *
sigmoid(z) + defect_weight * p(defect)``; pixel maps the same way, with the pixel statistics of
the normal maps. Both parts and the combination are one module (``scorer``), so prediction and
the ONNX export run the same path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flawline.errors import ConfigError
from flawline.models.base import Detector, DetectorConfig, create_detector, detector_class, register_detector
from flawline.models.segmenter import SegmenterDetector

SHARED_FIELDS = ("backbone", "weights", "image_size", "batch_size", "device", "seed", "precision")


class FewShotScorer(nn.Module):
    """Images → (scores, maps): both parts' outputs, the normal part's normalised, averaged."""

    def __init__(self, normal: nn.Module, defect: nn.Module, stats: torch.Tensor,
                 defect_weight: float) -> None:
        super().__init__()
        self.normal, self.defect = normal, defect
        self.register_buffer("stats", stats.float())  # score mean, score std, map mean, map std
        self.defect_weight = defect_weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_n, m_n = self.normal(x)
        s_d, m_d = self.defect(x)
        w = self.defect_weight
        z_s = torch.sigmoid((s_n.float() - self.stats[0]) / self.stats[1])
        z_m = torch.sigmoid((m_n.float() - self.stats[2]) / self.stats[3])
        return (1 - w) * z_s + w * s_d.float(), (1 - w) * z_m + w * m_d.float()


@dataclass
class FewShotConfig(DetectorConfig):
    image_size: int = 224
    normal_method: str = "padim"  # the normal-only part (any detector fitted on normal images)
    normal_options: dict[str, Any] = field(default_factory=dict)  # its own settings (e.g. channels)
    defect_weight: float = 0.5  # share of the defect segmenter in the combined score
    # the defect segmenter (see models/segmenter.py)
    width: int = 32
    freeze_blocks: int = 1
    blur_sigma: float = 1.0
    top_fraction: float = 0.001


def normal_moments(scores: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Sums that add up over workers: [n, Σs, Σs², pixels, Σm, Σm²] (float64)."""
    s, m = scores.double().flatten(), maps.double().flatten()
    return torch.stack([torch.tensor(float(s.numel()), dtype=torch.float64), s.sum(), (s * s).sum(),
                        torch.tensor(float(m.numel()), dtype=torch.float64), m.sum(), (m * m).sum()])


def _mean_std(n: torch.Tensor, total: torch.Tensor, squares: torch.Tensor) -> tuple[float, float]:
    mean = float(total / n)
    var = float(squares / n) - mean * mean
    std = max(var, 0.0) ** 0.5 * (float(n) / max(float(n) - 1, 1.0)) ** 0.5
    return mean, max(std, 1e-3 * abs(mean), 1e-6)  # never divide by (about) zero


@register_detector
class FewShotDetector(Detector):
    """Trained by ``flawline.train.fewshot``: fit ``normal`` on normal images, set the normal
    statistics, train ``segmenter``'s network; then it predicts like any detector."""

    name = "fewshot"
    Config = FewShotConfig
    learns_from_labels = True
    uses_backbone = False  # its parts hold the backbones
    no_tiling = "its segmenter is trained on whole images by the fewshot setting; a tiled segmenter or normal-only detector can be"

    def __init__(self, config: FewShotConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        c: FewShotConfig = self.config
        if not 0.0 <= c.defect_weight <= 1.0:
            raise ConfigError(f"fewshot: defect_weight {c.defect_weight} must lie in [0, 1]")
        if getattr(detector_class(c.normal_method), "learns_from_labels", False):
            raise ConfigError(f"fewshot: normal_method {c.normal_method!r} learns from labels; "
                              "pick a detector fitted on normal images (padim, patchcore, ...)")
        shared = {k: getattr(c, k) for k in SHARED_FIELDS}
        clash = sorted(set(shared) & set(c.normal_options))
        if clash:
            raise ConfigError(f"fewshot: normal_options cannot set {', '.join(clash)} (shared by both parts)")
        self.normal: Detector = create_detector(c.normal_method, **shared, **c.normal_options)
        self.segmenter = SegmenterDetector(**shared, width=c.width, freeze_blocks=c.freeze_blocks,
                                           blur_sigma=c.blur_sigma, top_fraction=c.top_fraction)
        self.stats: torch.Tensor | None = None  # score mean, score std, map mean, map std

    def set_normal_stats(self, moments: torch.Tensor) -> None:
        """From ``normal_moments`` of the normal part's predictions (summed over workers)."""
        if float(moments[0]) < 1:
            raise ConfigError("fewshot: no normal scores to normalise the normal-only detector with")
        s_mean, s_std = _mean_std(moments[0], moments[1], moments[2])
        m_mean, m_std = _mean_std(moments[3], moments[4], moments[5])
        self.stats = torch.tensor([s_mean, s_std, m_mean, m_std], dtype=torch.float32)
        self.info["normal_stats"] = {"images": int(moments[0]), "score_mean": round(s_mean, 6),
                                     "score_std": round(s_std, 6), "map_mean": round(m_mean, 6),
                                     "map_std": round(m_std, 6)}

    def scorer(self, chunked: bool = True) -> FewShotScorer:
        if self.stats is None:
            raise ConfigError("fewshot: the normal statistics are not set (not trained)")
        return FewShotScorer(self.normal.scorer(chunked), self.segmenter.scorer(chunked),
                             self.stats.to(self.device), self.config.defect_weight)

    def state_dict(self) -> dict[str, Any]:
        return {"normal": self.normal.state_dict(), "normal_info": dict(self.normal.info),
                "segmenter": self.segmenter.state_dict(), "stats": self.stats.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normal.load_state_dict(state["normal"])
        self.normal.info = dict(state.get("normal_info") or {})
        self.segmenter.load_state_dict(state["segmenter"])
        self.stats = state["stats"].float()
        self.fitted = True

    def _fit_embedded(self, embedded) -> int:  # noqa: ANN001
        raise ConfigError(f"{self.name} learns from labels: train it with "
                          "`flawline train submit --setting fewshot`")
