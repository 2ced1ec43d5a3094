"""Model registry and weight loading.

One :class:`ModelSpec` per registry name says which diffusers class it is, which Hugging Face
repo holds which resolution, and the architecture to build with ``--random-weights``. Loading is
offline only: a local diffusers directory (``--weights``), the local Hugging Face cache, the
weights shipped inside this package (``pixart-digits``), or a seeded random init. Every failure
names the value that is wrong and the ways out, before any heavy work starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
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


# Architecture fields that must be positive integers when given with --set.
POSITIVE_INT_FIELDS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "in_channels",
                       "out_channels", "sample_size", "cross_attention_dim", "caption_channels")


def check_overrides(spec: ModelSpec, overrides: dict[str, Any]) -> None:
    """--set keys must be config fields of the diffusers class; sizes must be positive integers."""
    import inspect

    params = set(inspect.signature(_model_class(spec).__init__).parameters) - {"self", "args", "kwargs"}
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


# ---------------------------------------------------------------- locating weights


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from; recorded in the manifest so the benchmark can rebuild the same model."""

    kind: str  # "local", "hf-cache", "bundled" or "random"
    path: str | None = None  # the transformer folder (local, hf-cache, bundled)
    repo_id: str | None = None
    seed: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {})}


def _transformer_folder(path: Path) -> Path:
    """Accept a pipeline folder (with transformer/) or the transformer folder itself."""
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    return path


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


WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")


def check_weight_files(folder: Path, where: str) -> None:
    """A config without weights fails deep inside diffusers; say so before any work starts."""
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(
            f"{where} has a config.json but no weights (looked for {', '.join(WEIGHT_FILES[:2])} and their "
            "sharded .index.json): the folder is incomplete; save_pretrained or download it again, or pass "
            "--random-weights"
        )


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment at call time (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def locate_weights(spec: ModelSpec, resolution: int, weights: str | os.PathLike | None) -> WeightsSource:
    """Find the transformer folder offline, or raise a ModelError naming where it looked and the ways out."""
    if weights is not None:
        folder = Path(weights).expanduser()
        if not folder.is_dir():
            what = "is a file, not a directory" if folder.exists() else "does not exist"
            raise ModelError(
                f"--weights {folder} {what}: pass a local diffusers folder (a pipeline folder or its transformer/ "
                "sub-folder, as written by save_pretrained), or leave --weights out to use the Hugging Face "
                "cache, or pass --random-weights"
            )
        folder = _transformer_folder(folder)
        check_config(spec, read_transformer_config(folder), resolution, f"--weights {folder}")
        check_weight_files(folder, f"--weights {folder}")
        return WeightsSource("local", path=str(folder.resolve()))
    if spec.bundled:
        folder = PACKAGE_WEIGHTS / spec.bundled / "transformer"
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"the shipped {spec.name} weights are missing from {folder.parent}: reinstall deltadit, or train "
                "them with `python tools/train_digits.py`"
            )
        check_config(spec, read_transformer_config(folder), resolution, f"shipped weights {folder}")
        return WeightsSource("bundled", path=str(folder))
    repo_id = spec.repo_ids[resolution]
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(
            repo_id, local_files_only=True, allow_patterns=["transformer/*", "model_index.json"],
            cache_dir=hf_cache_dir(),
        )
    except Exception:  # LocalEntryNotFoundError and friends: nothing in the cache
        root = None
    if root is None or not (Path(root) / "transformer" / "config.json").is_file():
        raise ModelError(
            f"no local weights for {spec.name} at {resolution}: looked for {repo_id!r} in the Hugging Face cache "
            f"({hf_cache_dir()}) and found "
            f"nothing (downloads are off). Either pass --weights DIR (a local diffusers folder of {repo_id}), or "
            "pass --random-weights to build the same architecture with seeded random weights"
        )
    folder = Path(root) / "transformer"
    check_config(spec, read_transformer_config(folder), resolution, f"cached {repo_id}")
    check_weight_files(folder, f"cached {repo_id} ({folder})")
    return WeightsSource("hf-cache", path=str(folder), repo_id=repo_id)


def random_config(spec: ModelSpec, resolution: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The diffusers config built by --random-weights: the spec's architecture at this resolution, plus --set."""
    if spec.bundled:
        config = read_transformer_config(PACKAGE_WEIGHTS / spec.bundled / "transformer")
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


def _model_class(spec: ModelSpec):
    import diffusers

    return getattr(diffusers, spec.diffusers_class)


def build_model(spec: ModelSpec, source: WeightsSource, config: dict[str, Any] | None = None):
    """Instantiate the diffusers transformer (fp32, eval mode) from a source. ``config`` is for random weights."""
    import torch

    cls = _model_class(spec)
    if source.kind == "random":
        torch.manual_seed(source.seed or 0)
        try:
            model = cls(**config)
        except TypeError as exc:
            raise ModelError(f"--set: {exc}; valid keys are the {spec.diffusers_class} config fields") from None
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            raise ModelError(f"--set: the {spec.diffusers_class} architecture cannot be built from these "
                             f"values ({type(exc).__name__}: {exc}); check the --set values") from None
    else:
        if source.overrides:
            raise ModelError("--set only applies to --random-weights (it changes the architecture)")
        try:
            # Without accelerate diffusers falls back to a full-memory load anyway, with a warning per load.
            lean = importlib.util.find_spec("accelerate") is not None
            model = cls.from_pretrained(source.path, torch_dtype=torch.float32, local_files_only=True,
                                        low_cpu_mem_usage=lean)
        except (OSError, ValueError, RuntimeError, KeyError, EnvironmentError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ModelError(
                f"cannot load the {spec.diffusers_class} weights in {source.path} ({type(exc).__name__}: {first}); "
                "the weight files are damaged or incomplete: save_pretrained or download them again"
            ) from exc
    return model.eval().requires_grad_(False)


def check_finite_weights(model, where: str) -> None:
    """NaN/Inf in a checkpoint poisons every image; refuse it before exporting anything (names the tensor)."""
    import torch

    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelError(
                f"{where}: weight {name!r} holds {bad} NaN/Inf value(s) of {tensor.numel()}; the checkpoint is "
                "corrupted: download or save_pretrained it again (or pass --random-weights)"
            )


def weights_fingerprint(source: WeightsSource, config: dict[str, Any]) -> str:
    """A hash identifying the weights without loading them: file contents, or (config, seed) for random."""
    h = hashlib.sha256()
    if source.kind == "random":
        h.update(json.dumps({"config": config, "seed": source.seed}, sort_keys=True).encode())
        return h.hexdigest()
    folder = Path(source.path)
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin", ".json") or f.name.endswith(".index.json")):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()


def caption_tokens(spec: ModelSpec) -> int:
    """Caption length of the engines: 120 for PixArt-α (T5), the shipped text encoder's length for digits."""
    if spec.family != "pixart":
        return 0
    if spec.bundled:
        cfg = PACKAGE_WEIGHTS / spec.bundled / "text_encoder" / "config.json"
        if cfg.is_file():
            return int(json.loads(cfg.read_text())["max_tokens"])
    return spec.caption_tokens or 120
