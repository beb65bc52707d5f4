"""PaDiM-style detector: one Gaussian per feature-map position over a random subset of channels;
anomaly = Mahalanobis distance (Defard et al., 2020)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flawline.models.base import Detector, DetectorConfig, register_detector
from flawline.models.features import patch_features, upsample_map


class PaDiMScorer(nn.Module):
    """Images → (scores, maps): the whole prediction path as one module (exported as is)."""

    def __init__(self, extractor: nn.Module, channel_idx: torch.Tensor, mean: torch.Tensor,
                 inv_cov: torch.Tensor, blur_sigma: float) -> None:
        super().__init__()
        self.extractor = extractor
        self.register_buffer("channel_idx", channel_idx)
        self.register_buffer("mean", mean)
        self.register_buffer("inv_cov", inv_cov)
        self.blur_sigma = blur_sigma

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps, _ = self.forward_features(x)
        return scores, maps

    def patch_distances(self, f: torch.Tensor) -> torch.Tensor:
        """Selected-channel features [B, d, h, w] → Mahalanobis distance per position [B, h, w]."""
        b, d, h, w = f.shape
        diff = f.permute(2, 3, 0, 1).reshape(h * w, b, d) - self.mean.unsqueeze(1)  # [P, B, d]
        m2 = (torch.bmm(diff, self.inv_cov) * diff).sum(-1).clamp_min(0)  # [P, B] squared Mahalanobis
        return m2.sqrt().T.reshape(b, h, w)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Scores [B], maps [B, S, S] and the backbone's feature maps they came from."""
        feats = self.extractor(x)
        patch_maps = self.patch_distances(patch_features(feats, pool=1).index_select(1, self.channel_idx))
        scores = patch_maps.flatten(1).max(1).values
        return scores, upsample_map(patch_maps, x.shape[-2:], self.blur_sigma), feats


@dataclass
class PaDiMConfig(DetectorConfig):
    channels: int = 100  # random channel subset (the paper's dimensionality reduction)
    regularisation: float = 0.01  # added to the covariance diagonal
    blur_sigma: float = 4.0


@register_detector
class PaDiMDetector(Detector):
    name = "padim"
    Config = PaDiMConfig

    def __init__(self, config: PaDiMConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.channel_idx: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None  # [P, d]
        self.inv_cov: torch.Tensor | None = None  # [P, d, d]

    def _pick_channels(self, width: int) -> None:
        """The random channel subset: from the seed and the feature width only, so every process
        embedding for this config picks the same one."""
        gen = torch.Generator().manual_seed(self.config.seed)
        n = min(self.config.channels, width)
        self.channel_idx = torch.randperm(width, generator=gen)[:n].sort().values.to(self.device)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The selected channels of the patch features [B, d, h, w]."""
        f = patch_features(self.extractor(x), pool=1)
        if self.channel_idx is None:
            self._pick_channels(f.shape[1])
        return f[:, self.channel_idx]

    def _fit_embedded(self, embedded: Iterator[torch.Tensor]) -> int:
        count, total, outer = 0, None, None
        for f in embedded:
            f = f.to(self.device).double()  # [B, d, h, w]
            b, d, h, w = f.shape
            v = f.permute(2, 3, 0, 1).reshape(h * w, b, d)  # [P, B, d]
            if total is None:
                total = torch.zeros(h * w, d, dtype=torch.float64, device=f.device)
                outer = torch.zeros(h * w, d, d, dtype=torch.float64, device=f.device)
            total += v.sum(1)
            outer += torch.einsum("pbi,pbj->pij", v, v)  # streamed: memory does not grow with N
            count += b
        if count == 0:
            return 0
        if self.channel_idx is None:  # embedded in other processes
            self._pick_channels(sum(self.extractor.channels))
        mean = total / count
        cov = (outer - count * torch.einsum("pi,pj->pij", mean, mean)) / max(count - 1, 1)
        cov += self.config.regularisation * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        self.mean = mean.float()
        self.inv_cov = torch.linalg.inv(cov).float()
        self.info.update(positions=int(mean.shape[0]), channels=int(mean.shape[1]))
        return count

    @torch.no_grad()
    def score_embedded(self, embedded: torch.Tensor) -> torch.Tensor:
        return self.scorer().patch_distances(embedded.to(self.device).float()).flatten(1).max(1).values

    def scorer(self, chunked: bool = True) -> PaDiMScorer:
        return PaDiMScorer(self.extractor, self.channel_idx, self.mean, self.inv_cov, self.config.blur_sigma)

    def state_dict(self) -> dict[str, Any]:
        return {"channel_idx": self.channel_idx.cpu(), "mean": self.mean.cpu(), "inv_cov": self.inv_cov.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.channel_idx = state["channel_idx"].to(self.device)
        self.mean = state["mean"].to(self.device)
        self.inv_cov = state["inv_cov"].to(self.device)
        self.fitted = True
