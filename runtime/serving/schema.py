"""What a serving request may hold, and the checks every front end (Triton, Ray, tests) runs on it.

One image is one :class:`ImageRequest`; a request carries one or more of them. The limits come from
the manifest (how many rows the engines take, which conditioning the model reads) and from the
server's own bounds (steps, guidance, prompt length), so a request that the engines cannot run is
refused before it joins a batch, with a :class:`RequestError` that names the field and the fix. The
front ends turn that error into their protocol's error (HTTP 400, Triton ``TritonError``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..manifest import Manifest
from ..schedule import POLICY_NAMES

OUTPUTS = ("png", "base64", "latents")
MAX_SEED = 2**63 - 1  # Triton carries seeds as INT64
DEFAULT_GUIDANCE = 4.5  # only for limits built by hand: from_manifest takes the model's (manifest.default_guidance)
DEFAULT_MAX_STEPS = 100
DEFAULT_MAX_GUIDANCE = 20.0
DEFAULT_MAX_PROMPT_CHARS = 2000


class RequestError(ValueError):
    """A request the server refuses; ``field`` names the part of the request that is wrong."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class Limits:
    """What one server accepts. ``rows`` is the manifest's max_batch: rows of one engine call, and with
    classifier-free guidance every image takes two rows (unconditional and conditional)."""

    conditioning: str  # "prompt" (text encoder shipped), "prompt_embeds" (caption states) or "class_label"
    rows: int
    default_steps: int
    default_guidance: float = DEFAULT_GUIDANCE
    default_policy: str = "delta-dit"
    max_steps: int = DEFAULT_MAX_STEPS
    max_guidance: float = DEFAULT_MAX_GUIDANCE
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    embeds_shape: tuple[int, int] | None = None  # (tokens, channels) for "prompt_embeds"
    num_classes: int | None = None
    null_class: int | None = None
    pixel_space: bool = False  # the samples are pixels (1 or 3 channels), so PNG output exists

    @classmethod
    def from_manifest(cls, manifest: Manifest, *, text_encoder: bool, **overrides) -> "Limits":
        cond = manifest.conditioning
        if cond.get("kind") == "caption":
            kind = "prompt" if text_encoder else "prompt_embeds"
            embeds_shape = (int(cond["tokens"]), int(cond["channels"]))
            classes = null = None
        else:
            kind, embeds_shape = "class_label", None
            classes, null = int(cond["num_classes"]), int(cond["null_class"])  # validated by the manifest
        limits = cls(conditioning=kind, rows=int(manifest.max_batch),
                     default_steps=int(manifest.schedule["num_steps"]),
                     default_guidance=float(manifest.default_guidance),  # the model's, recorded by the exporter
                     embeds_shape=embeds_shape, num_classes=classes, null_class=null,
                     pixel_space=int(manifest.sample_shape[0]) in (1, 3))
        return replace(limits, **{k: v for k, v in overrides.items() if v is not None})

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.max_prompt_chars < 1 or not self.max_guidance >= 0:
            raise ValueError(f"server limits out of range: {self}")

    def images_per_generation(self, guidance: float) -> int:
        """How many images one engine call holds: every row with guidance off, half of them with it on."""
        return self.rows // 2 if guidance > 1.0 else self.rows

    @property
    def max_images(self) -> int:
        """The batch limit that holds for any guidance (what Triton's max_batch_size and Ray's batch use)."""
        return max(1, self.rows // 2)


@dataclass(frozen=True)
class ImageRequest:
    """One image to generate. Exactly one of prompt / prompt_embeds / class_label is set (the model's kind)."""

    seed: int
    steps: int
    guidance: float
    policy: str
    prompt: str | None = None
    prompt_embeds: np.ndarray | None = field(default=None, compare=False)  # float32 [tokens, channels]
    prompt_mask: np.ndarray | None = field(default=None, compare=False)  # float32 [tokens]
    # The unconditional half of guidance for prompt_embeds: the client's text encoder's embedding of the negative
    # prompt (of "" for none). Per image, so an image still depends only on its own request.
    negative_embeds: np.ndarray | None = field(default=None, compare=False)  # float32 [tokens, channels]
    negative_mask: np.ndarray | None = field(default=None, compare=False)  # float32 [tokens]
    class_label: int | None = None

    @property
    def group_key(self) -> tuple:
        """Images with equal keys can share one generation (one schedule, one guidance scale)."""
        return (self.steps, self.policy, self.guidance)


@dataclass(frozen=True)
class ParsedRequest:
    images: tuple[ImageRequest, ...]
    output: str = "png"


# ---------------------------------------------------------------- field checks (shared by all front ends)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


def check_steps(value: Any, limits: Limits) -> int:
    if not _is_int(value):
        raise RequestError("steps", f"'steps' must be an integer, got {_shown(value)}; pass e.g. \"steps\": "
                                    f"{limits.default_steps}")
    if not 1 <= int(value) <= limits.max_steps:
        raise RequestError("steps", f"'steps'={int(value)} is out of range: expected an integer 1..{limits.max_steps}"
                                    f" (this server's limit; the export's default is {limits.default_steps})")
    return int(value)


def check_guidance(value: Any, limits: Limits) -> float:
    if not _is_number(value):
        raise RequestError("guidance", f"'guidance' must be a number, got {_shown(value)}; pass e.g. \"guidance\": "
                                       f"{limits.default_guidance}")
    g = float(value)
    if not (math.isfinite(g) and 0.0 <= g <= limits.max_guidance):
        raise RequestError("guidance", f"'guidance'={g} is out of range: expected a number 0..{limits.max_guidance:g}"
                                       " (1 or less turns classifier-free guidance off)")
    return g


def check_policy(value: Any, limits: Limits) -> str:
    if not isinstance(value, str) or value not in POLICY_NAMES:
        raise RequestError("policy", f"'policy' must be one of {', '.join(POLICY_NAMES)}, got {_shown(value)}")
    return value


def check_seed(value: Any, name: str = "seed") -> int:
    if not _is_int(value) or not 0 <= int(value) <= MAX_SEED:
        raise RequestError("seed", f"'{name}' must be an integer 0..2**63-1, got {_shown(value)}")
    return int(value)


def check_prompt(value: Any, limits: Limits, name: str = "prompt") -> str:
    if not isinstance(value, str):
        raise RequestError("prompt", f"'{name}' must be a string (or a list of strings), got {_shown(value)}")
    if len(value) > limits.max_prompt_chars:
        raise RequestError("prompt", f"'{name}' is {len(value)} characters long; this server takes at most "
                                     f"{limits.max_prompt_chars} (the text encoder reads only the first words): "
                                     "send a shorter caption")
    if "\x00" in value or not value.strip():
        raise RequestError("prompt", f"'{name}' is empty (or holds NUL characters): pass a caption, e.g. "
                                     "\"a handwritten digit 7\"")
    return value


def check_class_label(value: Any, limits: Limits, name: str = "class_label") -> int:
    top = int(limits.num_classes or 0)
    if not _is_int(value) or not 0 <= int(value) < top or int(value) == limits.null_class:
        raise RequestError("class_label", f"'{name}' must be a class id 0..{top - 1}, got {_shown(value)}")
    return int(value)


def check_embeds(value: Any, limits: Limits, name: str = "prompt_embeds", *, mask: bool = False) -> np.ndarray:
    """Caption states [tokens, channels] (or a mask [tokens] with ``mask``); ``name`` is the field, maybe indexed
    (``negative_embeds[2]``), and the error's field is the name without its index."""
    tokens, channels = limits.embeds_shape or (0, 0)
    want = (tokens,) if mask else (tokens, channels)
    field_name = name.split("[", 1)[0]
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise RequestError(field_name, f"'{name}' must be numbers of shape {list(want)}, got {_shown(value)}") from None
    if arr.shape != want:
        raise RequestError(field_name, f"'{name}' has shape {list(arr.shape)}, expected {list(want)} (the caption "
                                       "states this model was exported for)")
    if not np.isfinite(arr).all():
        raise RequestError(field_name, f"'{name}' holds NaN/Inf: send finite numbers")
    return arr


def check_negative(guidance: float, negative: np.ndarray | None, limits: Limits) -> None:
    """Guidance on caption states needs the unconditional states from the client: this server has no text encoder,
    and zeros are not the encoder's embedding of "" (runtime.generate refuses to make one up, and so do we)."""
    if limits.conditioning != "prompt_embeds" or guidance <= 1.0 or negative is not None:
        return
    raise RequestError("negative_embeds", f"guidance {guidance:g} needs the unconditional half, and this server has no "
                                          "text encoder to make it: pass 'negative_embeds' [tokens, channels] (+ "
                                          "'negative_mask' [tokens]), your text encoder's embedding of the negative "
                                          "prompt (of \"\" for none, as the diffusers pipelines do), or 'guidance' ≤ 1 "
                                          "to sample without guidance")


def check_images_count(count: int, guidance: float, limits: Limits, field_name: str) -> None:
    per_call = limits.images_per_generation(guidance)
    if count < 1:
        raise RequestError(field_name, f"'{field_name}' holds no image: send at least one")
    if count > per_call:
        rows = "2 rows per image with guidance" if guidance > 1.0 else "1 row per image without guidance"
        raise RequestError(field_name, f"{count} images in one request, but the engines take at most {per_call} per "
                                       f"generation (max_batch {limits.rows} rows, {rows}); send at most {per_call} per "
                                       "request, or re-export with a larger --max-batch")


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


# ---------------------------------------------------------------- the JSON request (Ray Serve, load test, docs)

COMMON_FIELDS = ("seed", "steps", "guidance", "policy", "output")
CONDITIONING_FIELDS = {"prompt": ("prompt",),
                       "prompt_embeds": ("prompt_embeds", "prompt_mask", "negative_embeds", "negative_mask"),
                       "class_label": ("class_label",)}


def parse_json_request(payload: Any, limits: Limits) -> ParsedRequest:
    """Check a decoded JSON object and turn it into images. ``prompt`` (or ``prompt_embeds`` / ``class_label``)
    may be one value or a list (several images); ``seed`` is one int (image i gets seed + i) or one per image."""
    if not isinstance(payload, Mapping):
        raise RequestError("body", f"the request body must be a JSON object, got {type(payload).__name__}; send e.g. "
                                   f"{example_request(limits)}")
    cond_fields = CONDITIONING_FIELDS[limits.conditioning]
    unknown = sorted(set(payload) - set(COMMON_FIELDS) - set(cond_fields))
    if unknown:
        raise RequestError(unknown[0], f"unknown field(s) {', '.join(map(repr, unknown))}: this server takes "
                                       f"{', '.join(cond_fields + COMMON_FIELDS)}")
    main = cond_fields[0]
    if main not in payload:
        raise RequestError(main, f"missing '{main}': this model is conditioned on {main}; send e.g. "
                                 f"{example_request(limits)}")
    steps = check_steps(payload.get("steps", limits.default_steps), limits)
    guidance = check_guidance(payload.get("guidance", limits.default_guidance), limits)
    policy = check_policy(payload.get("policy", limits.default_policy), limits)
    output = payload.get("output", "png")
    if output not in OUTPUTS:
        raise RequestError("output", f"'output' must be one of {', '.join(OUTPUTS)}, got {_shown(output)}")

    values, masks = _conditioning_values(payload, limits, main)
    check_images_count(len(values), guidance, limits, main)
    negatives, negative_masks = _negatives(payload, limits, len(values)) if main == "prompt_embeds" else ([], [])
    check_negative(guidance, negatives[0] if negatives else None, limits)
    if output in ("png", "base64") and not limits.pixel_space:
        raise RequestError("output", "this model's samples are latents (they need its VAE to become an image): ask "
                                     "for \"output\": \"latents\"")
    if output == "png" and len(values) != 1:
        raise RequestError("output", f"\"output\": \"png\" returns one image, but the request holds {len(values)}: ask "
                                     "for \"output\": \"base64\" (a JSON list of PNGs) or send one image per request")
    seeds = _seeds(payload.get("seed", 0), len(values))
    base = dict(steps=steps, guidance=guidance, policy=policy)
    if main == "prompt":
        images = [ImageRequest(seed=s, prompt=v, **base) for s, v in zip(seeds, values)]
    elif main == "class_label":
        images = [ImageRequest(seed=s, class_label=v, **base) for s, v in zip(seeds, values)]
    else:
        negatives = negatives or [None] * len(values)
        negative_masks = negative_masks or [None] * len(values)
        images = [ImageRequest(seed=s, prompt_embeds=v, prompt_mask=m, negative_embeds=n, negative_mask=nm, **base)
                  for s, v, m, n, nm in zip(seeds, values, masks, negatives, negative_masks)]
    return ParsedRequest(tuple(images), output)


def _conditioning_values(payload: Mapping, limits: Limits, main: str) -> tuple[list, list]:
    raw = payload[main]
    if main == "prompt":
        items = raw if isinstance(raw, list) else [raw]
        return [check_prompt(v, limits, f"prompt[{i}]" if isinstance(raw, list) else "prompt")
                for i, v in enumerate(items)], []
    if main == "class_label":
        items = raw if isinstance(raw, list) else [raw]
        return [check_class_label(v, limits) for v in items], []
    # Caption states: one [tokens, channels] or a list of them; an optional mask of [tokens] each.
    many = _depth(raw) == 3
    embeds = [check_embeds(v, limits, f"prompt_embeds[{i}]" if many else "prompt_embeds")
              for i, v in enumerate(raw if many else [raw])]
    mask_raw = payload.get("prompt_mask")
    if mask_raw is None:
        return embeds, [None] * len(embeds)
    masks = mask_raw if many else [mask_raw]
    if not isinstance(masks, list) or len(masks) != len(embeds):
        raise RequestError("prompt_mask", f"'prompt_mask' must hold one mask per prompt_embeds ({len(embeds)})")
    return embeds, [check_embeds(m, limits, "prompt_mask", mask=True) for m in masks]


def _negatives(payload: Mapping, limits: Limits, count: int) -> tuple[list, list]:
    """``negative_embeds``: one [tokens, channels] for every image (the usual case: the embedding of "") or a list
    of one per image; ``negative_mask`` likewise ([tokens] or one per image). Empty lists when absent."""
    raw, mask_raw = payload.get("negative_embeds"), payload.get("negative_mask")
    if raw is None:
        if mask_raw is not None:
            raise RequestError("negative_mask", "'negative_mask' without 'negative_embeds': send the negative prompt's "
                                                "states with its mask, or neither")
        return [], []
    negatives = _shared_or_each(raw, 3, count, "negative_embeds", lambda v, n: check_embeds(v, limits, n))
    if mask_raw is None:
        return negatives, [None] * count
    masks = _shared_or_each(mask_raw, 2, count, "negative_mask", lambda v, n: check_embeds(v, limits, n, mask=True))
    return negatives, masks


def _shared_or_each(raw: Any, per_image_depth: int, count: int, name: str, check) -> list:
    """One value for every image, or (nested one level deeper) a list of one per image."""
    if _depth(raw) != per_image_depth:
        return [check(raw, name)] * count
    if len(raw) != count:
        raise RequestError(name, f"'{name}' lists {len(raw)} entries for {count} images: send one per image, or one "
                                 "for all of them")
    return [check(v, f"{name}[{i}]") for i, v in enumerate(raw)]


def _depth(value: Any) -> int:
    """Nesting depth of JSON lists along their first elements (3 for a list of [tokens, channels])."""
    depth = 0
    while isinstance(value, list) and value:
        depth, value = depth + 1, value[0]
    return depth


def _seeds(value: Any, count: int) -> list[int]:
    if isinstance(value, list):
        if len(value) != count:
            raise RequestError("seed", f"'seed' lists {len(value)} seeds for {count} images: send one seed per image, "
                                       "or one integer (image i then gets seed + i)")
        return [check_seed(v, f"seed[{i}]") for i, v in enumerate(value)]
    first = check_seed(value)
    if first + count - 1 > MAX_SEED:
        raise RequestError("seed", f"'seed'={first} leaves no room for {count} consecutive seeds: pass a smaller one")
    return [first + i for i in range(count)]


def example_request(limits: Limits) -> str:
    if limits.conditioning == "prompt_embeds":
        tokens, channels = limits.embeds_shape or ("", "")
        states = f"[[...{channels} numbers] × {tokens} tokens]"
        cond = f'"prompt_embeds": {states}, "negative_embeds": {states}'
    else:
        cond = {"prompt": '"prompt": "a handwritten digit 7"', "class_label": '"class_label": 207'}[limits.conditioning]
    output = "png" if limits.pixel_space else "latents"
    return (f'{{{cond}, "seed": 0, "steps": {limits.default_steps}, "guidance": {limits.default_guidance:g}, '
            f'"policy": "{limits.default_policy}", "output": "{output}"}}')
