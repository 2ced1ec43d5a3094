"""Artifacts for backends other than ONNX Runtime, built from the exported segments.

``torch``: each segment saved as a ``torch.export`` program (``<segment>.pt2``) with a dynamic batch
axis, checked against the eager segment on the parity batches, for the runtime's torch backend.

``tensorrt``: one engine per segment, built with polygraphy from the segment's ONNX file:
- an optimization profile on the batch axis: min 1, opt the guidance batch (2), max the manifest's
  max_batch (2 × ``--max-batch``);
- precision as each TensorRT major version wants it. TensorRT 10 (weakly typed): an fp16 export is
  built with the FP16 builder flag, and every normalization layer (and any floating-point reduce) is
  constrained to fp32 (layer precision + output type, OBEY_PRECISION_CONSTRAINTS), because fp16
  LayerNorm after attention overflows (DESIGN.md §4). TensorRT 11 builds strongly typed networks
  only: the precision comes from the ONNX itself, which the exporter writes in fp16 with LayerNorms
  wrapped in fp32 casts when ``--precision fp16``. An fp32 export builds an fp32 engine (no TF32) on
  both;
- a timing cache (``timing.trt<major>.<minor>.<gpu>.cache``), carried over from the previous export in
  the same folder so rebuilds are faster;
- the TensorRT version in each engine's file name (``front.trt10.8.plan``) and in the manifest, with the
  GPU and its compute capability (engines run only on the TensorRT build and GPU kind that built them).
A failed build raises an error naming the segment; the exported ONNX files are kept next to the
output folder for inspection or a manual ``trtexec`` build.

Everything here is imported only when ``--backend tensorrt|torch`` is asked for.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from runtime.integrity import file_sha256
from runtime.manifest import BATCH, TensorSpec

from .onnx_export import TOLERANCES, ExportError

TRT_EXTRA = "pip install 'deltadit[tensorrt]'"
GUIDANCE_BATCH = 2  # classifier-free guidance runs the uncond and cond halves as one batch
TORCH_BATCH_LIMIT = 1024  # upper bound of the torch.export batch dimension (the runtime enforces max_batch)


class BackendUnavailable(ExportError):
    """The backend's libraries are not installed or too old; the message says what to install."""


class BackendBuildError(ExportError):
    """Building a backend artifact failed; the message names the segment and what was kept."""


def build_backend_artifacts(backend, job, segments, chains, tmp, progress) -> dict[str, Any]:
    """Build ``backend``'s artifacts in ``tmp``; returns the dict stored at ``manifest.engines[backend]``."""
    if backend == "torch":
        return build_torch_programs(job, segments, chains, Path(tmp), progress)
    if backend == "tensorrt":
        return build_tensorrt_engines(job, segments, Path(tmp), progress)
    raise BackendUnavailable(f"backend {backend!r} has no artifact builder: expected torch or tensorrt")


def preflight(backend: str) -> None:
    """Fail fast, before any model is loaded, when ``backend``'s artifacts cannot be built here.

    Meant for the exporter's option check (``resolve``): without it, ``--backend tensorrt`` on a machine
    without TensorRT only fails after the whole ONNX export.
    """
    if backend == "tensorrt":
        import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailable("--backend tensorrt builds engines on the GPU they will run on, and torch sees "
                                     "no CUDA device here")
    elif backend == "torch":
        import torch

        if not hasattr(torch, "export") or not hasattr(torch.export, "save"):
            raise BackendUnavailable(f"--backend torch needs torch.export (torch ≥ 2.5), this is torch "
                                     f"{torch.__version__}")
    elif backend != "onnx":
        raise BackendUnavailable(f"backend {backend!r} has no artifact builder: expected torch or tensorrt")


# ---------------------------------------------------------------- pure helpers (tested without a GPU)


def batch_profile(max_batch: int, guidance_batch: int = GUIDANCE_BATCH) -> dict[str, int]:
    """min/opt/max of the batch axis: 1, the guidance batch (clipped to max), the manifest's max_batch."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch={max_batch!r} must be a positive integer")
    return {"min": 1, "opt": max(1, min(guidance_batch, max_batch)), "max": max_batch}


def optimization_profile(inputs: Iterable[TensorSpec], max_batch: int,
                         guidance_batch: int = GUIDANCE_BATCH) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Input name -> (min, opt, max) shapes: the symbolic batch axis takes the batch profile, the rest is fixed."""
    b = batch_profile(max_batch, guidance_batch)
    shapes = {}
    for t in inputs:
        if BATCH not in t.shape:
            raise ValueError(f"input {t.name!r} has no batch axis ({list(t.shape)}); every engine input is batched")
        shapes[t.name] = tuple(t.concrete_shape(b[k]) for k in ("min", "opt", "max"))
    return shapes


def trt_major_minor(version: str) -> tuple[int, int]:
    parts = str(version).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise BackendUnavailable(f"cannot read the TensorRT version {version!r}") from None


def trt_tag(version: str) -> str:
    major, minor = trt_major_minor(version)
    return f"trt{major}.{minor}"


