"""Image tensors in, patch features out: shared by the memory-bank and density detectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flawline.errors import InvalidInput

MIN_SIDE = 16
MAX_SIDE = 8192
VALUE_SLACK = 0.05  # how far outside [0, 1] a float image may stray (bicubic/antialias overshoot)


def as_model_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Check and prepare a batch: [N, C, H, W] (or [C, H, W]), C = 1 (gray) or 3 (RGB), floats in
    [0, 1] (``VALUE_SLACK`` allowed for resampling overshoot) or uint8 0..255 (scaled by 1/255),
    finite; resized to ``size`` x ``size``; gray repeated to 3 channels. Raises ``InvalidInput``
    for values outside that range (0..255 floats, mean/std-normalised tensors), which would
    otherwise score silently wrong."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInput(f"expected a tensor batch, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise InvalidInput(f"expected images shaped [N, C, H, W], got {list(x.shape)}")
    n, c, h, w = x.shape
    if n == 0:
        raise InvalidInput("empty batch: no images")
    if c not in (1, 3):
        raise InvalidInput(f"images have {c} channels; expected 1 (gray) or 3 (RGB)")
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise InvalidInput(f"image size {w}x{h} is outside {MIN_SIDE}..{MAX_SIDE} px a side")
    if x.dtype == torch.uint8:  # torchvision.io / numpy images: 0..255 by convention
        x = x.float().div_(255.0)
    x = x.float()
    if not torch.isfinite(x).all():
        raise InvalidInput("images contain NaN or infinite values")
    lo, hi = torch.aminmax(x)
    if lo < -VALUE_SLACK or hi > 1 + VALUE_SLACK:  # 0..255 floats, or mean/std-normalised tensors
        raise InvalidInput(f"image values span {lo.item():.3g}..{hi.item():.3g}; expected [0, 1] (floats "
                           "scaled to [0, 1], or uint8 0..255; not normalised by a mean and std)")
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.expand(-1, 3, -1, -1) if c == 1 else x


def patch_features(maps: list[torch.Tensor], pool: int = 3) -> torch.Tensor:
    """PatchCore-style locally aware patch features: each map averaged over a ``pool`` x ``pool``
    neighbourhood, brought to the finest map's resolution, concatenated: [N, sum(C), h, w]."""
    size = maps[0].shape[-2:]
    out = []
    for f in maps:
        if pool > 1:
            f = F.avg_pool2d(f, pool, stride=1, padding=pool // 2, count_include_pad=False)
        if f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        out.append(f)
    # No data-dependent checks here (the module is exported to ONNX); Detector.predict checks outputs.
    return torch.cat(out, 1)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur [N, H, W] score maps (anomaly maps are smoothed before pixel scoring)."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    xs = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(xs ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def upsample_map(patch_maps: torch.Tensor, size: tuple[int, int] | torch.Size, sigma: float) -> torch.Tensor:
    """Patch-level maps [N, h, w] → pixel maps [N, H, W], Gaussian-smoothed with ``sigma`` pixels.

    The blur runs at a quarter of the output resolution (sigma / 4) and the result is upsampled:
    the same smoothing as blurring at full size, at a sixteenth of the cost."""
    h, w = int(size[0]), int(size[1])
    mid = (max(1, h // 4), max(1, w // 4))
    # In fp32 whatever the caller's autocast: scores are read off these maps, and bf16's 8-bit
    # mantissa would quantise them into ties (steps of ~0.004 near 1).
    with torch.autocast(patch_maps.device.type, enabled=False):
        x = F.interpolate(patch_maps.float().unsqueeze(1), size=mid, mode="bilinear", align_corners=False).squeeze(1)
        x = gaussian_blur(x, sigma / 4)
        return F.interpolate(x.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
