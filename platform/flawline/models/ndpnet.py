"""NDP-Net: normal reference attention and defective feature perception network
(../shared/seeds/002). Self-supervised on artificial defects: an encoder made defect-perceptive,
a fixed defect-free reference image whose features repair the input's, a decoder reconstructing
the normal background, and a segmentation module comparing input and reconstruction.

As published (III-B to III-E), here:

- Artificial defects I_ad = I_o * (1 - I_m) + I_n * I_m, DRAEM-style (``flawline.data.synthetic``:
  Perlin blobs of foreign texture, or CutPaste); a ``defect_fraction`` share of each batch gets one.
- Encoder with pixel-level defect perception: L_def_per = 1/L sum_l mean (N(M(|E_l(I_o) -
  E_l(I_ad)|^2)) - I_m^l)^2, M the channel mean, N a per-image min-max normalisation, I_m^l the mask
  at level l's size (Eq. 2).
- Reference-based attention (RBAM) on every encoder level: the reference features and the input's
  are cut into non-overlapping K x K patches; cosine similarity of each input patch to every
  reference patch, softmax over the reference patches, the repaired patch is the softmax-weighted
  sum of reference patches (RBFRM, Eqs. 3-5), for K = 2 and K = 4. The feature fusion module (FFM,
  SKNet-style, Eqs. 6-8) sums F_ad + F_rep2 + F_rep4, compresses it by an m x m convolution
  (m = 5), three m x m convolutions give per-element logits, softmax over the three, weighted sum.
  Feature repair loss L_fea_rep: MSE of the fused features to the defect-free image's (Eq. 9).
- Decoder: mirrors the encoder; every level's (repaired) features come in through a skip
  connection. Phase 1 feeds it the defect-free image's own features, phase 2 the repaired ones.
- Multi-scale defect segmentation (MSDSM): input and reconstruction go through the encoder, and at
  each of the three levels a small network segments the concatenation; focal loss (gamma 2)
  against the mask at that size (Eq. 10); anomaly map AM = lambda_1 AM_1 + lambda_2 g(AM_2) +
  lambda_3 g(AM_3) (Eq. 11, ``map_weights``), image score its maximum.
- Two training phases (III-E): phase 1 (the first ``phase1_epochs`` of ``epochs``) trains encoder
  and decoder with w_rec L_rec + w_def_per L_def_per; phase 2 (the rest) freezes the encoder and trains
  RBAM, decoder and MSDSM with w_rec L_rec + w_fea_rep L_fea_rep + w_seg L_seg, where L_rec now
  asks the reconstruction of I_ad to be I_o. Adam, weight decay 1e-5, constant rate.

Differences from the paper, and why:

- The encoder's input is flawline's frozen pretrained patch features (EfficientNet-Lite blocks 2
  and 3, stride 8, offline weights), standardised per channel over the training set, and the
  encoder is three trainable levels on them (strides 8, 16 and 32; widths ``width``, 2x, 2x)
  where the paper trains a five-layer image encoder from scratch (RBAM on its three deepest, MSDSM
  on its three first layers). Reason: CPU time: a from-scratch image encoder and decoder do not
  learn in a few CPU epochs (the paper trains 400 + 200 epochs on a V100).
- Consequently the decoder reconstructs the normal background in that feature space (standardised
  patch features), not in pixels, and MSDSM re-encodes the reconstructed features with the frozen
  trainable encoder instead of the reconstructed image. L_rec is the MSE of standardised features;
  the perceptual losses L_per (VGG-16 distances) are dropped: the reconstruction already lives in a
  pretrained network's feature space, which is what L_per measured. The loss weights are all 1
  (``w_rec`` etc.): the paper's w_rec = 100 scaled a pixel MSE in [0, 1], ours is on unit-variance
  features.
- Epochs 2 + 3 and learning rate 1e-3 by default where the paper trains 400 + 200 epochs at 1e-4
  (``epochs``, ``phase1_epochs``, ``lr``); FFM compresses to ``fusion_channels`` = 32 where
  the paper uses 64 (CPU time).
- The reference image: the paper says only "a fixed reference defect-free image"; here it is the
  training image whose spatially pooled standardised features lie closest to the training set's
  mean (a typical normal image), chosen identically on every worker (``choose_reference``).
- Where a level's map is not a whole number of K x K patches (small images), input and reference
  are padded by replication to a multiple of K and the repaired map cropped back.
- MSDSM's scales are the encoder's first three layers, as in the paper, which here are the frozen
  pretrained layer (the standardised features of input and reconstruction, stride 8) and the first
  two trainable levels (strides 8 and 16); RBAM sits on the three trainable levels (the paper: its
  three deepest). ``map_weights`` keep the paper's (0.2, 0.2, 0.6). A smoke check on Magnetic Tile
  (128 px, 96 normals, 50 + 50 test images, the default epochs) gave image ROC-AUC 0.61 with them
  and 0.77 with (0.6, 0.2, 0.2) (the first scale here is the pretrained features); that was
  measured on test images, so it is not the default: choose on data of your own
  (``--option 'map_weights=[0.6, 0.2, 0.2]'``).
- MSDSM outputs one logit per position (sigmoid focal loss) where DRAEM-style networks use two
  softmax channels; the final map is smoothed by flawline's Gaussian (``blur_sigma``) where the
  paper uses 5 x 5 mean and median filters.
- Phase-2 batches mix images with and without an artificial defect (``defect_fraction``), as
  flawline's ``selfsup`` does, so the segmentation also sees whole normal images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flawline.data.synthetic import SyntheticDefects
from flawline.errors import ConfigError
from flawline.models.base import DetectorConfig, TrainedDetector, register_detector
from flawline.models.features import patch_features, upsample_map

PATCH_SIZES = (2, 4)  # K of the two RBFRMs (paper: 2 and 4)
PRIOR = 0.1  # MSDSM's initial defect probability (the last layer's bias)


def conv_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2), nn.ReLU(inplace=True)]


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class Encoder(nn.Module):
    """Standardised patch features [B, C, h, w] -> three levels [B, w_l, h / 2^l, w / 2^l]
    (l = 0, 1, 2): a 1x1 then a 3x3 convolution, then per level a stride-2 and a plain 3x3
    convolution, each followed by a ReLU. No normalisation layers: nothing but its weights changes when it trains, so a
    frozen encoder is exactly frozen."""

    def __init__(self, channels: int, widths: tuple[int, int, int]) -> None:
        super().__init__()
        self.levels = nn.ModuleList([
            nn.Sequential(*conv_relu(channels, widths[0], kernel=1), *conv_relu(widths[0], widths[0])),
            nn.Sequential(*conv_relu(widths[0], widths[1], stride=2), *conv_relu(widths[1], widths[1])),
            nn.Sequential(*conv_relu(widths[1], widths[2], stride=2), *conv_relu(widths[2], widths[2]))])
        for m in self.modules():  # He initialisation: activations keep their scale through the levels
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, f: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for level in self.levels:
            f = level(f)
            out.append(f)
        return out


def repair(f: torch.Tensor, ref: torch.Tensor, k: int, scale: float = 1.0) -> torch.Tensor:
    """RBFRM (Eqs. 3-5): every K x K patch of ``f`` [B, C, H, W] replaced by the softmax-weighted
    sum of the reference's K x K patches (``ref`` [1, C, H, W]), weights softmax(scale * cosine
    similarity). Maps that are not a whole number of patches are padded by replication and the
    result cropped back. Only reshapes and matrix products (exports to ONNX)."""
    _, c, h, w = f.shape
    ph, pw = (-h) % k, (-w) % k
    if ph or pw:
        f = F.pad(f, (0, pw, 0, ph), mode="replicate")
        ref = F.pad(ref, (0, pw, 0, ph), mode="replicate")
    hh, ww = (h + ph) // k, (w + pw) // k

    def patches(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, N, C*K*K]
        return t.reshape(-1, c, hh, k, ww, k).permute(0, 2, 4, 1, 3, 5).reshape(-1, hh * ww, c * k * k)

    p, b = patches(f), patches(ref)[0]  # [B, N, D], [N, D]
    sim = F.normalize(p, dim=-1, eps=1e-6) @ F.normalize(b, dim=-1, eps=1e-6).t()  # [B, N, N]
    out = torch.softmax(scale * sim, dim=-1) @ b  # [B, N, D]
    out = out.reshape(-1, hh, ww, c, k, k).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, hh * k, ww * k)
    return out[:, :, :h, :w]


class FeatureFusion(nn.Module):
    """FFM (Eqs. 6-8): F_U = F_ad + F_rep2 + F_rep4, an m x m convolution to ``hidden`` channels,
    three m x m convolutions to per-element logits, softmax over the three, weighted sum. Inputs
    and output [B, C, H, W]."""

    def __init__(self, channels: int, hidden: int, kernel: int = 5) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(*conv_bn_relu(channels, hidden, kernel))
        self.attend = nn.ModuleList([nn.Conv2d(hidden, channels, kernel, padding=kernel // 2) for _ in range(3)])

    def forward(self, f_ad: torch.Tensor, f_rep2: torch.Tensor, f_rep4: torch.Tensor) -> torch.Tensor:
        u = self.squeeze(f_ad + f_rep2 + f_rep4)
        a = torch.softmax(torch.stack([conv(u) for conv in self.attend]), dim=0)  # [3, B, C, H, W]
        return a[0] * f_ad + a[1] * f_rep2 + a[2] * f_rep4


class Decoder(nn.Module):
    """Three levels of (repaired) features -> reconstructed standardised patch features
    [B, channels, h, w]: from the deepest level up, each step upsamples to the next level's size,
    concatenates it (skip connection) and convolves."""

    def __init__(self, channels: int, widths: tuple[int, int, int]) -> None:
        super().__init__()
        self.bottom = nn.Sequential(*conv_bn_relu(widths[2], widths[2]))
        self.up = nn.ModuleList([nn.Sequential(*conv_bn_relu(widths[2] + widths[1], widths[1])),
                                 nn.Sequential(*conv_bn_relu(widths[1] + widths[0], widths[0]))])
        self.out = nn.Conv2d(widths[0], channels, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        h = self.bottom(levels[2])
        for conv, skip in zip(self.up, (levels[1], levels[0])):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = conv(torch.cat((h, skip), 1))
        return self.out(h)


class NDPNet(nn.Module):
    """Encoder, RBAM (one pair of RBFRMs and an FFM per level), decoder and MSDSM, with the fixed
    reference image [1, 3, S, S] and the per-channel feature statistics as buffers.

    ``forward(f_o, f_ad, f_ref, phase)`` is the training pass (one call per step, as DDP needs):
    the raw patch features of the defect-free images, of the first k of them with an artificial
    defect and of the reference ([B, C, h, w], [k, C, h, w], [1, C, h, w]); it returns the tensors phase 1 or 2's
    loss needs. Parameters a phase does not train take no part in its graph (``ddp_find_unused``).
    ``segment(f, f_ref)`` is the prediction: MSDSM's three logit maps."""

    # Phase 1 leaves RBAM and MSDSM out, phase 2 the encoder: DDP must look for unused parameters
    # (``flawline.train.distributed.RayTrainContext.wrap`` reads this).
    ddp_find_unused: ClassVar[bool] = True

    def __init__(self, channels: int, width: int, fusion_channels: int, image_size: int,
                 softmax_scale: float = 1.0) -> None:
        super().__init__()
        widths = (width, 2 * width, 2 * width)
        self.softmax_scale = softmax_scale
        self.encoder = Encoder(channels, widths)
        self.fusion = nn.ModuleList([FeatureFusion(w, fusion_channels) for w in widths])
        self.decoder = Decoder(channels, widths)
        # MSDSM's scales: the encoder's first three layers, the frozen one (the standardised
        # features themselves, ``channels``) and the first two trainable levels.
        self.segmenters = nn.ModuleList([
            nn.Sequential(*conv_bn_relu(2 * c, w), *conv_bn_relu(w, w), nn.Conv2d(w, 1, 1))
            for c, w in zip((channels, *widths[:2]), widths)])
        for seg in self.segmenters:  # focal loss's prior initialisation (Lin et al., 2017): p = PRIOR
            nn.init.constant_(seg[-1].bias, -math.log((1 - PRIOR) / PRIOR))
        self.register_buffer("reference", torch.zeros(1, 3, image_size, image_size))
        self.register_buffer("feature_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, channels, 1, 1))

    def standardise(self, f: torch.Tensor) -> torch.Tensor:
        return (f.float() - self.feature_mean) / self.feature_std

    def attend(self, levels: list[torch.Tensor], ref_levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """RBAM on every level: the input's features repaired from the reference's."""
        out = []
        for f, r, fuse in zip(levels, ref_levels, self.fusion):
            reps = [repair(f, r, k, self.softmax_scale) for k in PATCH_SIZES]
            out.append(fuse(f, *reps))
        return out

    def frozen_encoder(self, f: torch.Tensor) -> list[torch.Tensor]:
        """The encoder with its weights detached: gradients reach ``f``, never the encoder."""
        params = {name: p.detach() for name, p in self.encoder.named_parameters()}
        return torch.func.functional_call(self.encoder, params, (f,))

    def msdsm(self, s: torch.Tensor, levels: list[torch.Tensor], recon: torch.Tensor,
              recon_levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """MSDSM: logits [B, h_l, w_l] at the encoder's first three layers (the standardised
        features ``s`` and the first two trainable levels), each from the concatenation of the
        input's and the reconstruction's features there."""
        pairs = [(s, recon), *zip(levels[:2], recon_levels[:2])]
        return [seg(torch.cat((a.to(b.dtype), b), 1)).squeeze(1) for (a, b), seg in zip(pairs, self.segmenters)]

    def forward(self, f_o: torch.Tensor, f_ad: torch.Tensor, f_ref: torch.Tensor,
                phase: int) -> dict[str, Any]:
        """``f_ad``: [k, C, h, w], the defective copies of the first k of ``f_o``'s rows (the
        others have no defect: their own features stand in)."""
        k = f_ad.shape[0]
        s_o = self.standardise(f_o)
        if phase == 1:
            e_o, e_bad = self.encoder(s_o), self.encoder(self.standardise(f_ad))
            e_ad = [torch.cat((a, b[k:])) for a, b in zip(e_bad, e_o)]
            return {"target": s_o, "recon": self.decoder(e_o), "e_o": e_o, "e_ad": e_ad}
        with torch.no_grad():
            e_o, e_bad = self.encoder(s_o), self.encoder(self.standardise(f_ad))
            e_ad = [torch.cat((a, b[k:])) for a, b in zip(e_bad, e_o)]
            e_ref = self.encoder(self.standardise(f_ref))
        repaired = self.attend(e_ad, e_ref)
        recon = self.decoder(repaired)
        s_ad = torch.cat((self.standardise(f_ad), s_o[k:]))
        logits = self.msdsm(s_ad, e_ad, recon, self.frozen_encoder(recon))
        return {"target": s_o, "recon": recon, "e_o": e_o, "repaired": repaired, "logits": logits}

    def segment(self, f: torch.Tensor, f_ref: torch.Tensor) -> list[torch.Tensor]:
        """Patch features [B, C, h, w] and the reference's [1, C, h, w] -> MSDSM's logits at the
        three levels ([B, h, w], [B, h/2, w/2], [B, h/4, w/4])."""
        s = self.standardise(f)
        e, e_ref = self.encoder(s), self.encoder(self.standardise(f_ref))
        recon = self.decoder(self.attend(e, e_ref))
        return self.msdsm(s, e, recon, self.encoder(recon))


def anomaly_map(logits: list[torch.Tensor], weights: tuple[float, ...]) -> torch.Tensor:
    """Eq. 11: the weighted sum of the levels' defect probabilities, each brought to the first
    level's size (bilinear), [B, h, w]. Logits to fp32 first (bf16 sigmoids tie near 1)."""
    size = logits[0].shape[-2:]
    out = 0
    for lam, z in zip(weights, logits):
        p = torch.sigmoid(z.float()).unsqueeze(1)
        if p.shape[-2:] != size:
            p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
        out = out + lam * p
    return out.squeeze(1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al., 2017) against soft targets in [0, 1], mean over positions."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    return ((target - p).abs() ** gamma * bce).mean()


def mask_at(masks: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Masks [B, S, S] (bool or float) -> the share of defect pixels per cell of ``size``, [B, h, w]."""
    return F.adaptive_avg_pool2d(masks.float().unsqueeze(1), size).squeeze(1)


def defect_perception_loss(e_o: list[torch.Tensor], e_ad: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """L_def_per (Eq. 2): per level, the channel mean of the squared feature difference, min-max
    normalised per image, against the mask at that level's size (MSE); mean over levels."""
    total = 0
    for a, b in zip(e_o, e_ad):
        d = (a.float() - b.float()).pow(2).mean(1)  # [B, h, w]
        flat = d.flatten(1)
        lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        n = ((flat - lo) / (hi - lo + 1e-6)).view_as(d)
        total = total + (n - mask_at(masks, d.shape[-2:])).pow(2).mean()
    return total / len(e_o)


def choose_reference(images: torch.Tensor, features: torch.Tensor,
                     total: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: of all workers' training images, the one whose spatially pooled features
    ([N, C, h, w] -> [N, C]) lie closest (Euclidean) to the mean over every worker's images.
    Returns (its image [1, 3, S, S], its features [1, C, h, w]), the same on every worker.

    ``total`` only sums, so the minimum over workers is found by bisection on the distance: each
    round sums, over workers, whether a worker's own best distance is at or below the midpoint
    (64 rounds of one number). The winner's image and features then reach every worker as
    total(x * is_winner) / total(is_winner) (several only on an exact tie of distances)."""
    pooled = features.double().mean((2, 3))
    mean = total(torch.cat((pooled.sum(0), torch.tensor([float(len(pooled))], dtype=torch.float64))))
    mean = mean[:-1] / mean[-1]
    dist = (pooled - mean).pow(2).sum(1)
    best = int(dist.argmin())
    mine = dist[best]
    lo, hi = torch.tensor(0.0, dtype=torch.float64), total(mine.reshape(1))[0]  # >= every worker's best
    for _ in range(64):
        mid = (lo + hi) / 2
        if total((mine <= mid).double().reshape(1))[0] > 0:
            hi = mid
        else:
            lo = mid
    winner = (mine <= hi).double()
    parts = torch.cat((images[best].double().flatten(), features[best].double().flatten(), winner.reshape(1)))
    parts = total(parts * torch.cat((winner.expand(len(parts) - 1), torch.ones(1, dtype=torch.float64))))
    n_img = images[best].numel()
    image = (parts[:n_img] / parts[-1]).float().view(1, *images.shape[1:])
    feats = (parts[n_img:-1] / parts[-1]).float().view(1, *features.shape[1:])
    return image, feats


@dataclass
class NDPNetConfig(DetectorConfig):
    width: int = 32  # channels of the encoder's first level (then 2x, 2x); decoder and MSDSM follow
    fusion_channels: int = 32  # FFM's compressed width (paper: 64)
    softmax_scale: float = 1.0  # RBFRM: softmax(scale * cosine similarity); the paper's Eq. 4 is 1
    # Epochs of both phases together (``flawline train --epochs`` sets it); the first
    # ``phase1_epochs`` train encoder + decoder, the rest RBAM, decoder and MSDSM (paper: 400 + 200).
    epochs: int = 5
    phase1_epochs: int = 2
    lr: float = 1e-3  # paper: 1e-4 over 600 epochs
    weight_decay: float = 1e-5
    w_rec: float = 1.0
    w_def_per: float = 1.0
    w_fea_rep: float = 1.0
    w_seg: float = 1.0
    focal_gamma: float = 2.0
    map_weights: tuple[float, float, float] = (0.2, 0.2, 0.6)  # lambda_1..3 of Eq. 11, as published
    cutpaste_prob: float = 0.5
    defect_fraction: float = 0.5  # share of each training batch that gets an artificial defect
    blur_sigma: float = 4.0


class NDPNetScorer(nn.Module):
    """Images [B, 3, S, S] in [0, 1] -> (scores [B], maps [B, S, S]): defect probabilities in
    [0, 1] (Eq. 11's weighted sum), the score the map's maximum. Holds the reference image as the
    network's buffer, so the exported model needs nothing else."""

    def __init__(self, extractor: nn.Module, net: NDPNet, map_weights: tuple[float, ...], blur_sigma: float) -> None:
        super().__init__()
        self.extractor, self.net = extractor, net
        self.map_weights, self.blur_sigma = tuple(map_weights), blur_sigma

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = patch_features(self.extractor(torch.cat((x, self.net.reference.to(x.dtype)))))
        logits = self.net.segment(f[:-1], f[-1:])
        maps = upsample_map(anomaly_map(logits, self.map_weights), x.shape[-2:], self.blur_sigma)
        return maps.flatten(1).max(1).values, maps


@register_detector
class NDPNetDetector(TrainedDetector):
    """NDP-Net (module docstring). ``embed``: (prepared images, their patch features), fp16."""

    name = "ndpnet"
    Config = NDPNetConfig

    def __init__(self, config: NDPNetConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        c: NDPNetConfig = self.config
        if not 0 <= c.phase1_epochs < c.epochs:
            raise ConfigError(f"ndpnet: phase1_epochs ({c.phase1_epochs}) must be >= 0 and below epochs "
                              f"({c.epochs}): phase 2 needs at least one epoch")
        if c.width < 1 or c.fusion_channels < 1:
            raise ConfigError("ndpnet: width and fusion_channels must be >= 1")
        if len(c.map_weights) != 3:
            raise ConfigError("ndpnet: map_weights needs three weights (one per scale)")
        self.config = replace(c, map_weights=tuple(float(w) for w in c.map_weights))  # a list from JSON
        self.net: NDPNet | None = None
        self.phase = 1

    @property
    def reference(self) -> torch.Tensor:
        """The fixed defect-free reference image [1, 3, S, S] (chosen at fit time)."""
        if self.net is None:
            raise ConfigError("ndpnet: not fitted; no reference image yet")
        return self.net.reference

    def _make_net(self, channels: int) -> NDPNet:
        c: NDPNetConfig = self.config
        return NDPNet(channels, c.width, c.fusion_channels, self.network_size, c.softmax_scale).to(self.device)

    def scorer(self, chunked: bool = True) -> NDPNetScorer:
        return NDPNetScorer(self.extractor, self.net, self.config.map_weights, self.config.blur_sigma)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared images [B, 3, S, S] and their patch features [B, C, S/8, S/8], both fp16: the
        defect-free features are computed once, the defective copies' each step."""
        return x.half(), patch_features(self.extractor(x)).half()

    def begin_training(self, embedded: tuple[torch.Tensor, torch.Tensor],
                       total: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
        """Per-channel feature mean and standard deviation over every worker's images (through
        ``total``), the reference image (``choose_reference``), a fresh network."""
        c: NDPNetConfig = self.config
        images, feats = embedded
        f = feats.double()
        stats = total(torch.cat((f.sum((0, 2, 3)), f.pow(2).sum((0, 2, 3)),
                                 torch.tensor([float(f.shape[0] * f.shape[2] * f.shape[3])], dtype=torch.float64))))
        ch = feats.shape[1]
        mean = stats[:ch] / stats[-1]
        std = (stats[ch:2 * ch] / stats[-1] - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-3)
        image, ref_feats = choose_reference(images, feats, total)
        self.net = self._make_net(ch)
        self.net.feature_mean.copy_(mean.float().view(1, -1, 1, 1))
        self.net.feature_std.copy_(std.float().view(1, -1, 1, 1))
        self.net.reference.copy_(image)
        self._ref_feats = ref_feats.to(self.device)
        self._synth = SyntheticDefects(cutpaste_prob=c.cutpaste_prob)
        self.info["phases"] = {"phase1_epochs": c.phase1_epochs, "phase2_epochs": c.epochs - c.phase1_epochs}
        return self.net

    def begin_epoch(self, epoch: int) -> None:
        """Phase 1 for the first ``phase1_epochs`` epochs, then phase 2: from the epoch number
        alone, so a run resumed at any epoch trains the right phase."""
        self.phase = 1 if epoch < self.config.phase1_epochs else 2

    def training_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                      generator: torch.Generator) -> torch.Tensor:
        """Phase 1: w_rec L_rec + w_def_per L_def_per; phase 2: w_rec L_rec + w_fea_rep L_fea_rep +
        w_seg L_seg (module docstring). The first ``defect_fraction`` share of the batch gets an
        artificial defect; its backbone features are recomputed, the others' come from ``embed``."""
        c: NDPNetConfig = self.config
        images, f_o = batch
        x = images.float().cpu()
        k = max(1, round(c.defect_fraction * x.shape[0]))
        bad, masks = self._synth(x[:k], generator)
        masks = torch.cat((masks.float(), torch.zeros(x.shape[0] - k, *masks.shape[1:]))).to(self.device)
        with torch.no_grad():
            f_bad = patch_features(self.extractor(bad.to(self.device)))
        out = model(f_o, f_bad, self._ref_feats, self.phase)
        rec = (out["recon"].float() - out["target"]).pow(2).mean()
        if self.phase == 1:
            return c.w_rec * rec + c.w_def_per * defect_perception_loss(out["e_o"], out["e_ad"], masks)
        fea_rep = sum((r.float() - e.float()).pow(2).mean() for r, e in zip(out["repaired"], out["e_o"]))
        seg = sum(focal_loss(z, mask_at(masks, z.shape[-2:]), c.focal_gamma) for z in out["logits"])
        return c.w_rec * rec + c.w_fea_rep * fea_rep / len(out["repaired"]) + c.w_seg * seg / len(out["logits"])

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "channels": int(self.net.feature_mean.shape[1])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net = self._make_net(state["channels"])
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.fitted = True
