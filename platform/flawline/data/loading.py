"""Image and mask bytes → tensors for the models (one decode path for training, evaluation and
serving, so scores never depend on who decoded the image)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from flawline.data.images import MAX_PIXELS, mask_image, open_image, to_canonical
from flawline.errors import InvalidInput


def decode_pixels(data: bytes, size: int | None = None, name: str = "image", white: int | None = None
                  ) -> np.ndarray:
    """Image bytes → uint8 pixels, [H, W] (gray) or [H, W, 3] (RGB), in the shown frame; resized to
    ``size`` x ``size``. Modes, orientation and bit depth follow the one decoding policy
    (``flawline.data.images.to_canonical``); ``white``: the dataset's or model's white level for
    images of more than 8 bits. No torch: Pillow releases the GIL while it decodes and resizes, so
    serving runs this on threads other than the one that runs the model. Raises ``InvalidInput``
    naming ``name``."""
    try:
        with open_image(data) as img:
            if img.width * img.height > MAX_PIXELS:  # the import's bound, before any pixel is decoded
                raise InvalidInput(f"{name}: {img.width}x{img.height} pixels exceeds the limit of {MAX_PIXELS}")
            if img.mode in ("L", "RGB", "CMYK", "YCbCr"):  # JPEG: decode at reduced scale when possible
                img.draft(img.mode, (size, size) if size else img.size)
            img.load()
            img = to_canonical(img, name, white)
            if size:
                img = img.resize((size, size), Image.BILINEAR)
            return np.array(img, dtype=np.uint8)
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InvalidInput(f"{name}: cannot decode image ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                           ) from None


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels [H, W] or [H, W, 3] (``decode_pixels``) → [C, H, W] float32 in [0, 1]."""
    t = torch.from_numpy(pixels).float().div_(255.0)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def decode_image(data: bytes, size: int | None = None, name: str = "image", white: int | None = None
                 ) -> torch.Tensor:
    """[C, H, W] float32 in [0, 1], C = 1 (gray) or 3 (RGB): ``decode_pixels`` then ``to_tensor``.
    Raises ``InvalidInput`` naming ``name``."""
    return to_tensor(decode_pixels(data, size, name, white))


def decode_mask(data: bytes | None, size: int, name: str = "mask") -> np.ndarray:
    """Boolean [size, size] mask in the shown frame (nearest-neighbour resize): a pixel is a defect
    when it is non-zero (``flawline.data.images.mask_image``); None gives an all-normal mask.
    Raises ``InvalidInput`` naming ``name``."""
    if data is None:
        return np.zeros((size, size), dtype=bool)
    return np.asarray(mask_image(data, name).resize((size, size), Image.NEAREST)) > 0


PAIR_CHANNELS = 6  # an image/reference pair: the image's 3 channels, then its reference's


def pair(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Images and their defect-free references → pairs: [C, H, W] each → [6, H, W], or batches
    [N, C, H, W] → [N, 6, H, W] (C = 1 or 3 on either side, gray repeated to 3 channels). The one
    home of "image + reference → pair", what detectors that ``uses_reference`` take: records
    (``flawline.data.records.decode_record``) and serving (``flawline.serving.pipeline``) pair here.
    Raises ``InvalidInput`` when the two differ in shape (beyond gray against RGB)."""
    if (images.dim() not in (3, 4) or images.dim() != references.dim() or images.shape[:-3] != references.shape[:-3]
            or images.shape[-2:] != references.shape[-2:] or images.shape[-3] not in (1, 3)
            or references.shape[-3] not in (1, 3)):
        raise InvalidInput(f"an image {list(images.shape)} and its reference {list(references.shape)} differ in shape")
    return torch.cat([images.expand(*images.shape[:-3], 3, *images.shape[-2:]),
                      references.expand(*references.shape[:-3], 3, *references.shape[-2:])], -3)


def stack_rgb(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Same-size [C, H, W] tensors → [N, 3, H, W] (gray repeated to 3 channels; pairs [6, H, W]
    stack as they are)."""
    if not images:
        raise InvalidInput("no images")
    return torch.stack([im.expand(3, -1, -1) if im.shape[0] == 1 else im for im in images])
