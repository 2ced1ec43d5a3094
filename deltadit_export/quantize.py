"""int8 segment engines: ONNX Runtime's dynamic quantization of the weights, and the per-segment gate.

What is quantized: the weights of every ``MatMul`` whose second input is a weight (the token-wise
Linear layers: attention projections, feed-forward, caption projection, the head's projection), to
int8 per output channel (symmetric), with the activations quantized to uint8 per tensor at run time
(``DynamicQuantizeLinear``). ONNX Runtime fuses each triple into ``DynamicQuantizeMatMul`` /
``MatMulIntegerToFloat``, which run on the CPU's VNNI instructions where it has them (the u8·s8 MLAS
kernels). What stays fp32: LayerNorm, softmax and the attention products (``Q·Kᵀ`` and ``A·V`` have
no weight operand; ``MatMulConstBOnly``), the patch-embedding ``Conv``, and the ``Gemm`` layers (the
timestep and conditioning MLPs on B rows, not B × tokens: negligible work, and ORT's dynamic integer
ops have no Gemm).

By default the embed and head segments stay fp32 entirely: together they are under 1% of a step's
work (full-width benchmark: 0.95 of 123 s), while an error in embed's ``t_cond`` modulates every
block and the head's output is the prediction itself. ``--keep-fp32`` names the segments to keep;
``none`` quantizes every segment.

The gate: each int8 segment is run on its real inputs (the fp32 torch chain's tensors at that
segment) at the parity batches, and its max relative error against the fp32 torch segment
(max |int8 − fp32| / max |fp32|) must stay within ``INT8_TOLERANCE``.

Why dynamic, not static: static QDQ quantization with activation ranges calibrated on the model's own
activations (4 batches of the fp32 chain on random latents, timesteps and captions; MinMax or the 99.99th
percentile) was measured on pixart-digits at 2–4× the dynamic error (front 3e-2 vs 1.5e-2, middle
6e-2–7.8e-2 vs 2.2e-2, above the gate; rear 2e-2 vs 0.6e-2), probably because a fixed range per
tensor does not fit activations whose range moves with the timestep. It is not offered. (Activations from sampled
generations were not tried; its possible speed gain was not measured.)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from runtime.manifest import SEGMENT_ROLES

# Measured here, per segment at batch 1 and 5 (max |int8 − fp32| / max |fp32|): pixart-digits
# (12 × 96) 0.5e-2–2.2e-2, the tiny test models (6 × 16) 0.2e-2–1.3e-2; whole quick model (12 × 512)
# 1.3e-2 (DESIGN.md §4). That is the noise of 8-bit weights per channel and 8-bit activations per
# tensor (a step of 1/127 of a channel's range and 1/255 of the tensor's range, accumulated over a
# few Linear layers per block). 5e-2 leaves 2× headroom over the worst measured segment and refuses
# what that noise cannot explain; the case it is meant for is activations with outlier channels (the
# known int8 failure of transformers, where one channel sets the whole tensor's scale), not seen on
# these models. Whether an error that passes is harmless for images is the quality evaluation's
# question, not this gate's.
INT8_TOLERANCE = 5e-2
DEFAULT_KEEP_FP32 = ("embed", "head")
SEGMENT_NAMES = tuple(SEGMENT_ROLES)
QUANTIZED_OPS = ("MatMul",)


class QuantizeError(RuntimeError):
    """ONNX Runtime's quantizer failed on a segment; the message names the segment."""


def int8_file_name(segment: str) -> str:
    return f"{segment}.int8.onnx"


