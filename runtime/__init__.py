"""deltadit runtime: run exported subgraph engines once per step with the Δ-DiT cache schedule.

Light and embeddable: it reads ``manifest.json`` and never imports diffusers to run engines
(only :func:`generate` imports a diffusers *scheduler*, when called).
"""

from .executor import DeltaDiTRuntime, InputError, NonFiniteError
from .generation import Generation, GenerationError
from .manifest import Manifest, ManifestError, load_manifest
from .schedule import POLICY_NAMES, Schedule, ScheduleError, build_schedule

__all__ = [
    "DeltaDiTRuntime", "Generation", "GenerationError", "InputError", "Manifest", "ManifestError",
    "NonFiniteError", "POLICY_NAMES", "Schedule", "ScheduleError", "build_schedule", "load_manifest",
    "generate", "install", "DeltaDiTTransformer", "DropInError",
]


def __getattr__(name):
    # The sampling loop and the drop-in are imported on first use: a service that only steps engines
    # never pays for them.
    if name == "generate":
        from .sampling import generate

        return generate
    if name in ("install", "DeltaDiTTransformer", "DropInError"):
        from . import dropin

        return getattr(dropin, name)
    raise AttributeError(name)
