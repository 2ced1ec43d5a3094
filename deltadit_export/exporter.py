"""The export job: load the transformer, cut it, export each segment, check it, write the manifest.

Order of work (every check that can fail fast runs before the model is loaded):
options → weights located and config checked → cache key → reuse an identical earlier export, or
build everything in a temporary folder → ONNX per segment + checker + ONNX Runtime parity →
optional backend artifacts → manifest → swap the folder into place. With ``--precision int8`` the
segments not kept in fp32 are quantized after their ONNX export and held to the int8 gate
(``quantize.py``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from runtime.manifest import (
    COMPANION_DIRS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    SegmentSpec,
    load_manifest,
    write_manifest,
)
from runtime.integrity import file_sha256, verify_companion_files, verify_segment_files
from runtime.schedule import MAX_STEPS, Cuts, ScheduleError, build_schedule, default_cached_blocks, scaled_boundary

from . import __version__
from .models import (
    DEFAULT_MODEL,
    ModelError,
    WeightsSource,
    build_model,
    caption_tokens,
    check_finite_weights,
    check_overrides,
    check_resolution,
    get_spec,
    locate_weights,
    model_guidance,
    random_config,
    read_transformer_config,
    weights_fingerprint,
)
from .progress import Progress
from .publish import mark_owner, publish, recover, staging_dir
from .quantize import resolve_int8_options

# The torch dtype each precision exports from: int8 segments are quantized from the fp32 export.
PRECISIONS = {"fp32": "float32", "fp16": "float16", "int8": "float32"}
BACKENDS = ("onnx", "tensorrt", "torch")
EXPORTERS = ("torchscript", "dynamo")
ENGINES_DIR = Path("engines")


ExportErrorType = RuntimeError  # onnx_export.ExportError, imported lazily (it imports torch)


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


@dataclass
class SegmentReport:
    name: str
    blocks: str
    params: int
    bytes: int
    seconds: float
    rel_err: float | None
    precision: str = "fp32"
    tolerance: float | None = None  # the limit rel_err was held to
    worst_batch: int | None = None


def format_reports(reports: list[SegmentReport]) -> list[str]:
    """The per-segment table of the export's summary (also shown when the int8 gate refuses)."""
    lines = [f"{'segment':<8} {'precision':>9} {'blocks':>8} {'params':>12} {'file MB':>9} {'export s':>9} "
             f"{'max rel err':>12} {'limit':>7}"]
    for r in reports:
        err = "-" if r.rel_err is None else f"{r.rel_err:.2e}"
        limit = "-" if r.tolerance is None else f"{r.tolerance:.0e}"
        above = r.rel_err is not None and r.tolerance is not None and r.rel_err > r.tolerance
        flag = "  ← above the limit" if above else ""
        lines.append(f"{r.name:<8} {r.precision:>9} {r.blocks:>8} {r.params:>12,} {r.bytes / 2**20:>9.1f} "
                     f"{r.seconds:>9.1f} {err:>12} {limit:>7}{flag}")
    return lines


@dataclass
class ExportResult:
    out: Path
    manifest: Manifest
    reused: bool
    reports: list[SegmentReport] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.reused:
            return f"reused the existing export at {self.out} (same weights and options; --force rebuilds)"
        lines = format_reports(self.reports)
        chain = self.manifest.export.get("chain_rel_err")
        if chain is not None:
            lines.append(f"whole chain (the engines in sequence) vs the fp32 torch model at batch 2: max rel err "
                         f"{chain:.2e} (not gated: the per-segment errors compound)")
        total = sum(r.bytes for r in self.reports) / 2**20
        lines.append(f"total {total:.1f} MB in {self.seconds:.1f} s → {self.out}")
        return "\n".join(lines + self.notes)


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
        "extras": _extras_fingerprint(_extras_root(spec, source)),
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
                          int8_tolerance, weights_fingerprint=fingerprint)


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


def reusable(out: Path, cache_key: str) -> Manifest | None:
    """The existing export at ``out`` if it was built from the same weights and options and is intact."""
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = load_manifest(out)
        if manifest.export.get("cache_key") != cache_key:
            return None
        verify_segment_files(manifest)
        verify_companion_files(manifest)  # an export from before companions were hashed is rebuilt
    except ManifestError:
        return None
    return manifest


