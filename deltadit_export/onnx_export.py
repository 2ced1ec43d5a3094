"""Export one segment to ONNX, check it, and compare it with torch in ONNX Runtime.

The exporter is chosen explicitly (torch's default changed in 2.9): ``torchscript`` (the
``dynamo=False`` exporter: fast, deprecated, works at opsets 17–23) or ``dynamo`` (needs opset
≥ 18; run through ``torch.export.export(..., strict=False)`` first, which the caption mask needs).
Opset 18 is the default: opset 23's ``Attention`` op rejects the broadcast caption mask in ORT's
CPU kernel (DESIGN.md §4).
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .split import Segment

EXPORTERS = ("torchscript", "dynamo")
OPSETS = range(17, 21)  # 17–20; 21+ untested, 23 breaks the caption mask on ORT CPU
# Relative error (max |onnx − torch| / max |torch|) above which the export fails. fp32: the two
# runtimes order their reductions differently, so agreement is to a few ulps times the depth, far
# below 1e-4. fp16: half precision carries ~3 decimal digits; 28 blocks of residual updates drift
# to ~1e-2 relative.
TOLERANCES = {"float32": 1e-4, "float16": 2e-2}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


class ExportError(RuntimeError):
    """A segment could not be exported or does not match torch; the message names the segment."""


@dataclass
class ParityResult:
    segment: str
    batch: int
    max_abs: float
    rel_err: float
    ok: bool
    note: str = ""


def export_segment(segment: Segment, example: dict[str, torch.Tensor], path: Path, *, opset: int = 18,
                   exporter: str = "torchscript") -> list[str]:
    """Export ``segment`` to ``path`` with a dynamic batch axis. Returns the external-data file names (if any)."""
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter {exporter!r} is not one of {EXPORTERS}")
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is out of range: expected {OPSETS.start}–{OPSETS.stop - 1}")
    if exporter == "dynamo" and opset < 18:
        raise ExportError("the dynamo exporter needs opset ≥ 18")
    args = tuple(example[t.name] for t in segment.inputs)
    input_names = [t.name for t in segment.inputs]
    output_names = [t.name for t in segment.outputs]
    scratch = path.parent / f".raw-{path.stem}"  # the exporter may spill per-tensor files: keep them apart
    scratch.mkdir(exist_ok=True)
    raw = scratch / "model.onnx"
    try:
        _export(segment.module, args, raw, input_names, output_names, opset, exporter)
        return _finalize(raw, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _export(module, args, raw: Path, input_names, output_names, opset: int, exporter: str) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation and tracer warnings: noise for users
        if exporter == "torchscript":
            torch.onnx.export(
                module, args, str(raw), input_names=input_names, output_names=output_names,
                dynamic_axes={n: {0: "batch"} for n in input_names + output_names},
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        else:
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.export.export(
                module, args, dynamic_shapes=tuple({0: batch} for _ in args), strict=False
            )
            onx = torch.onnx.export(program, args, input_names=input_names, output_names=output_names,
                                    opset_version=opset, dynamo=True, optimize=True)
            onx.save(str(raw))


def _finalize(raw: Path, path: Path) -> list[str]:
    """Re-save with the weights in one external-data file next to the graph, and check it.

    External data is required past 2 GB (the protobuf limit) and used for every segment: ONNX
    Runtime then maps the weights from the file instead of copying them out of a parsed protobuf,
    which lowers the runtime's peak memory (measured on a 12×512 model: 536 MB vs 650 MB after load).
    """
    import onnx

    model = onnx.load(str(raw), load_external_data=True)
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    onnx.checker.check_model(str(path))  # by path: works past the 2 GB protobuf limit
    if not (path.parent / data).is_file():
        return []
    # onnx writes the data file 0600; engines are read by whoever serves them, as the graph file is.
    os.chmod(path.parent / data, path.stat().st_mode & 0o777)
    return [data]


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """A CPU ONNX Runtime session for parity checks (same settings as the runtime's CPU backend)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure_parity(segment: Segment, path: Path,
                   feeds_by_batch: dict[int, dict[str, torch.Tensor]]) -> list[ParityResult]:
    """Run the ONNX file and the torch module on the same inputs; the worst output's error per batch.

    Raises for what no tolerance excuses (the file does not load, a shape differs, NaN/Inf); the caller
    decides what error is acceptable (``check_parity`` for one tolerance, the int8 gate for several).
    """
    try:
        sess = ort_session(path)
    except Exception as exc:  # an ONNX Runtime load error names an op, not the segment: add it
        raise ExportError(f"segment {segment.name!r}: ONNX Runtime cannot load {path.name}: {exc}") from exc
    results = []
    for batch, feeds in feeds_by_batch.items():
        args = [feeds[t.name] for t in segment.inputs]
        with torch.no_grad():
            ref = segment.module(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run([t.name for t in segment.outputs], {t.name: a.contiguous().numpy() for t, a in zip(segment.inputs, args)})
        worst = ParityResult(segment.name, batch, 0.0, 0.0, True)
        for spec, r, g in zip(segment.outputs, ref, got):
            r = r.float().numpy()
            g = np.asarray(g, dtype=np.float32)
            if g.shape != r.shape:
                raise ExportError(f"segment {segment.name!r}: output {spec.name} has shape {g.shape} in ONNX "
                                  f"Runtime but {r.shape} in torch at batch {batch}")
            if not np.isfinite(g).all():
                raise ExportError(f"segment {segment.name!r}: output {spec.name} has NaN/Inf in ONNX Runtime "
                                  f"at batch {batch}")
            max_abs = float(np.abs(g - r).max(initial=0.0))
            rel = max_abs / max(float(np.abs(r).max(initial=0.0)), 1e-12)
            if rel >= worst.rel_err:
                worst = ParityResult(segment.name, batch, max_abs, rel, True)
        results.append(worst)
    return results


def check_parity(segment: Segment, path: Path, feeds_by_batch: dict[int, dict[str, torch.Tensor]],
                 dtype: str) -> list[ParityResult]:
    """Run the ONNX file and the torch module on the same inputs; fail loudly above the tolerance."""
    tol = TOLERANCES[dtype]
    results = measure_parity(segment, path, feeds_by_batch)
    for worst in results:
        worst.ok = worst.rel_err <= tol
        if not worst.ok:
            raise ExportError(
                f"segment {segment.name!r} does not match torch at batch {worst.batch}: relative error "
                f"{worst.rel_err:.3g} > tolerance {tol:g} ({dtype})"
            )
    return results


def measure_chain(segments: list[Segment], paths: list[Path], env: dict[str, torch.Tensor]) -> float:
    """The ONNX files run in sequence on the model inputs in ``env`` (a ``run_segments`` result), against
    the torch chain's output there: how the per-segment errors compound (max relative error)."""
    produced: dict[str, np.ndarray] = {}
    for segment, path in zip(segments, paths):
        sess = ort_session(path)
        feeds = {t.name: produced[t.name] if t.name in produced else env[t.name].contiguous().numpy()
                 for t in segment.inputs}
        outs = sess.run([t.name for t in segment.outputs], feeds)
        for spec, value in zip(segment.outputs, outs):
            produced["hidden" if spec.name == "hidden_out" else spec.name] = value
    ref = env["out"].float().numpy()
    got = np.asarray(produced["out"], dtype=np.float32)
    return float(np.abs(got - ref).max(initial=0.0) / max(float(np.abs(ref).max(initial=0.0)), 1e-12))
