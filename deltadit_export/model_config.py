"""Diffusers configs of the registry models: reading ``config.json``, checking it against ``--model`` and
``--resolution``, ``--set`` overrides and the config ``--random-weights`` builds. Every failure names the
value that is wrong and the way out, before any heavy work starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import models as registry
from .models import ACCEPTED_CLASSES, FAMILY_NORM, ModelError, ModelSpec

# Architecture fields that must be positive integers when given with --set.
POSITIVE_INT_FIELDS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "in_channels",
                       "out_channels", "sample_size", "cross_attention_dim", "caption_channels")


def check_overrides(spec: ModelSpec, overrides: dict[str, Any]) -> None:
    """--set keys must be config fields of the diffusers class; sizes must be positive integers."""
    import inspect

    params = set(inspect.signature(model_class(spec).__init__).parameters) - {"self", "args", "kwargs"}
    for key, value in overrides.items():
        if key not in params:
            raise ModelError(f"--set {key}=...: {key!r} is not a {spec.diffusers_class} config field; valid keys: "
                             f"{', '.join(sorted(params))}")
        if key in POSITIVE_INT_FIELDS and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ModelError(f"--set {key}={value!r}: expected a positive integer")


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are parsed as JSON (numbers, true/false, null) or kept as strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ModelError(f"--set {item!r} is not key=value (example: --set num_layers=12)")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def check_resolution(spec: ModelSpec, resolution: int, random_weights: bool, patch_size: int = 2) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ModelError(f"--resolution {resolution!r} must be a positive integer")
    step = spec.vae_scale_factor * patch_size
    if random_weights:
        if resolution % step:
            raise ModelError(
                f"--resolution {resolution} for {spec.name} must be a multiple of {step} "
                f"(latent scale {spec.vae_scale_factor} × patch {patch_size})"
            )
    elif resolution not in spec.resolutions:
        raise ModelError(
            f"--resolution {resolution} has no published {spec.name} weights; accepted: "
            f"{', '.join(map(str, spec.resolutions))} (any multiple of {step} works with --random-weights)"
        )



def read_transformer_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(
            f"weights directory {folder} has no config.json (nor transformer/config.json): pass a diffusers "
            "pipeline folder or its transformer/ sub-folder, as written by save_pretrained"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config_path} is not valid JSON ({exc}); the weights folder is damaged: copy or "
                         "save_pretrained it again") from None
    except OSError as exc:
        raise ModelError(f"cannot read {config_path}: {exc.strerror or exc}; check the folder's permissions") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_path} holds a JSON {type(config).__name__}, not a diffusers config object; the "
                         "weights folder is damaged: copy or save_pretrained it again")
    return config


def check_config(spec: ModelSpec, config: dict[str, Any], resolution: int, where: str) -> None:
    """The config must be of the spec's diffusers class and match the chosen resolution."""
    cls = config.get("_class_name")
    accepted = ACCEPTED_CLASSES[spec.family]
    if cls not in accepted:
        raise ModelError(
            f"{where} holds a {cls!r}, but --model {spec.name} needs one of {', '.join(accepted)}; "
            "pick the --model that matches these weights"
        )
    norm = config.get("norm_type", FAMILY_NORM[spec.family])
    if norm != FAMILY_NORM[spec.family]:
        raise ModelError(
            f"{where} has norm_type {norm!r}; --model {spec.name} expects {FAMILY_NORM[spec.family]!r} "
            f"(is this a {'DiT' if norm == 'ada_norm_zero' else 'PixArt'} checkpoint? pick the matching --model)"
        )
    expected = spec.sample_size(resolution)
    size = config.get("sample_size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ModelError(
            f"{where} has sample_size {size!r} in its config.json; expected a positive integer ({expected} for "
            f"--resolution {resolution}): the config is damaged or not a {spec.diffusers_class} config"
        )
    if size != expected:
        raise ModelError(
            f"{where} has sample_size {size} (resolution {size * spec.vae_scale_factor}), but --resolution "
            f"{resolution} needs sample_size {expected}; pass --resolution {size * spec.vae_scale_factor}"
        )



def random_config(spec: ModelSpec, resolution: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The diffusers config built by --random-weights: the spec's architecture at this resolution, plus --set."""
    if spec.bundled:
        config = read_transformer_config(registry.PACKAGE_WEIGHTS / spec.bundled / "transformer")
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        config = dict(spec.random_config)
    config["sample_size"] = spec.sample_size(resolution)
    if spec.family == "pixart":
        # The 1024 checkpoints take resolution and aspect-ratio micro-conditions; the others do not.
        config.setdefault("use_additional_conditions", config["sample_size"] == 128)
    config.update(overrides)
    if spec.family == "pixart" and "cross_attention_dim" not in overrides:
        # PixArt projects captions to the block width, so cross-attention keys come in at that width.
        config["cross_attention_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    return config


def model_class(spec: ModelSpec):
    import diffusers

    return getattr(diffusers, spec.diffusers_class)

