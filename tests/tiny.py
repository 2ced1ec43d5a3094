"""Tiny models and exports shared by the tests: same classes and code paths as the real ones, seconds to build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# --set overrides that shrink pixart-alpha / dit-xl-2 to a few thousand parameters (the CLI path).
TINY_PIXART_SET = {
    "num_layers": 6, "num_attention_heads": 2, "attention_head_dim": 8, "caption_channels": 24,
    "cross_attention_dim": 16,
}
TINY_DIT_SET = {"num_layers": 6, "num_attention_heads": 2, "attention_head_dim": 8}
TINY_RESOLUTION = 64  # latent 8×8, 16 tokens


def set_args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={v}"]
    return out


def tiny_pixart(micro: bool = False, num_layers: int = 6, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    # Micro-conditions need a width divisible by 3 (resolution and aspect embeddings are D/3 each).
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=24 if micro else 8, in_channels=4, out_channels=8,
        num_layers=num_layers, cross_attention_dim=48 if micro else 16, caption_channels=24, sample_size=8,
        use_additional_conditions=micro,
    ).eval().requires_grad_(False)


def tiny_dit(num_layers: int = 6, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=num_layers, sample_size=8).eval().requires_grad_(False)


def export_tiny(out: Path, model: str = "pixart-alpha", **options) -> Path:
    """Export a tiny random model through the real exporter (library call, no subprocess)."""
    from deltadit_export.export_options import ExportOptions
    from deltadit_export.exporter import export
    from deltadit_export.progress import Progress

    overrides = TINY_PIXART_SET if model == "pixart-alpha" else TINY_DIT_SET
    opts = ExportOptions(model=model, resolution=options.pop("resolution", TINY_RESOLUTION), random_weights=True,
                         overrides=dict(options.pop("overrides", overrides)), out=str(out), **options)
    export(opts, Progress(quiet=True))
    return out


def rebuild_model(out: Path):
    """The diffusers model an export of export_tiny came from (same seed and overrides)."""
    from deltadit_export.model_weights import WeightsSource, build_model
    from deltadit_export.models import get_spec
    from runtime.manifest import load_manifest

    m = load_manifest(out)
    src = m.model["source"]
    return build_model(get_spec(m.model["name"]), WeightsSource("random", seed=src.get("seed", 0)),
                       m.model["config"])


# ---------------------------------------------------------------- copies of exports, for tests that damage them


def copy_export(src: Path, tmp_path: Path, name: str = "eng") -> Path:
    """A copy of the export ``src`` at ``tmp_path/name`` (the shared session exports stay read-only)."""
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edit_manifest(folder: Path, fn) -> dict:
    """Change the manifest dict of ``folder`` in place with ``fn``; returns the edited dict."""
    from runtime.manifest import MANIFEST_NAME

    path = folder / MANIFEST_NAME
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))
    return d


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of an export folder at ``dst`` with its manifest dict changed by ``edit``."""
    shutil.copytree(src, dst)
    edit_manifest(dst, edit)
    return dst
