"""Feature reconstruction (FRAD, ../shared/seeds/004): a convolutional autoencoder reconstructs
pretrained patch features of normal images; where it cannot, something is anomalous.

As published (the defaults, ``arch="paper"``):

- Encoder: three modules of three ResNet bottleneck layers each (1x1 reduce, 3x3, 1x1 restore,
  residual); the second and third modules start with a stride-2 layer. The decoder mirrors it:
  its upsampling layers put a stride-2 2x2 transposed convolution in place of the 3x3, and every
  decoder module takes the encoder's map of its resolution through a skip connection
  (concatenated, fused by a 1x1 convolution).
- Global feature extraction (GFE), at the bottleneck: the map [C, H, W] is cut into a K x K grid;
  each region's mean feature r_k [C] is compressed by a fully connected layer to C / K^2; the
  K^2 compressed vectors, flattened, form a global vector g [C], repeated over H x W and
  concatenated to the map.
- Feature recombination: the K x K grid cells of the input features are shuffled, and the network
  must reconstruct the original features from the shuffled ones as well.
- Loss: L_rec + lambda * L_ssl, the mean cosine distance of the features to the reconstruction of
  themselves and of their shuffled copy (lambda = ``ssl_weight`` = 0.1). Anomaly map: the cosine
  distance per position; image score: its maximum.

Differences from the paper, and why: the features are flawline's patch features (EfficientNet-Lite
blocks 2 and 3, 3x3 average-pooled; offline weights) where the paper uses WideResNet-50's layers 2
and 3; where the map does not split into whole K x K regions (small images) GFE interpolates
the region means; 12 epochs by
default where the paper trains 100 (``epochs``). ``arch="compact"`` is the earlier flawline
network (one 1x1 and one strided 3x3 convolution, a global mean through a 2-layer MLP, no skip
connections); models saved before ``arch`` existed load as it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flawline.errors import ConfigError
from flawline.models.base import DetectorConfig, TrainedDetector, register_detector
from flawline.models.features import patch_features, upsample_map

ARCHS = ("paper", "compact")


class CompactReconstructionNet(nn.Module):
    """The earlier flawline network (``arch="compact"``): 1x1 and strided 3x3 encoder, global mean
    through an MLP as context, one 3x3 decoder at half resolution."""

    def __init__(self, channels: int, hidden: int = 128, bottleneck: int = 64) -> None:
        super().__init__()
        self.encode = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, bottleneck, 3, stride=2, padding=1), nn.BatchNorm2d(bottleneck), nn.ReLU(inplace=True))
        self.global_feature = nn.Sequential(nn.Linear(bottleneck, bottleneck), nn.ReLU(inplace=True),
                                            nn.Linear(bottleneck, bottleneck))
        self.decode = nn.Sequential(
            nn.Conv2d(2 * bottleneck, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(hidden, channels, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = self.encode(f)
        g = self.global_feature(h.mean((2, 3)))[:, :, None, None].expand_as(h)
        h = self.decode(torch.cat((h, g), 1))
        return self.out(F.interpolate(h, size=f.shape[-2:], mode="bilinear", align_corners=False))


class Bottleneck(nn.Module):
    """ResNet bottleneck layer [B, c_in, h, w] -> [B, c_out, h', w']: 1x1 to ``mid``, then a 3x3
    (``stride`` 2: half size) or a stride-2 2x2 transposed convolution (``up``: double size), 1x1 to
    ``c_out``, plus the input (projected by a 1x1 convolution where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, mid: int, stride: int = 1, up: bool = False) -> None:
        super().__init__()
        middle = (nn.ConvTranspose2d(mid, mid, 2, stride=2) if up
                  else nn.Conv2d(mid, mid, 3, stride=stride, padding=1))
        self.body = nn.Sequential(
            nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            middle, nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        if up:
            self.short = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 1))
        elif stride != 1 or c_in != c_out:
            self.short = nn.Conv2d(c_in, c_out, 1, stride=stride)
        else:
            self.short = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


