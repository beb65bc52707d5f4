"""ValidFlow: a normalizing flow on multi-scale pretrained features (Chen et al., ValidFlow,
../shared/seeds/003; the CS-Flow lineage, Rudolph et al., WACV 2022).

The image is seen at three resolutions (1, 1/2, 1/4 of ``image_size``); the backbone's deepest
used map of each forms three feature scales y1..y3 [B, C, h_i, w_i]. The flow maps them jointly to
a standard normal. As published (the defaults):

- ``actnorm``: each scale first goes through ActNorm (a per-channel affine transform, initialised
  from the training features' mean and standard deviation over every worker, then trained).
- ``blocks`` = 6: three pairs of an FA flow and an FB flow. Each is an affine coupling block on
  every scale at once: channels shuffled (a fixed permutation per block), split in halves, each
  half scaled and shifted by a subnet of the other (soft-clamped scale, as CS-Flow).
- FA flow's subnet r1: scales pass in parallel with no cross-scale branch; a depthwise-separable
  hidden convolution (3x3 depthwise + 1x1 pointwise) and, with ``separable_out``, a
  depthwise-separable output convolution.
- FB flow's subnet r2: a 3x3 hidden convolution per scale, then each scale adds every other
  scale's hidden map: coarser ones bilinearly upsampled, finer ones by strided convolution
  (``strided_down``; else average-pool downsampling); ``far_branches`` adds the scale 1<->3
  branches (else neighbouring scales only, as CS-Flow).
- ``cbam``: both subnets end in CBAM attention (Woo et al., ECCV 2018: channel attention from
  average- and max-pooled features through a shared MLP, then spatial attention from a 7x7
  convolution over the channel mean and max).

Anomaly = 0.5 * ||z||^2: averaged over every position of every scale for the image score, per
position of the finest scale (upsampled, blurred) for the map.

Differences from the paper, and why: the backbone is EfficientNet-Lite (offline weights) where
the paper uses EfficientNet-B5, so the feature maps are smaller (8x8, 4x4, 2x2 at 256 px); output
convolutions start at zero (the flow starts as the identity, which keeps the first epochs stable
on CPU-sized runs); 16 epochs by default, where the paper trains 60 on MTD (``epochs``).
Every component can be switched off for the ablation in ``bench/magnetic_tile_bench.py``; with all
of them off and ``blocks=4`` it is the earlier flawline flow (saved models without an
architecture record load as that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flawline.models.base import DetectorConfig, TrainedDetector, register_detector
from flawline.models.features import upsample_map



class CBAM(nn.Module):
    """Convolutional block attention (Woo et al., ECCV 2018) on [B, C, h, w]: channel attention
    (shared MLP over average- and max-pooled features, reduction ``reduction``), then spatial
    attention (7x7 convolution over the channel-wise mean and max)."""

    def __init__(self, channels: int, reduction: int = 8, kernel: int = 7) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = x.mean(dim=(2, 3), keepdim=True)
        peak = x.amax(dim=(2, 3), keepdim=True)
        x = x * torch.sigmoid(self.mlp(avg) + self.mlp(peak))
        pooled = torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), 1)
        return x * torch.sigmoid(self.spatial(pooled))


def _separable(c_in: int, c_out: int) -> nn.Module:
    """Depthwise 3x3 then pointwise 1x1 (Chollet, Xception)."""
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in), nn.Conv2d(c_in, c_out, 1))


def _resize_to(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """``x`` at ``size`` when a strided convolution's output does not match (tiny images, whose
    deepest maps stop shrinking at 1x1)."""
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class Arch:
    """The flow's published components (``FlowConfig`` fields of the same names)."""

    actnorm: bool = True
    cbam: bool = True
    far_branches: bool = True
    strided_down: bool = True
    separable_out: bool = True