def engine_file_name(segment: str, version: str) -> str:
    """``front`` + ``10.8.0.43`` -> ``front.trt10.8.plan``."""
    return f"{segment}.{trt_tag(version)}.plan"


def timing_cache_name(version: str, device_name: str) -> str:
    from runtime.backends.cuda_util import slug

    return f"timing.{trt_tag(version)}.{slug(device_name)}.cache"


def trt_precision_mode(version: str, precision: str) -> str:
    """How the engine gets its precision on this TensorRT: ``fp16-flag``, ``fp32`` or ``strongly-typed``."""
    major, _ = trt_major_minor(version)
    if major < 10:
        raise BackendUnavailable(f"TensorRT {version} is too old: deltadit builds engines with TensorRT 10 or newer "
                                 f"({TRT_EXTRA})")
    if major >= 11:
        return "strongly-typed"  # weak typing is gone: precision comes from the ONNX
    return "fp16-flag" if precision == "fp16" else "fp32"


# ---------------------------------------------------------------- torch.export programs


def _example_batch(chains: dict[int, dict]) -> int:
    # torch.export specializes a dimension whose example value is 0 or 1: trace with a larger batch.
    candidates = [b for b in chains if b >= 2]
    if not candidates:
        raise BackendBuildError("the torch export needs example inputs with batch ≥ 2 (none were computed)")
    return max(candidates)


def _segment_feeds(env: dict, seg) -> dict:
    return {**env, "hidden": env.get(f"hidden@{seg.name}", env["hidden"])}


def _rel_err(ref, got) -> float:
    import torch

    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    if len(ref) != len(got):
        return float("inf")
    worst = 0.0
    for r, g in zip(ref, got):
        if r.shape != g.shape:
            return float("inf")
        r, g = r.float(), g.float()
        if not bool(torch.isfinite(g).all()):
            return float("inf")
        scale = max(float(r.abs().max()) if r.numel() else 0.0, 1e-12)
        worst = max(worst, float((r - g).abs().max()) / scale if r.numel() else 0.0)
    return worst


def build_torch_programs(job, segments, chains, tmp: Path, progress) -> dict[str, Any]:
    import torch

    from runtime.backends.torch_backend import load_program

    dtype = {"fp32": "float32", "fp16": "float16"}[job.options.precision]
    tol = TOLERANCES[dtype]
    example = _example_batch(chains)
    parity_batches = [b for b in job.options.parity_batches if b in chains] or [example]
    files: dict[str, Any] = {}
    parity: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for seg in segments:
        t0 = time.perf_counter()
        # A fresh wrapper module starts in training mode, and exporters may restore modes recursively;
        # a program traced in training mode keeps DiT's label dropout (DESIGN.md / the ONNX lesson).
        seg.module.eval()
        if any(m.training for m in seg.module.modules()):
            raise BackendBuildError(f"segment {seg.name!r}: some submodules are still in training mode")
        path = tmp / f"{seg.name}.pt2"
        with progress.segment(seg.name, phases=("torch.export", "save", "parity")) as bar:
            bar.phase("torch.export")
            feeds = _segment_feeds(chains[example], seg)
            args = tuple(feeds[t.name] for t in seg.inputs)
            batch = torch.export.Dim("batch", min=1, max=max(TORCH_BATCH_LIMIT, example))
            try:
                with torch.no_grad():
                    program = torch.export.export(seg.module, args, dynamic_shapes=tuple({0: batch} for _ in args),
                                                  strict=False)
            except Exception as exc:
                raise BackendBuildError(f"segment {seg.name!r}: torch.export failed: {type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0][:400] if str(exc) else ''}") from exc
            bar.phase("save")
            torch.export.save(program, str(path))
            del program
            bar.phase("parity")
            # The saved file, loaded back, against the eager segment, at other batch sizes than traced.
            module = load_program(path, torch.device("cpu"))
            worst = 0.0
            for b in parity_batches:
                fb = _segment_feeds(chains[b], seg)
                fargs = [fb[t.name] for t in seg.inputs]
                with torch.no_grad():
                    err = _rel_err(seg.module(*fargs), module(*fargs))
                if not err <= tol:
                    raise BackendBuildError(
                        f"segment {seg.name!r}: the torch.export program does not match the eager segment at batch "
                        f"{b}: relative error {err:.3g} > tolerance {tol:g} ({dtype})"
                    )
                worst = max(worst, err)
            del module
        files[seg.name] = {"file": path.name, "sha256": file_sha256(path)}
        parity[seg.name] = worst
        seconds[seg.name] = round(time.perf_counter() - t0, 3)
    return {
        "format": "torch.export",
        "torch": torch.__version__,
        "dtype": dtype,
        "files": files,
        "batch": {"min": 1, "max": max(TORCH_BATCH_LIMIT, example), "example": example},
        "parity": parity,
        "parity_batches": parity_batches,
        "seconds": seconds,
    }


# ---------------------------------------------------------------- TensorRT engines


