"""The calibration's sampler: the Δ-DiT schedule run on the diffusers modules, block by block, with the
runtime's guided sampling loop, and the per-sample PSNR the sweep judges settings by.

``BlockStepper`` runs one transformer call of a :class:`~runtime.schedule.StepPlan` exactly as
``runtime.executor`` does with engines (embed → blocks, run or skipped and replaced by input + stored delta →
head), on ``split.py``'s modules, so every N_c is available without re-cutting anything; a block can be
swapped for another callable of the same signature (``calibration_int8.py``'s ONNX Runtime int8 blocks).
``sample_many`` runs several schedules of the same cuts sharing their common prefix of step plans.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from runtime.schedule import Cuts, Schedule, StepPlan

from .models import DEFAULT_GUIDANCE


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

    def with_blocks(self, replacements: dict[int, Callable]) -> "BlockStepper":
        """A stepper sharing this one's modules, with block ``k`` replaced by ``replacements[k]`` (a callable of
        the block's signature, e.g. an int8 ONNX Runtime block)."""
        other = copy.copy(self)
        other.blocks = [replacements.get(k, b) for k, b in enumerate(self.blocks)]
        return other

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
