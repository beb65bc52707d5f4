"""Reference comparison: each image against its own defect-free reference image.

Printed-circuit-board and other patterned-part inspection pairs each tested image with a golden
(defect-free) image of the same design; what differs from the reference is the defect, whatever
the design looks like. Here both images go through the same ImageNet backbone; at every patch
position the tested image's locally aware patch feature (PatchCore's, Roth et al. 2022) is compared
with the reference's features within ``search`` patches around the same position (the nearest of
them: a registration tolerance of a few pixels, as NDP-Net's reference attention tolerates
misalignment by attending over the reference's patches, Zhang et al. ``../shared/seeds/002_*``,
here with the paired reference instead of one fixed one and without training). Fitting on normal
pairs (an image and its reference, both defect-free) learns what an aligned normal difference is
at each position (mean and standard deviation of the distance); the map is the difference in
those standard deviations, upsampled and blurred, and the image score its maximum.

Input: pairs [N, 6, H, W] in [0, 1], the tested image's 3 channels then its reference's
(``flawline.data.loading.pair``, re-exported here); the catalog's ``reference`` attribute names each image's reference, and every decoder
of records (``flawline.data.records.decode_record`` with ``reference=True``) builds these pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flawline.data.loading import PAIR_CHANNELS, pair  # noqa: F401 — pairs are built there (re-exported)
from flawline.errors import InvalidInput
from flawline.models.base import Detector, DetectorConfig, register_detector
from flawline.models.features import as_model_batch, patch_features, upsample_map


def aligned_distance(f: torch.Tensor, g: torch.Tensor, search: int) -> torch.Tensor:
    """Features of images ``f`` and of their references ``g`` [B, D, h, w] → [B, h, w]: the
    Euclidean distance of each of ``f``'s patches to the nearest of ``g``'s patches within
    ``search`` positions (a (2 search + 1)² window; edges replicate)."""
    b, d, h, w = f.shape
    k = 2 * search + 1
    padded = F.pad(g, (search, search, search, search), mode="replicate")
    windows = F.unfold(padded, k).reshape(b, d, k * k, h, w)  # [B, D, K, h, w]
    d2 = ((windows - f.unsqueeze(2)) ** 2).sum(1)  # [B, K, h, w]
    return d2.min(1).values.clamp_min(0).sqrt()


class ReferenceScorer(nn.Module):
    """Pairs [B, 6, S, S] → (scores [B], maps [B, S, S]); exported to ONNX as it runs."""

    def __init__(self, extractor: nn.Module, mean: torch.Tensor, std: torch.Tensor, search: int,
                 blur_sigma: float) -> None:
        super().__init__()
        self.extractor = extractor
        self.register_buffer("mean", mean)  # [h, w] normal aligned distance per position
        self.register_buffer("std", std)  # [h, w]
        self.search, self.blur_sigma = search, blur_sigma

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        f = patch_features(self.extractor(torch.cat([x[:, :3], x[:, 3:]], 0)))
        return aligned_distance(f[:b].float(), f[b:].float(), self.search)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = (self.distances(x) - self.mean) / self.std
        maps = upsample_map(z, x.shape[-2:], self.blur_sigma)
        return maps.flatten(1).max(1).values, maps


@dataclass
class ReferenceConfig(DetectorConfig):
    search: int = 1  # registration tolerance, in patches (stride 8 px at the backbone's finest level)
    blur_sigma: float = 4.0
    min_std_share: float = 0.1  # a position's std is at least this share of the mean std (few pairs)


@register_detector
class ReferenceDetector(Detector):
    """Compares each image with its paired defect-free reference (module docstring). Fit on
    normal pairs; predicts on pairs. Raises ``InvalidInput`` for inputs that are not pairs."""

    name = "reference"
    Config = ReferenceConfig
    uses_reference = True

    def __init__(self, config: ReferenceConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """Pairs [N, 6, H, W] → checked, each half at ``image_size``, [N, 6, S, S] on the device."""
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or batch.shape[1] != PAIR_CHANNELS:
            shape = list(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise InvalidInput(f"reference: expected image/reference pairs [N, 6, H, W], got {shape}; every "
                               "image needs its reference image (the `reference` attribute at import)")
        size = self.config.image_size
        return torch.cat([as_model_batch(batch[:, :3], size), as_model_batch(batch[:, 3:], size)], 1).to(self.device)

    def _scorer(self, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> ReferenceScorer:
        return ReferenceScorer(self.extractor, self.mean if mean is None else mean, self.std if std is None else std,
                               self.config.search, self.config.blur_sigma)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Aligned distances [B, h, w] of prepared pairs."""
        z = torch.zeros(1, 1, device=x.device)
        return self._scorer(z, z + 1).distances(x)

    def _fit_embedded(self, embedded: Iterator[torch.Tensor]) -> int:
        total = squares = None
        count = 0
        for d in embedded:
            d = d.to(self.device).double()
            total = d.sum(0) if total is None else total + d.sum(0)
            squares = (d ** 2).sum(0) if squares is None else squares + (d ** 2).sum(0)
            count += d.shape[0]
        if count == 0:
            return 0
        mean = total / count
        var = (squares / count - mean ** 2).clamp_min(0) * count / max(count - 1, 1)
        std = var.sqrt()
        std = std.clamp_min(max(float(std.mean()) * self.config.min_std_share, 1e-6))
        self.mean, self.std = mean.float(), std.float()
        self.info.update(positions=int(mean.numel()), normal_distance_mean=round(float(mean.mean()), 4))
        return count

    def scorer(self, chunked: bool = True) -> ReferenceScorer:
        return self._scorer()

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.cpu(), "std": self.std.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.std = state["mean"].to(self.device), state["std"].to(self.device)
        self.fitted = True
