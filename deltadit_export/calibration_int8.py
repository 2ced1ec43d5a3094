"""Precision in the calibration sweep: int8 blocks measured, not emulated.

With ``--precision int8 --calibrate`` the sweep also chooses, per block segment (front, middle, rear), int8 or
fp32. The int8 samples of a setting are computed with the real int8 arithmetic: every transformer block is
exported to ONNX on its own and quantized by the exporter's own ``quantize.quantize_segment`` (ONNX Runtime
dynamic quantization), and the sweep runs an int8 segment as the chain of its blocks' int8 ONNX Runtime
sessions (:class:`OrtBlock`) inside the PyTorch stepper.

Why per block and why that is faithful: N_c fixes the cut points, so the segments of every N_c of the grid
would otherwise need their own export. Dynamic quantization acts per MatMul (its weight is quantized per
output channel, its input activation per tensor at run time, inside that MatMul's own quantize node), so a
segment's int8 graph is the chain of its blocks' int8 graphs: the same weights, scales and kernels. Measured
(tests/test_calibrate.py): the chain of two int8 block sessions equals the exported two-block int8 segment
bit for bit. An emulation (fake-quantized torch MatMuls) would only approximate ONNX Runtime's rounding and
its u8·s8 kernels.

Speed: the sweep ranks settings by estimated block work, ``T·L / Σ_steps Σ_blocks run c(block)`` with
``c = 1`` for an fp32 block and ``c = ρ`` for an int8 one, where ρ is the int8 / fp32 time of the whole block
stack measured here once (ONNX Runtime, one guided image = batch 2, the measurement harness: both chains in a
timing worker, interleaved, median of the rounds). On a model too narrow for int8 to pay (ρ ≥ 1) the sweep
never prefers an int8 segment. Embed and head stay fp32 (under 1% of the work; quantize.DEFAULT_KEEP_FP32).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any, Iterable

import torch

from runtime.schedule import Cuts, Schedule

from .timing import Row, Runner, WorkerContext

BLOCK_SEGMENTS = ("front", "middle", "rear")
COST_REPEATS = 5


class OrtBlock:
    """One transformer block as an ONNX Runtime session, called like the stepper's torch block module:
    ``block(hidden, *block_args) -> hidden_out``."""

    def __init__(self, path: Path, input_names: list[str], threads: int | None = None):
        from .onnx_export import ort_session

        self.path = Path(path)
        self.session = ort_session(path, threads)
        self.input_names = input_names

    def __call__(self, hidden: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        feeds = {n: a.detach().contiguous().numpy() for n, a in zip(self.input_names, (hidden, *args))
                 if a is not None}
        return torch.from_numpy(self.session.run(["hidden_out"], feeds)[0])


@dataclasses.dataclass
class Int8Blocks:
    """Every block's int8 session (index = block), their fp32 and int8 files, and the block inputs' names."""

    blocks: list[OrtBlock]
    fp32_files: list[Path]
    int8_files: list[Path]
    input_names: list[str]
    example: dict[str, torch.Tensor]  # one guided image's block inputs (batch 2), for the cost measurement


def block_inputs_example(stepper, cond: dict[str, torch.Tensor], noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """The blocks' named inputs (hidden, conditioning) for the calibration conditioning at t = 999."""
    rows = len(next(iter(cond.values())))
    sample = noise.repeat(math.ceil(rows / len(noise)), 1, 1, 1)[:rows]  # shapes matter here, not values
    timestep = torch.full((rows,), 999.0)
    with torch.no_grad():
        if stepper.family == "pixart":
            hidden, t_cond, _, context, bias = stepper.embed(
                sample, timestep, cond["encoder_hidden_states"], cond.get("encoder_attention_mask"),
                cond.get("resolution"), cond.get("aspect_ratio"))
            return {"hidden": hidden, "t_cond": t_cond, "context": context, "context_bias": bias}
        return {"hidden": stepper.embed(sample), "timestep": timestep, "class_labels": cond["class_labels"]}


