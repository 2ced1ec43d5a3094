"""torch backend: runs each segment's ``torch.export`` program (``<segment>.pt2``, written by
``deltadit-export --backend torch``) on the CPU or a CUDA GPU, optionally replayed as CUDA graphs.

The programs are exported in the manifest's precision (fp32, or fp16 with LayerNorms kept in fp32)
and run as they are: a program asserts the dtypes it was traced with, so it cannot be cast or run
under ``torch.autocast`` afterwards (bf16 would need a bf16 export).

A program saved by one torch version is loaded by the same version: export on the machine (and torch)
that serves. Loading warns when the versions differ and fails with both versions named if it breaks.
"""

from __future__ import annotations

import threading
import warnings

import torch

from ..manifest import Manifest, SegmentSpec
from .base import BackendError
from .cuda_util import GraphCache, StreamOrder, artifact_entry, artifact_path, require_cuda

HOW_TO_BUILD = "`deltadit-export ... --backend torch` (it saves one torch.export program per segment)"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_program(path, device: torch.device):
    """Load a saved ``torch.export`` program onto ``device`` and return its callable module."""
    program = torch.export.load(str(path))
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        # Moves weights, buffers and the device arguments recorded in the graph (arange(device=cpu) …).
        program = move_to_device_pass(program, device)
    return program.module()


def compile_program(module):
    """Compile a loaded program with TorchInductor, weights frozen as constants.

    Freezing lets Inductor fold the weights into the graph and pre-pack them for oneDNN, and it fuses
    the element-wise work between the matmuls (adaLN modulation, GELU, residual adds): on a 2-core x86
    CPU that is what makes the compiled segments faster than eager PyTorch at fp32 (see the README's
    benchmark). Compilation happens at the first call per batch size (``dynamic=False``: guidance
    calls always have the same batch) and is cached on disk by torch between processes.
    """
    return torch.compile(module, dynamic=False, options={"freezing": True})


