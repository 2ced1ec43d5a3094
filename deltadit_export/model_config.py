"""Diffusers configs of the registry models: reading ``config.json``, checking it against ``--model`` and
``--resolution``, ``--set`` overrides and the config ``--random-weights`` builds. Every failure names the
value that is wrong and the way out, before any heavy work starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import models as registry
from .models import ACCEPTED_CLASSES, FAMILY_NORM, ModelError, ModelSpec

# Architecture fields that must be positive integers when given with --set, and their largest accepted value
# (far above any published DiT; they keep a typo from asking for terabytes before anything is built).
POSITIVE_INT_FIELDS = {"num_layers": 1024, "num_attention_heads": 1024, "attention_head_dim": 1024,
                       "patch_size": 64, "in_channels": 1024, "out_channels": 1024, "sample_size": 8192,
                       "cross_attention_dim": 65536, "caption_channels": 65536, "norm_num_groups": 1024,
                       "num_embeds_ada_norm": 1_000_000, "interpolation_scale": 1024}
# Parameters a --random-weights architecture may have (PixArt-α and DiT-XL/2 have 0.6e9): 80 GB at fp32.
MAX_PARAMS = 20_000_000_000


def _expected_kinds(annotation: Any) -> set[str]:
    """The JSON kinds a config field takes, from its annotation in the diffusers signature ('int | None', …)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return {k for k in ("bool", "int", "float", "str", "None") if k in text.replace("NoneType", "None")}


def _kind_ok(value: Any, kinds: set[str]) -> bool:
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return "int" in kinds or "float" in kinds
    if isinstance(value, float):
        return "float" in kinds and math.isfinite(value)
    if isinstance(value, str):
        return "str" in kinds
    return False  # lists, objects


def check_overrides(spec: ModelSpec, overrides: dict[str, Any]) -> None:
    """--set keys must be config fields of the diffusers class, of the field's type (from its signature);
    sizes must be positive integers within bounds, and the whole architecture must fit in memory."""
    import inspect

    signature = inspect.signature(model_class(spec).__init__).parameters
    params = set(signature) - {"self", "args", "kwargs"}
    for key, value in overrides.items():
        if key not in params:
            raise ModelError(f"--set {key}=...: {key!r} is not a {spec.diffusers_class} config field; valid keys: "
                             f"{', '.join(sorted(params))}")
        if key in POSITIVE_INT_FIELDS:
            top = POSITIVE_INT_FIELDS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= top:
                raise ModelError(f"--set {key}={value!r}: expected a positive integer ≤ {top:,}")
            continue
        kinds = _expected_kinds(signature[key].annotation)
        if kinds and not _kind_ok(value, kinds):
            want = " or ".join(sorted({"bool": "true/false", "int": "an integer", "float": "a finite number",
                                       "str": "a string", "None": "null"}[k] for k in kinds))
            raise ModelError(f"--set {key}={value!r}: expected {want} (the {spec.diffusers_class} default is "
                             f"{signature[key].default!r})")
        if key == "norm_eps" and not value > 0:
            raise ModelError(f"--set norm_eps={value!r}: expected a positive number (the default is "
                             f"{signature[key].default!r})")
        if key == "dropout" and not 0 <= value < 1:
            raise ModelError(f"--set dropout={value!r}: expected a number in [0, 1) (exports run in eval mode)")
        if key == "norm_type" and value != FAMILY_NORM[spec.family]:
            raise ModelError(f"--set norm_type={value!r}: --model {spec.name} is built with "
                             f"{FAMILY_NORM[spec.family]!r} (pick the --model of the other family instead)")


def check_architecture(spec: ModelSpec, config: dict[str, Any]) -> None:
    """A --random-weights architecture that cannot fit in memory is refused before it is built."""
    width = config.get("num_attention_heads", 1) * config.get("attention_head_dim", 1)
    params = config.get("num_layers", 1) * 12 * width * width  # attention (4·D²) + feed-forward (8·D²) per block
    if params > MAX_PARAMS:
        raise ModelError(f"--set: this {spec.diffusers_class} would have about {params:.1e} parameters "
                         f"({config.get('num_layers')} blocks of width {width}), more than the {MAX_PARAMS:.0e} the "
                         "exporter builds in memory (PixArt-α has 6e8); choose smaller --set values")


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
        except (ValueError, RecursionError):  # not JSON (or absurdly nested): the text itself
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

