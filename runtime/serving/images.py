"""Samples → pixels → PNG bytes, runtime side (no exporter import).

For pixel-space models (the shipped ``pixart-digits``: 1 channel in [-1, 1]) a sample is an image as
it is: clamp to [-1, 1] and map to 0..255 with rounding, the same conversion as
``deltadit_export.generate.to_uint8``, so a served PNG shows exactly what ``deltadit-generate``
shows. Latent models (4 channels) need their VAE first: they have no PNG here.

PNG encoding (Pillow, zlib at a fixed level, no time or text chunks) is a pure function of the
pixels, so equal samples give byte-identical PNG files.
"""

from __future__ import annotations

import io

import numpy as np
import torch

PNG_MODES = {1: "L", 3: "RGB"}


def to_uint8(samples: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[C,H,W]`` or ``[N,C,H,W]`` pixels in [-1, 1] → uint8 ``[H,W]`` / ``[H,W,3]`` (with ``N`` in front)."""
    x = torch.as_tensor(samples).detach().float().cpu()
    if x.ndim not in (3, 4) or x.shape[-3] not in PNG_MODES:
        raise ValueError(f"expected pixels [C,H,W] or [N,C,H,W] with 1 or 3 channels, got shape {list(x.shape)}")
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.movedim(-3, -1)  # channels last, as image files store them
    return (pixels[..., 0] if pixels.shape[-1] == 1 else pixels).numpy()


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 ``[H,W]`` (grey) or ``[H,W,3]`` (RGB) → PNG bytes."""
    from PIL import Image

    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"expected uint8 [H,W] or [H,W,3], got {pixels.dtype} {list(pixels.shape)}")
    buf = io.BytesIO()
    # uint8 [H,W] is mode L and [H,W,3] is RGB (Pillow infers it; its mode= argument is deprecated).
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def sample_to_png(sample: torch.Tensor | np.ndarray) -> bytes:
    """One sample ``[C,H,W]`` in [-1, 1] → PNG bytes."""
    return encode_png(to_uint8(sample))
