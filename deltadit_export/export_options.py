"""Export options: their defaults resolved and every value checked, and the cache key of an export.

Nothing heavy is loaded here (no torch, no model): :func:`resolve` turns :class:`ExportOptions` into a
:class:`ResolvedExport` (model spec, weights located, config read, cut points, default schedule, output
folder, cache key) or raises an :class:`OptionError` / ``ModelError`` naming the option and its range.
``--print-schedule`` needs only :func:`schedule_layers` and :func:`resolve_schedule`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.manifest import FORMAT_VERSION
from runtime.schedule import MAX_STEPS, Cuts, ScheduleError, build_schedule, default_cached_blocks, scaled_boundary

from . import __version__
from .model_config import (
    check_architecture, check_overrides, check_resolution, random_config, read_transformer_config,
)
from .model_weights import WeightsSource, locate_weights, weights_fingerprint
from .models import DEFAULT_MODEL, ModelError, get_spec, model_guidance
from .quantize import resolve_int8_options

# The torch dtype each precision exports from: int8 segments are quantized from the fp32 export.
PRECISIONS = {"fp32": "float32", "fp16": "float16", "int8": "float32"}
BACKENDS = ("onnx", "tensorrt", "torch")
EXPORTERS = ("torchscript", "dynamo")
ENGINES_DIR = Path("engines")


class OptionError(ValueError):
    """An export option is out of range; the message names it and the valid range."""


@dataclass(frozen=True)
class ExportOptions:
    model: str = DEFAULT_MODEL
    resolution: int | None = None  # None: the model's default
    weights: str | None = None
    random_weights: bool = False
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    cached_blocks: int | None = None  # None: round(0.75·L)
    precision: str = "fp32"
    out: str | None = None  # None: engines/<model>-<resolution>-<precision>
    opset: int = 18
    exporter: str = "torchscript"
    max_batch: int = 4  # images per call; engines take up to 2× that (guidance doubles the batch)
    num_steps: int | None = None  # default schedule recorded in the manifest; None: the model's
    interval: int | None = None
    boundary: int | None = None
    backends: tuple[str, ...] = ("onnx",)
    parity_batches: tuple[int, ...] = (1, 5)
    force: bool = False
    calibration: dict[str, Any] | None = None  # a calibration result to record (see calibrate.py)
    # --precision int8 only: segments kept in fp32 (None: quantize.DEFAULT_KEEP_FP32, embed and head) and the
    # gate's max relative error of an int8 segment against fp32 (None: quantize.INT8_TOLERANCE).
    keep_fp32: tuple[str, ...] | None = None
    int8_tolerance: float | None = None

    def cache_fields(self) -> dict[str, Any]:
        """The options that change the artifacts (not where they go or whether to rebuild)."""
        d = asdict(self)
        for key in ("out", "force", "weights", "parity_batches"):
            d.pop(key)
        return d



def default_out(model: str, resolution: int, precision: str) -> Path:
    return ENGINES_DIR / f"{model}-{resolution}-{precision}"


def _check_int(name: str, value: Any, low: int, high: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        rng = f"{low}..{high}" if high is not None else f"≥ {low}"
        raise OptionError(f"{name}={value!r} is out of range: expected an integer {rng}{hint}")


@dataclass(frozen=True)
class ResolvedExport:
    """Options with every default filled in and every value checked; nothing heavy loaded yet."""

    options: ExportOptions
    spec: Any
    resolution: int
    source: WeightsSource
    config: dict[str, Any]
    cuts: Cuts
    schedule: dict[str, Any]
    out: Path
    cache_key: str
    keep_fp32: tuple[str, ...] = ()  # int8: segments exported in fp32
    int8_tolerance: float | None = None  # int8: the gate's limit
    record: dict[str, Any] = field(default_factory=dict)  # the resolved options (manifest export.options)
    weights_fingerprint: str | None = None  # recorded: the PyTorch baselines check a --weights folder against it


def resolve(options: ExportOptions) -> ResolvedExport:
    spec = get_spec(options.model)
    resolution = options.resolution if options.resolution is not None else spec.default_resolution
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise OptionError(f"--resolution={resolution!r} is out of range: expected a positive integer "
                          f"({', '.join(map(str, spec.resolutions))} for the published {spec.name} weights)")
    if options.precision not in PRECISIONS:
        raise OptionError(f"--precision {options.precision!r} is not one of {', '.join(PRECISIONS)}")
    for b in options.backends:
        if b not in BACKENDS:
            raise OptionError(f"--backend {b!r} is not one of {', '.join(BACKENDS)}")
    from .backends import BackendUnavailable, preflight

    for b in options.backends:
        try:
            preflight(b)  # before any model is loaded: a missing TensorRT must not cost a whole ONNX export
        except BackendUnavailable as exc:
            raise OptionError(str(exc)) from None
    if options.exporter not in EXPORTERS:
        raise OptionError(f"--exporter {options.exporter!r} is not one of {', '.join(EXPORTERS)}")
    _check_int("--max-batch", options.max_batch, 1, 256)
    _check_int("--opset", options.opset, 17, 20)
    if options.exporter == "dynamo" and options.opset < 18:
        raise OptionError(f"--exporter dynamo needs --opset 18..20, got {options.opset}")
    if isinstance(options.seed, bool) or not isinstance(options.seed, int) or not 0 <= options.seed < 2**63:
        raise OptionError(f"--seed={options.seed!r} is out of range: expected an integer 0..2^63-1")
    if not isinstance(options.overrides, dict):
        raise OptionError(f"overrides must be a dict of config fields, got {type(options.overrides).__name__}")
    if options.weights and options.random_weights:
        raise OptionError("--weights and --random-weights exclude each other: pick one")
    if options.overrides and not options.random_weights:
        raise OptionError("--set changes the architecture, so it needs --random-weights")
    if options.random_weights:
        check_overrides(spec, options.overrides)
        config = random_config(spec, resolution, options.overrides)
        check_resolution(spec, resolution, True, config.get("patch_size", 2))
        source = WeightsSource("random", seed=options.seed, overrides=dict(options.overrides))
    else:
        # A local folder may hold any size of these classes: its config decides (checked in locate_weights);
        # the Hugging Face cache only has the published resolutions.
        check_resolution(spec, resolution, options.weights is not None)
        source = locate_weights(spec, resolution, options.weights)
        config = {k: v for k, v in read_transformer_config(Path(source.path)).items() if not k.startswith("_")}
    check_tokens(config, resolution)
    if options.random_weights:
        check_architecture(spec, config)
    cuts, sched = resolve_schedule(spec, options, config.get("num_layers", 28))
    n_c = cuts.cached_blocks
    out = Path(options.out) if options.out else default_out(spec.name, resolution, options.precision)
    # The key is built from resolved values, so `--resolution 512` and the default 512 share one export.
    fields = options.cache_fields()
    fields.update(resolution=resolution, cached_blocks=n_c, num_steps=sched["num_steps"],
                  interval=sched["interval"], boundary=sched["boundary"], backends=sorted(set(options.backends)))
    fingerprint = weights_fingerprint(source, config)
    key_material = {
        "options": fields,
        "weights": fingerprint,
        "extras": extras_fingerprint(extras_root(spec, source)),
        "guidance_scale": model_guidance(spec.name),  # recorded in the manifest
        "deltadit": __version__,
        "format_version": FORMAT_VERSION,
        "torch": _torch_version(),
        "diffusers": _package_version("diffusers"),
    }
    try:
        keep_fp32, int8_tolerance = resolve_int8_options(options.precision, options.keep_fp32, options.int8_tolerance,
                                                         cuts, options.backends)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    if options.precision == "int8":
        # The quantized files depend on the quantizer's version; the resolved lists make the default and the
        # same list spelled out share one export.
        fields.update(keep_fp32=list(keep_fp32), int8_tolerance=int8_tolerance)
        key_material["quantizer"] = "onnxruntime " + _package_version("onnxruntime")
    else:  # fp32/fp16 keys stay what they were before int8 existed
        fields.pop("keep_fp32")
        fields.pop("int8_tolerance")
    cache_key = hashlib.sha256(json.dumps(key_material, sort_keys=True, default=str).encode()).hexdigest()
    return ResolvedExport(options, spec, resolution, source, config, cuts, sched, out, cache_key, keep_fp32,
                          int8_tolerance, option_record(fields), weights_fingerprint=fingerprint)


# Latent tokens an export may have: PixArt-Σ at 4K, the largest published DiT, has 65,536.
MAX_TOKENS = 65536


def check_tokens(config: dict[str, Any], resolution: int) -> None:
    """Refuse a resolution whose token count no DiT has, before any model asks for its memory."""
    size, patch = config.get("sample_size"), config.get("patch_size", 2)
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (size, patch)):
        tokens = (size // patch) ** 2
        if tokens > MAX_TOKENS:
            raise OptionError(f"--resolution {resolution}: {tokens:,} latent tokens, more than the {MAX_TOKENS:,} "
                              "an export may have (PixArt-Σ at 4K, the largest published DiT, has 65,536); pass a "
                              "smaller --resolution")


def resolve_schedule(spec, options: ExportOptions, num_layers: Any) -> tuple[Cuts, dict[str, Any]]:
    """The cut points and the default schedule for ``num_layers`` blocks and these options, checked."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
        raise OptionError(f"num_layers={num_layers!r} in the model config: expected an integer ≥ 2 (the cache "
                          "needs at least one cached and one uncached block)")
    n_c = options.cached_blocks if options.cached_blocks is not None else default_cached_blocks(num_layers)
    _check_int("--cached-blocks", n_c, 1, num_layers - 1, f" (N_c must leave at least one of the L={num_layers} "
               "blocks uncached)")
    cuts = Cuts(num_layers, n_c)
    sched = dict(spec.default_schedule)
    for key in ("num_steps", "interval", "boundary"):
        if getattr(options, key) is not None:
            sched[key] = getattr(options, key)
    _check_int("--steps", sched["num_steps"], 1, MAX_STEPS)
    _check_int("--interval", sched["interval"], 1, None, " (a full step every N steps)")
    if options.boundary is None and options.num_steps is not None:
        # The default boundary scales with T (12 of 20), by the runtime's rule.
        d = spec.default_schedule
        sched["boundary"] = scaled_boundary(d["boundary"], d["num_steps"], sched["num_steps"])
    _check_int("--boundary", sched["boundary"], 0, sched["num_steps"], f" (the boundary step b, with "
               f"--steps {sched['num_steps']})")
    try:  # the runtime's own validation, as a last guard
        build_schedule("delta-dit", num_layers=num_layers, cached_blocks=n_c, num_steps=sched["num_steps"],
                       interval=sched["interval"], boundary=sched["boundary"])
    except ScheduleError as exc:
        raise OptionError(str(exc)) from None
    sched = {"policy": "delta-dit", "cached_blocks": n_c, **sched}
    return cuts, sched