ARCH_FIELDS = ("blocks", *(f.name for f in fields(Arch)))  # what a saved flow records of its build
# What a saved flow without an architecture record was built as (flawline before ValidFlow).
LEGACY_ARCH = {"blocks": 4, **{f.name: False for f in fields(Arch)}}


class _Subnet(nn.Module):
    """(s, t) for one half of the channels at every scale, from the other half: ValidFlow's r1
    (``fuse`` False: FA flow) or r2 (``fuse`` True: FB flow)."""

    def __init__(self, c_in: int, c_out: int, hidden: int, fuse: bool, scales: int, arch: Arch) -> None:
        super().__init__()
        self.fuse, self.arch = fuse, arch
        if fuse:
            self.inp = nn.ModuleList(nn.Conv2d(c_in, hidden, 3, padding=1) for _ in range(scales))
            # down[i][j]: scale i's hidden map brought to the coarser scale j > i (strided convolution)
            self.down = nn.ModuleDict({
                f"{i}{j}": nn.Conv2d(hidden, hidden, 3, stride=2 ** (j - i), padding=1)
                for i in range(scales) for j in range(i + 1, scales) if arch.strided_down and self._linked(i, j)})
        else:  # depthwise-separable: fewer parameters, no cross-scale branch
            self.inp = nn.ModuleList(_separable(c_in, hidden) for _ in range(scales))
        if fuse or not arch.separable_out:
            self.out = nn.ModuleList(nn.Conv2d(hidden, c_out, 3, padding=1) for _ in range(scales))
            last = list(self.out)
        else:
            self.out = nn.ModuleList(_separable(hidden, c_out) for _ in range(scales))
            last = [o[1] for o in self.out]
        for conv in last:  # start as the identity transform
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.attention = nn.ModuleList(CBAM(c_out) for _ in range(scales)) if arch.cbam else None

    def _linked(self, i: int, j: int) -> bool:
        return abs(i - j) == 1 or self.arch.far_branches

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        hs = [F.leaky_relu(f(x), 0.1) for f, x in zip(self.inp, xs)]
        if self.fuse:
            fused = []
            for j, h in enumerate(hs):
                total = h
                for i, other in enumerate(hs):
                    if i == j or not self._linked(i, j):
                        continue
                    if i > j:  # coarser: bilinear upsampling
                        total = total + F.interpolate(other, size=h.shape[-2:], mode="bilinear", align_corners=False)
                    elif self.arch.strided_down:  # finer: strided convolution
                        total = total + _resize_to(self.down[f"{i}{j}"](other), h.shape[-2:])
                    else:
                        total = total + F.interpolate(other, size=h.shape[-2:], mode="bilinear", align_corners=False)
                fused.append(total)
            hs = fused
        outs = [f(h) for f, h in zip(self.out, hs)]
        if self.attention is not None:
            outs = [a(o) for a, o in zip(self.attention, outs)]
        return outs


class _Coupling(nn.Module):
    def __init__(self, channels: int, hidden: int, fuse: bool, scales: int, clamp: float, seed: int,
                 arch: Arch) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(channels, generator=g)
        self.register_buffer("perm", perm)
        self.half = channels // 2
        self.clamp = clamp
        rest = channels - self.half
        self.net1 = _Subnet(self.half, 2 * rest, hidden, fuse, scales, arch)
        self.net2 = _Subnet(rest, 2 * self.half, hidden, fuse, scales, arch)

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


