"""The manifest: the only contract between the exporter and the runtime.

``manifest.json`` describes one export: the model, its resolution and latent shape, the block
count L, N_c and the cut points, the default schedule, the precision, and per segment its file,
sha256 and every input and output (name, dtype, shape with the symbolic ``"batch"`` axis).
The runtime runs from this file alone; it never imports diffusers.

Loading validates everything before anything else is touched: a manifest that is missing, not
JSON, of an unknown format version, missing fields, or naming files outside its folder is
refused with a :class:`ManifestError` that says what is wrong and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from .schedule import MAX_STEPS

FORMAT = "deltadit-manifest"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
BATCH = "batch"
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32")
SEGMENT_ROLES = {"embed": "embed", "front": "blocks", "middle": "blocks", "rear": "blocks", "head": "head"}
# The export's precision and what each segment may then be: int8 exports are mixed (int8 segments and the
# ones kept in fp32). A manifest without per-segment precision (written before it existed) has every
# segment in the export's precision, which for those manifests is fp32 or fp16.
SEGMENT_PRECISIONS = {"fp32": ("fp32",), "fp16": ("fp16",), "int8": ("int8", "fp32")}
FIX_REEXPORT = "re-export with `deltadit-export ... --force`"
# Guidance default for exports older than `conditioning.guidance_scale` (PixArt-α's pipeline default).
FALLBACK_GUIDANCE = 4.5

# Limits on what a manifest may ask for: a folder from elsewhere is untrusted input, and shapes, batch and step
# counts decide how much memory and time the runtime spends. Every limit is far above any real export.
MAX_MANIFEST_BYTES = 16 * 2**20  # real manifests: 10–200 KB (a calibration sweep adds ~20 KB)
MAX_BATCH_ROWS = 1024  # rows per engine call; the exporter's --max-batch ≤ 256 images gives 512
MAX_LAYERS = 1024  # PixArt-α and DiT-XL/2: 28
MAX_RANK = 8
MAX_ROW_ELEMENTS = 2**28  # elements of one tensor per batch row (1 GiB in fp32); PixArt-1024's hidden: 4.7M
MAX_RESOLUTION = 2**16
MAX_COMPANION_FILES = 256
# Folders next to the engines that the runtime and the CLIs read (sampler and text encoder configs): every
# file in them must be hashed in the manifest (``companion_files``).
COMPANION_DIRS = ("scheduler", "text_encoder")


class ManifestError(ValueError):
    """The manifest or a file it names cannot be used; the message says what, where, and the fix."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # ints, and the symbolic "batch" on axis 0

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)


@dataclass(frozen=True)
class SegmentSpec:
    name: str  # embed, front, middle, rear, head
    role: str  # embed, blocks, head
    blocks: tuple[int, int] | None  # [start, end) for block segments
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    params: int = 0
    extra_files: tuple[str, ...] = ()  # external-data files next to the ONNX file
    extra_sha256: dict[str, str] = field(default_factory=dict, hash=False)  # sha256 of each extra file
    precision: str = "fp32"  # fp32 | fp16 | int8 (int8: the token-wise MatMul weights; deltadit_export/quantize.py)
    # The exporter's max relative error of this file against the torch segment (fp32 model for fp32 and int8
    # segments, fp16 model for fp16) on its real inputs at the parity batches; None when not recorded.
    rel_err: float | None = None

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)