def export_int8_blocks(model, stepper, cond: dict[str, torch.Tensor], noise: torch.Tensor, folder: Path, *,
                       threads: int | None = None, opset: int = 18, exporter: str = "torchscript") -> Int8Blocks:
    """Export each block to ``folder/block<k>.onnx``, quantize it to ``block<k>.int8.onnx`` (the exporter's
    quantizer) and open the int8 sessions. ``folder`` is the caller's scratch folder."""
    from .onnx_export import export_segment
    from .quantize import quantize_segment
    from .split import Segment, split_model

    example = block_inputs_example(stepper, cond, noise)
    tokens = int(cond["encoder_hidden_states"].shape[1]) if "encoder_hidden_states" in cond else 0
    L = stepper.num_layers
    template = next(s for s in split_model(model, Cuts(L, 1), tokens) if s.role == "blocks")  # the blocks' I/O
    names = [t.name for t in template.inputs]
    fp32_files, int8_files = [], []
    for k, block in enumerate(model.transformer_blocks):
        seg = Segment(f"block{k}", type(template.module)([block]), template.inputs, template.outputs, (k, k + 1))
        fp32, int8 = folder / f"block{k}.onnx", folder / f"block{k}.int8.onnx"
        export_segment(seg, example, fp32, opset=opset, exporter=exporter)
        quantize_segment(fp32, int8)
        fp32_files.append(fp32)
        int8_files.append(int8)
    blocks = [OrtBlock(p, names, threads) for p in int8_files]
    two = {k: v[:2] for k, v in example.items()}  # one guided image: what the runtime runs per call
    return Int8Blocks(blocks, fp32_files, int8_files, names, two)


def chain_row(ctx: WorkerContext, files: list[str], input_names: list[str], feeds: dict[str, Any]) -> Runner:
    """Harness row: the block sessions of ``files`` in sequence (ONNX Runtime, the runtime's CPU settings)."""
    from .onnx_export import ort_session

    sessions = [ort_session(f, ctx.threads) for f in files]
    arrays = {n: v.contiguous().numpy() for n, v in feeds.items() if v is not None}

    def run(i: int):
        hidden = arrays["hidden"]
        for s in sessions:
            hidden = s.run(["hidden_out"], {**arrays, "hidden": hidden})[0]
        return None

    o = sessions[0].get_session_options()
    return Runner(run, info={"onnxruntime": {"intra_op_num_threads": o.intra_op_num_threads, "allow_spinning":
                                             o.get_session_config_entry("session.intra_op.allow_spinning")}})


def measure_int8_cost(blocks: Int8Blocks, threads: int | None = None, repeats: int = COST_REPEATS) -> dict[str, Any]:
    """ρ = int8 / fp32 time of the whole block stack, timed with the harness (interleaved, median)."""
    from .timing import measure

    args = {"input_names": blocks.input_names, "feeds": blocks.example}
    m = measure([Row("fp32 blocks", chain_row, dict(args, files=[str(p) for p in blocks.fp32_files])),
                 Row("int8 blocks", chain_row, dict(args, files=[str(p) for p in blocks.int8_files]))],
                repeats=repeats, warmup=1, threads=threads, desc="int8 cost")
    fp32, int8 = m.rows["fp32 blocks"], m.rows["int8 blocks"]
    return {"int8_cost": int8.median_ms / fp32.median_ms, "fp32_ms": fp32.median_ms, "int8_ms": int8.median_ms,
            "fp32_spread_ms": [fp32.min_ms, fp32.max_ms], "int8_spread_ms": [int8.min_ms, int8.max_ms],
            "batch": 2, "threads": m.settings.threads, "loadavg_before": m.load_before,
            "loadavg_after": m.load_after, "busy": m.busy()}


# ---------------------------------------------------------------- precision assignments and their cost


def assignments(cuts: Cuts, fixed_int8: Iterable[str] | None) -> list[tuple[str, ...]]:
    """The int8 block segments to try for these cuts: every subset of the cuts' segments, or only ``fixed_int8``
    (the user's --keep-fp32 fixes them), as sorted tuples, all-int8 first."""
    names = [s.name for s in cuts.segments]
    if fixed_int8 is not None:
        return [tuple(n for n in names if n in set(fixed_int8))]
    subsets = [tuple(c) for r in range(len(names), -1, -1) for c in itertools.combinations(names, r)]
    return subsets


def estimated_speedup(schedule: Schedule, int8: tuple[str, ...], int8_cost: float) -> float:
    """``T·L / Σ_steps Σ_blocks run c`` with c = 1 for fp32 and ``int8_cost`` for int8 blocks (= the bound when
    nothing is int8)."""
    sizes = {s.name: s.num_blocks for s in schedule.cuts.segments}
    work = sum(sizes[name] * (int8_cost if name in int8 else 1.0)
               for step in schedule.steps for verb, name in step.actions if verb == "run")
    return schedule.num_steps * schedule.num_layers / work


def int8_stepper(stepper, blocks: Int8Blocks, cuts: Cuts, int8: tuple[str, ...]):
    """The stepper with the blocks of the ``int8`` segments (of these cuts) replaced by their int8 sessions."""
    replace = {k: blocks.blocks[k] for s in cuts.segments if s.name in int8 for k in range(s.start, s.end)}
    return stepper.with_blocks(replace) if replace else stepper

