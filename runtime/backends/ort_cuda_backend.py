"""ONNX Runtime backend on the CUDA execution provider (``pip install 'deltadit[gpu]'``, i.e. onnxruntime-gpu).

Inputs and outputs are torch CUDA tensors bound with IOBinding (``bind_input``/``bind_output`` on their
``data_ptr``), so tokens and deltas stay on the device between segments: no host copy per step. ORT runs
on the backend's stream (``user_compute_stream``) and is told not to synchronize after each run
(``disable_synchronize_execution_providers``); the stream is ordered against the caller's with events.

``cuda_graphs=True`` turns on ORT's CUDA graphs (``enable_cuda_graph``), which need fixed input and
output addresses: each (segment, batch size) gets static buffers and its own graph id
(``gpu_graph_id``, ONNX Runtime ≥ 1.17).

Written against the documented ONNX Runtime API; see README for which parts were run where.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..integrity import check_onnx_external_data
from ..manifest import Manifest, SegmentSpec
from .base import BackendError
from .cuda_util import StreamOrder, require_cuda
from .onnxruntime_backend import session_options

GPU_EXTRA = "pip install 'deltadit[gpu]' (onnxruntime-gpu, in place of the CPU onnxruntime package)"
NUMPY_FROM_TORCH = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                    torch.int32: np.int32}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def cuda_provider_available() -> tuple[bool, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return False, f"onnxruntime is not installed: {GPU_EXTRA}"
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return False, (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: {', '.join(providers)})"
                       f": {GPU_EXTRA}")
    return True, ""


class OrtCudaEngine:
    def __init__(self, backend: "OrtCudaBackend", session, spec: SegmentSpec):
        self.backend = backend
        self.session = session
        self.spec = spec
        self.input_names = [t.name for t in spec.inputs if t.name in {i.name for i in session.get_inputs()}]
        self.outputs = list(spec.outputs)
        self.static: dict[int, tuple[dict, dict]] = {}  # batch -> (inputs, outputs) for CUDA graphs
        self.lock = threading.Lock()

    def _dtype(self, spec_dtype: str) -> torch.dtype:
        return TORCH_DTYPES[spec_dtype]

    def _bind_run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], graph_id: int | None):
        ort = self.backend.ort
        idx = self.backend.device.index
        binding = self.session.io_binding()
        for name in self.input_names:
            t = inputs[name]
            binding.bind_input(name, "cuda", idx, NUMPY_FROM_TORCH[t.dtype], tuple(t.shape), t.data_ptr())
        for name, t in outputs.items():
            binding.bind_output(name, "cuda", idx, NUMPY_FROM_TORCH[t.dtype], tuple(t.shape), t.data_ptr())
        options = ort.RunOptions()
        options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        if graph_id is not None:
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.session.run_with_iobinding(binding, options)

    def _alloc_outputs(self, batch: int) -> dict[str, torch.Tensor]:
        return {t.name: torch.empty(t.concrete_shape(batch), dtype=self._dtype(t.dtype), device=self.backend.device)
                for t in self.outputs}

    def _once(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {n: feeds[n].contiguous() for n in self.input_names}
        batch = int(inputs[self.input_names[0]].shape[0])
        outs = self._alloc_outputs(batch)
        self._bind_run(inputs, outs, None)
        return outs

    def _graphed(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = int(feeds[self.input_names[0]].shape[0])
        with self.lock:
            if batch not in self.static:
                self.static[batch] = ({n: torch.empty_like(feeds[n], memory_format=torch.contiguous_format)
                                       for n in self.input_names}, self._alloc_outputs(batch))
            static_in, static_out = self.static[batch]
            for n in self.input_names:
                static_in[n].copy_(feeds[n], non_blocking=True)
            # ORT captures on the first runs of a graph id and replays afterwards; addresses stay fixed.
            self._bind_run(static_in, static_out, batch)
            return {n: t.clone() for n, t in static_out.items()}

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = [feeds[n] for n in self.input_names]
        fn = self._graphed if self.backend.cuda_graphs else self._once
        with self.backend.lock:
            return self.backend.order.run(inputs, lambda: fn(feeds))


class OrtCudaBackend:
    name = "onnxruntime-cuda"

    def __init__(self, device: str | torch.device | None = None, cuda_graphs: bool = False,
                 threads: int | None = None):
        ok, why = cuda_provider_available()
        if not ok:
            raise BackendError(f"backend {self.name!r}: {why}")
        import onnxruntime as ort

        self.ort = ort
        self.device = require_cuda(self.name, device)
        self.cuda_graphs = bool(cuda_graphs)
        self.threads = threads
        self.dtype = torch.float32
        self.order = StreamOrder(self.device)
        self.lock = threading.RLock()

    @property
    def stream(self):
        return self.order.stream

    def provider_options(self) -> dict[str, str]:
        opts = {
            "device_id": str(self.device.index),
            "user_compute_stream": str(self.order.stream.cuda_stream),
            "has_user_compute_stream": "1",
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_use_max_workspace": "1",
        }
        if self.cuda_graphs:
            opts["enable_cuda_graph"] = "1"
        return opts

    def load(self, manifest: Manifest, segment: SegmentSpec) -> OrtCudaEngine:
        self.dtype = torch.float16 if manifest.precision == "fp16" else torch.float32
        path = manifest.path_of(segment.file)
        check_onnx_external_data(manifest, (segment,))  # also when used without DeltaDiTRuntime
        opts = session_options(self.threads)
        try:
            session = self.ort.InferenceSession(
                str(path), opts, providers=[("CUDAExecutionProvider", self.provider_options()), "CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(
                f"segment {segment.name!r}: ONNX Runtime (CUDA) cannot load {path} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else ''})"
                + ("; CUDA graphs need every node on the CUDA provider: retry with cuda_graphs=False"
                   if self.cuda_graphs else "")
            ) from None
        if "CUDAExecutionProvider" not in session.get_providers():
            raise BackendError(f"segment {segment.name!r}: ONNX Runtime fell back to {session.get_providers()} (CUDA "
                               "provider failed to initialise: check the CUDA/cuDNN libraries onnxruntime-gpu needs)")
        names = {i.name for i in session.get_inputs()}
        extra = [n for n in names if n not in {t.name for t in segment.inputs}]
        if extra:
            raise BackendError(f"segment {segment.name!r}: {path} has inputs {extra} that the manifest does not list; "
                               "re-export with --force")
        return OrtCudaEngine(self, session, segment)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)
