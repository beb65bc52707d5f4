"""Feature reconstruction (../shared/seeds/004): a small network reconstructs pretrained patch
features of normal images; where it cannot, something is anomalous.

- a global-feature module (GFE) gives every position the image's pooled context;
- feature recombination: the feature map is cut into a K x K grid, shuffled, and the network must
  restore the original arrangement's features — it learns the part's overall structure instead of
  copying its input.
Loss and anomaly map: cosine distance between features and their reconstruction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flawline.models.base import DetectorConfig, TrainedDetector, register_detector
from flawline.models.features import patch_features, upsample_map


class ReconstructionNet(nn.Module):
    def __init__(self, channels: int, hidden: int = 128, bottleneck: int = 64) -> None:
        super().__init__()
        self.encode = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, bottleneck, 3, stride=2, padding=1), nn.BatchNorm2d(bottleneck), nn.ReLU(inplace=True))
        self.global_feature = nn.Sequential(nn.Linear(bottleneck, bottleneck), nn.ReLU(inplace=True),
                                            nn.Linear(bottleneck, bottleneck))
        # The 3x3 decoder runs at the bottleneck's half resolution: 4x cheaper on a CPU.
        self.decode = nn.Sequential(
            nn.Conv2d(2 * bottleneck, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(hidden, channels, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = self.encode(f)
        g = self.global_feature(h.mean((2, 3)))[:, :, None, None].expand_as(h)  # GFE: image context
        h = self.decode(torch.cat((h, g), 1))
        return self.out(F.interpolate(h, size=f.shape[-2:], mode="bilinear", align_corners=False))


def recombine(f: torch.Tensor, grid: int, generator: torch.Generator) -> torch.Tensor:
    """Shuffle the K x K grid cells of each feature map (cells must tile it exactly)."""
    b, c, h, w = f.shape
    ch, cw = h // grid, w // grid
    cells = f[:, :, : ch * grid, : cw * grid].reshape(b, c, grid, ch, grid, cw).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(b, grid * grid, c, ch, cw)
    perm = torch.randperm(grid * grid, generator=generator).to(f.device)
    out = cells[:, perm].reshape(b, grid, grid, c, ch, cw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, ch * grid, cw * grid)
    return out


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(a, b, dim=1)


@dataclass
class ReconstructionConfig(DetectorConfig):
    hidden: int = 128
    bottleneck: int = 64
    grid: int = 4  # recombination grid K
    epochs: int = 12
    lr: float = 1e-3
    blur_sigma: float = 4.0


class ReconstructionScorer(nn.Module):
    def __init__(self, extractor: nn.Module, net: ReconstructionNet, blur_sigma: float) -> None:
        super().__init__()
        self.extractor, self.net, self.blur_sigma = extractor, net, blur_sigma

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = patch_features(self.extractor(x))
        d = cosine_distance(f, self.net(f))  # [B, h, w]
        scores = d.flatten(1).max(1).values
        return scores, upsample_map(d, x.shape[-2:], self.blur_sigma)


@register_detector
class FeatureReconstructionDetector(TrainedDetector):
    name = "reconstruction"
    Config = ReconstructionConfig

    def __init__(self, config: ReconstructionConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.net: ReconstructionNet | None = None

    def scorer(self, chunked: bool = True) -> ReconstructionScorer:
        return ReconstructionScorer(self.extractor, self.net, self.config.blur_sigma)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features [B, d, h, w] in fp16."""
        return patch_features(self.extractor(x)).half()

    def begin_training(self, embedded: torch.Tensor, total: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
        c: ReconstructionConfig = self.config
        self.net = ReconstructionNet(embedded.shape[1], c.hidden, c.bottleneck).to(self.device)
        return self.net

    def training_loss(self, model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cosine distance of the features and of their grid-shuffled copy to their reconstruction
        (one forward over both, as DDP needs)."""
        f = batch.float()
        out = model(torch.cat((f, recombine(f, self.config.grid, generator))))
        plain, shuffled = out[: f.shape[0]], out[f.shape[0]:]
        return cosine_distance(f, plain).mean() + cosine_distance(f, shuffled).mean()

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "channels": int(self.net.out.out_channels)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c: ReconstructionConfig = self.config
        self.net = ReconstructionNet(state["channels"], c.hidden, c.bottleneck).to(self.device)
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.fitted = True