def import_tensorrt():
    """(tensorrt, polygraphy.backend.trt), or BackendUnavailable naming the extra to install."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(
            f"--backend tensorrt needs TensorRT, which is not importable here ({exc}); install it with "
            f"{TRT_EXTRA} on a machine with an NVIDIA GPU and driver. The ONNX export works without it"
        ) from None
    try:
        from polygraphy.backend import trt as poly
    except ImportError as exc:
        raise BackendUnavailable(f"--backend tensorrt needs polygraphy, which is not importable here ({exc}); "
                                 f"install it with {TRT_EXTRA}") from None
    return trt, poly


def constrain_norms_fp32(trt, network) -> int:
    """TensorRT 10, weakly typed: pin normalization layers (and floating-point reduces, in case a
    LayerNorm arrived decomposed) to fp32 compute and fp32 outputs. Returns how many were pinned."""
    pinned = 0
    floating = (trt.DataType.FLOAT, trt.DataType.HALF)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION or (
            layer.type == trt.LayerType.REDUCE and layer.num_inputs and layer.get_input(0).dtype in floating
        ):
            layer.precision = trt.DataType.FLOAT
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.DataType.FLOAT)
            pinned += 1
    return pinned


def build_engine(trt, poly, onnx_path: Path, inputs: Iterable[TensorSpec], max_batch: int, mode: str,
                 cache_path: Path) -> tuple[bytes, int]:
    """One serialized engine from one ONNX file. Returns (plan bytes, number of layers pinned to fp32)."""
    builder, network, parser = poly.network_from_onnx_path(str(onnx_path), strongly_typed=mode == "strongly-typed")
    net_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    specs = {t.name: t for t in inputs}
    unknown = [n for n in net_inputs if n not in specs]
    if unknown:
        raise BackendBuildError(f"{onnx_path.name} has inputs {unknown} that the manifest does not list")
    shapes = optimization_profile([specs[n] for n in net_inputs], max_batch)
    profile = poly.Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    pinned = constrain_norms_fp32(trt, network) if mode == "fp16-flag" else 0
    config = poly.CreateConfig(
        fp16=mode == "fp16-flag",
        profiles=[profile],
        precision_constraints="obey" if pinned else None,
        load_timing_cache=str(cache_path) if cache_path.is_file() else None,
    )
    plan = poly.engine_bytes_from_network((builder, network, parser), config=config,
                                          save_timing_cache=str(cache_path))
    if not plan:
        raise BackendBuildError(f"TensorRT returned no engine for {onnx_path.name}")
    return bytes(plan), pinned


def keep_onnx(job, tmp: Path) -> Path:
    """Move the exported ONNX files out of the staging folder (which is removed on failure)."""
    kept = job.out.parent / f"{job.out.name}.onnx-kept"
    kept.mkdir(parents=True, exist_ok=True)
    for f in list(tmp.glob("*.onnx")) + list(tmp.glob("*.onnx.data")):
        shutil.move(str(f), str(kept / f.name))
    return kept


def build_tensorrt_engines(job, segments, tmp: Path, progress) -> dict[str, Any]:
    trt, poly = import_tensorrt()
    import torch

    version = trt.__version__
    mode = trt_precision_mode(version, job.options.precision)
    if not torch.cuda.is_available():
        raise BackendUnavailable("--backend tensorrt builds engines on the GPU they will run on, and torch sees "
                                 "no CUDA device here")
    device_name = torch.cuda.get_device_name()
    cc = torch.cuda.get_device_capability()
    max_batch = 2 * job.options.max_batch
    cache_name = timing_cache_name(version, device_name)
    cache_path = tmp / cache_name
    previous = job.out / cache_name
    if previous.is_file():
        shutil.copyfile(previous, cache_path)
    files: dict[str, Any] = {}
    for seg in segments:
        onnx_path = tmp / f"{seg.name}.onnx"
        t0 = time.perf_counter()
        with progress.segment(seg.name, phases=("tensorrt",)) as bar:
            bar.phase("tensorrt")
            try:
                plan, pinned = build_engine(trt, poly, onnx_path, seg.inputs, max_batch, mode, cache_path)
            except Exception as exc:
                kept = keep_onnx(job, tmp)
                detail = str(exc).strip().splitlines()
                raise BackendBuildError(
                    f"segment {seg.name!r}: TensorRT {version} engine build failed ({type(exc).__name__}: "
                    f"{detail[-1][:400] if detail else 'no message'}); the exported ONNX files are kept in {kept} "
                    "(run `trtexec --onnx=<file>` there for TensorRT's full log)"
                ) from exc
        name = engine_file_name(seg.name, version)
        (tmp / name).write_bytes(plan)
        files[seg.name] = {"file": name, "sha256": file_sha256(tmp / name), "fp32_layers": pinned,
                           "seconds": round(time.perf_counter() - t0, 3)}
    return {
        "version": version,
        "major": trt_major_minor(version)[0],
        "precision_mode": mode,
        "precision": job.options.precision,
        "device": device_name,
        "compute_capability": f"{cc[0]}.{cc[1]}",
        "profile": batch_profile(max_batch),
        "timing_cache": cache_name if cache_path.is_file() else None,
        "files": files,
    }
