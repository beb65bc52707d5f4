"""Batch augmentations for training from labels (plain torch, seeded by a generator).

``geometric`` flips and rotates images together with their masks (defects have no preferred
orientation on tiles, cells or sheets); ``photometric`` changes brightness, contrast and gamma;
``strong`` adds noise, blur and cut-out on top — FixMatch's "strong" view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rand(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen)


def geometric(images: torch.Tensor, gen: torch.Generator, *masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Random element of the dihedral group D4 per image, applied to ``images`` [B, C, S, S] and to
    each ``masks`` [B, S, S] alike."""
    b = images.shape[0]
    flips, turns = _rand(b, gen) < 0.5, torch.randint(0, 4, (b,), generator=gen)
    out_images, out_masks = images.clone(), [m.clone() for m in masks]
    for i in range(b):
        k = int(turns[i])
        for t in [out_images, *out_masks]:
            item = t[i].flip(-1) if flips[i] else t[i]
            t[i] = torch.rot90(item, k, dims=(-2, -1)) if k else item
    return (out_images, *out_masks)


def photometric(images: torch.Tensor, gen: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    b = images.shape[0]
    shape = (b, 1, 1, 1)
    brightness = ((_rand(b, gen) * 2 - 1) * strength).view(shape)
    contrast = (1 + (_rand(b, gen) * 2 - 1) * strength).view(shape)
    gamma = torch.exp((_rand(b, gen) * 2 - 1) * strength).view(shape)
    mean = images.mean((1, 2, 3), keepdim=True)
    x = ((images - mean) * contrast + mean + brightness).clamp(0, 1)
    return x.clamp_min(1e-6) ** gamma


def strong(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Strong view: stronger photometric jitter, Gaussian noise, box blur on half the images and
    one cut-out square (a quarter of the side) per image."""
    b, _, h, w = images.shape
    x = photometric(images, gen, 0.4)
    x = x + torch.randn(x.shape, generator=gen) * 0.03
    blur = _rand(b, gen) < 0.5
    if blur.any():
        x[blur] = F.avg_pool2d(x[blur], 3, stride=1, padding=1, count_include_pad=False)
    side = max(1, h // 4)
    ys = torch.randint(0, h - side + 1, (b,), generator=gen)
    xs = torch.randint(0, w - side + 1, (b,), generator=gen)
    for i in range(b):
        x[i, :, ys[i]:ys[i] + side, xs[i]:xs[i] + side] = 0.5
    return x.clamp(0, 1)
