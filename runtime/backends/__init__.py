"""Engine backends and how one is chosen.

``make_backend(name)`` builds a backend by name; ``auto`` picks the fastest one that is usable here.
Each backend module is imported only when chosen, so a CPU-only install never imports CUDA code.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Backend, BackendError, SegmentEngine

# name -> (module, class). Order of preference for "auto" is AUTO_ORDER.
BACKENDS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("runtime.backends.onnxruntime_backend", "OnnxRuntimeCpuBackend"),
}
AUTO_ORDER = ("onnxruntime",)


def make_backend(name: str = "auto", **options: Any) -> Backend:
    if name == "auto":
        errors = []
        for candidate in AUTO_ORDER:
            try:
                return make_backend(candidate, **options)
            except BackendError as exc:
                errors.append(f"{candidate}: {exc}")
        raise BackendError("no usable backend: " + "; ".join(errors))
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: expected auto or one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(**options)


__all__ = ["Backend", "BackendError", "SegmentEngine", "make_backend", "BACKENDS"]