class TorchSegmentEngine:
    def __init__(self, backend: "TorchBackend", module, spec: SegmentSpec):
        self.backend = backend
        self.module = module
        self.spec = spec
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]
        self.graphs = (GraphCache(backend.order.stream, backend.graph_pool)
                       if backend.cuda_graphs else None)

    def _call(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            result = self.module(*[feeds[n] for n in self.input_names])
        result = result if isinstance(result, (tuple, list)) else (result,)
        if len(result) != len(self.output_names):
            raise BackendError(f"segment {self.spec.name!r}: the program returned {len(result)} outputs, the "
                               f"manifest lists {self.output_names}; re-export with --force")
        io_dtype = self.backend.dtype
        return {n: (r.to(io_dtype) if r.is_floating_point() and r.dtype != io_dtype else r)
                for n, r in zip(self.output_names, result)}

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # no_grad, not inference_mode: the runtime adds deltas in place to these outputs afterwards.
        if self.backend.device.type == "cpu":
            return self._call(feeds)
        inputs = [feeds[n] for n in self.input_names]
        if self.graphs is None:
            return self.backend.order.run(inputs, lambda: self._call(feeds))
        return self.backend.order.run(inputs, lambda: self.graphs.run(feeds, self.input_names, self._call))


class TorchBackend:
    """``device``: "cpu", "cuda" or "cuda:N" (default: cuda when torch sees a GPU, else cpu).

    ``trust_artifacts=True`` is required: ``torch.export.load`` unpickles the ``.pt2`` files, so a folder from
    elsewhere could run code through them (runtime/backends/__init__.py).
    """

    name = "torch"
    code_artifacts = "<segment>.pt2 programs with torch.export.load (it unpickles them)"
    reads_onnx = False

    @classmethod
    def missing_artifacts(cls, manifest: Manifest) -> str | None:
        entry = manifest.engines.get("torch")
        return None if isinstance(entry, dict) and entry.get("files") else \
            f"the export has no torch programs (re-export with {HOW_TO_BUILD})"

    def __init__(self, device: str | torch.device | None = None, cuda_graphs: bool = False,
                 verify: bool = True, threads: int | None = None, compile: bool = False, trust_artifacts: bool = False):
        self.trust_artifacts = bool(trust_artifacts)
        if compile and cuda_graphs:
            raise BackendError("compile=True and cuda_graphs=True exclude each other: the compiled graphs run as "
                               "they are (use torch.compile's own mode='reduce-overhead' outside the runtime)")
        self.compile = bool(compile)
        if threads is not None:
            torch.set_num_threads(int(threads))  # process-wide: torch has one intra-op pool
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda":
            device = require_cuda(self.name, device)
        elif device.type != "cpu":
            raise BackendError(f"backend 'torch' runs on cpu or cuda, got device={str(device)!r}")
        if cuda_graphs and device.type != "cuda":
            raise BackendError("cuda_graphs=True needs a CUDA device; CUDA graphs do not exist on the CPU")
        self.device = device
        self.cuda_graphs = bool(cuda_graphs)
        self.verify = verify
        self.dtype = torch.float32
        self.order = StreamOrder(device) if device.type == "cuda" else None
        self.graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._load_lock = threading.Lock()
        self._warned_fp16_cpu = False

    @property
    def stream(self):
        return self.order.stream if self.order is not None else None

    def load(self, manifest: Manifest, segment: SegmentSpec) -> TorchSegmentEngine:
        if not self.trust_artifacts:  # also when built directly, not through make_backend
            from . import untrusted

            raise BackendError(untrusted(self.name, type(self)))
        entry = artifact_entry(manifest, self.name, "torch", HOW_TO_BUILD)
        path = artifact_path(manifest, entry, segment.name, self.name, verify=self.verify)
        io_dtype = TORCH_DTYPES.get(str(entry.get("dtype", "")), None)
        if io_dtype is None:
            io_dtype = torch.float16 if manifest.precision == "fp16" else torch.float32
        if io_dtype == torch.float16 and self.device.type == "cpu" and not self._warned_fp16_cpu:
            self._warned_fp16_cpu = True
            warnings.warn("running fp16 torch programs on the CPU: correct but slow; export fp32 for CPU serving",
                          stacklevel=2)
        saved = entry.get("torch")
        if saved and saved != torch.__version__:
            warnings.warn(f"segment {segment.name!r} was saved by torch {saved}, this is torch {torch.__version__}: "
                          "torch.export programs are best loaded by the torch that saved them (re-export here "
                          "if loading fails)", stacklevel=2)
        with self._load_lock:
            try:
                module = load_program(path, self.device)
            except Exception as exc:
                raise BackendError(
                    f"segment {segment.name!r}: cannot load the torch.export program {path} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); it was saved "
                    f"by torch {saved or '?'} and this is torch {torch.__version__}: re-export with {HOW_TO_BUILD} "
                    "using this torch"
                ) from exc
            self.dtype = io_dtype
        if self.compile:
            module = compile_program(module)
        return TorchSegmentEngine(self, module, segment)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class TorchCudaBackend(TorchBackend):
    """The torch backend pinned to CUDA (the name ``torch-cuda`` that ``auto`` tries)."""

    name = "torch-cuda"

    def __init__(self, device: str | torch.device | None = None, cuda_graphs: bool = False, verify: bool = True,
                 threads: int | None = None, trust_artifacts: bool = False):
        super().__init__(require_cuda(self.name, device), cuda_graphs=cuda_graphs, verify=verify, threads=threads,
                         trust_artifacts=trust_artifacts)


class TorchCompiledBackend(TorchBackend):
    """The torch backend with every segment compiled by TorchInductor (``torch-compile``): the fastest CPU path.

    The first call of each segment at a new batch size compiles it (tens of seconds per segment on a
    small CPU; cached on disk afterwards), so warm a service up before it takes traffic.
    """

    name = "torch-compile"

    def __init__(self, device: str | torch.device | None = None, verify: bool = True, threads: int | None = None,
                 trust_artifacts: bool = False):
        super().__init__(device or "cpu", cuda_graphs=False, verify=verify, threads=threads, compile=True,
                         trust_artifacts=trust_artifacts)
