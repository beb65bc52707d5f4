"""Image classifier over defect classes, trained from labels (``flawline.train``: supervised,
few-shot, semi- and weakly-supervised settings).

A fine-tuned timm encoder; a 1x1 convolution scores every class at every position of the last two
feature maps and global average pooling turns those maps into image logits. Pooling after the
linear layer equals pooling before it, so the per-position logits are exactly the class activation
maps (CAM, Zhou et al. 2016): the same forward pass gives the image verdict and the defect map that
weak supervision localises with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flawline.models.backbones import FeatureExtractor
from flawline.models.base import DetectorConfig, register_detector
from flawline.models.features import upsample_map
from flawline.models.labelled import LabelTrainedDetector

NORMAL = "normal"


def deep_features(maps: list[torch.Tensor]) -> torch.Tensor:
    """The last two pyramid levels at the finer one's resolution (stride 16): CAMs at stride 32
    are too coarse for small defects."""
    fine, coarse = maps[-2], maps[-1]
    return torch.cat((fine, F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)), 1)


class ClassifierNet(nn.Module):
    def __init__(self, encoder: FeatureExtractor, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = encoder
        channels = sum(encoder.channels[-2:])
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [B, 3, S, S] in [0, 1] → image logits [B, K] and class maps [B, K, h, w]."""
        cams = self.head(self.dropout(deep_features(self.encoder(x))))
        return cams.mean((2, 3)), cams


class ClassifierScorer(nn.Module):
    """Score = probability of any defect class; map = per-position defect probability (CAM)."""

    def __init__(self, net: ClassifierNet, blur_sigma: float) -> None:
        super().__init__()
        self.net, self.blur_sigma = net, blur_sigma

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cams = self.net(x)
        scores = 1.0 - logits.float().softmax(1)[:, 0]
        maps = upsample_map(1.0 - cams.float().softmax(1)[:, 0], x.shape[-2:], self.blur_sigma)
        return scores, maps


@dataclass
class ClassifierConfig(DetectorConfig):
    image_size: int = 224
    classes: list[str] = field(default_factory=lambda: [NORMAL, "defect"])  # index 0 is always normal
    dropout: float = 0.2
    freeze_blocks: int = 2  # stem + this many encoder stages stay at their ImageNet weights
    # Supervised setting: inverse-frequency class weights in the loss (rare defects count more).
    # False: plain cross-entropy, whose p(defect) estimates the real posterior, so the runner's
    # fallback verdict p >= 0.5 (no validation split to calibrate on) is the accuracy-optimal one.
    class_weighted: bool = True
    blur_sigma: float = 4.0


@register_detector
class ClassifierDetector(LabelTrainedDetector):
    """Learns from labelled images (``flawline train --setting supervised`` and friends)."""
    no_tiling = "it learns one verdict per image and a tile's verdict is unknown; the segmenter tiles"

    name = "classifier"
    Config = ClassifierConfig

    def __init__(self, config: ClassifierConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        c: ClassifierConfig = self.config
        if not c.classes or c.classes[0] != NORMAL or len(c.classes) < 2:
            from flawline.errors import ConfigError

            raise ConfigError(f"classifier classes must start with {NORMAL!r} and name at least one defect class")

    def build_net(self, encoder: FeatureExtractor) -> ClassifierNet:
        return ClassifierNet(encoder, len(self.config.classes), self.config.dropout)

    def class_index(self, defect_class: str | None, defective: bool) -> int:
        """Target index for a label: 0 for normal; a defect's own class, else the first defect class."""
        if not defective:
            return 0
        classes = self.config.classes
        return classes.index(defect_class) if defect_class in classes[1:] else 1

    def scorer(self, chunked: bool = True) -> ClassifierScorer:
        return ClassifierScorer(self.net.eval(), self.config.blur_sigma)
