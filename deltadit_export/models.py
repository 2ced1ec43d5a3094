"""Model registry: one :class:`ModelSpec` per registry name.

Each spec says which diffusers class the model is, which Hugging Face repo holds which resolution, the
architecture to build with ``--random-weights``, its default schedule and guidance. Reading and checking a
config is ``model_config.py``; locating, fingerprinting and loading weights is ``model_weights.py`` (both
import this module, never the other way round).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "weights"


class ModelError(ValueError):
    """The model, its weights or its options cannot be used; the message says why and how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "pixart" (caption-conditioned, adaLN-single) or "dit" (class-conditioned, adaLN-zero)
    diffusers_class: str
    resolutions: tuple[int, ...]  # resolutions with published weights
    default_resolution: int
    repo_ids: dict[int, str] = field(default_factory=dict)  # resolution -> Hugging Face repo id
    vae_scale_factor: int = 8  # pixels per latent pixel (1 for a pixel-space model)
    random_config: dict[str, Any] = field(default_factory=dict)  # architecture for --random-weights
    bundled: str | None = None  # folder under deltadit_export/weights shipped with the package
    default_schedule: dict[str, int] = field(default_factory=dict)  # num_steps, interval, boundary
    caption_tokens: int = 120  # caption length the engines take (T5 max_sequence_length for PixArt-α)
    guidance_scale: float = 4.5  # classifier-free guidance default (its diffusers pipeline's); see model_guidance

    def sample_size(self, resolution: int) -> int:
        return resolution // self.vae_scale_factor


PIXART_ARCH = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    cross_attention_dim=1152,
    caption_channels=4096,
    patch_size=2,
    norm_type="ada_norm_single",
    num_embeds_ada_norm=1000,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    attention_bias=True,
    activation_fn="gelu-approximate",
)
DIT_ARCH = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    patch_size=2,
    norm_type="ada_norm_zero",
    num_embeds_ada_norm=1000,
)
# 20-step DPM-Solver defaults of DESIGN.md §2 (N=2, b=12); N_c is derived from L.
DEFAULT_SCHEDULE = {"num_steps": 20, "interval": 2, "boundary": 12}
# Classifier-free guidance of PixArt-α (PixArtAlphaPipeline's default): models.model_guidance gives each model's
# own (DiTPipeline's 4.0 for DiT, the model card's for a shipped model); the exporter records it in the manifest.
DEFAULT_GUIDANCE = 4.5

REGISTRY: dict[str, ModelSpec] = {
    "pixart-digits": ModelSpec(
        name="pixart-digits",
        family="pixart",
        diffusers_class="PixArtTransformer2DModel",
        resolutions=(16,),
        default_resolution=16,
        vae_scale_factor=1,
        bundled="pixart-digits",
        default_schedule=DEFAULT_SCHEDULE,
        caption_tokens=0,  # read from the shipped text encoder's config
    ),
    "pixart-alpha": ModelSpec(
        name="pixart-alpha",
        family="pixart",
        diffusers_class="PixArtTransformer2DModel",
        resolutions=(512, 1024),
        default_resolution=512,
        repo_ids={512: "PixArt-alpha/PixArt-XL-2-512x512", 1024: "PixArt-alpha/PixArt-XL-2-1024-MS"},
        random_config=PIXART_ARCH,
        default_schedule=DEFAULT_SCHEDULE,
    ),
    "dit-xl-2": ModelSpec(
        name="dit-xl-2",
        family="dit",
        diffusers_class="DiTTransformer2DModel",
        resolutions=(256, 512),
        default_resolution=256,
        repo_ids={256: "facebook/DiT-XL-2-256", 512: "facebook/DiT-XL-2-512"},
        random_config=DIT_ARCH,
        default_schedule=DEFAULT_SCHEDULE,
        caption_tokens=0,
        guidance_scale=4.0,  # DiTPipeline's default
    ),
}
DEFAULT_MODEL = "pixart-digits"
# Diffusers classes accepted per family; old checkpoints (DiT-XL-2 on the hub) say Transformer2DModel.
ACCEPTED_CLASSES = {
    "pixart": ("PixArtTransformer2DModel", "Transformer2DModel"),
    "dit": ("DiTTransformer2DModel", "Transformer2DModel"),
}
FAMILY_NORM = {"pixart": "ada_norm_single", "dit": "ada_norm_zero"}


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}: expected one of {', '.join(sorted(REGISTRY))}") from None


def model_guidance(model_name: str) -> float:
    """The one default classifier-free guidance scale of a model: for a shipped model the scale it was
    evaluated with (``training_summary.json`` → evaluation → guidance_scale, its model card's), else the
    registry's (its diffusers pipeline's default), else ``DEFAULT_GUIDANCE``. The exporter records it in the
    manifest (``conditioning.guidance_scale``), where the runtime and every tool read it."""
    spec = REGISTRY.get(model_name)
    if spec is not None and spec.bundled:
        path = PACKAGE_WEIGHTS / spec.bundled / "training_summary.json"
        try:
            return float(json.loads(path.read_text())["evaluation"]["guidance_scale"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return spec.guidance_scale if spec is not None else DEFAULT_GUIDANCE


def check_prompt(model_name: str, prompt: str) -> None:
    """Refuse a prompt the shipped model cannot know. ``pixart-digits`` learned the captions "a handwritten
    digit 0".."9" (and "" for guidance); its hashed-word encoder maps any other word to a vector the model has
    never seen, so "digit 11" would silently draw noise. Other models take what their encoder takes."""
    if model_name != "pixart-digits":
        return
    from runtime.text_encoder import tokenize

    from .digits import prompt_for_digit

    known = {w for d in range(10) for w in tokenize(prompt_for_digit(d))}
    unknown = [w for w in tokenize(prompt) if w not in known]
    if unknown:
        raise ModelError(f"prompt {prompt!r}: pixart-digits was trained on the captions {prompt_for_digit(0)!r} .. "
                         f"{prompt_for_digit(9)!r} only and cannot know {', '.join(map(repr, unknown))} (its words: "
                         f"{', '.join(sorted(known))}); pass e.g. --prompt {prompt_for_digit(7)!r}")


def caption_tokens(spec: ModelSpec) -> int:
    """Caption length of the engines: 120 for PixArt-α (T5), the shipped text encoder's length for digits."""
    if spec.family != "pixart":
        return 0
    if spec.bundled:
        cfg = PACKAGE_WEIGHTS / spec.bundled / "text_encoder" / "config.json"
        if cfg.is_file():
            return int(json.loads(cfg.read_text())["max_tokens"])
    return spec.caption_tokens or 120