@dataclass(frozen=True)
class Manifest:
    model: dict[str, Any]  # name, family, diffusers_class, config, source
    resolution: int
    sample_shape: tuple[int, int, int]  # channels, height, width of the transformer input
    out_channels: int
    num_layers: int
    cached_blocks: int
    cuts: dict[str, int]  # a, c
    schedule: dict[str, Any]  # default schedule: policy, num_steps, interval, cached_blocks, boundary
    precision: str
    max_batch: int
    conditioning: dict[str, Any]
    segments: tuple[SegmentSpec, ...]
    export: dict[str, Any] = field(default_factory=dict)  # exporter, opset, cache key, versions, timings
    engines: dict[str, Any] = field(default_factory=dict)  # backend-specific artifacts (tensorrt, torch)
    calibration: dict[str, Any] | None = None
    companion_files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 (scheduler/, ...)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    root: Path | None = field(default=None, compare=False)  # folder the manifest was loaded from

    def segment(self, name: str) -> SegmentSpec:
        for s in self.segments:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def segment_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.segments)

    @property
    def segment_precisions(self) -> dict[str, str]:
        """Each segment's precision, e.g. ``{"embed": "fp32", "front": "int8", ...}``."""
        return {s.name: s.precision for s in self.segments}

    def path_of(self, file: str) -> Path:
        """The path of a file the manifest names; refuses one that leaves the folder (``..``, absolute, symlink)."""
        if self.root is None:
            raise ManifestError("this manifest was not loaded from a folder, so its files cannot be located")
        file = _safe_relative(file, "file")
        path = self.root / file
        try:
            real, root = path.resolve(), self.root.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise ManifestError(f"{path} cannot be resolved ({exc}); {FIX_REEXPORT}") from None
        if real != root and root not in real.parents:
            raise ManifestError(
                f"{path} is a link to {real}, outside the engine folder {root}; segment files must live inside the "
                "folder: copy the file in instead of linking it, or re-export"
            )
        return path

    @property
    def default_guidance(self) -> float:
        """The model's default classifier-free guidance scale, recorded by the exporter
        (``conditioning.guidance_scale``); 4.5 for exports made before the field existed."""
        return float(self.conditioning.get("guidance_scale", FALLBACK_GUIDANCE))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        # Order the keys so a person reading the file sees the format first.
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}


# ---------------------------------------------------------------- reading and validation