def parse_keep_fp32(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """``"embed,head"`` (the CLI's form), a sequence of names, ``"none"``/``""`` (keep nothing) or None (default).

    Returns sorted unique names; raises ValueError naming an unknown segment.
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in items if str(n).strip()]
    if names in ([], ["none"]):
        return ()
    unknown = [n for n in names if n not in SEGMENT_NAMES]
    if unknown:
        raise ValueError(f"--keep-fp32 {','.join(unknown)}: not a segment; expected a comma-separated list of "
                         f"{', '.join(SEGMENT_NAMES)} (or none)")
    return tuple(sorted(set(names), key=SEGMENT_NAMES.index))


def check_tolerance(value: float | None) -> float:
    if value is None:
        return INT8_TOLERANCE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"--int8-tolerance={value!r} is out of range: expected a positive number (default "
                         f"{INT8_TOLERANCE:.0e}, the max relative error of a segment against fp32)")
    return float(value)


@contextlib.contextmanager
def _quiet_root_logger():
    """ORT's quantizer logs through the root logger (``logging.warning``); keep it out of the user's output
    without changing their logging setup for longer than the call."""
    root = logging.getLogger()
    level = root.level
    # logging.warning() on a root logger without handlers installs one for good (basicConfig): give it a
    # handler that drops everything for the duration instead.
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        if placeholder is not None:
            root.removeHandler(placeholder)


def quantize_segment(fp32_path: Path, out_path: Path) -> list[str]:
    """Write the int8 version of the ONNX file ``fp32_path`` (with its external data) to ``out_path``.

    Returns the external-data file names written next to ``out_path`` (empty for a small segment).
    The quantizer's intermediate files go to a temporary folder that is removed afterwards.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = fp32_path.stem
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=out_path.parent) as scratch, _quiet_root_logger():
        # Pre-processing = shape inference (the quantizer needs every MatMul input's type). ORT's graph
        # optimization is skipped: the runtime's session applies it, and an optimized graph here would
        # bake in this machine's choices.
        pre = Path(scratch) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_optimization=True, save_as_external_data=True,
                              all_tensors_to_one_file=True, external_data_location="pre.onnx.data")
            quantize_dynamic(str(pre), str(Path(scratch) / out_path.name), op_types_to_quantize=list(QUANTIZED_OPS),
                             per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                             use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
        except Exception as exc:
            raise QuantizeError(f"segment {name!r}: ONNX Runtime's quantizer failed ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); export this segment in "
                                f"fp32 with --keep-fp32 {name}") from exc
        return _finalize_int8(Path(scratch) / out_path.name, out_path)


def _finalize_int8(raw: Path, path: Path) -> list[str]:
    """Re-save with all weights in ``<file>.data`` next to the graph (the quantizer's own naming varies by
    version), check it, and give the data file the graph file's permissions (as for fp32 segments)."""
    import onnx

    model = onnx.load(str(raw), load_external_data=True)
    data = path.name + ".data"
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    onnx.checker.check_model(str(tmp))
    os.replace(tmp, path)  # the data file is already in place under its final name, the graph last
    if not (path.parent / data).is_file():
        return []
    os.chmod(path.parent / data, path.stat().st_mode & 0o777)
    return [data]


def gate_refusal(failing: list[tuple[str, float, int]], keep_fp32: tuple[str, ...], tolerance: float) -> str:
    """The message for int8 segments above the tolerance: each one with its error, and the exact fix."""
    parts = ", ".join(f"{name!r} {err:.2e} at batch {batch}" for name, err, batch in failing)
    keep = sorted(set(keep_fp32) | {name for name, _, _ in failing}, key=SEGMENT_NAMES.index)
    return (f"int8 segment(s) above the int8 tolerance {tolerance:.0e} (max relative error against the fp32 "
            f"segment on its real inputs): {parts}; keep them in fp32 with --keep-fp32 {','.join(keep)} "
            "(or raise --int8-tolerance once a quality evaluation shows the error is harmless)")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def resolve_int8_options(precision: str, keep_fp32, int8_tolerance, cuts,
                         backends) -> tuple[tuple[str, ...], float | None]:
    """--keep-fp32 and --int8-tolerance resolved: only with --precision int8, names of segments these cuts
    have. Raises ValueError (the exporter's OptionError) with the option's name and the fix."""
    if precision != "int8":
        if keep_fp32 is not None or int8_tolerance is not None:
            flag = "--keep-fp32" if keep_fp32 is not None else "--int8-tolerance"
            raise ValueError(f"{flag} needs --precision int8 (with --precision {precision} no segment is quantized)")
        return (), None
    keep = parse_keep_fp32(keep_fp32)
    tolerance = check_tolerance(int8_tolerance)
    keep = DEFAULT_KEEP_FP32 if keep is None else keep
    present = {"embed", "head", *(s.name for s in cuts.segments)}
    absent = [n for n in keep if n not in present]
    if absent:
        raise ValueError(f"--keep-fp32 {','.join(absent)}: this export has no such segment (N_c={cuts.cached_blocks} "
                         f"of L={cuts.num_layers} leaves the middle empty); its segments are "
                         f"{', '.join(n for n in ('embed', 'front', 'middle', 'rear', 'head') if n in present)}")
    others = [b for b in backends if b != "onnx"]
    if others:
        raise ValueError(f"--backend {others[0]} builds from the fp32/fp16 model, not from int8 ONNX: int8 engines "
                         "run on ONNX Runtime (and OpenVINO); export int8 without --backend")
    return keep, tolerance


def weight_matmuls(path: Path) -> int:
    """How many MatMuls of an ONNX file have a weight (an initializer) as their second input."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return sum(1 for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights)


def export_int8_segment(seg, feeds: dict, tmp: Path, progress, *, opset: int, exporter: str,
                        batches: tuple[int, ...]) -> tuple[Path, list[str], list, str]:
    """Export the fp32 ONNX into a scratch folder of the staging folder ``tmp``, quantize it into
    ``<seg>.int8.onnx``, measure it against the fp32 torch segment (``feeds``: its real inputs per batch).

    Returns the file, its external-data files, the parity results and the precision: ``int8``, or ``fp32``
    for a segment without a weight MatMul (DiT's embed is a Conv and a sum), which is then exported as it is
    and held to the fp32 parity tolerance. The exporter applies the int8 gate over all segments afterwards.
    """
    from .onnx_export import ExportError, check_parity, export_segment, measure_parity

    scratch = tmp / f".fp32-{seg.name}"
    scratch.mkdir()
    fp32 = scratch / f"{seg.name}.onnx"
    try:
        with progress.segment(seg.name, phases=("export", "quantize", "parity")) as bar:
            bar.phase("export")
            try:
                extra = export_segment(seg, feeds[2], fp32, opset=opset, exporter=exporter)
            except Exception as exc:
                raise ExportError(f"segment {seg.name!r}: ONNX export failed: {exc}") from exc
            bar.phase("quantize")
            if not weight_matmuls(fp32):  # nothing to quantize: the fp32 file is the segment
                path = tmp / fp32.name
                for name in (fp32.name, *extra):
                    os.replace(scratch / name, tmp / name)  # the graph names its data file relatively
                bar.phase("parity")
                parity = check_parity(seg, path, {b: feeds[b] for b in batches}, "float32")
                return path, extra, parity, "fp32"
            path = tmp / int8_file_name(seg.name)
            try:
                extra = quantize_segment(fp32, path)
            except QuantizeError as exc:
                raise ExportError(str(exc)) from exc
            remove_tree(scratch)
            bar.phase("parity")
            parity = measure_parity(seg, path, {b: feeds[b] for b in batches})
    finally:
        remove_tree(scratch)
    return path, extra, parity, "int8"


def int8_record(keep_fp32: tuple[str, ...], tolerance: float) -> dict:
    """How the int8 segments were made, for whoever reads the manifest (the runtime needs none of it)."""
    return {"tool": f"onnxruntime.quantization.quantize_dynamic (onnxruntime {_onnxruntime_version()})",
            "weights": "int8, per output channel, symmetric", "activations": "uint8, per tensor, dynamic",
            "ops": list(QUANTIZED_OPS), "keep_fp32": list(keep_fp32), "tolerance": tolerance}