def _check_out_folder(out: Path) -> None:
    """Never swap away a folder that is not ours: it may hold a user's files."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise OptionError(
            f"--out {out} exists and is not a deltadit export (no {MANIFEST_NAME}); refusing to replace it. "
            "Pass a new or empty folder"
        )


def export(options: ExportOptions, progress: Progress | None = None,
           on_model_loaded: Callable[[Any], None] | None = None) -> ExportResult:
    """Run the whole export. ``progress`` reports per-segment phases (stderr by default)."""
    t0 = time.perf_counter()
    progress = progress or Progress(stream=sys.stderr)
    job = resolve(options)
    try:
        notes = [f"note: {msg}" for msg in recover(job.out)]
    except OSError as exc:
        raise _disk_error(exc, job.out, "cleaning up after an interrupted export") from exc
    _check_out_folder(job.out)
    if not options.force:
        existing = reusable(job.out, job.cache_key)
        if existing is not None:
            return ExportResult(job.out, existing, reused=True, seconds=time.perf_counter() - t0, notes=notes)
    tmp: Path | None = None
    try:
        tmp = staging_dir(job.out)
        mark_owner(tmp)
        result = _build(job, tmp, progress, on_model_loaded)
        publish(tmp, job.out)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        os_error = _os_error_in(exc)
        if os_error is not None:
            raise _disk_error(os_error, job.out, "writing the export") from exc
        raise
    manifest = load_manifest(job.out)
    return ExportResult(job.out, manifest, False, result, time.perf_counter() - t0, notes)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind an export failure (the ONNX exporter wraps them), if any."""
    if isinstance(exc, (ModelError, OptionError, ManifestError)):
        return None  # complete user errors already
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _disk_error(exc: OSError, out: Path, doing: str) -> ExportErrorType:
    """A file-system failure as a user error: what happened, where, that the old export is intact, the fix."""
    from .onnx_export import ExportError

    where = exc.filename or out.parent
    kept = f"the previous export at {out} is untouched" if (out / MANIFEST_NAME).is_file() else \
        f"nothing was written to {out}"
    if exc.errno in DISK_FULL:
        return ExportError(f"disk full while {doing} ({where}: {exc.strerror}); {kept} and the partial files were "
                           f"removed. Free space on the file system of {out.parent} (or pass --out on another "
                           "disk) and rerun")
    return ExportError(f"file-system error while {doing} ({where}: {exc.strerror or exc}); {kept}. Check that "
                       f"{out.parent} is writable and on a local file system, then rerun")


def keep_norms_fp32(model) -> None:
    """Run every LayerNorm in fp32 inside an fp16 model: fp16 LayerNorm after attention overflows (§4)."""
    from torch import nn

    class FP32LayerNorm(nn.Module):
        def __init__(self, norm: nn.LayerNorm):
            super().__init__()
            self.norm = norm.float()

        def forward(self, x):
            return self.norm(x.float()).to(x.dtype)

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, FP32LayerNorm(child))


