"""The denoising loop for services: conditioning tensors in, latents out.

No diffusers pipeline is needed: only a diffusers *scheduler* (DPM-Solver++, 20 steps by default),
imported when a generation runs. Classifier-free guidance runs the unconditional and conditional
halves as one batch of 2B, in diffusers' order ([uncond; cond]); deltas are kept per row, so
guidance needs no special case in the cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .executor import DeltaDiTRuntime, InputError
from .generation import Generation
from .schedule import Schedule


def default_scheduler(runtime: DeltaDiTRuntime):
    """DPM-Solver++ with the noise schedule shipped next to the engines, else the PixArt/DiT default."""
    from diffusers import DPMSolverMultistepScheduler

    root = runtime.root
    config_path = root / "scheduler" / "scheduler_config.json" if root is not None else None
    if config_path is not None and config_path.is_file():
        return DPMSolverMultistepScheduler.from_config(json.loads(config_path.read_text()))
    # PixArt-α and DiT-XL/2 were trained with 1000 linear betas from 1e-4 to 2e-2, epsilon prediction.
    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                       beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2)


@dataclass
class GenerationResult:
    latents: torch.Tensor
    generation: Generation
    timesteps: list[float] = field(default_factory=list)


def generate(
    runtime: DeltaDiTRuntime,
    *,
    prompt_embeds: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    negative_embeds: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    num_steps: int | None = None,
    policy: str | Schedule = "delta-dit",
    scheduler=None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    profile: bool = False,
    step_callback=None,
) -> GenerationResult:
    """Run a whole generation; returns the final latents (the transformer's input space).

    PixArt: ``prompt_embeds`` [B, S, C] (and ``prompt_mask`` [B, S]); the unconditional half is
    ``negative_embeds`` (zeros when not given, i.e. an empty caption). DiT: ``class_labels`` [B];
    the unconditional half uses the null class. ``guidance_scale <= 1`` turns guidance off; ``None`` is the
    model's default, recorded in the manifest (``conditioning.guidance_scale``).
    """
    m = runtime.manifest
    if guidance_scale is None:
        guidance_scale = m.default_guidance
    kind = m.conditioning["kind"]
    if kind == "caption":
        if prompt_embeds is None:
            raise InputError("this model is caption-conditioned: pass prompt_embeds [B, tokens, channels]")
        batch = prompt_embeds.shape[0]
    else:
        if class_labels is None:
            raise InputError("this model is class-conditioned: pass class_labels [B]")
        batch = class_labels.shape[0]
    guided = guidance_scale > 1.0
    rows = 2 * batch if guided else batch
    schedule = policy if isinstance(policy, Schedule) else runtime.schedule(policy, num_steps=num_steps)
    num_steps = schedule.num_steps
    gen = runtime.new_generation(rows, schedule, profile=profile)
    scheduler = scheduler if scheduler is not None else default_scheduler(runtime)
    scheduler.set_timesteps(num_steps)
    if len(scheduler.timesteps) != num_steps:
        raise InputError(f"the scheduler gives {len(scheduler.timesteps)} timesteps for {num_steps} steps; "
                         "the Δ-DiT schedule needs one transformer call per step")
    channels, height, width = m.sample_shape
    if latents is None:
        latents = torch.randn((batch, channels, height, width), generator=generator, dtype=torch.float32)
    # Latents stay on the engines' device for the whole loop (the scheduler math runs there too).
    latents = latents.to(runtime.device, torch.float32) * scheduler.init_noise_sigma

    cond: dict[str, torch.Tensor] = {}
    if kind == "caption":
        mask = prompt_mask if prompt_mask is not None else torch.ones(prompt_embeds.shape[:2])
        if guided:
            neg = negative_embeds if negative_embeds is not None else torch.zeros_like(prompt_embeds)
            neg_mask = negative_mask if negative_mask is not None else torch.ones_like(mask)
            cond["encoder_hidden_states"] = torch.cat([neg, prompt_embeds])
            cond["encoder_attention_mask"] = torch.cat([neg_mask.to(mask.dtype), mask])
        else:
            cond["encoder_hidden_states"] = prompt_embeds
            cond["encoder_attention_mask"] = mask
        if m.conditioning.get("micro_conditions"):
            vae = m.export.get("vae_scale_factor", 8)
            size = torch.tensor([[height * vae, width * vae]], dtype=torch.float32).repeat(rows, 1)
            cond["resolution"] = size
            cond["aspect_ratio"] = torch.tensor([[height / width]], dtype=torch.float32).repeat(rows, 1)
    else:
        labels = class_labels.to(torch.int64)
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, int(m.conditioning.get("null_class", 1000)))])
        cond["class_labels"] = labels
    cond = runtime.prepare_inputs(cond | {"sample": torch.zeros(rows, channels, height, width),
                                          "timestep": torch.zeros(rows)}, rows)

    timesteps = []
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        step_inputs = dict(cond)
        step_inputs["sample"] = model_in.to(runtime.device, runtime.dtype)
        step_inputs["timestep"] = torch.full((rows,), float(t), device=runtime.device, dtype=runtime.dtype)
        out = runtime.step(gen, step_inputs).float()
        if guided:
            uncond, text = out.chunk(2)
            out = uncond + guidance_scale * (text - uncond)
        if m.out_channels // 2 == channels:  # learned sigma: keep the noise prediction only
            out = out[:, :channels]
        latents = scheduler.step(out, t, latents, return_dict=False)[0]
        timesteps.append(float(t))
        if step_callback is not None:
            step_callback(gen.step_index - 1, latents)
    return GenerationResult(latents, gen, timesteps)
