"""Tiled detection: high-resolution images with small defects, seen by the network tile by tile.

Resizing a 1024 px image to the usual 256 px shrinks a 30 px defect to 7 px, below what a
backbone's stride-8 patch features resolve. With a detector's ``tile`` setting (pixels, 0 = off)
the image is brought to ``image_size`` (e.g. its native 1024 px) and cut into overlapping square
tiles of ``tile`` px (``tile_overlap``: the share of a tile its neighbour covers); the network
fits on tiles and predicts per tile; the tiles' maps are stitched back into one map of
``image_size`` (overlaps averaged) and the image score is the stitched map's maximum. This is the
overlapping-tile inference of sliding-window segmentation (e.g. Ronneberger et al., U-Net, 2015,
"overlap-tile strategy") used in industrial anomaly detection for small defects on large parts.

Training on tiles: detectors that fit on normal images alone fit on every tile of every image
(``tiles``); detectors that learn masks train on random crops (``random_crops``), half of them
placed over a labelled defect so tiny defects are seen at all.

The tile grid is fixed by (``image_size``, ``tile``, ``tile_overlap``), so ``TiledScorer`` has no
data-dependent control flow and is exported to ONNX as it runs here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flawline.errors import ConfigError

MIN_TILE = 32
MAX_OVERLAP = 0.9


def check_tiling(image_size: int, tile: int, overlap: float, who: str = "detector") -> None:
    """Raise ``ConfigError`` (one line) unless ``tile`` is 0 (off) or a side in
    ``MIN_TILE..image_size - 1`` px (a tile as large as the image would be no tiling) and ``overlap`` a share in ``[0, MAX_OVERLAP]``."""
    if tile == 0:
        return
    if not MIN_TILE <= tile < image_size:
        raise ConfigError(f"{who}: tile {tile} px must be 0 (no tiling) or lie in {MIN_TILE}..{image_size - 1}, "
                          f"under the image_size (--image-size) the image is brought to before it is cut into "
                          f"tiles{'; a tile of the whole image is no tiling: raise image_size' if tile == image_size else ''}")
    if not 0 <= overlap <= MAX_OVERLAP:
        raise ConfigError(f"{who}: tile_overlap {overlap} must lie in 0..{MAX_OVERLAP} (a share of the tile)")


def tile_offsets(size: int, tile: int, overlap: float) -> list[int]:
    """Start positions (px) of tiles along one side of ``size`` px: evenly spaced, the first at 0
    and the last flush with the edge, neighbours overlapping by at least ``overlap`` of a tile.

    >>> tile_offsets(1024, 256, 0.25)
    [0, 192, 384, 576, 768]"""
    if tile >= size:
        return [0]
    step = tile * (1.0 - overlap)
    n = math.ceil((size - tile) / max(step, 1.0)) + 1
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def grid(size: int, tile: int, overlap: float) -> list[tuple[int, int]]:
    """(top, left) of every tile of a ``size`` x ``size`` image, row by row."""
    offsets = tile_offsets(size, tile, overlap)
    return [(y, x) for y in offsets for x in offsets]


def tiles(x: torch.Tensor, tile: int, overlap: float) -> torch.Tensor:
    """Images [B, C, S, S] → tiles [B * T, C, tile, tile], image by image, each image's tiles row
    by row (``grid``'s order)."""
    s = int(x.shape[-1])  # the grid is fixed by the size (a constant in the exported graph)
    cuts = [x[:, :, y:y + tile, x0:x0 + tile] for y, x0 in grid(s, tile, overlap)]
    return torch.stack(cuts, 1).flatten(0, 1)


def stitch(maps: torch.Tensor, size: int, overlap: float) -> torch.Tensor:
    """Tile maps [B * T, t, t] (``tiles``' order) → maps [B, S, S], overlapping pixels averaged.
    Constant padding places each tile (no in-place writes), so the export is a plain graph."""
    t = int(maps.shape[-1])
    places = grid(size, t, overlap)
    per = maps.reshape(-1, len(places), t, t)
    total = torch.zeros(per.shape[0], size, size, dtype=maps.dtype, device=maps.device)
    count = torch.zeros(1, size, size, dtype=maps.dtype, device=maps.device)
    ones = torch.ones(1, t, t, dtype=maps.dtype, device=maps.device)
    for i, (y, x) in enumerate(places):
        pad = (x, size - x - t, y, size - y - t)
        total = total + F.pad(per[:, i], pad)
        count = count + F.pad(ones, pad)
    return total / count


class TiledScorer(nn.Module):
    """A detector's prediction path over tiles: images [B, 3, S, S] → (scores [B], maps [B, S, S]).

    ``inner`` maps tiles [n, 3, t, t] → (scores [n], maps [n, t, t]): the detector's scorer module
    (exported to ONNX inside this one) or any callable with that contract. ``chunk``: tiles per
    call of ``inner`` (None: all of a batch's tiles at once, as the export does). The image score
    is the maximum of the stitched map."""

    def __init__(self, inner: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], tile: int,
                 overlap: float, chunk: int | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.tile, self.overlap, self.chunk = tile, overlap, chunk

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = int(x.shape[-1])
        cut = tiles(x, self.tile, self.overlap)
        if self.chunk is None or self.chunk >= cut.shape[0]:
            _, maps = self.inner(cut)
        else:
            maps = torch.cat([self.inner(cut[i:i + self.chunk])[1] for i in range(0, cut.shape[0], self.chunk)])
        with torch.autocast(x.device.type, enabled=False):
            stitched = stitch(maps.float(), size, self.overlap)
        return stitched.flatten(1).max(1).values, stitched


def random_crops(x: torch.Tensor, target: torch.Tensor | None, tile: int, generator: torch.Generator,
                 on_defect: float = 0.5) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One random ``tile`` x ``tile`` crop per image of ``x`` [B, C, S, S] and the same crop of
    ``target`` [B, S, S] (a mask or box map; None: uniform crops). With probability ``on_defect``
    an image with target pixels > 0.5 is cropped around one of them (at a random place within the
    crop), so defects of a few pixels in a large image are trained on at all."""
    b, _, s, _ = x.shape
    if tile >= s:
        return x, target
    xs, ts = [], []
    for i in range(b):
        top, left = (int(v) for v in torch.randint(0, s - tile + 1, (2,), generator=generator))
        if target is not None and float(torch.rand((), generator=generator)) < on_defect:
            hits = (target[i] > 0.5).nonzero()
            if len(hits):
                y, x0 = (int(v) for v in hits[int(torch.randint(0, len(hits), (), generator=generator))])
                dy, dx = (int(v) for v in torch.randint(0, tile, (2,), generator=generator))
                top, left = min(max(y - dy, 0), s - tile), min(max(x0 - dx, 0), s - tile)
        xs.append(x[i, :, top:top + tile, left:left + tile])
        if target is not None:
            ts.append(target[i, top:top + tile, left:left + tile])
    return torch.stack(xs), (torch.stack(ts) if target is not None else None)
