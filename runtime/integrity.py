"""What an engine folder may make the runtime read, checked before any engine is created.

A folder from elsewhere is untrusted input. The manifest names every file the runtime reads and hashes it:
the segment graphs and their external-data weights, the backend artifacts (``engines``), and the *companion
files*: the sampler and text-encoder configs in ``scheduler/`` and ``text_encoder/``, which change what a
generation computes. The manifest's own validation (runtime/manifest.py) sees only names; this module checks
the files on disk:

- segment files: each one the manifest names resolves inside the folder, exists and has its recorded
  sha256 (``check_segment_paths``, ``verify_segment_files``; ``file_sha256`` is the one hash function);
- companion files: each listed one is inside the folder and has its recorded sha256, and no file in
  those folders is unlisted (an export from before they were hashed, or a file added after export);
- ONNX external data: every ``location`` of every tensor of every graph (initializers, sparse
  initializers, tensor attributes, subgraphs, functions) is one of the segment's hashed
  ``extra_files``. ONNX Runtime before 1.27 follows ``..``, absolute paths and links in these fields
  (sparse tensors until 1.27, dense ones until 1.24), so a graph could read any file as weights.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from .backends.base import BackendError
from .manifest_schema import (COMPANION_DIRS, FIX_REEXPORT, MAX_COMPANION_FILES, Manifest, ManifestError,
                              SegmentSpec)

MAX_COMPANION_BYTES = 16 * 2**20  # the shipped configs are under 2 KB
FIX_VERIFY = ("or load it anyway with DeltaDiTRuntime(..., verify=False) (CLI: --no-verify) if you changed it on "
              "purpose")


# ---------------------------------------------------------------- segment files


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, read in chunks (segment weights are up to gigabytes)."""
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
            _check_digest(path, recorded, f"segment {seg.name!r}")


def _check_digest(path: Path, recorded: str, what: str, so: str = "") -> None:
    """``path`` (an existing file) has the sha256 ``recorded``; else a ManifestError naming ``what`` and the fix."""
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise ManifestError(f"{what}: cannot read {path} ({exc.strerror or exc}); check its permissions") from None
    if digest != recorded:
        raise ManifestError(
            f"{what}: {path} was changed or damaged after export ({path.stat().st_size} bytes, sha256 "
            f"{digest[:12]}… ≠ recorded {recorded[:12]}…); {so}{FIX_REEXPORT}, {FIX_VERIFY}")


# ---------------------------------------------------------------- companion files


def check_companion_paths(manifest: Manifest) -> None:
    """Every companion file and folder resolves inside the engine folder (cheap; runs even with verify=False)."""
    for rel in manifest.companion_files:
        manifest.path_of(rel)
    if manifest.root is None:
        return
    for sub in COMPANION_DIRS:
        if (manifest.root / sub).exists() or (manifest.root / sub).is_symlink():
            manifest.path_of(sub)


def verify_companion_files(manifest: Manifest) -> None:
    """Each listed companion file exists with its recorded sha256; no file in a companion folder is unlisted."""
    for rel, recorded in manifest.companion_files.items():
        path = manifest.path_of(rel)
        if not path.is_file():
            raise ManifestError(f"companion file {rel!r}: {path} is missing; {FIX_REEXPORT}")
        _check_size(path)
        _check_digest(path, recorded, f"companion file {rel!r}", so="the runtime samples with it, so ")
    if manifest.root is None:
        return
    for sub in COMPANION_DIRS:
        for path in _files_under(manifest.root / sub):
            rel = path.relative_to(manifest.root).as_posix()
            if rel not in manifest.companion_files:
                raise ManifestError(
                    f"{path} is not recorded in the manifest (an export made before companion files were hashed, or a "
                    f"file added after export): the runtime reads the files in {sub}/, so each must have its sha256 in "
                    f"the manifest; {FIX_REEXPORT}, {FIX_VERIFY}")


