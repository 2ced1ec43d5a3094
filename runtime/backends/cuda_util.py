"""What the CUDA backends share: the device check, one stream per backend ordered against the caller's
stream without a host synchronization, artifact checks, and static buffers for CUDA-graph replay.

Ordering. A CUDA backend enqueues its work on its own stream (TensorRT wants a non-default stream).
Before a segment runs, that stream waits for the work the caller already queued (events, not a
host sync); after it, the caller's stream waits for the segment. The caching allocator is told
which stream uses which tensor (``record_stream``), so memory freed on one stream is never reused
while the other still reads it. A caller that makes the backend's stream current
(``with torch.cuda.stream(backend.stream)``) runs everything on that one stream and skips the events.

CUDA graphs. A graph bakes in device addresses, so each (segment, batch size) gets static input and
output buffers: inputs are copied in, the graph is replayed, outputs are cloned out (the runtime keeps
segment outputs across segments and steps, and changes some in place). Copies are a few MB per
segment, microseconds on a GPU, against milliseconds of segment work.
"""

from __future__ import annotations

import re
import threading
from pathlib import PurePosixPath
from typing import Callable, Iterable

import torch

from ..integrity import file_sha256
from ..manifest import Manifest, ManifestError
from .base import BackendError


def require_cuda(backend: str, device: str | torch.device | None = None) -> torch.device:
    """The CUDA device a backend runs on; a BackendError naming what is missing when there is none."""
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
        raise BackendError(
            f"backend {backend!r} needs an NVIDIA GPU, but torch {torch.__version__} ({built}) sees none; "
            "use backend='onnxruntime' (CPU) or 'torch' with device='cpu' here"
        )
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        raise BackendError(f"backend {backend!r} runs on CUDA devices only, got device={str(dev)!r}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise BackendError(f"device {dev} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def artifact_entry(manifest: Manifest, backend: str, key: str, how_to_build: str) -> dict:
    """``manifest.engines[key]``, or a BackendError saying the export lacks it and how to build it."""
    entry = manifest.engines.get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
        raise BackendError(
            f"backend {backend!r}: this export ({manifest.root}) has no {key} artifacts; re-export with "
            f"{how_to_build}"
        )
    return entry


def artifact_path(manifest: Manifest, entry: dict, segment: str, backend: str, verify: bool = True):
    """The file of one segment's artifact: a plain name inside the folder, present, with its recorded sha256."""
    info = entry["files"].get(segment)
    if not isinstance(info, dict) or not isinstance(info.get("file"), str):
        raise BackendError(f"backend {backend!r}: the manifest lists no {backend} file for segment {segment!r}; "
                           "re-export with --force")
    name = info["file"]
    p = PurePosixPath(name.replace("\\", "/"))
    if not name or p.is_absolute() or len(p.parts) != 1 or name in (".", "..") or ":" in name:
        raise BackendError(f"backend {backend!r}: segment {segment!r} names file {name!r}, which is not a plain "
                           "file name inside the engine folder; the manifest was edited or is corrupt")
    try:
        path = manifest.path_of(name)
    except ManifestError as exc:
        raise BackendError(str(exc)) from None
    if not path.is_file():
        raise BackendError(f"backend {backend!r}: segment {segment!r}: {path} is missing; re-export with --force")
    if verify and isinstance(info.get("sha256"), str):
        digest = file_sha256(path)
        if digest != info["sha256"]:
            raise BackendError(
                f"backend {backend!r}: segment {segment!r}: {path} was changed after export (sha256 "
                f"{digest[:12]}… ≠ recorded {info['sha256'][:12]}…); re-export with --force"
            )
    return path


def slug(text: str) -> str:
    """A file-name-safe lower-case form of a device name ('NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3')."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


class StreamOrder:
    """One CUDA stream for a backend, ordered against the caller's current stream with events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def run(self, inputs: Iterable[torch.Tensor], fn: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        caller = torch.cuda.current_stream(self.device)
        if caller == self.stream:
            with torch.cuda.device(self.device):
                return fn()
        self.stream.wait_stream(caller)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            outputs = fn()
        for t in inputs:
            if t.is_cuda:
                t.record_stream(self.stream)
        for t in outputs.values():
            t.record_stream(caller)
        caller.wait_stream(self.stream)
        return outputs


class GraphCache:
    """CUDA graphs of one segment, one per batch size, with their static input and output buffers.

    ``capture(static_inputs) -> static_outputs`` must enqueue the segment's work on the current stream
    using only the given buffers; it is called once per batch size, after a warm-up run (lazy
    initialisation must not happen inside a capture). A new batch size captures a new graph; earlier
    graphs are kept (at most ``max_batch`` of them).
    """

    def __init__(self, stream: torch.cuda.Stream, pool, warmup: int = 2):
        self.stream = stream
        self.pool = pool  # shared by all graphs of a backend: replays never overlap (one stream, one lock)
        self.warmup = warmup
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict, dict]] = {}
        self.lock = threading.Lock()

    def run(self, feeds: dict[str, torch.Tensor], names: list[str],
            capture: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Copy ``feeds`` into the static inputs for this batch size, replay, return clones of the outputs.

        Runs on the current stream, which must be the backend's stream.
        """
        batch = int(feeds[names[0]].shape[0])
        with self.lock:
            entry = self.graphs.get(batch)
            if entry is None:
                entry = self._capture(feeds, names, capture)
                self.graphs[batch] = entry
            graph, static_in, static_out = entry
            for n in names:
                static_in[n].copy_(feeds[n], non_blocking=True)
            graph.replay()
            return {n: t.clone() for n, t in static_out.items()}

    def _capture(self, feeds, names, capture):
        static_in = {n: torch.empty_like(feeds[n], memory_format=torch.contiguous_format).copy_(feeds[n])
                     for n in names}
        for _ in range(self.warmup):
            capture(static_in)
        self.stream.synchronize()  # once per (segment, batch size): the warm-up must finish before capture
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's eager work (a second generation) does not break this capture.
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            static_out = capture(static_in)
        return graph, static_in, static_out

    def clear(self) -> None:
        with self.lock:
            self.graphs.clear()
