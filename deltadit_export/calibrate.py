"""Schedule calibration: sweep (N, N_c, b), and with ``--precision int8`` the precision of each block
segment, on the model in PyTorch and pick the fastest setting that keeps its samples within a PSNR budget
of full compute.

Why in PyTorch and before the export: N_c fixes the cut points (front/middle/rear), so it must be
chosen before the segments are exported. The sweep runs the Δ-DiT schedule of ``runtime.schedule``
(the very plans the runtime executes) on the diffusers modules, one block at a time, so every N_c
is available without re-cutting anything: embed → blocks (run, or skipped and replaced by input +
stored delta) → head, exactly as ``runtime.executor`` does with engines.

Procedure (``calibrate``):

1. generate ``prompts`` samples with full compute (same sampler, guidance and noise as the runtime:
   DPM-Solver++ from the export's scheduler config, classifier-free guidance, one
   ``torch.Generator(seed)`` for the noise);
2. for every setting of the grid (N in ``intervals``, N_c in ``cached_blocks`` (default 1..L-1),
   b in ``boundaries`` (default {0, T/4, T/2, 0.6·T, 3T/4, T} rounded)), generate the same samples with
   the Δ-DiT schedule and measure each sample's PSNR against its full-compute twin;
3. keep the settings whose **worst** per-sample PSNR is ≥ the budget, and choose the one with the
   highest block-compute bound ``T·L / block-runs`` (the fastest); ties go to the higher worst-case
   PSNR, then to the smaller N, N_c, b. N_c is swept from high to low and settings whose bound is
   already below the best passing one are left out (they cannot be chosen); the record counts them.
   Settings of one N_c share their common prefix of step plans (``sample_many``).

PSNR is over the final samples: pixel values clamped to [-1, 1] (range 2) for pixel-space models
(pixart-digits); for latent models, over the latents with the full-compute sample's peak-to-peak as
range. The whole sweep and the choice are recorded in the manifest (``calibration``), and the
chosen N_c, N and b become the export's cut points and default schedule.

Precision (``--precision int8``): every setting is also tried with each subset of its block segments in int8
(``--keep-fp32`` given: only that one), the int8 blocks run as their real int8 ONNX on ONNX Runtime inside the
stepper (``calibration_int8.py``: why per block is faithful, and how their cost is measured); the ranking uses
the estimated block-work speedup (int8 blocks at their measured cost) instead of the bound, and the chosen
fp32 segments become the export's ``--keep-fp32`` (embed and head stay fp32).

Layout: the sampler (stepper, guided loop, PSNR) is ``calibration_sampling.py``, the int8 blocks
``calibration_int8.py``, the sweep and the export's side here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from runtime.schedule import Cuts, DeltaDiTPolicy, NoCachePolicy

from .calibration_int8 import BLOCK_SEGMENTS, Int8Blocks, assignments, estimated_speedup, int8_stepper
from .calibration_sampling import (  # noqa: F401  (the calibration's public names, importable from here)
    BlockStepper, CalibrationInputs, calibration_inputs, per_sample_psnr, sample, sample_many,
)
from .console import bar
from .export_options import extras_root
from .models import model_guidance
from .timing import Elapsed, Stopwatch

DEFAULT_PSNR_BUDGET = 30.0
DEFAULT_PROMPTS = 4
DEFAULT_INTERVALS = (2, 3, 4)
BOUNDARY_FRACTIONS = (0.0, 0.25, 0.5, 0.6, 0.75, 1.0)


class CalibrationError(ValueError):
    """No setting of the sweep meets the budget, or the sweep is empty; the message says what to change."""


# ================================================================ the sweep


@dataclasses.dataclass
class Setting:
    interval: int
    cached_blocks: int
    boundary: int
    block_runs: int
    bound: float
    psnr_min: float
    psnr_mean: float
    int8: tuple[str, ...] = ()  # block segments run in int8 (empty: all fp32)
    speedup: float | None = None  # estimated block-work speedup with int8's measured cost (None: the bound)

    def __post_init__(self) -> None:
        if self.speedup is None:
            self.speedup = self.bound

    @property
    def key(self) -> tuple:
        """(N, N_c, b), and the int8 segments when there are any."""
        return (self.interval, self.cached_blocks, self.boundary) + ((self.int8,) if self.int8 else ())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("psnr_min", "psnr_mean"):
            d[k] = None if math.isinf(d[k]) else round(d[k], 3)  # JSON has no infinity: null = identical
        d["bound"] = round(d["bound"], 4)
        d["speedup"] = round(d["speedup"], 4)
        d["int8"] = list(self.int8)
        return d


@dataclasses.dataclass
class CalibrationResult:
    psnr_budget: float
    num_steps: int
    num_layers: int
    chosen: Setting | None
    sweep: list[Setting]
    inputs: str
    guidance: float
    seed: int
    seconds: float
    pruned: int = 0  # grid settings left out: their (estimated) speedup is below the best passing setting's
    load_before: float | None = None  # 1-minute load average before and after the sweep
    load_after: float | None = None
    precision: dict[str, Any] | None = None  # int8 in the sweep: how it was measured, its cost, what was fixed

    def to_dict(self) -> dict[str, Any]:
        method = ("sweep of (N, N_c, b) in PyTorch on the diffusers blocks; fastest (highest block-compute "
                  "bound) setting whose worst per-sample PSNR vs full compute is ≥ the budget")
        if self.precision is not None:
            method = ("sweep of (N, N_c, b) and of int8/fp32 per block segment (int8 blocks: their int8 ONNX on "
                      "ONNX Runtime, calibration_int8.py); fastest (highest estimated block-work speedup, int8 "
                      "blocks at their measured cost) setting whose worst per-sample PSNR vs fp32 full compute is "
                      "≥ the budget")
        return {
            "method": method,
            "psnr_budget_db": self.psnr_budget,
            "num_steps": self.num_steps,
            "num_layers": self.num_layers,
            "samples": self.inputs,
            "guidance": self.guidance,
            "seed": self.seed,
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "sweep": [s.to_dict() for s in self.sweep],
            "pruned": self.pruned,
            "seconds": round(self.seconds, 1),
            "loadavg_before": self.load_before,
            "loadavg_after": self.load_after,
            **({"precision": self.precision} if self.precision is not None else {}),
        }

    def summary(self, top: int = 5) -> str:
        passing = sorted((s for s in self.sweep if s.psnr_min >= self.psnr_budget), key=_rank)
        what = "(N, N_c, b, int8 segments)" if self.precision is not None else "(N, N_c, b)"
        lines = [f"calibration: {len(self.sweep)} settings {what} measured at T={self.num_steps}, guidance "
                 f"{self.guidance}, in {Elapsed(self.seconds, self.load_before, self.load_after).describe()} "
                 f"({self.pruned} more left out: slower than the choice); "
                 f"budget: worst per-sample PSNR ≥ {self.psnr_budget:g} dB vs full compute; {len(passing)} pass"]
        if self.precision is not None:
            p = self.precision
            measured = (f" (block stack, ONNX Runtime, batch 2: {p['int8_ms']:.1f} vs {p['fp32_ms']:.1f} ms)"
                        if "int8_ms" in p else "")
            lines.append(f"  int8 blocks cost {p['int8_cost']:.2f}× the fp32 ones here{measured}"
                         + ("; int8 segments fixed by --keep-fp32" if p.get("fixed") else ""))
        extra = f" {'int8':>18} {'est.':>6}" if self.precision is not None else ""
        lines.append(f"  {'N':>2} {'N_c':>4} {'b':>3} {'block-runs':>10} {'bound':>6} {'PSNR min':>9} {'mean':>6}{extra}")
        for s in passing[:top]:
            mark = "  ← chosen" if self.chosen is not None and s.key == self.chosen.key else ""
            cols = f" {','.join(s.int8) or '-':>18} {s.speedup:>5.2f}×" if self.precision is not None else ""
            lines.append(f"  {s.interval:>2} {s.cached_blocks:>4} {s.boundary:>3} {s.block_runs:>10} {s.bound:>5.2f}× "
                         f"{_db(s.psnr_min):>9} {_db(s.psnr_mean):>6}{cols}{mark}")
        if self.chosen is not None:
            c = self.chosen
            precision = ""
            if self.precision is not None:
                precision = (f", int8 segments {','.join(c.int8) or 'none'} (estimated {c.speedup:.2f}×)")
            lines.append(f"chosen: --interval {c.interval} --cached-blocks {c.cached_blocks} --boundary {c.boundary} "
                         f"(bound {c.bound:.2f}×, worst PSNR {_db(c.psnr_min)} dB{precision}); the sweep is in "
                         "manifest.json → calibration")
        return "\n".join(lines)


def _db(v: float) -> str:
    return "∞" if math.isinf(v) else f"{v:.1f}"


def _rank(s: Setting) -> tuple:
    """Sort key, best first: fastest, then most accurate, then fewer int8 segments, then the smallest parameters."""
    return (-s.speedup, -s.psnr_min, len(s.int8), s.interval, s.cached_blocks, s.boundary, s.int8)


def default_boundaries(num_steps: int) -> tuple[int, ...]:
    return tuple(sorted({int(round(f * num_steps)) for f in BOUNDARY_FRACTIONS}))


def calibrate(model, inputs: CalibrationInputs, scheduler_config: dict, *, num_steps: int = 20,
              psnr_budget: float = DEFAULT_PSNR_BUDGET, intervals: Iterable[int] = DEFAULT_INTERVALS,
              cached_blocks: Iterable[int] | None = None, boundaries: Iterable[int] | None = None,
              pixel_space: bool = True, seed: int = 0, log: Callable[[str], None] | None = None,
              int8: Int8Blocks | None = None, int8_cost: float = 1.0,
              fixed_int8: tuple[str, ...] | None = None) -> CalibrationResult:
    """Sweep the grid and choose; raises :class:`CalibrationError` when no setting meets the budget.

    With ``int8`` (every block's int8 session, ``calibration_int8.export_int8_blocks``) each (N, N_c, b) is also
    tried with every subset of its block segments in int8 (only ``fixed_int8`` when given), an int8 block
    costing ``int8_cost`` × an fp32 one in the speed estimate."""
    watch = Stopwatch()
    stepper = BlockStepper(model)
    L = stepper.num_layers
    ncs = sorted(set(cached_blocks)) if cached_blocks is not None else list(range(1, L))
    bs = sorted(set(boundaries)) if boundaries is not None else list(default_boundaries(num_steps))
    ns = sorted(set(intervals))
    if not ncs or not bs or not ns:
        raise CalibrationError("the calibration grid is empty: give at least one interval, N_c and boundary")
    for n_c in ncs:
        Cuts(L, n_c)  # validates 1 <= N_c < L
    reference = sample(stepper, NoCachePolicy().plan(num_steps, Cuts(L, ncs[0])), inputs, scheduler_config)
    sweep: list[Setting] = []
    pruned = 0
    best: Setting | None = None
    sets = {n_c: assignments(Cuts(L, n_c), fixed_int8) if int8 is not None else [()] for n_c in ncs}
    # N_c from high to low: the bound grows with N_c (and N), so once a setting passes, every setting whose
    # (estimated) speedup is below the best passing one can be left out without changing the choice.
    progress = bar(total=sum(len(v) for v in sets.values()) * len(ns) * len(bs), desc="calibration", unit="setting")
    for k, n_c in enumerate(sorted(ncs, reverse=True)):
        cuts = Cuts(L, n_c)
        progress.set_postfix_str(f"N_c={n_c}", refresh=True)
        for int8_set in sets[n_c]:
            plans = {(n, b): DeltaDiTPolicy(interval=n, boundary=b).plan(num_steps, cuts) for n in ns for b in bs}
            speed = {key: estimated_speedup(s, int8_set, int8_cost) for key, s in plans.items()}
            grid = [key for key in plans if best is None or speed[key] >= best.speedup - 1e-12]
            pruned += len(plans) - len(grid)
            progress.update(len(plans) - len(grid))  # pruned settings count as done
            if not grid:
                continue
            step = int8_stepper(stepper, int8, cuts, int8_set) if int8_set else stepper
            schedules = [plans[key] for key in grid]
            for (n, b), schedule, x in zip(grid, schedules, sample_many(step, schedules, inputs, scheduler_config)):
                p = per_sample_psnr(x, reference, pixel_space)
                setting = Setting(n, n_c, b, schedule.block_runs, schedule.bound, float(np.min(p)), float(np.mean(p)),
                                  int8_set, speed[(n, b)])
                sweep.append(setting)
                if setting.psnr_min >= psnr_budget and (best is None or _rank(setting) < _rank(best)):
                    best = setting
            progress.update(len(grid))
        if log is not None:
            log(f"calibration: N_c={n_c} done ({k + 1}/{len(ncs)}, {watch.seconds:.0f} s)")
    progress.close()
    passing = [s for s in sweep if s.psnr_min >= psnr_budget]
    took = watch.stop()
    result = CalibrationResult(psnr_budget, num_steps, L, min(passing, key=_rank) if passing else None, sweep,
                               inputs.description, inputs.guidance, seed, took.seconds, pruned, took.load_before,
                               took.load_after, {"int8_cost": int8_cost} if int8 is not None else None)
    if result.chosen is None:
        best = max(sweep, key=lambda s: (s.psnr_min, s.bound))
        raise CalibrationError(
            f"no setting of the sweep keeps the worst per-sample PSNR ≥ {psnr_budget:g} dB against full compute "
            f"(best: N={best.interval}, N_c={best.cached_blocks}, b={best.boundary}"
            f"{', int8 ' + ','.join(best.int8) if best.int8 else ''} at {_db(best.psnr_min)} dB); "
            "lower --psnr-budget, or export without --calibrate")
    return result


# ================================================================ the export's side


def scheduler_config_for(spec, source) -> dict:
    """The sampler config the runtime will use with this export: the shipped ``scheduler/`` of a bundled
    model (the exporter copies it next to the engines), else the runtime's default."""
    from runtime.sampling import default_scheduler

    root = extras_root(spec, source)

    class _R:
        pass

    r = _R()
    r.root = root
    return dict(default_scheduler(r).config)


def calibrate_export_options(options, *, psnr_budget: float = DEFAULT_PSNR_BUDGET, num_prompts: int = DEFAULT_PROMPTS,
                             log: Callable[[str], None] | None = None):
    """Run the calibration for an export and return ``(options with the chosen N_c/N/b and the calibration
    record, CalibrationResult)``. Values the user set explicitly (``--cached-blocks``, ``--interval``,
    ``--boundary``, with ``--precision int8`` also ``--keep-fp32``) are kept and only the others are swept.
    With ``--precision int8`` the chosen fp32 block segments become ``keep_fp32`` (with embed and head)."""
    from .export_options import OptionError, resolve
    from .model_weights import build_model

    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise OptionError(f"--calibrate-prompts={num_prompts!r} is out of range: expected an integer ≥ 1")
    if not isinstance(psnr_budget, (int, float)) or math.isnan(psnr_budget):
        raise OptionError(f"--psnr-budget={psnr_budget!r} must be a number of dB")
    job = resolve(options)
    torch.set_grad_enabled(False)
    model = build_model(job.spec, job.source, job.config)
    root = extras_root(job.spec, job.source)
    inputs = calibration_inputs(job.spec, model, num_prompts, guidance=model_guidance(job.spec.name),
                                text_encoder_dir=root / "text_encoder" if root else None)
    T = job.schedule["num_steps"]
    sweep = dict(num_steps=T, psnr_budget=float(psnr_budget),
                 intervals=(options.interval,) if options.interval is not None else DEFAULT_INTERVALS,
                 cached_blocks=(options.cached_blocks,) if options.cached_blocks is not None else None,
                 boundaries=(options.boundary,) if options.boundary is not None else None,
                 pixel_space=job.spec.vae_scale_factor == 1, log=log)
    scheduler_config = scheduler_config_for(job.spec, job.source)
    try:
        if options.precision == "int8":
            result = _calibrate_int8(model, inputs, scheduler_config, sweep, options.keep_fp32, job)
        else:
            result = calibrate(model, inputs, scheduler_config, **sweep)
    except CalibrationError as exc:
        raise OptionError(str(exc)) from None
    c = result.chosen
    changes: dict[str, Any] = {}
    if options.precision == "int8" and options.keep_fp32 is None:
        fp32_blocks = [s.name for s in Cuts(job.cuts.num_layers, c.cached_blocks).segments if s.name not in c.int8]
        changes["keep_fp32"] = ("embed", *fp32_blocks, "head")
    new = dataclasses.replace(options, cached_blocks=c.cached_blocks, interval=c.interval, boundary=c.boundary,
                              calibration=json.loads(json.dumps(result.to_dict())), **changes)
    return new, result


def _calibrate_int8(model, inputs: CalibrationInputs, scheduler_config: dict, sweep: dict[str, Any], keep_fp32,
                    job) -> CalibrationResult:
    """The sweep with int8 blocks: export and quantize every block into a scratch folder, measure their cost,
    sweep. ``keep_fp32`` given: the int8 segments are fixed to the others (embed and head are never swept)."""
    import tempfile

    from .calibration_int8 import export_int8_blocks, measure_int8_cost
    from .quantize import parse_keep_fp32

    keep = parse_keep_fp32(keep_fp32)
    fixed = None if keep is None else tuple(n for n in BLOCK_SEGMENTS if n not in keep)
    with tempfile.TemporaryDirectory(prefix="deltadit-calibrate-int8-") as scratch:
        if sweep["log"] is not None:
            sweep["log"]("calibration: exporting and quantizing every block for the int8 segments of the sweep")
        blocks = export_int8_blocks(model, BlockStepper(model), inputs.cond, inputs.noise, Path(scratch),
                                    threads=torch.get_num_threads(), opset=job.options.opset,
                                    exporter=job.options.exporter)
        cost = measure_int8_cost(blocks)
        result = calibrate(model, inputs, scheduler_config, int8=blocks, int8_cost=cost["int8_cost"],
                           fixed_int8=fixed, **sweep)
    result.precision = {"int8_blocks": "each block's int8 ONNX (quantize.quantize_segment) on ONNX Runtime",
                        **result.precision, **cost, "fixed": fixed is not None, "fixed_int8": list(fixed) if fixed is not None else None,
                        "embed_head": "fp32" if keep is None else [n for n in ("embed", "head") if n in keep]}
    return result
