"""Image and mask bytes → tensors for the models (one decode path for training, evaluation and
serving, so scores never depend on who decoded the image)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from flawline.data.images import MAX_PIXELS
from flawline.errors import InvalidInput

Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def decode_image(data: bytes, size: int | None = None, name: str = "image") -> torch.Tensor:
    """[C, H, W] float32 in [0, 1], C = 1 (gray) or 3 (RGB); resized to ``size`` x ``size``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB" if img.mode not in ("L", "I;16") else img.mode,
                      (size, size) if size else img.size)  # JPEG: decode at reduced scale when possible
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(img, dtype=np.float32)
                arr = arr / max(float(arr.max()), 1.0)
                img = Image.fromarray((arr * 255).astype(np.uint8), "L")
            elif mode == "P":
                img = img.convert("RGB")
            elif mode not in ("L", "RGB"):
                raise InvalidInput(f"{name}: image mode {mode} has {len(img.getbands())} channels; "
                                   "expected 1 (gray) or 3 (RGB)")
            if size:
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InvalidInput(f"{name}: cannot decode image ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                           ) from None
    t = torch.from_numpy(arr.copy()).float().div_(255.0)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def decode_mask(data: bytes | None, size: int, name: str = "mask") -> np.ndarray:
    """Boolean [size, size] mask (nearest-neighbour resize); None gives an all-normal mask."""
    if data is None:
        return np.zeros((size, size), dtype=bool)
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("L").resize((size, size), Image.NEAREST)) > 127
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InvalidInput(f"{name}: cannot decode mask ({type(err).__name__})") from None


def stack_rgb(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Same-size [C, H, W] tensors → [N, 3, H, W] (gray repeated to 3 channels)."""
    if not images:
        raise InvalidInput("no images")
    return torch.stack([im.expand(3, -1, -1) if im.shape[0] == 1 else im for im in images])
