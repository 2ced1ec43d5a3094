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
    """Write a uint8 greyscale PNG (through a temporary file renamed into place)."""
    import io

    from PIL import Image

    from .publish import write_file

    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG")
    return write_file(path, buf.getvalue())


def comparison_image(full: torch.Tensor, delta: torch.Tensor, prompts: int, per_prompt: int, shown: int,
                     row_labels: list[str] | None = None,
                     names: tuple[str, str, str] | None = ("full", "delta-dit", "difference")) -> np.ndarray:
    """Per prompt row: ``shown`` triples (full | Δ-DiT | 4×|difference|, inverted so white = equal), with the
    triple's names above the columns (ASCII: PIL's default font has no Δ) and ``row_labels`` (e.g. the digit)
    left of the rows; ``names=None`` and no
    ``row_labels``: the bare grid."""
    a, b = to_uint8(full), to_uint8(delta)
    diff = 255 - np.clip(4 * np.abs(a.astype(np.int16) - b.astype(np.int16)), 0, 255).astype(np.uint8)
    tiles = []
    for p in range(prompts):
        for s in range(shown):
            k = p * per_prompt + s
            tiles += [a[k], b[k], diff[k]]
    grid = grid_image(np.stack(tiles), cols=3 * shown, gap_every=3)
    if names is None and not row_labels:
        return grid
    h, w = a.shape[1:]
    return label_grid(grid, tile=(h * IMAGE_SCALE, w * IMAGE_SCALE), cols=3 * shown, gap_every=3,
                      col_labels=list(names or ("", "", "")) * shown, row_labels=row_labels)


def label_grid(grid: np.ndarray, tile: tuple[int, int], cols: int, col_labels: list[str],
               row_labels: list[str] | None = None, pad: int = 2, gap_every: int = 0, gap: int = 6) -> np.ndarray:
    """A :func:`grid_image` with a label above each column and left of each row (PIL's default font)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    H, W = tile
    rows = (grid.shape[0] - pad) // (H + pad)
    row_labels = list(row_labels or [])
    top = 14 if any(col_labels) else 0
    left = (max(_text_width(font, t) for t in row_labels) + 8) if row_labels else 0
    canvas = Image.new("L", (grid.shape[1] + left, grid.shape[0] + top), 255)
    canvas.paste(Image.fromarray(grid, mode="L"), (left, top))
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(col_labels[:cols]):
        x = left + pad + c * (W + pad) + ((c // gap_every) * gap if gap_every else 0)
        text = _drawable(font, text)
        draw.text((x + (W - _text_width(font, text)) / 2, 1), text, fill=0, font=font)
    for r, text in enumerate(row_labels[:rows]):
        y = top + pad + r * (H + pad) + H / 2 - 6
        draw.text((3, y), _drawable(font, text), fill=0, font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()


def _drawable(font, text: str) -> str:
    """``text``, or its ASCII approximation where the font cannot encode it (PIL's bitmap fallback font)."""
    try:
        font.getmask(text)
        return text
    except UnicodeError:
        return text.encode("ascii", "replace").decode()


def _text_width(font, text: str) -> float:
    left, _, right, _ = font.getbbox(_drawable(font, text))
    return right - left
