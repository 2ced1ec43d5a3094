"""deltadit runtime: run exported subgraph engines once per step with the Δ-DiT cache schedule.

Light and embeddable: it reads ``manifest.json`` and never imports diffusers to run engines
(only :func:`generate` imports a diffusers *scheduler*, when called).
"""

import importlib

# Everything is imported on first use: ``runtime.manifest`` and ``runtime.schedule`` (pure data, no torch)
# stay instant for tools that only read a manifest or print a schedule, and a service that only steps
# engines never pays for the sampling loop or the drop-in.
_EXPORTS = {
    "DeltaDiTRuntime": "executor", "InputError": "executor", "NonFiniteError": "executor",
    "Generation": "generation", "GenerationError": "generation",
    "Manifest": "manifest", "ManifestError": "manifest", "load_manifest": "manifest",
    "POLICY_NAMES": "schedule", "Schedule": "schedule", "ScheduleError": "schedule", "build_schedule": "schedule",
    "generate": "sampling", "install": "dropin", "DeltaDiTTransformer": "dropin", "DropInError": "dropin",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
