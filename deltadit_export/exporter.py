"""The export job: resolve the options, reuse an identical export or build a new one, publish it atomically.

Order of work (every check that can fail fast runs before the model is loaded):
options → weights located and config checked → cache key (``export_options.py``) → reuse an identical
earlier export, or build everything in a temporary folder (``export_build.py``: ONNX per segment + checker
+ ONNX Runtime parity, the int8 gate with ``--precision int8``, optional backend artifacts, manifest) →
swap the folder into place (``publish.py``). File-system failures become one user error naming the fix.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from runtime.manifest import COMPANION_DIRS, MANIFEST_NAME, Manifest, ManifestError, load_manifest
from runtime.integrity import verify_companion_files, verify_segment_files

from . import export_build
from .export_options import (
    ExportOptions, OptionError, ReplaceRefused, ResolvedExport, option_changes, recorded_options, resolve,
)
from .export_report import ExportResult
from .folder_lock import acquire, release
from .models import ModelError
from .progress import Progress
from .publish import (
    DISK_FULL, OutputError, carry_user_files, mark_owner, probe_space, publish, recover, staging_dir,
)

log = logging.getLogger("deltadit")

ExportErrorType = RuntimeError  # onnx_export.ExportError, imported lazily (it imports torch)


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


def export_files(out: Path) -> Callable[[str], bool]:
    """Which paths (relative to ``out``) belong to the export there: what its manifest records, the manifest, the
    companion folders; with a manifest that cannot be read, files named like export artifacts. Everything else
    is a user's file, carried into the new folder on a re-export (``publish.carry_user_files``)."""
    names = {MANIFEST_NAME}
    try:
        manifest = load_manifest(out) if (out / MANIFEST_NAME).is_file() else None
    except ManifestError:
        manifest = None
    if manifest is not None:
        for seg in manifest.segments:
            names.update((seg.file, *seg.extra_files))
        names.update(manifest.companion_files)
        for entry in manifest.engines.values():
            entry = entry if isinstance(entry, dict) else {}
            files = entry.get("files") if isinstance(entry.get("files"), dict) else {}
            names.update(f["file"] for f in files.values() if isinstance(f, dict) and isinstance(f.get("file"), str))
            if isinstance(entry.get("timing_cache"), str):
                names.add(entry["timing_cache"])

    def is_ours(rel: str) -> bool:
        if rel in names or rel.split("/", 1)[0] in COMPANION_DIRS:
            return True
        return manifest is None and rel.endswith(ARTIFACT_SUFFIXES)

    return is_ours


ARTIFACT_SUFFIXES = (".onnx", ".onnx.data", ".pt2", ".plan", ".cache")


def _existing_options(out: Path) -> dict[str, Any] | None:
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        return recorded_options(load_manifest(out))
    except ManifestError:
        return None  # a damaged export: rebuilt (its options cannot be known)


def check_replaceable(options: ExportOptions, ignore: tuple[str, ...] = ()) -> None:
    """Refuse (OptionError) before any work when ``options`` would replace an export made with other options
    (``--force`` allows it). ``ignore``: options not known yet (those a calibration will choose)."""
    if options.force:
        return
    job = resolve(options)
    existing = _existing_options(job.out)
    changes = option_changes(existing, job.record, ignore) if existing is not None else []
    if changes:
        raise ReplaceRefused(job.out, changes)


def export(options: ExportOptions, progress: Progress | None = None,
           on_model_loaded: Callable[[Any], None] | None = None) -> ExportResult:
    """Run the whole export. ``progress`` reports per-segment phases (stderr by default). One export at a time
    per output folder: a second one waits for the lock (saying so), then reuses or refuses like any rerun."""
    t0 = time.perf_counter()
    progress = progress or Progress(stream=sys.stderr)
    job = resolve(options)
    try:
        lock = acquire(job.out, on_wait=log.warning)
    except OSError as exc:
        raise _disk_error(exc, job.out, "locking the output folder") from exc
    try:
        return _export_locked(job, progress, on_model_loaded, t0)
    finally:
        release(job.out, lock)


def _export_locked(job: ResolvedExport, progress: Progress, on_model_loaded, t0: float) -> ExportResult:
    try:
        notes = [f"note: {msg}" for msg in recover(job.out)]
    except OSError as exc:
        raise _disk_error(exc, job.out, "cleaning up after an interrupted export") from exc
    _check_out_folder(job.out)
    if not job.options.force:
        existing = reusable(job.out, job.cache_key)
        if existing is not None:
            return ExportResult(job.out, existing, reused=True, seconds=time.perf_counter() - t0, notes=notes)
        recorded = _existing_options(job.out)
        changes = option_changes(recorded, job.record) if recorded is not None else []
        if changes:  # same options, other weights or versions: rebuilt; other options: the user's call
            raise ReplaceRefused(job.out, changes)
    tmp: Path | None = None
    try:
        tmp = staging_dir(job.out)
        mark_owner(tmp)
        probe_space(tmp)  # a full disk is found now, not after the model is loaded
        result = export_build.build(job, tmp, progress, on_model_loaded)
        carried = carry_user_files(job.out, tmp, export_files(job.out))
        publish(tmp, job.out)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        os_error = _os_error_in(exc)
        if os_error is not None:
            raise _disk_error(os_error, job.out, "writing the export") from exc
        raise
    if carried:
        shown = ", ".join(carried[:5]) + (f" and {len(carried) - 5} more" if len(carried) > 5 else "")
        notes.append(f"note: kept your file(s) in {job.out} that are not part of the export: {shown}")
    manifest = load_manifest(job.out)
    return ExportResult(job.out, manifest, False, result, time.perf_counter() - t0, notes)


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind an export failure (the ONNX exporter wraps them), if any."""
    if isinstance(exc, (ModelError, OptionError, ManifestError, OutputError)):
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
