"""The export options an existing export was made with, to export the same model another way.

For comparisons across precisions (benchmark peers, evaluation rows, calibration of precision): from a
folder, the options that rebuild it exactly (same cache key: ``export`` reuses the folder), and with
changes, an export of the same weights and cuts at another precision::

    from deltadit_export.exporter import export
    from deltadit_export.variants import export_options_like

    int8 = export(export_options_like("engines/pixart-digits-16-fp32", precision="int8")).out
    # -> engines/pixart-digits-16-int8 (embed and head fp32); keep_fp32=..., int8_tolerance=..., out=... as needed
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from runtime.manifest import Manifest, load_manifest

from .export_options import ExportOptions

INT8_ONLY = ("keep_fp32", "int8_tolerance")
log = logging.getLogger("deltadit")


class VariantError(RuntimeError):
    """The export of a variant failed in its child process (the message says why)."""


def export_options_like(folder: str | os.PathLike | Manifest, **changes: Any) -> ExportOptions:
    """The ``ExportOptions`` that made ``folder`` (its manifest), with ``changes`` applied.

    Changing ``precision`` away from int8 drops the int8-only options; changing it to another precision
    without ``out`` sends the export to that precision's default folder, not over this one.
    """
    m = folder if isinstance(folder, Manifest) else load_manifest(folder)
    source = m.model.get("source", {})
    kind = source.get("kind")
    int8 = m.export.get("int8", {}) if m.precision == "int8" else {}
    if kind == "local" and not changes.get("weights"):
        # The recorded path is the (untrusted) folder's say: a local source is read only from a folder the user names.
        from .models import ModelError

        raise ModelError(f"{m.root} was exported from a local weights folder ({source.get('path')!r}): pass "
                         "weights=DIR (CLI --weights DIR), the folder it was exported from, to export it another way")
    options = ExportOptions(
        model=m.model["name"], resolution=m.resolution,
        weights=None,  # a local source needs changes["weights"] (above)
        random_weights=kind == "random", seed=source.get("seed") or 0,
        overrides=dict(source.get("overrides", {})) if kind == "random" else {},
        cached_blocks=m.cached_blocks, precision=m.precision,
        out=str(m.root) if m.root is not None else None,
        opset=m.export.get("opset", 18), exporter=m.export.get("exporter", "torchscript"),
        max_batch=m.max_batch // 2, num_steps=m.schedule["num_steps"], interval=m.schedule["interval"],
        boundary=m.schedule["boundary"], backends=("onnx",) + tuple(sorted(m.engines)),
        calibration=m.calibration,
        keep_fp32=tuple(int8["keep_fp32"]) if "keep_fp32" in int8 else None,
        int8_tolerance=int8.get("tolerance"),
    )
    if "precision" in changes and changes["precision"] != m.precision and "out" not in changes:
        changes["out"] = None  # engines/<model>-<resolution>-<new precision>
    options = replace(options, **changes)
    if options.precision != "int8":
        options = replace(options, **{k: None for k in INT8_ONLY if k not in changes})
    return options


def sibling_folder(folder: str | os.PathLike, precision: str) -> Path:
    """Where a variant of ``folder`` at another precision goes: next to it, the last ``fp32``/``fp16``/``int8`` in
    its name replaced (``engines/pixart-alpha-256-fp32`` → ``engines/pixart-alpha-256-int8``, the exporter's
    default folder for that variant, so an earlier ``deltadit export --precision int8`` of the same model is
    reused), else ``-<precision>`` appended. Never the folder itself."""
    folder = Path(folder)
    name = folder.name
    for token in ("fp32", "fp16", "int8"):
        at = name.rfind(token)
        if at >= 0:
            new = name[:at] + precision + name[at + len(token):]
            break
    else:
        new = f"{name}-{precision}"
    if new == name:
        new = f"{name}-{precision}"
    return folder.parent / new


def export_variant(folder: str | os.PathLike, precision: str, *, weights: str | None = None,
                   quiet_progress: bool = True, in_child: bool = False) -> Path:
    """The export of the same model as ``folder`` at ``precision`` (same weights, cuts and schedule), in
    :func:`sibling_folder`: exported once, reused afterwards (the exporter's cache key). Returns its folder.

    ``in_child``: export in a spawned process, for callers that go on to time or hold other models: an export
    loads the whole fp32 model and its ONNX (at full width ~6 GB at its peak), memory a long-lived process would
    otherwise keep from the allocator. Its failures come back as :class:`VariantError`; in-process ones are the
    exporter's own errors."""
    out = sibling_folder(folder, precision)
    log.info("%s rows: the %s export of the same model at %s (exported once, reused when it exists)",
             precision, precision, out)
    named = {"weights": weights} if weights else {}  # a local source is read only from a folder the user names
    options = export_options_like(folder, precision=precision, out=str(out), force=False, **named)
    if not in_child:
        from .exporter import export
        from .progress import Progress

        return export(options, Progress(stream=sys.stderr, quiet=quiet_progress)).out
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    replies = ctx.SimpleQueue()
    child = ctx.Process(target=_export_in_child, args=(options, quiet_progress, log.getEffectiveLevel(), replies))
    child.start()
    child.join()
    reply = replies.get() if not replies.empty() else ("error", f"the {precision} export process died (exit code "
                                                                f"{child.exitcode}); its error is printed above")
    if reply[0] == "error":
        raise VariantError(reply[1])
    return Path(reply[1])


def _export_in_child(options: ExportOptions, quiet_progress: bool, level: int, replies) -> None:
    """In the child process of :func:`export_variant`: export, and reply ("ok", folder) or ("error", message)."""
    from .cli import user_errors
    from .console import setup_logging
    from .exporter import export
    from .progress import Progress

    setup_logging()
    log.setLevel(level)
    try:
        result = export(options, Progress(stream=sys.stderr, quiet=quiet_progress))
    except user_errors() as exc:
        replies.put(("error", str(exc)))
        return
    except Exception as exc:  # a bug: the traceback goes to stderr, one line to the parent
        import traceback

        traceback.print_exc()
        replies.put(("error", f"the export failed: {type(exc).__name__}: {exc}"))
        return
    if not result.reused:
        log.info("%s", result.summary())
    replies.put(("ok", str(result.out)))
