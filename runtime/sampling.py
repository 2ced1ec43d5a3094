"""The denoising loop for services: conditioning tensors in, latents out.

No diffusers pipeline is needed: only a diffusers *scheduler* (DPM-Solver++, 20 steps by default),
imported when a generation runs. Classifier-free guidance runs the unconditional and conditional
halves as one batch of 2B, in the order of the family's diffusers pipeline (runtime/guidance.py:
PixArt [negative; positive], DiT [labels; null]); deltas are kept per row, so guidance needs no
special case in the cache.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from .executor import DeltaDiTRuntime, InputError
from .generation import Generation
from .guidance import guidance_for
from .integrity import read_companion
from .manifest import MANIFEST_NAME, load_manifest
from .schedule import Schedule


SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def default_scheduler(runtime: DeltaDiTRuntime):
    """DPM-Solver++ with the noise schedule shipped next to the engines, else the PixArt/DiT default.

    In an engine folder the config is a companion file: read only from inside the folder and, unless the
    runtime was built with ``verify=False``, only with the sha256 the manifest records.
    """
    from diffusers import DPMSolverMultistepScheduler

    root = runtime.root
    config_path = root / SCHEDULER_CONFIG if root is not None else None
    if config_path is not None and (config_path.is_file() or config_path.is_symlink()):
        manifest = getattr(runtime, "manifest", None)
        if manifest is None and (root / MANIFEST_NAME).is_file():
            manifest = load_manifest(root)
        if manifest is not None:  # an engine folder (else the package's own shipped weights)
            text = read_companion(manifest, SCHEDULER_CONFIG, verify=getattr(runtime, "verified", True)).decode()
        else:
            text = config_path.read_text()
        return DPMSolverMultistepScheduler.from_config(json.loads(text))
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

    Samples as the diffusers pipeline of the model's family does (``PixArtAlphaPipeline``, ``DiTPipeline``;
    the guided batch and the step come from :mod:`runtime.guidance`), so with ``policy="none"`` and the
    same noise and scheduler the latents equal the pipeline's.

    PixArt: ``prompt_embeds`` [B, S, C] and ``prompt_mask`` [B, S] (float, int64 or bool, as a tokenizer
    gives it; all tokens kept when omitted). With guidance (``guidance_scale > 1``) ``negative_embeds`` is
    required: the text encoder's embedding of the negative prompt (of ``""`` for none, which is what the
    pipelines encode), with its ``negative_mask`` (all tokens kept when omitted). Zeros are not the
    encoder's ``""`` embedding, so nothing is made up for a missing negative. DiT: ``class_labels`` [B];
    the unconditional half uses the null class of the manifest. ``guidance_scale <= 1`` turns guidance off;
    ``None`` is the model's default, recorded in the manifest (``conditioning.guidance_scale``).
    """
    m = runtime.manifest
    if guidance_scale is None:
        guidance_scale = m.default_guidance
    kind = m.conditioning["kind"]
    if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) \
            or not math.isfinite(guidance_scale):
        raise InputError(f"guidance_scale={guidance_scale!r} must be a finite number (> 1 turns guidance on)")
    if kind == "caption":
        if prompt_embeds is None:
            raise InputError("this model is caption-conditioned: pass prompt_embeds [B, tokens, channels]")
        batch = prompt_embeds.shape[0]
        if guidance_scale > 1.0 and negative_embeds is None:
            raise InputError(
                f"guidance_scale={guidance_scale:g} needs the unconditional half: pass negative_embeds, the text "
                "encoder's embedding of the negative prompt (of \"\" for none, as the diffusers pipelines do; zeros "
                "are not that embedding), or guidance_scale=1 to sample without guidance")
    else:
        if class_labels is None:
            raise InputError("this model is class-conditioned: pass class_labels [B]")
        batch = class_labels.shape[0]
    guide = guidance_for(m, guidance_scale)
    rows = guide.rows(batch)
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
        # Tokenizers give int64 (or bool) masks; the engines take the 1/0 mask as floats.
        mask = prompt_mask.to(torch.float32) if prompt_mask is not None else torch.ones(prompt_embeds.shape[:2])
        neg_mask = None
        if guide.guided:
            neg_mask = (negative_mask.to(torch.float32) if negative_mask is not None
                        else torch.ones(negative_embeds.shape[:2]))
        cond["encoder_hidden_states"] = guide.batch(prompt_embeds, negative_embeds)
        cond["encoder_attention_mask"] = guide.batch(mask, neg_mask)
        if m.conditioning.get("micro_conditions"):
            vae = m.export.get("vae_scale_factor", 8)
            size = torch.tensor([[height * vae, width * vae]], dtype=torch.float32).repeat(rows, 1)
            cond["resolution"] = size
            cond["aspect_ratio"] = torch.tensor([[height / width]], dtype=torch.float32).repeat(rows, 1)
    else:
        labels = class_labels.to(torch.int64)
        cond["class_labels"] = guide.batch(labels, torch.full_like(labels, runtime.null_class))
    cond = runtime.prepare_inputs(cond | {"sample": torch.zeros(rows, channels, height, width),
                                          "timestep": torch.zeros(rows)}, rows)

    timesteps = []
    state = guide.start(latents, scheduler)
    step_kwargs = guide.step_kwargs(scheduler, generator)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(guide.model_input(state), t)
        step_inputs = dict(cond)
        step_inputs["sample"] = model_in.to(runtime.device, runtime.dtype)
        step_inputs["timestep"] = torch.full((rows,), float(t), device=runtime.device, dtype=runtime.dtype)
        out = runtime.step(gen, step_inputs).float()
        state = guide.step(scheduler, out, t, state, num_steps=num_steps, **step_kwargs)
        timesteps.append(float(t))
        if step_callback is not None:
            step_callback(gen.step_index - 1, guide.result(state))
    return GenerationResult(guide.result(state), gen, timesteps)
