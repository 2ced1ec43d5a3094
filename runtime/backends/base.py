"""The one small interface every engine backend implements.

A backend turns one manifest segment into a :class:`SegmentEngine`, whose ``run`` maps named input
tensors to named output tensors. Tensors are ``torch.Tensor`` on the backend's device throughout,
so the runtime's delta arithmetic (``Δ = out − in``, ``h += Δ``) runs where the engines run and a
GPU backend never copies to the host inside a step. ``run`` must be safe to call from several
threads at once (two generations in flight): backends that own preallocated buffers lock them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: BackendError must import without torch (CLIs that only read a manifest)
    import torch

from ..manifest import Manifest, SegmentSpec


class BackendError(RuntimeError):
    """A backend cannot be used or cannot load a segment; the message says what to install or fix."""


@runtime_checkable
class SegmentEngine(Protocol):
    spec: SegmentSpec

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the segment. ``feeds`` holds at least the segment's inputs, on the backend's device."""
        ...


class Backend(Protocol):
    name: str
    device: torch.device
    dtype: torch.dtype  # dtype of the engines' floating inputs and outputs

    def load(self, manifest: Manifest, segment: SegmentSpec) -> SegmentEngine:
        ...

    def synchronize(self) -> None:
        """Wait for queued work (for timing); a no-op on the CPU."""
        ...
