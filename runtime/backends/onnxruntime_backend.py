"""ONNX Runtime backend: CPU execution provider (and the CUDA provider with IOBinding, see ort_cuda).

Chained sessions on few cores starve each other when idle threads busy-spin (DESIGN.md §4: 589 ms
vs 338 ms), so spinning is off for every session; all sessions share the same intra-op thread
count so no segment oversubscribes the cores.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..manifest import Manifest, SegmentSpec
from .base import BackendError

TORCH_FROM_ORT = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None
    return ort


def session_options(threads: int | None = None):
    ort = _ort()
    opts = ort.SessionOptions()
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

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self.dtype = torch.float32

    def load(self, manifest: Manifest, segment: SegmentSpec) -> OrtCpuEngine:
        ort = _ort()
        self.dtype = torch.float16 if manifest.precision == "fp16" else torch.float32
        path = manifest.path_of(segment.file)
        try:
            session = ort.InferenceSession(str(path), session_options(self.threads),
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
