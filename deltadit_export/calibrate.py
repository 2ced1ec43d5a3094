"""Schedule calibration: sweep (N, N_c, b) on the model in PyTorch and pick the fastest setting that
keeps its samples within a PSNR budget of full compute.

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
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from runtime.schedule import Cuts, DeltaDiTPolicy, NoCachePolicy, Schedule, StepPlan

from .models import DEFAULT_GUIDANCE, model_guidance
from .console import bar
from .timing import Elapsed, Stopwatch

DEFAULT_PSNR_BUDGET = 30.0
DEFAULT_PROMPTS = 4
DEFAULT_INTERVALS = (2, 3, 4)
BOUNDARY_FRACTIONS = (0.0, 0.25, 0.5, 0.6, 0.75, 1.0)


class CalibrationError(ValueError):
    """No setting of the sweep meets the budget, or the sweep is empty; the message says what to change."""


# ================================================================ the Δ-DiT schedule on diffusers modules


class BlockStepper:
    """Runs one transformer call of a :class:`StepPlan` on the diffusers modules, block by block.

    Reuses ``split.py``'s embed/blocks/head modules, so full compute equals the diffusers forward
    exactly; a skipped range's output is (its current input) + (its delta from the last full step),
    or its stored output in ``output`` cache mode, as ``runtime.generation.Generation`` does.
    """

    def __init__(self, model):
        from .split import DiTBlocks, DiTEmbed, DiTHead, PixArtBlocks, PixArtEmbed, PixArtHead, model_shape

        self.shape = model_shape(model)
        self.family = self.shape.family
        if self.family == "pixart":
            self.embed, self.head = PixArtEmbed(model).eval(), PixArtHead(model).eval()
            self.blocks = [PixArtBlocks([b]).eval() for b in model.transformer_blocks]
        else:
            self.embed, self.head = DiTEmbed(model).eval(), DiTHead(model).eval()
            self.blocks = [DiTBlocks([b]).eval() for b in model.transformer_blocks]
        self.num_layers = len(self.blocks)

    @torch.no_grad()
    def __call__(self, plan: StepPlan, cuts: Cuts, cache_mode: str, state: dict[str, torch.Tensor],
                 feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.family == "pixart":
            hidden, t_cond, emb_t, context, bias = self.embed(
                feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"], feeds.get("encoder_attention_mask"),
                feeds.get("resolution"), feeds.get("aspect_ratio"))
            args = (t_cond, context, bias)
            head_args = (emb_t,)
        else:
            hidden = self.embed(feeds["sample"])
            args = head_args = (feeds["timestep"], feeds["class_labels"])
        bounds = {s.name: (s.start, s.end) for s in cuts.segments}
        at = {0: hidden}
        for verb, name in plan.actions:
            if verb == "run":
                start, end = bounds[name]
                for k in range(start, end):
                    hidden = self.blocks[k](hidden, *args)
                at[end] = hidden
            else:
                start, end = cuts.range_bounds(name)
                hidden = at[start] + state[name] if cache_mode == "delta" else state[name]
                at[end] = hidden
        for cache_range in plan.record:
            start, end = cuts.range_bounds(cache_range)
            state[cache_range] = at[end] - at[start] if cache_mode == "delta" else at[end]
        return self.head(hidden, *head_args)


# ================================================================ conditioning and sampling


@dataclasses.dataclass
class CalibrationInputs:
    """The conditioning of the calibration samples, as named model inputs (guidance halves included)."""

    cond: dict[str, torch.Tensor]  # 2·P rows in the family's guided order (runtime/guidance.py)
    noise: torch.Tensor  # [P, C, H, W]
    description: str
    guidance: float


def calibration_inputs(spec, model, num_prompts: int, *, guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
                       text_encoder_dir: Path | None = None) -> CalibrationInputs:
    """Inputs of ``num_prompts`` calibration samples for this model.

    pixart-digits (a shipped text encoder): prompts "a handwritten digit 0".. cycling over the digits,
    "" as the unconditional prompt. Other PixArt models (no T5 here): seeded random caption states
    (unit normal, all tokens kept), zeros as the unconditional caption (no text encoder here to embed "").
    DiT: class labels spread over the config's classes, its null class for guidance.
    """
    from runtime.guidance import Guidance, null_class

    from .split import model_shape

    shape = model_shape(model)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_prompts, shape.in_channels, shape.sample_size, shape.sample_size), generator=g)
    guide = Guidance(shape.family, guidance, shape.in_channels, shape.out_channels)
    cond: dict[str, torch.Tensor] = {}
    if shape.family == "pixart":
        if text_encoder_dir is not None and (text_encoder_dir / "config.json").is_file():
            from runtime.text_encoder import HashedWordEncoder

            from .digits import prompt_for_digit

            encoder = HashedWordEncoder.load(text_encoder_dir)
            prompts = [prompt_for_digit(i % 10) for i in range(num_prompts)]
            e, m = (torch.from_numpy(a) for a in encoder.encode(prompts))
            ne, nm = (torch.from_numpy(a) for a in encoder.encode([""] * num_prompts))
            desc = f"prompts {prompts!r}, negative ''"
        else:
            tokens, channels = 120, shape.caption_channels
            e = torch.randn((num_prompts, tokens, channels), generator=g)
            m = torch.ones(num_prompts, tokens)
            ne, nm = torch.zeros_like(e), torch.ones_like(m)
            desc = f"{num_prompts} seeded random caption states [{tokens}, {channels}] (no text encoder here)"
        cond["encoder_hidden_states"] = guide.batch(e, ne)
        cond["encoder_attention_mask"] = guide.batch(m, nm)
        if shape.micro_conditions:
            rows = len(cond["encoder_hidden_states"])
            res = float(shape.sample_size * 8)
            cond["resolution"] = torch.tensor([[res, res]]).repeat(rows, 1)
            cond["aspect_ratio"] = torch.ones(rows, 1)
    else:
        classes, null = shape.num_classes, null_class(shape.num_classes)
        labels = torch.tensor([(i * 997 // max(num_prompts, 1)) % classes for i in range(num_prompts)], dtype=torch.int64)
        cond["class_labels"] = guide.batch(labels, torch.full_like(labels, null))
        desc = f"class labels {labels.tolist()}, null class {null}"
    return CalibrationInputs(cond, noise, desc, guidance)


def _guidance(stepper: BlockStepper, inputs: CalibrationInputs):
    """The runtime's guided batch for this model (runtime/guidance.py): the loop state is the guided latents."""
    from runtime.guidance import Guidance

    return Guidance(stepper.family, inputs.guidance, stepper.shape.in_channels, stepper.shape.out_channels)


