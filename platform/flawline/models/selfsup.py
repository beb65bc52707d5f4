"""Self-supervised detector trained on synthetic defects (DRAEM / NDP-Net's artificial defects,
../shared/seeds/002): normal images get CutPaste patches or Perlin blobs of foreign texture
(``flawline.data.synthetic``), and a segmentation head on frozen pretrained features learns to
outline them. Its output is a defect-probability mask per pixel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flawline.data.synthetic import SyntheticDefects
from flawline.models.base import DetectorConfig, TrainedDetector, register_detector
from flawline.models.features import patch_features, upsample_map


class SegmentationHead(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f).squeeze(1)  # logits [B, h, w]


@dataclass
class SelfSupervisedConfig(DetectorConfig):
    hidden: int = 64
    epochs: int = 4
    lr: float = 1e-3
    cutpaste_prob: float = 0.5
    defect_fraction: float = 0.5  # share of each training batch that gets a synthetic defect
    pos_weight: float = 4.0
    blur_sigma: float = 2.0


class SelfSupervisedScorer(nn.Module):
    def __init__(self, extractor: nn.Module, head: SegmentationHead, blur_sigma: float) -> None:
        super().__init__()
        self.extractor, self.head, self.blur_sigma = extractor, head, blur_sigma

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Logits to fp32 first: a bf16 sigmoid near 1 has steps of ~0.004, which ties scores.
        prob = torch.sigmoid(self.head(patch_features(self.extractor(x))).float())
        maps = upsample_map(prob, x.shape[-2:], self.blur_sigma)
        return maps.flatten(1).max(1).values, maps


@register_detector
class SelfSupervisedDetector(TrainedDetector):
    name = "selfsup"
    Config = SelfSupervisedConfig

    def __init__(self, config: SelfSupervisedConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.head: SegmentationHead | None = None

    def scorer(self, chunked: bool = True) -> SelfSupervisedScorer:
        return SelfSupervisedScorer(self.extractor, self.head, self.config.blur_sigma)

    # Synthetic defects change pixels, so features are recomputed each step: embed() keeps the
    # default (the prepared images themselves).
    def begin_training(self, embedded: torch.Tensor, total: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
        c: SelfSupervisedConfig = self.config
        with torch.no_grad():
            channels = patch_features(self.extractor(embedded[:1].float().to(self.device))).shape[1]
        self.head = SegmentationHead(channels, c.hidden).to(self.device)
        self._synth = SyntheticDefects(cutpaste_prob=c.cutpaste_prob)
        return self.head

    def training_loss(self, model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Binary cross-entropy of the head's map against the synthetic defects' masks (the
        ``defect_fraction`` share of the batch gets one)."""
        c: SelfSupervisedConfig = self.config
        x = batch.float().cpu()
        k = max(1, round(c.defect_fraction * x.shape[0]))
        bad, masks = self._synth(x[:k], generator)
        x = torch.cat((bad, x[k:])).to(self.device)
        target = torch.cat((masks.float(), torch.zeros(x.shape[0] - k, *masks.shape[1:]))).to(self.device)
        with torch.no_grad():
            f = patch_features(self.extractor(x))
        logits = model(f)
        target = F.adaptive_avg_pool2d(target.unsqueeze(1), logits.shape[-2:]).squeeze(1)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(c.pos_weight,
                                                                                            device=self.device))

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "channels": int(self.head.net[0].in_channels)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head = SegmentationHead(state["channels"], self.config.hidden).to(self.device)
        self.head.load_state_dict(state["head"])
        self.head.eval()
        self.fitted = True
