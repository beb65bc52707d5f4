"""Defect segmentation from masks (supervised) or from coarse boxes/ellipses (weakly supervised):
a U-Net-style decoder on a fine-tuned timm encoder's feature pyramid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flawline.models.backbones import FeatureExtractor
from flawline.models.base import DetectorConfig, register_detector
from flawline.models.features import upsample_map
from flawline.models.labelled import LabelTrainedDetector


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
class SegmenterDetector(LabelTrainedDetector):
    """Learns from masks (``--setting supervised``) or boxes/ellipses (``--setting weakly``)."""

    name = "segmenter"
    Config = SegmenterConfig

    def build_net(self, encoder: FeatureExtractor) -> SegmenterNet:
        return SegmenterNet(encoder, self.config.width)

    def scorer(self, chunked: bool = True) -> SegmenterScorer:
        return SegmenterScorer(self.net.eval(), self.config.blur_sigma, self.config.top_fraction)
