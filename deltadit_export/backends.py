"""Artifacts for backends other than ONNX Runtime, built from the exported segments (issue: GPU path)."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """The backend's libraries are not installed; the message says what to install."""


def build_backend_artifacts(backend, job, segments, chains, tmp, progress):
    raise BackendUnavailable(f"backend {backend!r} is not implemented yet")