def _build(job: ResolvedExport, tmp: Path, progress: Progress, on_model_loaded) -> list[SegmentReport]:
    import torch

    from .onnx_export import TOLERANCES as PARITY_TOLERANCES
    from .onnx_export import ExportError, check_parity, export_segment, measure_chain
    from .quantize import export_int8_segment, int8_record
    from .split import model_shape, random_model_inputs, run_segments, split_model

    torch.set_grad_enabled(False)
    dtype = PRECISIONS[job.options.precision]
    progress.note(f"loading {job.spec.name} ({job.source.kind} weights)")
    model = build_model(job.spec, job.source, job.config)
    check_finite_weights(model, f"{job.spec.name} weights ({job.source.path or 'random'})")
    if on_model_loaded is not None:
        on_model_loaded(model)
    model_config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    if dtype == "float16":
        model = model.half()
        keep_norms_fp32(model)
    tokens = caption_tokens(job.spec)
    segments = split_model(model, job.cuts, caption_tokens=tokens, dtype=dtype)
    shape = model_shape(model, tokens)
    torch_dtype = getattr(torch, dtype)
    # Every segment is checked on its real inputs: the torch chain run on random model inputs.
    batches = sorted(set(job.options.parity_batches) | {2})
    chains = {b: run_segments(segments, random_model_inputs(shape, b, torch.Generator().manual_seed(b),
                                                            dtype=torch_dtype)) for b in batches}
    reports, specs = [], []

    def record(seg, path: Path, extra: list[str], parity, precision: str, tolerance: float, t: float) -> None:
        size = path.stat().st_size + sum((tmp / e).stat().st_size for e in extra)
        blocks = f"{seg.blocks[0]}-{seg.blocks[1] - 1}" if seg.blocks else "-"
        worst = max(parity, key=lambda p: p.rel_err)
        reports.append(SegmentReport(seg.name, blocks, seg.params, size, time.perf_counter() - t, worst.rel_err,
                                     precision, tolerance, worst.batch))
        specs.append(SegmentSpec(seg.name, seg.role, seg.blocks, path.name, file_sha256(path), seg.inputs,
                                 seg.outputs, seg.params, tuple(extra), {e: file_sha256(tmp / e) for e in extra},
                                 precision, worst.rel_err))

    for seg in segments:
        t = time.perf_counter()
        feeds = {b: {**env, "hidden": env.get(f"hidden@{seg.name}", env["hidden"])} for b, env in chains.items()}
        if job.options.precision == "int8" and seg.name not in job.keep_fp32:
            path, extra, parity, precision = export_int8_segment(
                seg, feeds, tmp, progress, opset=job.options.opset, exporter=job.options.exporter,
                batches=job.options.parity_batches)
            record(seg, path, extra, parity, precision,
                   job.int8_tolerance if precision == "int8" else PARITY_TOLERANCES[dtype], t)
            continue
        path = tmp / f"{seg.name}.onnx"
        with progress.segment(seg.name, phases=("export", "parity")) as bar:
            bar.phase("export")
            try:
                extra = export_segment(seg, feeds[2], path, opset=job.options.opset, exporter=job.options.exporter)
            except Exception as exc:
                raise ExportError(f"segment {seg.name!r}: ONNX export failed: {exc}") from exc
            bar.phase("parity")
            try:
                parity = check_parity(seg, path, {b: feeds[b] for b in job.options.parity_batches}, dtype)
            except ExportError as exc:
                kept = job.out.parent / f"{job.out.name}.{seg.name}.failed.onnx"
                shutil.move(path, kept)
                raise ExportError(f"{exc}; the failing ONNX is kept at {kept} for inspection") from None
        record(seg, path, extra, parity, "fp16" if dtype == "float16" else "fp32", PARITY_TOLERANCES[dtype], t)
    chain_rel_err = None
    if job.options.precision == "int8":
        _int8_gate(job, reports)
        chain_rel_err = measure_chain(segments, [tmp / spec.file for spec in specs], chains[2])
    engines: dict[str, Any] = {}
    for backend in job.options.backends:
        if backend == "onnx":
            continue
        from .backends import build_backend_artifacts

        engines[backend] = build_backend_artifacts(backend, job, segments, chains, tmp, progress)
    conditioning: dict[str, Any]
    if shape.family == "pixart":
        conditioning = {"kind": "caption", "tokens": tokens, "channels": shape.caption_channels,
                        "micro_conditions": shape.micro_conditions}
        if job.spec.bundled:
            conditioning["text_encoder"] = "text_encoder"
    else:
        from runtime.guidance import null_class  # here: runtime.guidance imports torch (--print-schedule must not)

        conditioning = {"kind": "class", "num_classes": shape.num_classes, "null_class": null_class(shape.num_classes)}
    conditioning["guidance_scale"] = model_guidance(job.spec.name)  # the model's default (runtime.generate's)
    _copy_bundled_extras(job, tmp)
    # The runtime reads these configs (sampler, text encoder): hashed like the segments, verified at load.
    companions = {f.relative_to(tmp).as_posix(): file_sha256(f) for sub in COMPANION_DIRS
                  for f in sorted((tmp / sub).rglob("*")) if f.is_file()}
    manifest = Manifest(
        model={"name": job.spec.name, "family": shape.family, "diffusers_class": job.spec.diffusers_class,
               "config": model_config, "source": job.source.to_dict(), "params": sum(p.numel() for p in model.parameters())},
        resolution=job.resolution,
        sample_shape=(shape.in_channels, shape.sample_size, shape.sample_size),
        out_channels=shape.out_channels,
        num_layers=job.cuts.num_layers,
        cached_blocks=job.cuts.cached_blocks,
        cuts={"a": job.cuts.a, "c": job.cuts.c},
        schedule=job.schedule,
        precision=job.options.precision,
        max_batch=2 * job.options.max_batch,
        conditioning=conditioning,
        segments=tuple(specs),
        export={"cache_key": job.cache_key, "weights_fingerprint": job.weights_fingerprint,
                "exporter": job.options.exporter, "opset": job.options.opset,
                "deltadit": __version__, "torch": torch.__version__, "tokens": shape.tokens,
                "width": shape.width, "vae_scale_factor": job.spec.vae_scale_factor,
                "parity": {r.name: r.rel_err for r in reports},
                **({} if chain_rel_err is None else
                   {"chain_rel_err": chain_rel_err, "int8": int8_record(job.keep_fp32, job.int8_tolerance)})},
        engines=engines,
        calibration=job.options.calibration,
        companion_files=companions,
    )
    write_manifest(manifest, tmp)
    return reports


def _int8_gate(job: ResolvedExport, reports: list[SegmentReport]) -> None:
    """Refuse the export when an int8 segment is above the tolerance, naming each one and the exact fix."""
    from .onnx_export import ExportError
    from .quantize import gate_refusal

    failing = [(r.name, r.rel_err, r.worst_batch) for r in reports
               if r.precision == "int8" and r.rel_err is not None and r.rel_err > job.int8_tolerance]
    if failing:
        error = ExportError(gate_refusal(failing, job.keep_fp32, job.int8_tolerance))
        error.table = "\n".join(format_reports(reports))  # the CLI shows it above the Error line
        raise error


EXTRA_FOLDERS = ("text_encoder", "scheduler")


def _extras_root(spec, source: WeightsSource) -> Path | None:
    """Where a shipped model's text encoder and scheduler configs live (None for hub models)."""
    if not spec.bundled:
        return None
    if source.kind == "bundled":
        return Path(source.path).parent
    from .models import PACKAGE_WEIGHTS

    return PACKAGE_WEIGHTS / spec.bundled


def _extras_fingerprint(root: Path | None) -> str | None:
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


def _copy_bundled_extras(job: ResolvedExport, tmp: Path) -> None:
    """A shipped model's text encoder and scheduler configs travel with its engines (the runtime reads them)."""
    root = _extras_root(job.spec, job.source)
    for sub in EXTRA_FOLDERS if root is not None else ():
        if (root / sub).is_dir():
            shutil.copytree(root / sub, tmp / sub)
