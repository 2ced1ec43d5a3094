"""Engine backends and how one is chosen.

``make_backend(name, **options)`` builds a backend by name; ``auto`` picks the fastest one that is usable
here: TensorRT, then ONNX Runtime's CUDA provider, then the torch backend on CUDA, then ONNX Runtime on
the CPU (``openvino`` only by name). A candidate is skipped when its libraries or a GPU are missing (its
constructor raises BackendError) or, given the ``manifest``, when the export lacks its artifacts (no
TensorRT engines, no torch programs). Options a candidate does not take (``threads`` for the CPU, ``cuda_graphs`` for
the GPU) are passed only to the candidates that take them.

Each backend module is imported only when chosen, so a CPU-only install never imports CUDA code.

Trust: a backend whose artifacts can run code when loaded (``code_artifacts``: torch.export programs
unpickle, TensorRT plans are native code) is built only with ``trust_artifacts=True``; ``auto`` skips
it without, saying why (a warning on the ``deltadit`` logger when it would have been usable). ONNX
files carry no code (their external-data paths are checked by the runtime, see runtime/integrity.py).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any

from .base import Backend, BackendError, SegmentEngine

# name -> (module, class). Order of preference for "auto" is AUTO_ORDER.
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorrt": ("runtime.backends.tensorrt_backend", "TensorRTBackend"),
    "onnxruntime-cuda": ("runtime.backends.ort_cuda_backend", "OrtCudaBackend"),
    "torch-cuda": ("runtime.backends.torch_backend", "TorchCudaBackend"),
    "torch": ("runtime.backends.torch_backend", "TorchBackend"),  # device="cpu" | "cuda" (default: cuda if any)
    "torch-compile": ("runtime.backends.torch_backend", "TorchCompiledBackend"),  # Inductor, frozen weights
    "onnxruntime": ("runtime.backends.onnxruntime_backend", "OnnxRuntimeCpuBackend"),
    "openvino": ("runtime.backends.openvino_backend", "OpenVinoBackend"),  # CPU, bf16 where the CPU has it
}
# openvino is never in it: its default bf16 arithmetic changes the results, which auto must not do behind
# the user's back (and a speed self-test at start-up would make the choice depend on the machine's load).
AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime")


def backend_class(name: str) -> type:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: expected auto or one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def _accepted(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


TRUST_OPT_IN = "trust_artifacts=True (CLI: --trust-artifacts)"


def untrusted(name: str, cls: type) -> str:
    """Why backend ``name`` is not built without the opt-in, and what to do."""
    return (f"backend {name!r} loads {cls.code_artifacts}, which can run arbitrary code when loaded: a folder from "
            f"elsewhere can do anything to this machine through them. Load them only from an export you made or "
            f"trust, with {TRUST_OPT_IN}; or use backend='onnxruntime' (ONNX files carry no code)")


def _with_trust(cls: type, options: dict[str, Any], trust_artifacts: bool) -> dict[str, Any]:
    if "trust_artifacts" in inspect.signature(cls.__init__).parameters:
        return {**options, "trust_artifacts": trust_artifacts}
    return dict(options)


def make_backend(name: str = "auto", manifest=None, *, trust_artifacts: bool = False, **options: Any) -> Backend:
    """Build backend ``name`` (or the best usable one for ``auto``, for ``manifest`` when given).

    ``trust_artifacts``: allow backends whose artifacts can run code when loaded (see the module doc).
    """
    if name == "auto":
        errors = []
        for candidate in AUTO_ORDER:
            try:
                cls = backend_class(candidate)
                missing = getattr(cls, "missing_artifacts", None)
                reason = missing(manifest) if (missing is not None and manifest is not None) else None
                if reason:
                    errors.append(f"{candidate}: {reason}")
                    continue
                backend = cls(**_with_trust(cls, _accepted(cls, options), trust_artifacts))
            except BackendError as exc:
                errors.append(f"{candidate}: {exc}")
                continue
            if getattr(cls, "code_artifacts", None) and not trust_artifacts:
                why = f"skipped: its {cls.code_artifacts} can run code when loaded; pass {TRUST_OPT_IN} to use it"
                logging.getLogger("deltadit").warning("backend auto: %s %s", candidate, why)
                errors.append(f"{candidate}: {why}")
                continue
            return backend
        raise BackendError("no usable backend: " + "; ".join(errors))
    cls = backend_class(name)
    unknown = sorted(set(options) - set(_accepted(cls, options)))
    if unknown:
        raise BackendError(f"backend {name!r} takes no option(s) {unknown}")
    backend = cls(**_with_trust(cls, options, trust_artifacts))  # first what is missing here (a GPU, a library)
    if getattr(cls, "code_artifacts", None) and not trust_artifacts:
        raise BackendError(untrusted(name, cls))
    return backend


__all__ = ["Backend", "BackendError", "SegmentEngine", "make_backend", "backend_class", "untrusted", "BACKENDS",
           "AUTO_ORDER"]