def _start(stepper: BlockStepper, inputs: CalibrationInputs, scheduler_config: dict, num_steps: int):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler.from_config(scheduler_config)
    sched.set_timesteps(num_steps)
    return _guidance(stepper, inputs).start(inputs.noise * sched.init_noise_sigma, sched), sched


def _step(stepper: BlockStepper, plan: StepPlan, cuts: Cuts, cache_mode: str, inputs: CalibrationInputs, x, sched,
          state: dict[str, torch.Tensor]) -> torch.Tensor:
    """One denoising step (the runtime's sampling loop, in PyTorch); ``state`` holds the deltas."""
    t = sched.timesteps[plan.index]
    guide = _guidance(stepper, inputs)
    xin = sched.scale_model_input(guide.model_input(x), t)
    feeds = dict(inputs.cond, sample=xin, timestep=torch.full((len(xin),), float(t)))
    out = stepper(plan, cuts, cache_mode, state, feeds).float()
    return guide.step(sched, out, t, x, num_steps=len(sched.timesteps))


def sample(stepper: BlockStepper, schedule: Schedule, inputs: CalibrationInputs, scheduler_config: dict) -> torch.Tensor:
    """Final samples of one generation following ``schedule``."""
    x, sched = _start(stepper, inputs, scheduler_config, schedule.num_steps)
    state: dict[str, torch.Tensor] = {}
    for plan in schedule.steps:
        x = _step(stepper, plan, schedule.cuts, schedule.cache_mode, inputs, x, sched, state)
    return _guidance(stepper, inputs).result(x)