class GlobalFeature(nn.Module):
    """GFE: [B, C, H, W] -> the global vector g [B, C] repeated over H x W and concatenated:
    [B, 2C, H, W]. Each of the K x K grid regions' mean feature [C] is compressed to C // K^2 by a
    shared fully connected layer (the remainder of C padded with zeros)."""

    def __init__(self, channels: int, grid: int) -> None:
        super().__init__()
        self.grid, self.channels = grid, channels
        self.fc = nn.Linear(channels, max(1, channels // (grid * grid)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h, w = t.shape[-2:]
        if h % self.grid == 0 and w % self.grid == 0:  # r_k: the mean of each region, [B, C, K, K]
            regions = F.avg_pool2d(t, (h // self.grid, w // self.grid))
        else:  # regions not a whole number of positions (small maps): interpolated
            regions = F.interpolate(t, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        compact = self.fc(regions.flatten(2).transpose(1, 2))  # [B, K*K, C/K^2]
        g = compact.flatten(1)  # [B, K*K * C/K^2]
        if g.shape[1] < self.channels:
            g = F.pad(g, (0, self.channels - g.shape[1]))
        g = g[:, : self.channels, None, None].expand(-1, -1, t.shape[2], t.shape[3])
        return torch.cat((t, g), 1)


class ReconstructionNet(nn.Module):
    """FRAD's autoencoder (module docstring): features [B, C, h, w] -> their reconstruction, same shape."""

    def __init__(self, channels: int, hidden: int = 128, bottleneck: int = 64, grid: int = 4,
                 global_feature: bool = True) -> None:
        super().__init__()
        widths = (hidden, hidden, hidden)
        mid = bottleneck
        self.stem = nn.Conv2d(channels, widths[0], 1)
        self.encoder = nn.ModuleList()
        for i, w in enumerate(widths):
            c_in = widths[max(i - 1, 0)]
            self.encoder.append(nn.Sequential(Bottleneck(c_in, w, mid, stride=1 if i == 0 else 2),
                                              Bottleneck(w, w, mid), Bottleneck(w, w, mid)))
        self.gfe = GlobalFeature(widths[-1], grid) if global_feature else None
        self.fuse_bottom = nn.Conv2d(2 * widths[-1] if global_feature else widths[-1], widths[-1], 1)
        self.decoder = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for i in reversed(range(len(widths))):  # mirror: the deepest module first
            w = widths[i]
            if i > 0:  # ends by doubling the size back to the encoder module above
                self.decoder.append(nn.Sequential(Bottleneck(w, w, mid), Bottleneck(w, w, mid),
                                                  Bottleneck(w, widths[i - 1], mid, up=True)))
                self.fuse.append(nn.Conv2d(2 * widths[i - 1], widths[i - 1], 1))
            else:
                self.decoder.append(nn.Sequential(Bottleneck(w, w, mid), Bottleneck(w, w, mid), Bottleneck(w, w, mid)))
        self.out = nn.Conv2d(widths[0], channels, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = self.stem(f)
        skips = []
        for module in self.encoder:
            h = module(h)
            skips.append(h)
        if self.gfe is not None:
            h = self.gfe(h)
        h = self.fuse_bottom(h)
        fuse = iter(self.fuse)
        for k, module in enumerate(self.decoder):
            h = module(h)
            level = len(skips) - 2 - k  # the encoder module this output's size matches
            if level >= 0:
                skip = skips[level]
                if h.shape[-2:] != skip.shape[-2:]:  # odd sizes: the transposed convolution overshoots
                    h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
                h = next(fuse)(torch.cat((h, skip), 1))
        return self.out(h)


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
    arch: str = "paper"  # "paper" (FRAD's autoencoder) or "compact" (the earlier, smaller network)
    hidden: int = 128  # channels of every encoder and decoder module
    bottleneck: int = 64  # the bottleneck layers' reduced width (compact: the code's width)
    grid: int = 4  # K: the GFE grid and the recombination grid
    global_feature: bool = True  # GFE at the bottleneck (paper network only)
    ssl_weight: float = 0.1  # lambda: the weight of the recombined features' loss (0: no recombination)
    epochs: int = 12
    lr: float = 1e-3
    blur_sigma: float = 4.0


class ReconstructionScorer(nn.Module):
    def __init__(self, extractor: nn.Module, net: nn.Module, blur_sigma: float) -> None:
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
        if self.config.arch not in ARCHS:
            raise ConfigError(f"reconstruction: arch {self.config.arch!r} must be one of {', '.join(ARCHS)}")
        if self.config.ssl_weight < 0:
            raise ConfigError("reconstruction: ssl_weight must be >= 0")
        self.net: nn.Module | None = None

    def _make_net(self, channels: int) -> nn.Module:
        c: ReconstructionConfig = self.config
        if c.arch == "compact":
            return CompactReconstructionNet(channels, c.hidden, c.bottleneck).to(self.device)
        return ReconstructionNet(channels, c.hidden, c.bottleneck, c.grid, c.global_feature).to(self.device)

    def scorer(self, chunked: bool = True) -> ReconstructionScorer:
        return ReconstructionScorer(self.extractor, self.net, self.config.blur_sigma)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features [B, d, h, w] in fp16."""
        return patch_features(self.extractor(x)).half()

    def begin_training(self, embedded: torch.Tensor, total: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
        self.net = self._make_net(embedded.shape[1])
        return self.net

    def training_loss(self, model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """L_rec + lambda * L_ssl: the mean cosine distance of the features to their reconstruction
        and to the reconstruction of their grid-shuffled copy (one forward over both, as DDP needs)."""
        c: ReconstructionConfig = self.config
        f = batch.float()
        if c.ssl_weight == 0:
            return cosine_distance(f, model(f)).mean()
        out = model(torch.cat((f, recombine(f, c.grid, generator))))
        plain, shuffled = out[: f.shape[0]], out[f.shape[0]:]
        return cosine_distance(f, plain).mean() + c.ssl_weight * cosine_distance(f, shuffled).mean()

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "channels": int(self.net.out.out_channels), "arch": self.config.arch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Saved before ``arch`` existed: the compact network, with the loss weight it was trained with.
        arch = state.get("arch", "compact")
        self.config = replace(self.config, arch=arch, **({} if "arch" in state else {"ssl_weight": 1.0}))
        self.net = self._make_net(state["channels"])
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.fitted = True
