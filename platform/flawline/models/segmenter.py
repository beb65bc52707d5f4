"""Defect segmentation from masks (supervised) or from coarse boxes/ellipses (weakly supervised):
a U-Net-style decoder on a fine-tuned timm encoder's feature pyramid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flawline.errors import ConfigError
from flawline.models.backbones import FeatureExtractor, build_feature_extractor
from flawline.models.base import Detector, DetectorConfig, register_detector
from flawline.models.features import upsample_map


class UpBlock(nn.Module):
    """Upsample the coarser map, concatenate the skip connection, two 3x3 convolutions."""

    def __init__(self, coarse: int, skip: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(coarse + skip, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
            nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True))

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(coarse, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.net(torch.cat((up, skip), 1))


class SegmenterNet(nn.Module):
    def __init__(self, encoder: FeatureExtractor, width: int = 32) -> None:
        super().__init__()
        self.encoder = encoder
        channels = encoder.channels  # strides 4, 8, 16, 32 for layers (1, 2, 3, 4)
        widths = [width * 2 ** i for i in range(len(channels) - 1)]  # 32, 64, 128 at strides 4, 8, 16
        ups, coarse = [], channels[-1]
        for skip, out in zip(reversed(channels[:-1]), reversed(widths)):
            ups.append(UpBlock(coarse, skip, out))
            coarse = out
        self.ups = nn.ModuleList(ups)
        self.out = nn.Conv2d(coarse, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, 3, S, S] → defect logits [B, S/4, S/4]."""
        maps = self.encoder(x)
        y = maps[-1]
        for up, skip in zip(self.ups, reversed(maps[:-1])):
            y = up(y, skip)
        return self.out(y).squeeze(1)


class SegmenterScorer(nn.Module):
    """Map = defect probability per pixel; score = mean of the map's top ``top_fraction`` pixels
    (steadier than the single maximum)."""

    def __init__(self, net: SegmenterNet, blur_sigma: float, top_fraction: float) -> None:
        super().__init__()
        self.net, self.blur_sigma, self.top_fraction = net, blur_sigma, top_fraction

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = upsample_map(torch.sigmoid(self.net(x).float()), x.shape[-2:], self.blur_sigma)
        k = max(1, int(self.top_fraction * maps.shape[-1] * maps.shape[-2]))
        return maps.flatten(1).topk(k, dim=1).values.mean(1), maps


@dataclass
class SegmenterConfig(DetectorConfig):
    width: int = 32
    freeze_blocks: int = 1
    blur_sigma: float = 1.0
    top_fraction: float = 0.001


@register_detector
class SegmenterDetector(Detector):
    """Learns from masks (``--setting supervised``) or boxes/ellipses (``--setting weakly``)."""

    name = "segmenter"
    Config = SegmenterConfig
    learns_from_labels = True

    def __init__(self, config: SegmenterConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._net: SegmenterNet | None = None

    @property
    def net(self) -> SegmenterNet:
        if self._net is None:
            c: SegmenterConfig = self.config
            encoder = build_feature_extractor(c.backbone, c.weights, layers=(1, 2, 3, 4), trainable=True)
            encoder.freeze_stem(c.freeze_blocks)
            self._net = SegmenterNet(encoder, c.width).to(self.device).eval()
        return self._net

    def scorer(self, chunked: bool = True) -> SegmenterScorer:
        return SegmenterScorer(self.net.eval(), self.config.blur_sigma, self.config.top_fraction)

    def state_dict(self) -> dict[str, Any]:
        return {"net": {k: v.cpu() for k, v in self.net.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.fitted = True

    def _fit_embedded(self, embedded) -> int:  # noqa: ANN001
        raise ConfigError(f"{self.name} learns from labels: train it with `flawline train submit --setting ...`")
