"""ONNX Runtime backend: CPU execution provider (and the CUDA provider with IOBinding, see ort_cuda).

Chained sessions on few cores starve each other when idle threads busy-spin (DESIGN.md §4: 589 ms
vs 338 ms), so spinning is off for every session; all sessions share the same intra-op thread
count so no segment oversubscribes the cores.

Memory: by default every session owns a CPU arena sized for its own activations, so five chained
sessions hold five arenas although only one runs at a time. The CPU backend instead registers one
arena with ONNX Runtime's process-wide environment and lets every session allocate from it
(``session.use_env_allocators``): activations of consecutive segments reuse the same memory. On the
quick benchmark model (12 blocks × 512) that cuts the runtime's peak RSS from 845 to about 715 MB.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from ..integrity import check_onnx_external_data
from ..manifest import Manifest, SegmentSpec
from .base import BackendError

TORCH_FROM_ORT = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None
    return ort


@functools.cache
def register_shared_cpu_arena() -> None:
    """Register one CPU arena with ONNX Runtime's environment, once per process.

    The environment is process-wide in ONNX Runtime itself, so this is the one place where the backend
    touches process state; the arena is thread-safe and shared by every runtime in the process. Arena
    growth is "same as requested" (not powers of two), so it holds what the largest segment needs.
    """
    ort = _ort()
    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    # OrtArenaCfg(max_mem=0: no limit, arena_extend_strategy=1: kSameAsRequested, initial chunk and max
    # dead bytes per chunk: -1, the defaults).
    ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, 1, -1, -1))


def session_options(threads: int | None = None, shared_arena: bool = False):
    ort = _ort()
    opts = ort.SessionOptions()
    if shared_arena:
        register_shared_cpu_arena()
        opts.add_session_config_entry("session.use_env_allocators", "1")
        # Without the memory pattern tensors go back to the shared arena as soon as they are dead, so it
        # holds one segment's live set, not a planned block per session (same speed: 271 vs 274 ms
        # for the quick model's middle segment; 25 MB lower peak RSS).
        opts.enable_mem_pattern = False
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


class OrtCpuEngine:
    """One ONNX Runtime session for one segment; inputs and outputs as CPU torch tensors (zero-copy)."""

    def __init__(self, session, spec: SegmentSpec):
        self.session = session
        self.spec = spec
        self.output_names = [t.name for t in spec.outputs]
        self.input_names = [t.name for t in spec.inputs]

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {n: feeds[n].contiguous().numpy() for n in self.input_names}
        outs = self.session.run(self.output_names, arrays)
        return {n: torch.from_numpy(np.asarray(o)) for n, o in zip(self.output_names, outs)}


class OnnxRuntimeCpuBackend:
    name = "onnxruntime"
    device = torch.device("cpu")

    def __init__(self, threads: int | None = None, shared_arena: bool = True):
        self.threads = threads
        self.shared_arena = shared_arena
        self.dtype = torch.float32

    def load(self, manifest: Manifest, segment: SegmentSpec) -> OrtCpuEngine:
        ort = _ort()
        self.dtype = torch.float16 if manifest.precision == "fp16" else torch.float32
        path = manifest.path_of(segment.file)
        check_onnx_external_data(manifest, (segment,))  # also when used without DeltaDiTRuntime
        try:
            session = ort.InferenceSession(str(path), session_options(self.threads, self.shared_arena),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(
                f"segment {segment.name!r}: {path} is not a loadable ONNX file ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); re-export with `deltadit-export ... --force`"
            ) from None
        names = {i.name for i in session.get_inputs()}
        missing = [t.name for t in segment.inputs if t.name not in names]
        if missing:
            raise BackendError(f"segment {segment.name!r}: {path} lacks inputs {missing} that the manifest lists; "
                               "the file does not belong to this manifest: re-export with --force")
        return OrtCpuEngine(session, segment)

    def synchronize(self) -> None:
        pass
