"""Normalizing flow on multi-scale features (CS-Flow / ValidFlow lineage, ../shared/seeds/003).

The image is seen at three resolutions; the backbone's deepest used map of each forms three
feature scales. Stacked affine coupling blocks map them jointly to a standard normal: blocks
alternate between scale-parallel subnets with depthwise-separable convolutions (ValidFlow's
"FA flow") and subnets that fuse neighbouring scales by up/down-sampling ("FB flow").
Anomaly = 0.5 * ||z||^2: averaged over everything for the image score, per position (finest
scale) for the map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flawline.models.base import DetectorConfig, TrainedDetector, register_detector
from flawline.models.features import upsample_map


class _Subnet(nn.Module):
    """(s, t) for one half of the channels at every scale, from the other half."""

    def __init__(self, c_in: int, c_out: int, hidden: int, fuse: bool, scales: int) -> None:
        super().__init__()
        self.fuse = fuse
        if fuse:
            self.inp = nn.ModuleList(nn.Conv2d(c_in, hidden, 3, padding=1) for _ in range(scales))
        else:  # depthwise-separable: fewer parameters, no cross-scale branch
            self.inp = nn.ModuleList(nn.Sequential(nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in),
                                                   nn.Conv2d(c_in, hidden, 1)) for _ in range(scales))
        self.out = nn.ModuleList(nn.Conv2d(hidden, c_out, 3, padding=1) for _ in range(scales))
        for conv in self.out:  # start as the identity transform
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        hs = [F.leaky_relu(f(x), 0.1) for f, x in zip(self.inp, xs)]
        if self.fuse:
            fused = []
            for i, h in enumerate(hs):
                h = h.clone()
                if i > 0:
                    h = h + F.interpolate(hs[i - 1], size=h.shape[-2:], mode="bilinear", align_corners=False)
                if i + 1 < len(hs):
                    h = h + F.interpolate(hs[i + 1], size=h.shape[-2:], mode="bilinear", align_corners=False)
                fused.append(h)
            hs = fused
        return [f(h) for f, h in zip(self.out, hs)]


class _Coupling(nn.Module):
    def __init__(self, channels: int, hidden: int, fuse: bool, scales: int, clamp: float, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(channels, generator=g)
        self.register_buffer("perm", perm)
        self.half = channels // 2
        self.clamp = clamp
        rest = channels - self.half
        self.net1 = _Subnet(self.half, 2 * rest, hidden, fuse, scales)
        self.net2 = _Subnet(rest, 2 * self.half, hidden, fuse, scales)

    def _affine(self, x: torch.Tensor, st: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = st.chunk(2, 1)
        s = self.clamp * torch.tanh(s / self.clamp)  # soft clamp keeps exp(s) tame
        return x * torch.exp(s) + t, s.flatten(1).sum(1)

    def forward(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        xs = [x.index_select(1, self.perm) for x in xs]
        a = [x[:, : self.half] for x in xs]
        b = [x[:, self.half:] for x in xs]
        logdet = torch.zeros(xs[0].shape[0], device=xs[0].device)
        b2 = []
        for bi, st in zip(b, self.net1(a)):
            y, ld = self._affine(bi, st)
            b2.append(y)
            logdet = logdet + ld
        a2 = []
        for ai, st in zip(a, self.net2(b2)):
            y, ld = self._affine(ai, st)
            a2.append(y)
            logdet = logdet + ld
        return [torch.cat((p, q), 1) for p, q in zip(a2, b2)], logdet


class CrossScaleFlow(nn.Module):
    def __init__(self, channels: int, blocks: int, hidden: int, scales: int, clamp: float, seed: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            _Coupling(channels, hidden, fuse=(i % 2 == 1), scales=scales, clamp=clamp, seed=seed + i)
            for i in range(blocks))

    def forward(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        logdet = torch.zeros(xs[0].shape[0], device=xs[0].device)
        for block in self.blocks:
            xs, ld = block(xs)
            logdet = logdet + ld
        return xs, logdet


@dataclass
class FlowConfig(DetectorConfig):
    scales: int = 3  # the image at 1, 1/2, 1/4 of image_size
    blocks: int = 4  # coupling blocks (alternating parallel / cross-scale)
    hidden: int = 64
    clamp: float = 3.0
    epochs: int = 16
    lr: float = 2e-4
    weight_decay: float = 1e-5
    blur_sigma: float = 4.0


class FlowScorer(nn.Module):
    def __init__(self, extractor: nn.Module, flow: CrossScaleFlow, scales: int, norm: torch.Tensor,
                 blur_sigma: float) -> None:
        super().__init__()
        self.extractor, self.flow, self.scales, self.blur_sigma = extractor, flow, scales, blur_sigma
        self.register_buffer("norm", norm)  # per-channel feature scale seen in training

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._features(x)[0]

    def _features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(the normalised deepest map at each scale, the backbone's maps at full scale)."""
        out, full = [], []
        for i in range(self.scales):
            xi = x if i == 0 else F.avg_pool2d(x, 2 ** i)  # box-filtered halving (exports to ONNX)
            maps = self.extractor(xi)
            full = full or maps
            out.append(maps[-1] / self.norm.view(1, -1, 1, 1))
        return out, full

    def score(self, zs: list[torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        energy = [0.5 * (z ** 2).sum(1) for z in zs]  # [B, h_i, w_i]
        scores = torch.stack([e.flatten(1).mean(1) for e in energy], 1).mean(1)
        return scores, upsample_map(energy[0], size, self.blur_sigma)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps, _ = self.forward_features(x)
        return scores, maps

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Scores [B], maps [B, S, S] and the backbone's feature maps at full scale."""
        feats, full = self._features(x)
        zs, _ = self.flow(feats)
        return (*self.score(zs, x.shape[-2:]), full)


@register_detector
class FlowDetector(TrainedDetector):
    name = "flow"
    Config = FlowConfig

    def __init__(self, config: FlowConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.flow: CrossScaleFlow | None = None
        self.norm: torch.Tensor | None = None

    def _make_flow(self, channels: int) -> CrossScaleFlow:
        c: FlowConfig = self.config
        return CrossScaleFlow(channels, c.blocks, c.hidden, c.scales, c.clamp, c.seed).to(self.device)

    def scorer(self, chunked: bool = True) -> FlowScorer:
        return FlowScorer(self.extractor, self.flow, self.config.scales, self.norm, self.config.blur_sigma)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The un-normalised features at each scale: ``scales`` tensors [B, C, h_i, w_i]."""
        c: FlowConfig = self.config
        probe = FlowScorer(self.extractor, None, c.scales, torch.ones(1, device=self.device), c.blur_sigma)
        return tuple(probe.features(x))

    def begin_training(self, embedded: tuple[torch.Tensor, ...],
                       total: Callable[[torch.Tensor], torch.Tensor]) -> CrossScaleFlow:
        """Per-channel scale of the finest scale's features over every worker's images (so the flow
        starts near unit variance), then a fresh flow."""
        f0 = embedded[0].double().transpose(0, 1).flatten(1)  # [C, N*h*w]
        sums = total(torch.stack((f0.sum(1), (f0 ** 2).sum(1), torch.full_like(f0[:, 0], f0.shape[1]))))
        mean, count = sums[0] / sums[2], sums[2]
        var = (sums[1] - count * mean ** 2) / (count - 1).clamp_min(1)
        self.norm = var.clamp_min(0).sqrt().float().clamp_min(1e-3).to(self.device)
        self._dims = sum(f[0].numel() for f in embedded)
        self.flow = self._make_flow(embedded[0].shape[1])
        return self.flow

    def training_loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...],
                      generator: torch.Generator) -> torch.Tensor:
        zs, logdet = model([f.float() / self.norm.view(1, -1, 1, 1) for f in batch])
        nll = sum(0.5 * (z ** 2).flatten(1).sum(1) for z in zs) - logdet
        return (nll / self._dims).mean()

    @torch.no_grad()
    def score_embedded(self, embedded: tuple[torch.Tensor, ...]) -> torch.Tensor:
        feats = [f.to(self.device).float() / self.norm.view(1, -1, 1, 1) for f in embedded]
        zs, _ = self.flow(feats)
        return torch.stack([(0.5 * (z ** 2).sum(1)).flatten(1).mean(1) for z in zs], 1).mean(1)

    def state_dict(self) -> dict[str, Any]:
        return {"flow": self.flow.state_dict(), "norm": self.norm.cpu(), "channels": int(self.norm.numel())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norm = state["norm"].to(self.device)
        self.flow = self._make_flow(state["channels"])
        self.flow.load_state_dict(state["flow"])
        self.flow.eval()
        self.fitted = True
