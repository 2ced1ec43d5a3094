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
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT = "deltadit-manifest"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
BATCH = "batch"
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32")
SEGMENT_ROLES = {"embed": "embed", "front": "blocks", "middle": "blocks", "rear": "blocks", "head": "head"}
FIX_REEXPORT = "re-export with `deltadit-export ... --force`"


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

    def path_of(self, file: str) -> Path:
        if self.root is None:
            raise ManifestError("this manifest was not loaded from a folder, so its files cannot be located")
        return self.root / file

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
        raise ManifestError(f"manifest field `{where}` must be a file name, got {file!r}")
    p = PurePosixPath(file.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or file.startswith(("/", "\\")) or ":" in file:
        raise ManifestError(
            f"manifest field `{where}` = {file!r} points outside the engine folder; "
            "segment files must be plain names inside the folder (no '..', no absolute paths)"
        )
    return file


def _tensor(d: Any, where: str) -> TensorSpec:
    if not isinstance(d, dict):
        raise ManifestError(f"manifest field `{where}` must be an object with name, dtype, shape")
    name = _require(d, "name", str, f"{where}.")
    dtype = _require(d, "dtype", str, f"{where}.")
    if dtype not in DTYPES:
        raise ManifestError(f"manifest field `{where}.dtype` = {dtype!r} is not one of {DTYPES}")
    shape = _require(d, "shape", list, f"{where}.")
    for i, dim in enumerate(shape):
        ok = dim == BATCH if isinstance(dim, str) else (isinstance(dim, int) and not isinstance(dim, bool) and dim > 0)
        if not ok:
            raise ManifestError(f"manifest field `{where}.shape[{i}]` = {dim!r}: expected a positive int or 'batch'")
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
        if not (isinstance(blocks, list) and len(blocks) == 2 and all(isinstance(b, int) for b in blocks)):
            raise ManifestError(f"manifest field `{where}.blocks` must be [start, end] for block segment {name!r}")
        blocks = (blocks[0], blocks[1])
    else:
        blocks = None
    file = _safe_relative(_require(d, "file", str, f"{where}."), f"{where}.file")
    sha = _require(d, "sha256", str, f"{where}.")
    extra = d.get("extra_files", [])
    if not isinstance(extra, list):
        raise ManifestError(f"manifest field `{where}.extra_files` must be a list")
    extra = tuple(_safe_relative(f, f"{where}.extra_files") for f in extra)
    inputs = tuple(_tensor(t, f"{where}.inputs[{i}]") for i, t in enumerate(_require(d, "inputs", list, f"{where}.")))
    outputs = tuple(
        _tensor(t, f"{where}.outputs[{i}]") for i, t in enumerate(_require(d, "outputs", list, f"{where}."))
    )
    if not inputs or not outputs:
        raise ManifestError(f"manifest field `{where}` lists no inputs or no outputs; {FIX_REEXPORT}")
    params = d.get("params", 0)
    return SegmentSpec(name, role, blocks, file, sha, inputs, outputs, params if isinstance(params, int) else 0, extra)


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
    resolution = _require(d, "resolution", int, "")
    sample_shape = _require(d, "sample_shape", list, "")
    if len(sample_shape) != 3 or not all(isinstance(x, int) and x > 0 for x in sample_shape):
        raise ManifestError(f"manifest field `sample_shape` must be [channels, height, width], got {sample_shape!r}")
    out_channels = _require(d, "out_channels", int, "")
    num_layers = _require(d, "num_layers", int, "")
    cached_blocks = _require(d, "cached_blocks", int, "")
    if not 1 <= cached_blocks < num_layers:
        raise ManifestError(f"manifest cached_blocks={cached_blocks} is out of range 1..{num_layers - 1}")
    cuts = _require(d, "cuts", dict, "")
    a, c = min(cached_blocks, num_layers - cached_blocks), max(cached_blocks, num_layers - cached_blocks)
    if cuts.get("a") != a or cuts.get("c") != c:
        raise ManifestError(f"manifest cuts {cuts!r} do not match N_c={cached_blocks}, L={num_layers} (a={a}, c={c})")
    schedule = _require(d, "schedule", dict, "")
    for key in ("num_steps", "interval", "boundary"):
        _require(schedule, key, int, "schedule.")
    precision = _require(d, "precision", str, "")
    max_batch = _require(d, "max_batch", int, "")
    if max_batch < 1:
        raise ManifestError(f"manifest max_batch={max_batch} must be ≥ 1")
    conditioning = _require(d, "conditioning", dict, "")
    _require(conditioning, "kind", str, "conditioning.")
    raw_segments = _require(d, "segments", list, "")
    segments = tuple(_segment(s, i) for i, s in enumerate(raw_segments))
    names = [s.name for s in segments]
    expected = ["embed"] + [n for n in ("front", "middle", "rear") if n in names] + ["head"]
    if names != expected or "front" not in names or "rear" not in names:
        raise ManifestError(f"manifest segments {names} are incomplete or out of order (expected {expected}); "
                            f"{FIX_REEXPORT}")
    bounds = {"front": (0, a), "middle": (a, c), "rear": (c, num_layers)}
    for s in segments:
        if s.role == "blocks" and s.blocks != bounds[s.name]:
            raise ManifestError(f"segment {s.name!r} covers blocks {s.blocks}, expected {bounds[s.name]} from the cuts")
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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); {FIX_REEXPORT}") from None
    return manifest_from_dict(data, root=path.parent.resolve())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_segment_files(manifest: Manifest, names: tuple[str, ...] | None = None) -> None:
    """Check every segment file exists and matches its recorded sha256. Raises ManifestError naming the file."""
    for seg in manifest.segments:
        if names is not None and seg.name not in names:
            continue
        path = manifest.path_of(seg.file)
        if not path.is_file():
            raise ManifestError(f"segment {seg.name!r}: file {path} is missing; {FIX_REEXPORT}")
        for extra in seg.extra_files:
            if not manifest.path_of(extra).is_file():
                raise ManifestError(f"segment {seg.name!r}: external-data file {manifest.path_of(extra)} is missing")
        digest = file_sha256(path)
        if digest != seg.sha256:
            raise ManifestError(
                f"segment {seg.name!r}: {path} was changed after export (sha256 {digest[:12]}… ≠ recorded "
                f"{seg.sha256[:12]}…); {FIX_REEXPORT}, or pass verify=False (CLI: --no-verify) if you changed it on "
                "purpose"
            )


def write_manifest(manifest: Manifest, folder: str | os.PathLike) -> Path:
    """Write ``folder/manifest.json`` atomically (temporary file in the same folder, then rename)."""
    folder = Path(folder)
    target = folder / MANIFEST_NAME
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=folder)
    try:
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
