"""TensorRT backend: one engine per segment (``<segment>.trt<major>.<minor>.plan``, built by
``deltadit-export --backend tensorrt``), run with the TensorRT 10/11 ``enqueueV3`` API.

- One execution context per segment, all created with the user-managed allocation strategy and all
  pointed at one device scratch buffer sized to the largest ``device_memory_size_v2`` of the engines
  (segments run one after another on one stream, so they never need their scratch at the same time).
- Inputs and outputs are torch CUDA tensors bound with ``set_tensor_address``; the batch is set with
  ``set_input_shape``; work is enqueued with ``execute_async_v3`` on the backend's stream. Nothing
  returns to the host inside a step.
- ``cuda_graphs=True`` captures one CUDA graph per (segment, batch size) around ``execute_async_v3`` on
  static buffers and replays it; a new batch size captures a new graph.
- At load, each engine file's sha256 and the TensorRT version and GPU it was built for are checked
  against the manifest, with errors that say what to rebuild.

Written against the documented TensorRT 10/11 Python API; see README for which parts were run where.
"""

from __future__ import annotations

import threading

import torch

from ..manifest import Manifest, SegmentSpec
from .base import BackendError
from .cuda_util import GraphCache, StreamOrder, artifact_entry, artifact_path, require_cuda

HOW_TO_BUILD = "`deltadit-export ... --backend tensorrt` on this machine (TensorRT engines are built per GPU)"
TRT_EXTRA = "pip install 'deltadit[tensorrt]'"
TORCH_FROM_TRT = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                  "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
MANIFEST_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "int64": torch.int64, "int32": torch.int32}


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(f"backend 'tensorrt' needs the TensorRT Python package, which is not importable here "
                           f"({exc}): {TRT_EXTRA}") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise BackendError(f"backend 'tensorrt' needs TensorRT 10 or newer, found {trt.__version__}: {TRT_EXTRA}")
    return trt


def _dtype_name(dtype) -> str:
    return getattr(dtype, "name", str(dtype).split(".")[-1])


def create_user_managed_context(trt, engine):
    """An execution context that allocates no device memory of its own (TensorRT 10 and 11 spellings)."""
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    context = None
    try:
        context = engine.create_execution_context(strategy)
    except TypeError:  # only the runtime-config overload
        pass
    if context is None and hasattr(engine, "create_runtime_config"):
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        context = engine.create_execution_context(config)
    if context is None:
        raise BackendError("TensorRT could not create an execution context (out of device memory?)")
    return context


def engine_scratch_size(engine) -> int:
    size = getattr(engine, "device_memory_size_v2", None)
    if size is None:
        size = engine.device_memory_size  # TensorRT 10.0
    return int(size)