def _require(d: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ManifestError(f"manifest field `{where}{key}` is missing; {FIX_REEXPORT}")
    value = d[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(f"manifest field `{where}{key}` must be {names}, got {value!r}; {FIX_REEXPORT}")
    return value


def _safe_relative(file: Any, where: str) -> str:
    if not isinstance(file, str) or not file:
        raise ManifestError(f"manifest field `{where}` must be a file name, got {file!r}; {FIX_REEXPORT}")
    p = PurePosixPath(file.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or file.startswith(("/", "\\", "~")) or ":" in file:
        raise ManifestError(
            f"manifest field `{where}` = {file!r} points outside the engine folder; "
            "segment files must be plain names inside the folder (no '..', no absolute paths)"
        )
    if any(ord(ch) < 32 for ch in file) or p.name in ("", ".") or file.endswith(("/", "\\")):
        raise ManifestError(f"manifest field `{where}` = {file!r} is not a plain file name (control characters, "
                            f"or a folder); {FIX_REEXPORT}")
    return file


def _tensor(d: Any, where: str) -> TensorSpec:
    if not isinstance(d, dict):
        raise ManifestError(f"manifest field `{where}` must be an object with name, dtype, shape")
    name = _require(d, "name", str, f"{where}.")
    if not name:
        raise ManifestError(f"manifest field `{where}.name` is empty; {FIX_REEXPORT}")
    dtype = _require(d, "dtype", str, f"{where}.")
    if dtype not in DTYPES:
        raise ManifestError(f"manifest field `{where}.dtype` = {dtype!r} is not one of {DTYPES}")
    shape = _require(d, "shape", list, f"{where}.")
    if len(shape) > MAX_RANK:
        raise ManifestError(f"manifest field `{where}.shape` has {len(shape)} axes, more than the {MAX_RANK} a tensor "
                            f"of these models may have; {FIX_REEXPORT}")
    per_row = 1
    for i, dim in enumerate(shape):
        ok = dim == BATCH if isinstance(dim, str) else (isinstance(dim, int) and not isinstance(dim, bool) and dim > 0)
        if not ok:
            raise ManifestError(f"manifest field `{where}.shape[{i}]` = {dim!r}: expected a positive int or 'batch'")
        per_row *= dim if isinstance(dim, int) else 1
        if per_row > MAX_ROW_ELEMENTS:
            raise ManifestError(
                f"manifest field `{where}.shape` = {shape!r} asks for more than {MAX_ROW_ELEMENTS:,} elements per batch "
                f"row (the limit; the largest real tensor, PixArt-α 1024's hidden states, has 4,718,592): the runtime "
                f"refuses to allocate it; {FIX_REEXPORT}")
    return TensorSpec(name, dtype, tuple(shape))


def _segment(d: Any, index: int) -> SegmentSpec:
    where = f"segments[{index}]"
    if not isinstance(d, dict):
        raise ManifestError(f"manifest field `{where}` must be an object")
    name = _require(d, "name", str, f"{where}.")
    if name not in SEGMENT_ROLES:
        raise ManifestError(f"manifest field `{where}.name` = {name!r} is not one of {tuple(SEGMENT_ROLES)}")
    role = SEGMENT_ROLES[name]
    blocks = d.get("blocks")
    if role == "blocks":
        if not (isinstance(blocks, list) and len(blocks) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)):
            raise ManifestError(f"manifest field `{where}.blocks` must be [start, end] for block segment {name!r}; "
                                f"{FIX_REEXPORT}")
        blocks = (blocks[0], blocks[1])
    else:
        blocks = None
    file = _safe_relative(_require(d, "file", str, f"{where}."), f"{where}.file")
    sha = _sha(_require(d, "sha256", str, f"{where}."), f"{where}.sha256")
    extra = d.get("extra_files", [])
    if not isinstance(extra, list):
        raise ManifestError(f"manifest field `{where}.extra_files` must be a list; {FIX_REEXPORT}")
    extra = tuple(_safe_relative(f, f"{where}.extra_files[{i}]") for i, f in enumerate(extra))
    extra_sha = d.get("extra_sha256", {})
    if not isinstance(extra_sha, dict) or set(extra_sha) != set(extra):
        raise ManifestError(f"manifest field `{where}.extra_sha256` must map the extra_files to their sha256; "
                            f"{FIX_REEXPORT}")
    extra_sha = {k: _sha(v, f"{where}.extra_sha256[{k!r}]") for k, v in extra_sha.items()}
    inputs = tuple(_tensor(t, f"{where}.inputs[{i}]") for i, t in enumerate(_require(d, "inputs", list, f"{where}.")))
    outputs = tuple(
        _tensor(t, f"{where}.outputs[{i}]") for i, t in enumerate(_require(d, "outputs", list, f"{where}."))
    )
    if not inputs or not outputs:
        raise ManifestError(f"manifest field `{where}` lists no inputs or no outputs; {FIX_REEXPORT}")
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise ManifestError(f"manifest field `{where}.inputs` names an input twice ({names}); {FIX_REEXPORT}")
    params = d.get("params", 0)
    precision = d.get("precision")  # None: an older manifest; the export's precision is filled in by the caller
    if precision is not None and (not isinstance(precision, str) or precision not in SEGMENT_PRECISIONS):
        raise ManifestError(f"manifest field `{where}.precision` = {precision!r} is not one of "
                            f"{', '.join(SEGMENT_PRECISIONS)}; {FIX_REEXPORT}")
    rel_err = d.get("rel_err")
    if rel_err is not None and (isinstance(rel_err, bool) or not isinstance(rel_err, (int, float))
                                or not math.isfinite(rel_err) or rel_err < 0):
        raise ManifestError(f"manifest field `{where}.rel_err` = {rel_err!r} must be a finite number ≥ 0 (the "
                            f"exporter's measured error) or null; {FIX_REEXPORT}")
    return SegmentSpec(name, role, blocks, file, sha, inputs, outputs,
                       params if isinstance(params, int) and not isinstance(params, bool) else 0, extra, extra_sha,
                       precision or "", None if rel_err is None else float(rel_err))


def _sha(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or any(ch not in "0123456789abcdef" for ch in value):
        raise ManifestError(f"manifest field `{where}` = {value!r} is not a sha256 (64 lowercase hex digits); "
                            f"{FIX_REEXPORT}")
    return value


CONDITIONING_KINDS = ("caption", "class")


def _positive(d: dict, key: str, low: int = 1, where: str = "", high: int | None = None) -> int:
    value = _require(d, key, int, where)
    if value < low:
        raise ManifestError(f"manifest field `{where}{key}` = {value} must be ≥ {low}; {FIX_REEXPORT}")
    if high is not None and value > high:
        raise ManifestError(f"manifest field `{where}{key}` = {value} is out of range {low}..{high} (the limit of this "
                            f"runtime; real exports stay far below it); {FIX_REEXPORT}")
    return value


def _companions(d: dict) -> dict[str, str]:
    files = d.get("companion_files", {})
    if not isinstance(files, dict) or len(files) > MAX_COMPANION_FILES:
        raise ManifestError(f"manifest field `companion_files` must map at most {MAX_COMPANION_FILES} file names to their "
                            f"sha256; {FIX_REEXPORT}")
    return {_safe_relative(k, f"companion_files[{k!r}]"): _sha(v, f"companion_files[{k!r}]") for k, v in files.items()}


def _check_wiring(segments: tuple[SegmentSpec, ...]) -> None:
    """The tensors the runtime passes between segments: embed → hidden [batch, tokens, width] → each block
    segment (hidden → hidden_out, same shape) → head (hidden → out). Every tensor has the batch axis first."""
    def find(ts: tuple[TensorSpec, ...], name: str, seg: SegmentSpec, kind: str) -> TensorSpec:
        for t in ts:
            if t.name == name:
                return t
        raise ManifestError(f"segment {seg.name!r} has no {kind} named {name!r}, which the runtime passes between "
                            f"segments; {FIX_REEXPORT}")

    for seg in segments:
        for kind, ts in (("input", seg.inputs), ("output", seg.outputs)):
            for t in ts:
                if not t.shape or t.shape[0] != BATCH or BATCH in t.shape[1:]:
                    raise ManifestError(f"segment {seg.name!r} {kind} {t.name!r} has shape {list(t.shape)}: expected "
                                        f"'batch' first and only there; {FIX_REEXPORT}")
    hidden = find(segments[0].outputs, "hidden", segments[0], "output")
    if len(hidden.shape) != 3:
        raise ManifestError(f"segment 'embed' output 'hidden' has shape {list(hidden.shape)}: expected "
                            f"[batch, tokens, width]; {FIX_REEXPORT}")
    for seg in segments[1:]:
        got = find(seg.inputs, "hidden", seg, "input")
        if got.shape != hidden.shape or got.dtype != hidden.dtype:
            raise ManifestError(f"segment {seg.name!r} input 'hidden' is {got.dtype} {list(got.shape)}, but embed "
                                f"gives {hidden.dtype} {list(hidden.shape)}; {FIX_REEXPORT}")
        if seg.role == "blocks":
            out = find(seg.outputs, "hidden_out", seg, "output")
            if out.shape != hidden.shape or out.dtype != hidden.dtype:
                raise ManifestError(f"segment {seg.name!r} output 'hidden_out' is {out.dtype} {list(out.shape)}, "
                                    f"expected {hidden.dtype} {list(hidden.shape)}; {FIX_REEXPORT}")
    find(segments[-1].outputs, "out", segments[-1], "output")


def _segment_precisions(segments: tuple[SegmentSpec, ...], precision: str) -> tuple[SegmentSpec, ...]:
    """Fill in a missing per-segment precision (older manifests) and check each fits the export's precision."""
    out = []
    for i, seg in enumerate(segments):
        if not seg.precision:
            if precision == "int8":
                raise ManifestError(f"manifest field `segments[{i}].precision` is missing: an int8 export names the "
                                    f"precision of every segment (int8 or fp32); {FIX_REEXPORT}")
            seg = replace(seg, precision=precision)
        elif seg.precision not in SEGMENT_PRECISIONS[precision]:
            raise ManifestError(f"manifest field `segments[{i}].precision` = {seg.precision!r} does not fit the "
                                f"export's precision {precision!r} (its segments are "
                                f"{' or '.join(SEGMENT_PRECISIONS[precision])}); {FIX_REEXPORT}")
        out.append(seg)
    return tuple(out)


def manifest_from_dict(d: Any, root: Path | None = None) -> Manifest:
    """Validate a parsed manifest and build the :class:`Manifest`. Raises ManifestError."""
    if not isinstance(d, dict):
        raise ManifestError(f"manifest must be a JSON object, got {type(d).__name__}; {FIX_REEXPORT}")
    fmt = d.get("format")
    if fmt != FORMAT:
        raise ManifestError(f"not a deltadit manifest (format={fmt!r}, expected {FORMAT!r}); {FIX_REEXPORT}")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"manifest format_version {version!r} is not supported by this runtime (supports {FORMAT_VERSION}); "
            f"{FIX_REEXPORT} using this version of deltadit, or install the deltadit version that wrote it"
        )
    model = _require(d, "model", dict, "")
    for key in ("name", "family", "diffusers_class"):
        _require(model, key, str, "model.")
    resolution = _positive(d, "resolution", high=MAX_RESOLUTION)
    sample_shape = _require(d, "sample_shape", list, "")
    if len(sample_shape) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                         for x in sample_shape):
        raise ManifestError(f"manifest field `sample_shape` must be [channels, height, width], got {sample_shape!r}; "
                            f"{FIX_REEXPORT}")
    out_channels = _positive(d, "out_channels")
    num_layers = _positive(d, "num_layers", 2, high=MAX_LAYERS)
    cached_blocks = _require(d, "cached_blocks", int, "")
    if not 1 <= cached_blocks < num_layers:
        raise ManifestError(f"manifest cached_blocks={cached_blocks} is out of range 1..{num_layers - 1}; "
                            f"{FIX_REEXPORT}")
    cuts = _require(d, "cuts", dict, "")
    a, c = min(cached_blocks, num_layers - cached_blocks), max(cached_blocks, num_layers - cached_blocks)
    if cuts.get("a") != a or cuts.get("c") != c:
        raise ManifestError(f"manifest cuts {cuts!r} do not match N_c={cached_blocks}, L={num_layers} (a={a}, c={c}); "
                            f"{FIX_REEXPORT}")
    schedule = _require(d, "schedule", dict, "")
    num_steps = _positive(schedule, "num_steps", 1, "schedule.", high=MAX_STEPS)
    _positive(schedule, "interval", 1, "schedule.")
    boundary = _require(schedule, "boundary", int, "schedule.")
    if not 0 <= boundary <= num_steps:
        raise ManifestError(f"manifest field `schedule.boundary` = {boundary} is out of range 0..{num_steps}; "
                            f"{FIX_REEXPORT}")
    precision = _require(d, "precision", str, "")
    if precision not in SEGMENT_PRECISIONS:
        raise ManifestError(f"manifest field `precision` = {precision!r} is not one of "
                            f"{', '.join(SEGMENT_PRECISIONS)}; {FIX_REEXPORT}")
    max_batch = _positive(d, "max_batch", high=MAX_BATCH_ROWS)
    conditioning = _require(d, "conditioning", dict, "")
    kind = _require(conditioning, "kind", str, "conditioning.")
    if kind not in CONDITIONING_KINDS:
        raise ManifestError(f"manifest field `conditioning.kind` = {kind!r} is not one of {CONDITIONING_KINDS}; "
                            f"{FIX_REEXPORT}")
    if isinstance(conditioning.get("text_encoder"), str) and conditioning["text_encoder"] not in COMPANION_DIRS:
        raise ManifestError(f"manifest field `conditioning.text_encoder` = {conditioning['text_encoder']!r}: expected "
                            f"'text_encoder' (the folder of the text encoder next to the engines); {FIX_REEXPORT}")
    if kind == "class":
        classes = _positive(conditioning, "num_classes", 1, "conditioning.", high=2**31 - 2)
        null = _require(conditioning, "null_class", int, "conditioning.")
        if null != classes:  # DiT's label table has num_classes + 1 rows; the last is "no class"
            raise ManifestError(f"manifest field `conditioning.null_class` = {null}, but a model with {classes} classes "
                                f"has its unconditional class at {classes}; {FIX_REEXPORT}")
    guidance = conditioning.get("guidance_scale", FALLBACK_GUIDANCE)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 < guidance < 1e3:
        raise ManifestError(f"manifest field `conditioning.guidance_scale` = {guidance!r}: expected a positive "
                            f"number; {FIX_REEXPORT}")
    raw_segments = _require(d, "segments", list, "")
    segments = _segment_precisions(tuple(_segment(s, i) for i, s in enumerate(raw_segments)), precision)
    names = [s.name for s in segments]
    expected = ["embed"] + [n for n in ("front", "middle", "rear") if n in names] + ["head"]
    if names != expected or "front" not in names or "rear" not in names:
        raise ManifestError(f"manifest segments {names} are incomplete or out of order (expected {expected}); "
                            f"{FIX_REEXPORT}")
    if ("middle" in names) != (a < c):
        raise ManifestError(f"manifest segments {names} do not match the cuts a={a}, c={c} (the middle segment "
                            f"exists exactly when a < c); {FIX_REEXPORT}")
    bounds = {"front": (0, a), "middle": (a, c), "rear": (c, num_layers)}
    for s in segments:
        if s.role == "blocks" and s.blocks != bounds[s.name]:
            raise ManifestError(f"segment {s.name!r} covers blocks {s.blocks}, expected {bounds[s.name]} from the cuts; "
                                f"{FIX_REEXPORT}")
    _check_wiring(segments)
    caption = next((t for t in segments[0].inputs if t.name == "encoder_hidden_states"), None)
    if kind == "caption" and (caption is None or [conditioning.get("tokens"), conditioning.get("channels")]
                              != list(caption.shape[1:])):
        raise ManifestError(f"manifest field `conditioning` says tokens={conditioning.get('tokens')!r}, channels="
                            f"{conditioning.get('channels')!r}, but segment 'embed' takes encoder_hidden_states "
                            f"{list(caption.shape) if caption else 'not at all'}; {FIX_REEXPORT}")
    sample = next((t for t in segments[0].inputs if t.name == "sample"), None)
    if sample is None or list(sample.shape[1:]) != list(sample_shape):
        raise ManifestError(f"segment 'embed' input 'sample' is {list(sample.shape) if sample else 'missing'}, but "
                            f"sample_shape is {sample_shape}; {FIX_REEXPORT}")
    out = next(t for t in segments[-1].outputs if t.name == "out")
    if len(out.shape) != 4 or out.shape[1] != out_channels or list(out.shape[2:]) != list(sample_shape[1:]):
        raise ManifestError(f"segment 'head' output 'out' is {list(out.shape)}, but out_channels={out_channels} and "
                            f"sample_shape={sample_shape} say ['batch', {out_channels}, {sample_shape[1]}, "
                            f"{sample_shape[2]}]; {FIX_REEXPORT}")
    return Manifest(
        model=model,
        resolution=resolution,
        sample_shape=tuple(sample_shape),
        out_channels=out_channels,
        num_layers=num_layers,
        cached_blocks=cached_blocks,
        cuts={"a": a, "c": c},
        schedule=schedule,
        precision=precision,
        max_batch=max_batch,
        conditioning=conditioning,
        segments=segments,
        export=d.get("export", {}) if isinstance(d.get("export", {}), dict) else {},
        engines=d.get("engines", {}) if isinstance(d.get("engines", {}), dict) else {},
        calibration=d.get("calibration") if isinstance(d.get("calibration"), dict) else None,
        companion_files=_companions(d),
        root=root,
    )


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and validate ``folder/manifest.json`` (or a manifest file path). Does not touch segment files."""
    path = Path(folder)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"no manifest at {path}: this folder is not a finished export. "
            "Run `deltadit-export --model ... --out <folder>` first, or pass the folder that holds manifest.json"
        )
    real = path.resolve()
    if real.parent != path.parent.resolve():
        raise ManifestError(f"{path} is a link to {real}, outside the engine folder {path.parent.resolve()}; copy the "
                            "manifest in instead of linking it, or re-export")
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path} is {size:,} bytes, more than the {MAX_MANIFEST_BYTES:,} a manifest may have (real "
                                f"ones are under 1 MB): this is not a deltadit manifest; {FIX_REEXPORT}")
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)  # bounded even if the file grows after the size check
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path} grew past {MAX_MANIFEST_BYTES:,} bytes while being read; {FIX_REEXPORT}")
        data = json.loads(raw.decode("utf-8"))
    except ManifestError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); {FIX_REEXPORT}") from None
    except RecursionError:
        raise ManifestError(f"{path} is not a manifest (JSON nested too deeply); {FIX_REEXPORT}") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ManifestError(f"{path} is not a manifest ({exc}); {FIX_REEXPORT}") from None
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror or exc}; check the folder's permissions") from None
    return manifest_from_dict(data, root=path.parent.resolve())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_segment_paths(manifest: Manifest) -> None:
    """Every file the manifest names resolves inside its folder (cheap; runs even with ``verify=False``)."""
    for seg in manifest.segments:
        for file in (seg.file, *seg.extra_files):
            manifest.path_of(file)


def verify_segment_files(manifest: Manifest, names: tuple[str, ...] | None = None) -> None:
    """Check every segment file exists and matches its recorded sha256. Raises ManifestError naming the file."""
    for seg in manifest.segments:
        if names is not None and seg.name not in names:
            continue
        files = [(seg.file, seg.sha256)] + [(f, seg.extra_sha256.get(f)) for f in seg.extra_files]
        for file, recorded in files:
            path = manifest.path_of(file)
            if not path.is_file():
                raise ManifestError(f"segment {seg.name!r}: file {path} is missing; {FIX_REEXPORT}")
            try:
                digest = file_sha256(path)
            except OSError as exc:
                raise ManifestError(f"segment {seg.name!r}: cannot read {path} ({exc.strerror or exc}); check its "
                                    "permissions") from None
            if digest != recorded:
                raise ManifestError(
                    f"segment {seg.name!r}: {path} was changed or damaged after export ({path.stat().st_size} "
                    f"bytes, sha256 {digest[:12]}… ≠ recorded {recorded[:12]}…); {FIX_REEXPORT}, or load it "
                    "anyway with DeltaDiTRuntime(..., verify=False) (CLI: --no-verify) if you changed it on purpose"
                )


def write_manifest(manifest: Manifest, folder: str | os.PathLike) -> Path:
    """Write ``folder/manifest.json`` atomically (temporary file in the same folder, then rename)."""
    folder = Path(folder)
    target = folder / MANIFEST_NAME
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=folder)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it 0600; the manifest is read by whoever runs the engines
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest.to_dict(), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