def schedule_layers(options: ExportOptions) -> int:
    """L for ``--print-schedule`` without locating or loading any weights (well under a second): ``--set
    num_layers``, else the ``--weights`` folder's config.json, else the shipped model's config, else the
    published architecture in the registry (28 for pixart-alpha and dit-xl-2)."""
    spec = get_spec(options.model)
    if options.overrides and not options.random_weights:
        raise OptionError("--set changes the architecture, so it needs --random-weights")
    if options.random_weights and "num_layers" in options.overrides:
        return options.overrides["num_layers"]  # checked by resolve_schedule (the other keys are not needed here)
    folder = Path(options.weights) if options.weights else None
    if folder is None and spec.bundled:  # its config also shapes --random-weights
        from .models import PACKAGE_WEIGHTS

        folder = PACKAGE_WEIGHTS / spec.bundled
    if folder is not None:
        if not folder.is_dir():
            raise ModelError(f"--weights {folder} does not exist: pass a local diffusers folder")
        sub = folder / "transformer"
        return read_transformer_config(sub if (sub / "config.json").is_file() else folder).get("num_layers", 28)
    return (spec.random_config or {}).get("num_layers", 28)


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


def _torch_version() -> str:
    import torch

    return torch.__version__


EXTRA_FOLDERS = ("text_encoder", "scheduler")