def sample_many(stepper: BlockStepper, schedules: list[Schedule], inputs: CalibrationInputs,
                scheduler_config: dict) -> list[torch.Tensor]:
    """Final samples of several schedules of the same cuts, sharing every common prefix of step plans.

    The schedules form a tree (all start with the same full step; Δ-DiT plans with different N or b agree
    until their first differing step): each distinct prefix is computed once, and the sampler state (latents,
    scheduler history, deltas) is copied where the plans part. Same results as ``sample`` per schedule.
    """
    import copy

    if not schedules:
        return []
    cuts, mode, T = schedules[0].cuts, schedules[0].cache_mode, schedules[0].num_steps
    if any(s.cuts != cuts or s.cache_mode != mode or s.num_steps != T for s in schedules):
        raise ValueError("sample_many needs schedules of the same cuts, cache mode and step count")
    results: list[torch.Tensor | None] = [None] * len(schedules)

    def key(plan: StepPlan) -> tuple:
        return plan.kind, plan.actions, plan.record

    def walk(members: list[int], step: int, x, sched, state) -> None:
        if step == T:
            for i in members:
                results[i] = _guidance(stepper, inputs).result(x)
            return
        groups: dict[tuple, list[int]] = {}
        for i in members:
            groups.setdefault(key(schedules[i].steps[step]), []).append(i)
        for n, group in enumerate(groups.values()):
            last = n == len(groups) - 1
            bx, bsched, bstate = (x, sched, state) if last else (x.clone(), copy.deepcopy(sched), dict(state))
            bx = _step(stepper, schedules[group[0]].steps[step], cuts, mode, inputs, bx, bsched, bstate)
            walk(group, step + 1, bx, bsched, bstate)

    x, sched = _start(stepper, inputs, scheduler_config, T)
    walk(list(range(len(schedules))), 0, x, sched, {})
    return results


def per_sample_psnr(x: torch.Tensor, ref: torch.Tensor, pixel_space: bool) -> np.ndarray:
    """PSNR (dB) of each sample against its reference; ``inf`` where identical."""
    x64, r64 = x.double(), ref.double()
    if pixel_space:
        x64, r64, peak = x64.clamp(-1, 1), r64.clamp(-1, 1), torch.full((len(x),), 2.0, dtype=torch.float64)
    else:
        flat = r64.flatten(1)
        peak = (flat.max(1).values - flat.min(1).values).clamp_min(1e-12)
    mse = ((x64 - r64) ** 2).flatten(1).mean(1)
    with np.errstate(divide="ignore"):
        return (10 * torch.log10(peak ** 2 / mse)).numpy()


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

    @property
    def key(self) -> tuple:
        return (self.interval, self.cached_blocks, self.boundary)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("psnr_min", "psnr_mean"):
            d[k] = None if math.isinf(d[k]) else round(d[k], 3)  # JSON has no infinity: null = identical
        d["bound"] = round(d["bound"], 4)
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
    pruned: int = 0  # grid settings left out: their bound is below the best passing setting's
    load_before: float | None = None  # 1-minute load average before and after the sweep
    load_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "sweep of (N, N_c, b) in PyTorch on the diffusers blocks; fastest (highest block-compute "
                      "bound) setting whose worst per-sample PSNR vs full compute is ≥ the budget",
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
        }

    def summary(self, top: int = 5) -> str:
        passing = sorted((s for s in self.sweep if s.psnr_min >= self.psnr_budget), key=_rank)
        lines = [f"calibration: {len(self.sweep)} settings (N, N_c, b) measured at T={self.num_steps}, guidance "
                 f"{self.guidance}, in {Elapsed(self.seconds, self.load_before, self.load_after).describe()} ({self.pruned} more left out: slower than the choice); "
                 f"budget: worst per-sample PSNR ≥ {self.psnr_budget:g} dB vs full compute; {len(passing)} pass"]
        lines.append(f"  {'N':>2} {'N_c':>4} {'b':>3} {'block-runs':>10} {'bound':>6} {'PSNR min':>9} {'mean':>6}")
        for s in passing[:top]:
            mark = "  ← chosen" if self.chosen is not None and s.key == self.chosen.key else ""
            lines.append(f"  {s.interval:>2} {s.cached_blocks:>4} {s.boundary:>3} {s.block_runs:>10} {s.bound:>5.2f}× "
                         f"{_db(s.psnr_min):>9} {_db(s.psnr_mean):>6}{mark}")
        if self.chosen is not None:
            c = self.chosen
            lines.append(f"chosen: --interval {c.interval} --cached-blocks {c.cached_blocks} --boundary {c.boundary} "
                         f"(bound {c.bound:.2f}×, worst PSNR {_db(c.psnr_min)} dB); the sweep is in manifest.json "
                         "→ calibration")
        return "\n".join(lines)


