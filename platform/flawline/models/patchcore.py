"""PatchCore-style detector: a memory bank of normal patch features, thinned by greedy k-center
coreset selection; anomaly = distance to the nearest bank entry (Roth et al., 2022)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flawline.errors import InvalidInput
from flawline.models.base import Detector, DetectorConfig, register_detector
from flawline.models.features import patch_features, upsample_map
from flawline.models.neighbors import nearest_distances, select_k_center


class PatchCoreScorer(nn.Module):
    """Images → (scores, maps) for a fitted bank: the whole prediction path as one module, so the
    ONNX export runs exactly this code. ``chunk=None`` searches in one block (export)."""

    def __init__(self, extractor: nn.Module, bank: torch.Tensor, blur_sigma: float, chunk: int | None) -> None:
        super().__init__()
        self.extractor = extractor
        self.register_buffer("bank", bank)
        self.blur_sigma = blur_sigma
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps, _ = self.forward_features(x)
        return scores, maps

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Scores [B], maps [B, S, S] and the backbone's feature maps they came from (so a head
        on top, e.g. ``mixed``, needs no second backbone pass)."""
        feats = self.extractor(x)
        f = patch_features(feats)
        b, c, h, w = f.shape
        q = f.permute(0, 2, 3, 1).reshape(-1, c)
        d = nearest_distances(q, self.bank, 1, self.chunk or q.shape[0])
        patch_maps = d.reshape(b, h, w)
        scores = patch_maps.flatten(1).max(1).values
        return scores, upsample_map(patch_maps, x.shape[-2:], self.blur_sigma), feats


@dataclass
class PatchCoreConfig(DetectorConfig):
    coreset_ratio: float = 0.01  # fraction of training patches kept in the bank
    projection_dim: int = 128  # coreset distances in a random projection of this size
    coreset_chunk: int = 65_536  # greedy selection works on chunks of at most this many patches
    search_chunk: int = 1024  # query patches per distance block at predict time
    blur_sigma: float = 4.0


@register_detector
class PatchCoreDetector(Detector):
    name = "patchcore"
    Config = PatchCoreConfig

    def __init__(self, config: PatchCoreConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.bank: torch.Tensor | None = None
        self.feature_hw: tuple[int, int] | None = None
        self._scorer: PatchCoreScorer | None = None

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features [B, d, h, w]."""
        return patch_features(self.extractor(x))

    def _fit_embedded(self, embedded: Iterator[torch.Tensor]) -> int:
        cfg: PatchCoreConfig = self.config
        if not 0.0 < cfg.coreset_ratio <= 1.0:
            raise InvalidInput(f"coreset_ratio {cfg.coreset_ratio} must lie in (0, 1]")
        started = time.perf_counter()
        parts, count = [], 0
        for f in embedded:
            self.feature_hw = tuple(f.shape[-2:])
            parts.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu())
            count += f.shape[0]
        if count == 0:
            return 0
        feats = torch.cat(parts)
        del parts
        extract_s = time.perf_counter() - started
        k = max(1, round(cfg.coreset_ratio * feats.shape[0]))
        idx = select_k_center(feats.to(self.device), k, projection_dim=cfg.projection_dim,
                              chunk_size=cfg.coreset_chunk, seed=cfg.seed)
        self.bank = feats[idx.cpu()].to(self.device).contiguous()
        self._scorer = None
        self.info.update(patches=int(feats.shape[0]), bank=int(self.bank.shape[0]),
                         extract_seconds=round(extract_s, 2),
                         coreset_seconds=round(time.perf_counter() - started - extract_s, 2))
        return count

    @torch.no_grad()
    def score_embedded(self, embedded: torch.Tensor) -> torch.Tensor:
        f = embedded.to(self.device).float()
        q = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        d = nearest_distances(q, self.bank, 1, self.config.search_chunk)
        return d.reshape(f.shape[0], -1).max(1).values

    def scorer(self, chunked: bool = True) -> PatchCoreScorer:
        return PatchCoreScorer(self.extractor, self.bank, self.config.blur_sigma,
                               self.config.search_chunk if chunked else None)

    def _predict_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scorer is None:
            self._scorer = self.scorer()
        return self._scorer(x)

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.cpu(), "feature_hw": list(self.feature_hw or ())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank = state["bank"].to(self.device)
        self.feature_hw = tuple(state["feature_hw"])
        self._scorer = None
        self.fitted = True
