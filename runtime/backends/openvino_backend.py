"""OpenVINO backend (CPU): compiles the export's ONNX segments, fp32 or int8, with OpenVINO.

Install it with ``pip install 'deltadit[openvino]'``; use it by name (``backend="openvino"``): ``auto``
never picks it (README, backends table), because its default bf16 inference changes the numerics.

- **Inference precision**: bf16 where the CPU has bf16 instructions (OpenVINO lists ``BF16`` in the
  CPU's ``OPTIMIZATION_CAPABILITIES``: avx512_bf16 or AMX), fp32 elsewhere; ``inference_precision=
  "f32"`` asks for fp32 anywhere, ``"bf16"`` refuses a CPU without it. The choice and its reason are
  :attr:`OpenVinoBackend.precision_note` (one line for a CLI to print). Inputs and outputs stay in the
  manifest's dtypes (fp32); only the arithmetic inside runs in bf16.
- **Threads and streams** as the ONNX Runtime backend: ``threads`` intra-op threads (default: the
  CPUs this process may use), one stream, the latency hint, so one call uses the whole machine.
- **No copies**: inputs are handed to OpenVINO as views of the torch tensors' memory, and outputs are
  written by OpenVINO straight into torch tensors allocated for the call (``ov.Tensor(array,
  shared_memory=True)``); the delta arithmetic then runs on them in place.
- **Threads of the caller**: each call takes an infer request from a per-segment pool (a new one when
  all are busy), so two generations can run at once from two threads.
- **Untrusted folders**: only the ONNX files the manifest names are read (the runtime checks their sha256
  before loading), and only with external data in the files the manifest hashes for that segment: an ONNX
  whose weights point anywhere else is refused before OpenVINO opens it. No compiled-model cache is read
  or written. ONNX carries no code.
"""

from __future__ import annotations

import os
import queue

import numpy as np
import torch

from ..integrity import check_onnx_external_data
from ..manifest import Manifest, SegmentSpec
from .base import BackendError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}
PRECISIONS = ("auto", "bf16", "f32")
FIX = "re-export with `deltadit-export ... --force`"


def _ov():
    try:
        import openvino as ov
    except ImportError:
        raise BackendError("openvino is not installed: pip install 'deltadit[openvino]'") from None
    return ov


class OpenVinoEngine:
    """One compiled segment; ``run`` is thread-safe (an infer request per concurrent call)."""

    def __init__(self, compiled, spec: SegmentSpec):
        self.compiled = compiled
        self.spec = spec
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    def _request(self):
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self.compiled.create_infer_request()  # thread-safe in OpenVINO

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ov = _ov()
        request = self._request()
        try:
            batch = int(feeds[self.spec.inputs[0].name].shape[0])
            arrays = {t.name: feeds[t.name].contiguous() for t in self.spec.inputs}  # kept alive for the call
            for name, tensor in arrays.items():
                request.set_tensor(name, ov.Tensor(tensor.numpy(), shared_memory=True))
            outputs = {t.name: torch.empty(t.concrete_shape(batch), dtype=TORCH_DTYPES[t.dtype])
                       for t in self.spec.outputs}
            for name, tensor in outputs.items():
                request.set_tensor(name, ov.Tensor(tensor.numpy(), shared_memory=True))
            request.infer()
            for name, tensor in outputs.items():
                written = request.get_tensor(name).data
                if not np.shares_memory(written, tensor.numpy()):  # OpenVINO allocated its own: copy it over
                    tensor.copy_(torch.from_numpy(np.asarray(written)).reshape(tensor.shape))
            return outputs
        finally:
            self._idle.put(request)


class OpenVinoBackend:
    name = "openvino"
    device = torch.device("cpu")

    def __init__(self, threads: int | None = None, inference_precision: str = "auto"):
        ov = _ov()
        if inference_precision not in PRECISIONS:
            raise BackendError(f"inference_precision={inference_precision!r} is not one of {', '.join(PRECISIONS)}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise BackendError(f"threads={threads!r} is out of range: expected a positive integer (or None: all CPUs)")
        self.core = ov.Core()  # one per backend: no process-wide OpenVINO state of ours
        self.threads = threads or len(os.sched_getaffinity(0))
        self.dtype = torch.float32
        capabilities = list(self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        has_bf16 = "BF16" in capabilities
        cpu = self.core.get_property("CPU", "FULL_DEVICE_NAME")
        if inference_precision == "bf16" and not has_bf16:
            raise BackendError(f"inference_precision='bf16' needs a CPU with bf16 instructions (avx512_bf16 or AMX); "
                               f"OpenVINO reports {capabilities} for {cpu}: pass inference_precision='f32' or 'auto'")
        if inference_precision == "auto":
            self.inference_precision = "bf16" if has_bf16 else "f32"
            why = ("the CPU has bf16 instructions: BF16 in OpenVINO's OPTIMIZATION_CAPABILITIES" if has_bf16 else
                   f"this CPU has no bf16 instructions (OpenVINO capabilities: {', '.join(capabilities)})")
        else:
            self.inference_precision = inference_precision
            why = "asked for"
        self.precision_note = (f"OpenVINO {ov.__version__.split('-')[0]} on {cpu}: inference precision "
                               f"{'bf16' if self.inference_precision == 'bf16' else 'fp32'} ({why}); "
                               f"{self.threads} thread{'s' if self.threads > 1 else ''}, 1 stream")

    def _config(self) -> dict:
        import openvino.properties as props
        import openvino.properties.hint as hints

        ov = _ov()
        return {
            hints.inference_precision: ov.Type.bf16 if self.inference_precision == "bf16" else ov.Type.f32,
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            props.inference_num_threads: self.threads,
            props.streams.num: 1,
        }

    def load(self, manifest: Manifest, segment: SegmentSpec) -> OpenVinoEngine:
        self.dtype = torch.float16 if manifest.precision == "fp16" else torch.float32
        path = manifest.path_of(segment.file)
        if path.suffix != ".onnx":
            raise BackendError(f"segment {segment.name!r}: {path.name} is not an .onnx file; the openvino backend "
                               f"reads the export's ONNX segments only; {FIX}")
        check_onnx_external_data(manifest, (segment,))  # also when used without DeltaDiTRuntime
        try:
            model = self.core.read_model(str(path))
            compiled = self.core.compile_model(model, "CPU", self._config())
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise BackendError(f"segment {segment.name!r}: OpenVINO cannot compile {path} ({type(exc).__name__}: "
                               f"{first}); {FIX}") from None
        names = {n for port in compiled.inputs for n in port.get_names()}
        missing = [t.name for t in segment.inputs if t.name not in names]
        if missing:
            raise BackendError(f"segment {segment.name!r}: {path} lacks inputs {missing} that the manifest lists; the "
                               f"file does not belong to this manifest: {FIX}")
        return OpenVinoEngine(compiled, segment)

    def describe(self) -> str:
        return self.precision_note

    def synchronize(self) -> None:
        pass
