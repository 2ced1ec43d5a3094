"""The manifest's data model: what ``manifest.json`` holds, and the bounds on what it may ask for.

``manifest.json`` describes one export: the model, its resolution and latent shape, the block
count L, N_c and the cut points, the default schedule, the precision, and per segment its file,
sha256 and every input and output (name, dtype, shape with the symbolic ``"batch"`` axis).
Reading, validating and writing it is runtime/manifest.py (the module callers import); checking the
files it names is runtime/integrity.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

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
CONDITIONING_KINDS = ("caption", "class")


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
        file = safe_relative(file, "file")
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


def safe_relative(file: Any, where: str) -> str:
    """``file`` if it is a plain relative name inside the engine folder; ManifestError naming field ``where`` if not."""
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
