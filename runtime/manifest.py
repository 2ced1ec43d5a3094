"""The manifest: the only contract between the exporter and the runtime; reading, validating and writing it.

The runtime runs from ``manifest.json`` alone; it never imports diffusers. Its data model (the dataclasses,
format constants and bounds) is runtime/manifest_schema.py; this module is where callers import it from,
with the functions that read and write the file. Checking the files it names is runtime/integrity.py.

Loading validates everything before anything else is touched: a manifest that is missing, not
JSON, of an unknown format version, missing fields, or naming files outside its folder is
refused with a :class:`ManifestError` that says what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from .manifest_schema import (BATCH, COMPANION_DIRS, CONDITIONING_KINDS, DTYPES, FALLBACK_GUIDANCE, FIX_REEXPORT, FORMAT,
                              FORMAT_VERSION,
                              MANIFEST_NAME, MAX_BATCH_ROWS, MAX_COMPANION_FILES, MAX_LAYERS, MAX_MANIFEST_BYTES,
                              MAX_RANK, MAX_RESOLUTION, MAX_ROW_ELEMENTS, SEGMENT_PRECISIONS, SEGMENT_ROLES, Manifest,
                              ManifestError, SegmentSpec, TensorSpec, safe_relative)
from .schedule import MAX_STEPS

# The schema's names are part of this module's interface: callers import the manifest from here.
__all__ = ["BATCH", "COMPANION_DIRS", "FORMAT_VERSION", "MANIFEST_NAME", "SEGMENT_ROLES", "Manifest", "ManifestError",
           "SegmentSpec", "TensorSpec", "load_manifest", "manifest_from_dict", "write_manifest"]


# ---------------------------------------------------------------- reading and validation


def _require(d: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ManifestError(f"manifest field `{where}{key}` is missing; {FIX_REEXPORT}")
    value = d[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(f"manifest field `{where}{key}` must be {names}, got {value!r}; {FIX_REEXPORT}")
    return value


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
    file = safe_relative(_require(d, "file", str, f"{where}."), f"{where}.file")
    sha = _sha(_require(d, "sha256", str, f"{where}."), f"{where}.sha256")
    extra = d.get("extra_files", [])
    if not isinstance(extra, list):
        raise ManifestError(f"manifest field `{where}.extra_files` must be a list; {FIX_REEXPORT}")
    extra = tuple(safe_relative(f, f"{where}.extra_files[{i}]") for i, f in enumerate(extra))
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
    return {safe_relative(k, f"companion_files[{k!r}]"): _sha(v, f"companion_files[{k!r}]") for k, v in files.items()}


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


# ---------------------------------------------------------------- the file


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