def extras_root(spec, source: WeightsSource) -> Path | None:
    """Where a shipped model's text encoder and scheduler configs live (None for hub models)."""
    if not spec.bundled:
        return None
    if source.kind == "bundled":
        return Path(source.path).parent
    from .models import PACKAGE_WEIGHTS

    return PACKAGE_WEIGHTS / spec.bundled


def extras_fingerprint(root: Path | None) -> str | None:
    """The configs copied next to the engines are part of the export: a changed sampler config re-exports."""
    if root is None:
        return None
    h = hashlib.sha256()
    for sub in EXTRA_FOLDERS:
        for f in sorted((root / sub).glob("*")) if (root / sub).is_dir() else ():
            if f.is_file():
                h.update(f"{sub}/{f.name}".encode())
                h.update(f.read_bytes())
    return h.hexdigest()



# ---------------------------------------------------------------- the options of an existing export

OPTION_FLAGS = {"model": "--model", "resolution": "--resolution", "random_weights": "--random-weights",
                "seed": "--seed", "overrides": "--set", "cached_blocks": "--cached-blocks", "precision": "--precision",
                "opset": "--opset", "exporter": "--exporter", "max_batch": "--max-batch", "num_steps": "--steps",
                "interval": "--interval", "boundary": "--boundary", "backends": "--backend",
                "calibration": "--calibrate", "keep_fp32": "--keep-fp32", "int8_tolerance": "--int8-tolerance"}