def _db(v: float) -> str:
    return "∞" if math.isinf(v) else f"{v:.1f}"


def _rank(s: Setting) -> tuple:
    """Sort key, best first: fastest, then most accurate, then the smallest parameters."""
    return (-s.bound, -s.psnr_min, s.interval, s.cached_blocks, s.boundary)


def _bound(num_steps: int, num_layers: int, cached_blocks: int, interval: int) -> float:
    from runtime.schedule import bound

    return bound(num_steps, num_layers, cached_blocks, interval)


def default_boundaries(num_steps: int) -> tuple[int, ...]:
    return tuple(sorted({int(round(f * num_steps)) for f in BOUNDARY_FRACTIONS}))


def calibrate(model, inputs: CalibrationInputs, scheduler_config: dict, *, num_steps: int = 20,
              psnr_budget: float = DEFAULT_PSNR_BUDGET, intervals: Iterable[int] = DEFAULT_INTERVALS,
              cached_blocks: Iterable[int] | None = None, boundaries: Iterable[int] | None = None,
              pixel_space: bool = True, seed: int = 0, log: Callable[[str], None] | None = None) -> CalibrationResult:
    """Sweep the grid and choose; raises :class:`CalibrationError` when no setting meets the budget."""
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
    # N_c from high to low: the bound grows with N_c (and N), so once a setting passes, every (N, N_c) whose
    # bound is below the best passing one can be left out without changing the choice.
    progress = bar(total=len(ncs) * len(ns) * len(bs), desc="calibration", unit="setting")
    for k, n_c in enumerate(sorted(ncs, reverse=True)):
        grid = [(n, b) for n in ns for b in bs
                if best is None or _bound(num_steps, L, n_c, n) >= best.bound - 1e-12]
        pruned += len(ns) * len(bs) - len(grid)
        progress.set_postfix_str(f"N_c={n_c}", refresh=True)
        progress.update(len(ns) * len(bs) - len(grid))  # pruned settings count as done
        if not grid:
            continue
        schedules = [DeltaDiTPolicy(interval=n, boundary=b).plan(num_steps, Cuts(L, n_c)) for n, b in grid]
        for (n, b), schedule, x in zip(grid, schedules, sample_many(stepper, schedules, inputs, scheduler_config)):
            p = per_sample_psnr(x, reference, pixel_space)
            setting = Setting(n, n_c, b, schedule.block_runs, schedule.bound, float(np.min(p)), float(np.mean(p)))
            sweep.append(setting)
            if setting.psnr_min >= psnr_budget and (best is None or _rank(setting) < _rank(best)):
                best = setting
        progress.update(len(grid))
        if log is not None:
            log(f"calibration: N_c={n_c}: {len(grid)} settings ({k + 1}/{len(ncs)}, {watch.seconds:.0f} s)")
    progress.close()
    passing = [s for s in sweep if s.psnr_min >= psnr_budget]
    took = watch.stop()
    result = CalibrationResult(psnr_budget, num_steps, L, min(passing, key=_rank) if passing else None, sweep,
                               inputs.description, inputs.guidance, seed, took.seconds, pruned, took.load_before,
                               took.load_after)
    if result.chosen is None:
        best = max(sweep, key=lambda s: (s.psnr_min, s.bound))
        raise CalibrationError(
            f"no setting of the sweep keeps the worst per-sample PSNR ≥ {psnr_budget:g} dB against full compute "
            f"(best: N={best.interval}, N_c={best.cached_blocks}, b={best.boundary} at {_db(best.psnr_min)} dB); "
            "lower --psnr-budget, or export without --calibrate")
    return result


