"""Synthetic defects on normal images, for self-supervised and few-shot training.

Two generators, both returning the altered images and the true defect masks:
- CutPaste (Li et al., 2021): a patch cut from the image, jittered, pasted elsewhere;
- Perlin-noise masks filled with a foreign texture (DRAEM, Zavrtanik et al., 2021; NDP-Net's
  artificial defects): smooth random blobs, blended with a texture from another image or
  procedural noise.
Everything is torch on the tensors' device, seeded by a ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def perlin_noise(height: int, width: int, cells: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """2D gradient (Perlin) noise of ``cells`` periods over [height, width], values about in [-1, 1]."""
    cy, cx = cells
    angles = 2 * math.pi * torch.rand(cy + 1, cx + 1, generator=generator)
    grads = torch.stack((torch.cos(angles), torch.sin(angles)), -1)
    ys = torch.linspace(0, cy, height + 1)[:-1]
    xs = torch.linspace(0, cx, width + 1)[:-1]
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    y0, x0 = gy.floor().long().clamp(max=cy - 1), gx.floor().long().clamp(max=cx - 1)
    fy, fx = gy - y0, gx - x0

    def dot(dy: int, dx: int) -> torch.Tensor:
        g = grads[y0 + dy, x0 + dx]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3

    u, v = fade(fx), fade(fy)
    top = torch.lerp(dot(0, 0), dot(0, 1), u)
    bottom = torch.lerp(dot(1, 0), dot(1, 1), u)
    return math.sqrt(2) * torch.lerp(top, bottom, v)


def perlin_mask(size: int, generator: torch.Generator, threshold: float = 0.5,
                max_fraction: float = 0.25) -> torch.Tensor:
    """A boolean blob mask: thresholded Perlin noise at a random scale (never empty, never huge)."""
    for _ in range(20):
        scale = 2 ** int(torch.randint(1, 4, (1,), generator=generator))
        noise = perlin_noise(size, size, (scale, scale), generator)
        mask = noise > threshold
        frac = mask.float().mean()
        if 0.002 < frac <= max_fraction:
            return mask
    # fall back to a small ellipse
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = (torch.randint(size // 4, 3 * size // 4, (2,), generator=generator)).tolist()
    return ((yy - cy) / (size / 12)) ** 2 + ((xx - cx) / (size / 20)) ** 2 <= 1


def cutpaste(image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a jittered patch of ``image`` [C, H, W] somewhere else; returns (image, mask)."""
    c, h, w = image.shape
    area = float(torch.empty(1).uniform_(0.02, 0.12, generator=generator)) * h * w
    aspect = math.exp(float(torch.empty(1).uniform_(math.log(0.3), math.log(3.3), generator=generator)))
    ph = max(2, min(h - 1, int(round(math.sqrt(area * aspect)))))
    pw = max(2, min(w - 1, int(round(math.sqrt(area / aspect)))))
    sy, sx = int(torch.randint(0, h - ph + 1, (1,), generator=generator)), int(torch.randint(0, w - pw + 1, (1,), generator=generator))
    ty, tx = int(torch.randint(0, h - ph + 1, (1,), generator=generator)), int(torch.randint(0, w - pw + 1, (1,), generator=generator))
    patch = image[:, sy:sy + ph, sx:sx + pw]
    jitter = 1.0 + float(torch.empty(1).uniform_(-0.3, 0.3, generator=generator))
    patch = (patch * jitter).clamp(0, 1)
    out = image.clone()
    out[:, ty:ty + ph, tx:tx + pw] = patch
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[ty:ty + ph, tx:tx + pw] = (patch - image[:, ty:ty + ph, tx:tx + pw]).abs().amax(0) > 0.02
    return out, mask


def procedural_texture(c: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """A foreign texture with no outside data: multi-octave Perlin noise, random contrast."""
    tex = sum(perlin_noise(size, size, (2 ** o, 2 ** o), generator) / (o + 1) for o in range(1, 5))
    tex = (tex - tex.min()) / (tex.max() - tex.min() + 1e-6)
    gains = torch.rand(c, 1, 1, generator=generator) * 0.8 + 0.2
    return (tex.unsqueeze(0) * gains).clamp(0, 1)


@dataclass
class SyntheticDefects:
    """Makes a defective copy of each image; ``cutpaste_prob`` picks CutPaste over Perlin+texture."""

    cutpaste_prob: float = 0.5
    blend_range: tuple[float, float] = (0.1, 0.6)  # DRAEM's beta: how much of the original shows through

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N, C, S, S] in [0, 1] → (defective images, masks [N, S, S] bool)."""
        n, c, h, w = images.shape
        out, masks = images.clone(), torch.zeros(n, h, w, dtype=torch.bool)
        for i in range(n):
            if float(torch.rand(1, generator=generator)) < self.cutpaste_prob:
                out[i], masks[i] = cutpaste(images[i].cpu(), generator)
                continue
            mask = perlin_mask(h, generator) if h == w else F.interpolate(
                perlin_mask(max(h, w), generator)[None, None].float(), size=(h, w))[0, 0] > 0.5
            if n > 1 and float(torch.rand(1, generator=generator)) < 0.5:
                other = images[(i + 1 + int(torch.randint(0, n - 1, (1,), generator=generator))) % n].cpu()
                texture = torch.rot90(other, int(torch.randint(1, 4, (1,), generator=generator)), (1, 2))
                texture = (1 - texture) if float(torch.rand(1, generator=generator)) < 0.5 else texture
            else:
                texture = procedural_texture(c, max(h, w), generator)[:, :h, :w]
            beta = float(torch.empty(1).uniform_(*self.blend_range, generator=generator))
            m = mask.unsqueeze(0).float()
            out[i] = images[i].cpu() * (1 - m) + (beta * images[i].cpu() + (1 - beta) * texture) * m
            masks[i] = mask
        return out.to(images.device), masks.to(images.device)