def set_context_memory(context, ptr: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(ptr, size)  # TensorRT ≥ 10.1: address and size
    else:
        context.device_memory = ptr  # TensorRT 10.0


class SharedScratch:
    """One device buffer for all contexts of a backend, grown (and every context re-pointed) as engines load."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer: torch.Tensor | None = None
        self.contexts: list = []

    @property
    def size(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.numel())

    def add(self, context, need: int) -> bool:
        """Register a context; returns True when the buffer moved (captured graphs are then stale)."""
        self.contexts.append(context)
        moved = False
        if need > self.size:
            # torch's allocator aligns to 512 bytes (TensorRT needs 256).
            self.buffer = torch.empty(max(need, 1), dtype=torch.uint8, device=self.device)
            targets, moved = self.contexts, True
        else:
            targets = [context]
        for ctx in targets:
            set_context_memory(ctx, int(self.buffer.data_ptr()), self.size)
        return moved


class TensorRTSegmentEngine:
    def __init__(self, backend: "TensorRTBackend", engine, context, spec: SegmentSpec):
        self.backend = backend
        self.engine = engine
        self.context = context
        self.spec = spec
        trt = backend.trt
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.dtypes: dict[str, torch.dtype] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs).append(name)
            dtype = TORCH_FROM_TRT.get(_dtype_name(engine.get_tensor_dtype(name)))
            if dtype is None:
                raise BackendError(f"segment {spec.name!r}: engine tensor {name!r} has TensorRT type "
                                   f"{_dtype_name(engine.get_tensor_dtype(name))}, which this backend cannot bind")
            self.dtypes[name] = dtype
        self._check_io()
        self.graphs = GraphCache(backend.order.stream, backend.graph_pool) if backend.cuda_graphs else None
        self._shape_batch: int | None = None

    def _check_io(self) -> None:
        spec_in = {t.name: t for t in self.spec.inputs}
        spec_out = {t.name: t for t in self.spec.outputs}
        unknown = [n for n in self.inputs if n not in spec_in]
        missing = [n for n in spec_out if n not in self.outputs]
        if unknown or missing:
            raise BackendError(f"segment {self.spec.name!r}: the engine's inputs {self.inputs} / outputs "
                               f"{self.outputs} do not match the manifest ({list(spec_in)} / {list(spec_out)}); "
                               f"rebuild with {HOW_TO_BUILD} --force")
        for name in self.inputs + list(spec_out):
            t = spec_in.get(name) or spec_out[name]
            want = MANIFEST_DTYPES[t.dtype]
            if self.dtypes[name] != want:
                raise BackendError(f"segment {self.spec.name!r}: engine tensor {name!r} is {self.dtypes[name]}, the "
                                   f"manifest says {t.dtype}; rebuild with {HOW_TO_BUILD} --force")

    # -------------------------------------------------------- enqueue (on the backend's stream, under its lock)

    def _set_shapes(self, feeds: dict[str, torch.Tensor]) -> None:
        batch = int(feeds[self.inputs[0]].shape[0])
        if batch != self._shape_batch:
            for name in self.inputs:
                if not self.context.set_input_shape(name, tuple(feeds[name].shape)):
                    raise BackendError(f"segment {self.spec.name!r}: TensorRT rejected input {name!r} of shape "
                                       f"{list(feeds[name].shape)} (outside the engine's optimization profile "
                                       f"{self.backend.profile}?)")
            self._shape_batch = batch

    def _enqueue(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind ``feeds`` (contiguous, right dtype), allocate outputs, enqueue on the current stream."""
        self._set_shapes(feeds)
        for name in self.inputs:
            self.context.set_tensor_address(name, int(feeds[name].data_ptr()))
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.backend.device)
            self.context.set_tensor_address(name, int(outs[name].data_ptr()))
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.backend.device).cuda_stream):
            raise BackendError(f"segment {self.spec.name!r}: TensorRT execute_async_v3 failed (see TensorRT's log "
                               "above)")
        return outs

    def _prepared(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.inputs:
            t = feeds[name]
            if t.dtype != self.dtypes[name]:
                t = t.to(self.dtypes[name])
            out[name] = t.contiguous()
        return out

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = [feeds[n] for n in self.inputs]
        with self.backend.lock:
            if self.graphs is None:
                outs = self.backend.order.run(inputs, lambda: self._enqueue(self._prepared(feeds)))
            else:
                outs = self.backend.order.run(
                    inputs, lambda: self.graphs.run(self._prepared(feeds), self.inputs, self._enqueue))
        return {n: outs[n] for n in (t.name for t in self.spec.outputs)}


class TensorRTBackend:
    """Needs ``trust_artifacts=True``: a TensorRT plan is native code (NVIDIA: deserializing an engine from an
    untrusted source is running untrusted code, and plans can embed plugin libraries that run on load)."""

    name = "tensorrt"
    code_artifacts = "TensorRT plans (<segment>.trt*.plan: compiled native code, may embed plugin libraries)"
    reads_onnx = False

    @classmethod
    def missing_artifacts(cls, manifest: Manifest) -> str | None:
        entry = manifest.engines.get("tensorrt")
        return None if isinstance(entry, dict) and entry.get("files") else \
            f"the export has no TensorRT engines (build them with {HOW_TO_BUILD})"

    def __init__(self, device: str | torch.device | None = None, cuda_graphs: bool = False, verify: bool = True,
                 log_level: str = "WARNING", trust_artifacts: bool = False):
        self.trust_artifacts = bool(trust_artifacts)
        self.trt = import_tensorrt()
        self.device = require_cuda(self.name, device)
        trt = self.trt
        self.logger = trt.Logger(getattr(trt.Logger, log_level.upper(), trt.Logger.WARNING))
        self.runtime = trt.Runtime(self.logger)
        if hasattr(self.runtime, "engine_host_code_allowed"):
            self.runtime.engine_host_code_allowed = False  # the default, stated: no lean runtime code from a plan
        self.cuda_graphs = bool(cuda_graphs)
        self.verify = verify
        self.dtype = torch.float32
        self.order = StreamOrder(self.device)
        self.graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.lock = threading.RLock()  # one stream, one shared scratch: enqueue one segment at a time
        self.scratch = SharedScratch(self.device)
        self.engines: list[TensorRTSegmentEngine] = []
        self.profile: dict | None = None

    @property
    def stream(self):
        return self.order.stream

    def _check_build(self, entry: dict) -> None:
        built = str(entry.get("version", "?"))
        if built != self.trt.__version__:
            raise BackendError(f"the engines were built with TensorRT {built}, this is TensorRT "
                               f"{self.trt.__version__}: a TensorRT engine runs only on the version that built it. "
                               f"Rebuild with {HOW_TO_BUILD} --force, or install tensorrt=={built}")
        cc = torch.cuda.get_device_capability(self.device)
        here = f"{cc[0]}.{cc[1]}"
        if entry.get("compute_capability") and entry["compute_capability"] != here:
            raise BackendError(f"the engines were built on a {entry.get('device', '?')} (compute capability "
                               f"{entry['compute_capability']}), this GPU is a {torch.cuda.get_device_name(self.device)} "
                               f"({here}): rebuild with {HOW_TO_BUILD} --force")

    def load(self, manifest: Manifest, segment: SegmentSpec) -> TensorRTSegmentEngine:
        if not self.trust_artifacts:  # also when built directly, not through make_backend
            from . import untrusted

            raise BackendError(untrusted(self.name, type(self)))
        entry = artifact_entry(manifest, self.name, "tensorrt", HOW_TO_BUILD)
        self._check_build(entry)
        path = artifact_path(manifest, entry, segment.name, self.name, verify=self.verify)
        self.profile = entry.get("profile")
        with self.lock, torch.cuda.device(self.device):
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BackendError(f"segment {segment.name!r}: TensorRT {self.trt.__version__} could not deserialize "
                                   f"{path} (see TensorRT's log above); rebuild with {HOW_TO_BUILD} --force")
            context = create_user_managed_context(self.trt, engine)
            if self.scratch.add(context, engine_scratch_size(engine)):
                for e in self.engines:
                    if e.graphs is not None:
                        e.graphs.clear()  # graphs captured against the old scratch address
            seg_engine = TensorRTSegmentEngine(self, engine, context, segment)
            self.engines.append(seg_engine)
        self.dtype = torch.float16 if manifest.precision == "fp16" else torch.float32
        return seg_engine

    @property
    def scratch_bytes(self) -> int:
        return self.scratch.size

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)