# ================================================================ the export's side


def scheduler_config_for(spec, source) -> dict:
    """The sampler config the runtime will use with this export: the shipped ``scheduler/`` of a bundled
    model (the exporter copies it next to the engines), else the runtime's default."""
    from runtime.sampling import default_scheduler

    root = _bundled_root(spec, source)

    class _R:
        pass

    r = _R()
    r.root = root
    return dict(default_scheduler(r).config)


def _bundled_root(spec, source) -> Path | None:
    if not spec.bundled:
        return None
    if source.kind == "bundled":
        return Path(source.path).parent
    from .models import PACKAGE_WEIGHTS

    return PACKAGE_WEIGHTS / spec.bundled


def calibrate_export_options(options, *, psnr_budget: float = DEFAULT_PSNR_BUDGET, num_prompts: int = DEFAULT_PROMPTS,
                             log: Callable[[str], None] | None = None):
    """Run the calibration for an export and return ``(options with the chosen N_c/N/b and the calibration
    record, CalibrationResult)``. Values the user set explicitly (``--cached-blocks``, ``--interval``,
    ``--boundary``) are kept and only the others are swept."""
    from .export_options import OptionError, resolve
    from .model_weights import build_model

    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise OptionError(f"--calibrate-prompts={num_prompts!r} is out of range: expected an integer ≥ 1")
    if not isinstance(psnr_budget, (int, float)) or math.isnan(psnr_budget):
        raise OptionError(f"--psnr-budget={psnr_budget!r} must be a number of dB")
    job = resolve(options)
    torch.set_grad_enabled(False)
    model = build_model(job.spec, job.source, job.config)
    root = _bundled_root(job.spec, job.source)
    inputs = calibration_inputs(job.spec, model, num_prompts, guidance=model_guidance(job.spec.name),
                                text_encoder_dir=root / "text_encoder" if root else None)
    T = job.schedule["num_steps"]
    try:
        result = calibrate(
            model, inputs, scheduler_config_for(job.spec, job.source), num_steps=T, psnr_budget=float(psnr_budget),
            intervals=(options.interval,) if options.interval is not None else DEFAULT_INTERVALS,
            cached_blocks=(options.cached_blocks,) if options.cached_blocks is not None else None,
            boundaries=(options.boundary,) if options.boundary is not None else None,
            pixel_space=job.spec.vae_scale_factor == 1, log=log)
    except CalibrationError as exc:
        raise OptionError(str(exc)) from None
    c = result.chosen
    new = dataclasses.replace(options, cached_blocks=c.cached_blocks, interval=c.interval, boundary=c.boundary,
                              calibration=json.loads(json.dumps(result.to_dict())))
    return new, result