class ActNorm(nn.Module):
    """Per-channel affine transform of one scale (Kingma & Dhariwal, Glow): y = (x - bias) * exp(-log_scale);
    log-determinant -sum(log_scale) per position. Initialised from the data by ``initialise``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    @torch.no_grad()
    def initialise(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.bias.copy_(mean.view(1, -1, 1, 1))
        self.log_scale.copy_(std.clamp_min(1e-3).log().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = (x - self.bias) * torch.exp(-self.log_scale)
        logdet = -self.log_scale.sum() * (x.shape[2] * x.shape[3])
        return y, logdet.expand(x.shape[0])


class CrossScaleFlow(nn.Module):
    """ActNorm per scale (``arch.actnorm``), then ``blocks`` coupling blocks alternating FA and FB."""

    def __init__(self, channels: int, blocks: int, hidden: int, scales: int, clamp: float, seed: int,
                 arch: Arch | None = None) -> None:
        super().__init__()
        arch = arch or Arch()
        self.actnorm = nn.ModuleList(ActNorm(channels) for _ in range(scales)) if arch.actnorm else None
        self.blocks = nn.ModuleList(
            _Coupling(channels, hidden, fuse=(i % 2 == 1), scales=scales, clamp=clamp, seed=seed + i, arch=arch)
            for i in range(blocks))

    def forward(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        logdet = torch.zeros(xs[0].shape[0], device=xs[0].device)
        if self.actnorm is not None:
            normed = []
            for norm, x in zip(self.actnorm, xs):
                y, ld = norm(x)
                normed.append(y)
                logdet = logdet + ld
            xs = normed
        for block in self.blocks:
            xs, ld = block(xs)
            logdet = logdet + ld
        return xs, logdet


@dataclass
class FlowConfig(DetectorConfig):
    scales: int = 3  # the image at 1, 1/2, 1/4 of image_size
    blocks: int = 6  # coupling blocks, alternating FA flow / FB flow (the paper: 3 pairs)
    actnorm: bool = True  # ActNorm per scale, initialised from the data (else a fixed per-channel std of scale 1)
    cbam: bool = True  # CBAM attention at the end of both subnets
    far_branches: bool = True  # FB flow also fuses scales 1 <-> 3 (else neighbouring scales only)
    strided_down: bool = True  # FB flow downsamples by strided convolution (else by interpolation)
    separable_out: bool = True  # FA flow's output convolution depthwise-separable (else a full 3x3)
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
        arch = Arch(**{f.name: getattr(c, f.name) for f in fields(Arch)})
        return CrossScaleFlow(channels, c.blocks, c.hidden, c.scales, c.clamp, c.seed, arch).to(self.device)

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
        """A fresh flow started near unit variance: each scale's per-channel mean and standard
        deviation over every worker's images (``total`` sums across workers) initialise its
        ActNorm; without ActNorm, scale 1's standard deviation divides every scale (``norm``)."""
        stats = []
        for f in embedded:
            flat = f.double().transpose(0, 1).flatten(1)  # [C, N*h*w]
            stats += [flat.sum(1), (flat ** 2).sum(1), torch.full_like(flat[:, 0], flat.shape[1])]
        sums = total(torch.stack(stats))
        moments = []
        for i in range(len(embedded)):
            s1, s2, count = sums[3 * i], sums[3 * i + 1], sums[3 * i + 2]
            mean = s1 / count
            std = ((s2 - count * mean ** 2) / (count - 1).clamp_min(1)).clamp_min(0).sqrt()
            moments.append((mean.float().to(self.device), std.float().clamp_min(1e-3).to(self.device)))
        self._dims = sum(f[0].numel() for f in embedded)
        self.flow = self._make_flow(embedded[0].shape[1])
        if self.flow.actnorm is not None:
            self.norm = torch.ones_like(moments[0][1])
            for norm, (mean, std) in zip(self.flow.actnorm, moments):
                norm.initialise(mean, std)
        else:
            self.norm = moments[0][1]
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
        return {"flow": self.flow.state_dict(), "norm": self.norm.cpu(), "channels": int(self.norm.numel()),
                "arch": {k: getattr(self.config, k) for k in ARCH_FIELDS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = replace(self.config, **state.get("arch", LEGACY_ARCH))
        self.norm = state["norm"].to(self.device)
        self.flow = self._make_flow(state["channels"])
        self.flow.load_state_dict(state["flow"])
        self.flow.eval()
        self.fitted = True