def _check_size(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_COMPANION_BYTES:
        raise ManifestError(f"{path} is {size:,} bytes, more than the {MAX_COMPANION_BYTES:,} a config next to the engines "
                            f"may have; {FIX_REEXPORT}")


def read_companion(manifest: Manifest, rel: str, verify: bool = True) -> bytes:
    """The bytes of companion file ``rel``: inside the folder, and (``verify``) listed with this sha256."""
    path = manifest.path_of(rel)
    if verify and rel not in manifest.companion_files:
        raise ManifestError(f"{path} is not recorded in the manifest (an export made before companion files were "
                            f"hashed, or a file added after export): the runtime reads it, so it must have its sha256 "
                            f"in the manifest; {FIX_REEXPORT}, {FIX_VERIFY}")
    _check_size(path)
    data = path.read_bytes()
    if verify and hashlib.sha256(data).hexdigest() != manifest.companion_files[rel]:
        raise ManifestError(f"companion file {rel!r}: {path} was changed or damaged after export (sha256 ≠ recorded "
                            f"{manifest.companion_files[rel][:12]}…); the runtime samples with it, so {FIX_REEXPORT}, "
                            f"{FIX_VERIFY}")
    return data


def _files_under(folder: Path) -> Iterator[Path]:
    """Files and links below ``folder`` (links not followed), in order; bounded: a folder of more entries than
    a manifest may list is refused without walking all of it."""
    if not folder.is_dir() or folder.is_symlink():
        return
    seen = 0
    for top, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
        for name in sorted(files + links):
            seen += 1
            if seen > 4 * MAX_COMPANION_FILES:
                raise ManifestError(f"{folder} holds more than {4 * MAX_COMPANION_FILES} files, more than a manifest may "
                                    f"list; {FIX_REEXPORT}")
            yield Path(top) / name


# ---------------------------------------------------------------- ONNX external data


def _tensors(graph) -> Iterator:
    """Every TensorProto of a graph that can hold data: initializers, sparse ones, attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node) -> Iterator:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _tensors(attr.g)
        for g in attr.graphs:
            yield from _tensors(g)


def _model_tensors(model) -> Iterator:
    yield from _tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def external_locations(path: Path) -> list[tuple[str, str]]:
    """(tensor name, external-data location) of every tensor of the ONNX file that keeps its data outside it.

    Parses the protobuf only: ``onnx.load(..., load_external_data=False)`` reads no external file.
    """
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    found = []
    for tensor in _model_tensors(model):
        entries = {e.key: e.value for e in tensor.external_data}
        if tensor.data_location == TensorProto.EXTERNAL or entries:
            found.append((tensor.name, entries.get("location", "")))
    return found


def _bad_location(location: str, allowed: tuple[str, ...]) -> str | None:
    p = PurePosixPath(location.replace("\\", "/"))
    if not location:
        return "has no location"
    if p.is_absolute() or location.startswith(("/", "\\", "~")) or ":" in location:
        return "is an absolute path"
    if ".." in p.parts:
        return "leaves the folder ('..')"
    if location not in allowed:
        return f"is not one of the segment's hashed weight files ({', '.join(allowed) or 'none'})"
    return None


def check_onnx_external_data(manifest: Manifest, segments: tuple[SegmentSpec, ...] | None = None) -> None:
    """Refuse a graph whose external data would be read from anywhere but its segment's hashed ``extra_files``."""
    for seg in segments if segments is not None else manifest.segments:
        path = manifest.path_of(seg.file)
        if not path.is_file():  # only with verify=False (verification names it first): as the engine library would
            raise BackendError(f"segment {seg.name!r}: file {path} is missing; {FIX_REEXPORT}")
        try:
            locations = external_locations(path)
        except Exception as exc:  # not a protobuf, truncated, nested too deeply: name the file
            raise BackendError(f"segment {seg.name!r}: {path} is not a loadable ONNX file ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); {FIX_REEXPORT}") from None
        for tensor, location in locations:
            why = _bad_location(location, seg.extra_files)
            if why is not None:
                raise ManifestError(
                    f"segment {seg.name!r}: {path} keeps the data of tensor {tensor!r} in {location!r}, which {why}: "
                    "ONNX Runtime would read that file as weights, so the graph is refused before any engine is "
                    f"created; {FIX_REEXPORT}")