def option_record(fields: dict[str, Any]) -> dict[str, Any]:
    """The resolved options as recorded in the manifest (``export.options``) and compared on a re-export. A
    calibration is recorded by its budget (its timings differ on every run; its choices are the N_c, N, b)."""
    d = json.loads(json.dumps(fields, sort_keys=True, default=str))
    calibration = d.get("calibration")
    d["calibration"] = {"psnr_budget_db": calibration.get("psnr_budget_db")} if calibration else None
    return d


def recorded_options(manifest: Any) -> dict[str, Any]:
    """The options an existing export was made with: ``export.options``, or, for an export written before that
    field existed, what its manifest records of them."""
    recorded = manifest.export.get("options")
    if isinstance(recorded, dict):
        return recorded
    source = manifest.model.get("source") or {}
    random = source.get("kind") == "random"
    s = manifest.schedule
    legacy = {"model": manifest.model.get("name"), "resolution": manifest.resolution, "precision": manifest.precision,
              "cached_blocks": manifest.cached_blocks, "num_steps": s.get("num_steps"), "interval": s.get("interval"),
              "boundary": s.get("boundary"), "max_batch": manifest.max_batch // 2,
              "opset": manifest.export.get("opset"), "exporter": manifest.export.get("exporter"),
              "random_weights": random, "overrides": source.get("overrides", {}),
              "backends": sorted({"onnx", *manifest.engines}),
              "calibration": option_record({"calibration": manifest.calibration})["calibration"]}
    if random:
        legacy["seed"] = source.get("seed", 0)
    return legacy


def _shown(key: str, value: Any) -> str:
    if key == "calibration":
        return f"calibrated with --psnr-budget {value.get('psnr_budget_db')}" if value else "not calibrated"
    if key == "random_weights":
        return "random weights" if value else "trained weights"
    if key == "overrides":
        return " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(value.items())) if value else "none"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def option_changes(existing: dict[str, Any], wanted: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The options in which ``wanted`` differs from ``existing``, as '--flag old → new' (flags in CLI order)."""
    changes = []
    for key, flag in OPTION_FLAGS.items():
        if key in ignore or key not in existing or key not in wanted:
            continue
        if key == "seed" and not (existing.get("random_weights") and wanted.get("random_weights")):
            continue  # the seed only shapes random weights
        old, new = json.loads(json.dumps(existing[key], default=str)), json.loads(json.dumps(wanted[key], default=str))
        if old != new:
            flag = "" if key in ("calibration", "random_weights") else f"{flag} "
            changes.append(f"{flag}{_shown(key, old)} → {_shown(key, new)}")
    return changes


class ReplaceRefused(OptionError):
    """``out`` holds an export made with other options (``changes``, as flags: old → new), and --force was not
    given. Callers with a policy of their own (eval re-exports its own folder, bench offers --engines) read the
    fields, not the message."""

    def __init__(self, out: Path, changes: list[str]):
        self.out, self.changes = Path(out), list(changes)
        super().__init__(f"{out} holds an export made with other options ({'; '.join(changes)}); an export is never "
                         "replaced by one with other options without --force: pass --force to replace it, or --out "
                         "another folder to keep both")
