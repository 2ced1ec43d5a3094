"""Image metrics and image files: what generate, eval and calibration share about pixel images.

Samples are ``[N, 1, H, W]`` pixels in [-1, 1] (the shipped ``pixart-digits`` model works in pixel
space). This module sits below every command that shows or scores images, so their imports point down
to it and never at each other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_SCALE = 4  # nearest-neighbour upscaling of the 16×16 digits in the PNGs


# ---------------------------------------------------------------- metrics


def _images(x) -> np.ndarray:
    return torch.as_tensor(x).detach().double().clamp(-1, 1).numpy()


def psnr(a, b, data_range: float = 2.0) -> float:
    """PSNR (dB) of two image sets in [-1, 1] (clamped first, as shown), over all pixels pooled:
    ``10·log10(range² / MSE)``; ``inf`` for identical sets."""
    mse = float(np.mean((_images(a) - _images(b)) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(data_range ** 2 / mse))


def max_abs(a, b) -> float:
    """Largest pixel difference of two image sets in [-1, 1] (clamped first)."""
    return float(np.max(np.abs(_images(a) - _images(b))))


# ---------------------------------------------------------------- images


def to_uint8(samples: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[N,1,H,W]`` pixels in [-1, 1] → uint8 ``[N,H,W]`` (clamped, as the PNGs show them)."""
    x = torch.as_tensor(samples).float().clamp(-1, 1)
    return ((x[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()


def grid_image(images: np.ndarray, cols: int, scale: int = IMAGE_SCALE, pad: int = 2, gap_every: int = 0,
               gap: int = 6) -> np.ndarray:
    """uint8 ``[N,H,W]`` → one uint8 grid (row-major, white padding; an extra gap after every ``gap_every`` cols)."""
    n, h, w = images.shape
    rows = (n + cols - 1) // cols
    H, W = h * scale, w * scale
    extra = lambda c: (c // gap_every) * gap if gap_every else 0  # noqa: E731
    width = pad + cols * (W + pad) + extra(cols - 1)
    grid = np.full((pad + rows * (H + pad), width), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad) + extra(c)
        grid[y:y + H, x:x + W] = np.kron(img, np.ones((scale, scale), dtype=np.uint8))
    return grid


def save_png(array: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="L").save(path)
    return path


def comparison_image(full: torch.Tensor, delta: torch.Tensor, prompts: int, per_prompt: int, shown: int) -> np.ndarray:
    """Per prompt row: ``shown`` triples (full | Δ-DiT | 4×|difference|, inverted so white = equal)."""
    a, b = to_uint8(full), to_uint8(delta)
    diff = 255 - np.clip(4 * np.abs(a.astype(np.int16) - b.astype(np.int16)), 0, 255).astype(np.uint8)
    tiles = []
    for p in range(prompts):
        for s in range(shown):
            k = p * per_prompt + s
            tiles += [a[k], b[k], diff[k]]
    return grid_image(np.stack(tiles), cols=3 * shown, gap_every=3)
