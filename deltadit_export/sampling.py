"""Prompts in, samples out: the sampling loops shared by ``deltadit-generate``, ``deltadit-eval`` and the
benchmarks' PyTorch baselines, on the runtime and on the diffusers model in PyTorch eager.

Both loops sample the same way (the export's DPM-Solver++ config, the same noise scaling, classifier-free
guidance as one batch ``[uncond; cond]``, timesteps as float32), so their samples differ only by float
error; diffusers cache hooks on the eager model get a fresh state per generation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import click
import torch

from .console import log
from .models import DEFAULT_GUIDANCE


# ---------------------------------------------------------------- export side: configs, encoder, model, noise


def stale_extras(manifest) -> list[str]:
    """Config files of the shipped model's ``text_encoder/`` and ``scheduler/`` that differ from (or are missing
    in) the copies next to the engines. The export's reuse check hashes the transformer weights only, so an
    updated scheduler config alone does not trigger a re-export: callers warn or re-export with ``force``."""
    from .models import PACKAGE_WEIGHTS, REGISTRY

    spec = REGISTRY.get(manifest.model.get("name"))
    if spec is None or not spec.bundled or manifest.root is None:
        return []
    src = PACKAGE_WEIGHTS / spec.bundled
    out = []
    for sub in ("text_encoder", "scheduler"):
        for f in sorted((src / sub).glob("*.json")) if (src / sub).is_dir() else []:
            copy = manifest.root / sub / f.name
            if not copy.is_file() or copy.read_bytes() != f.read_bytes():
                out.append(f"{sub}/{f.name}")
    return out


def default_guidance(manifest) -> float:
    """The model's default guidance scale as the manifest records it (what ``runtime.generate`` uses). Exports
    made before the manifest recorded it get the registry's value (``models.model_guidance``, the same source
    the exporter records), with a warning to re-export."""
    if "guidance_scale" in manifest.conditioning:
        return manifest.default_guidance
    from .models import model_guidance

    value = model_guidance(manifest.model.get("name", ""))
    log.warning("%s predates the recorded guidance default (conditioning.guidance_scale): using %s's %g; "
                "re-export (deltadit-export ... --force) so that runtime.generate uses it too",
                manifest.root, manifest.model.get("name"), value)
    return value


def load_text_encoder(manifest, warn: Callable[[str], None] | None = None):
    """The caption encoder shipped next to the engines (``text_encoder/config.json``).

    Falls back to a fresh ``HashedWordEncoder`` of the engines' caption shape when the folder has none
    (e.g. an export of an untrained stand-in model); ``warn`` is told so.
    """
    from runtime.text_encoder import HashedWordEncoder, HashedWordEncoderConfig

    cond = manifest.conditioning
    if cond.get("kind") != "caption":
        raise click.ClickException(f"{manifest.model['name']} is not caption-conditioned; deltadit-generate takes "
                                   "prompts (pixart-digits)")
    sub = cond.get("text_encoder")
    if sub and manifest.root is not None and (manifest.root / sub / "config.json").is_file():
        return HashedWordEncoder.load(manifest.root / sub)
    encoder = HashedWordEncoder(HashedWordEncoderConfig(dim=int(cond["channels"]), max_tokens=int(cond["tokens"])))
    if warn is not None:
        warn(f"no text_encoder/ next to the engines in {manifest.root}: using {encoder!r}; prompts mean nothing to a "
             "model that was not trained with it")
    return encoder


def encode_prompts(encoder, prompts: Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
    states, mask = encoder.encode(list(prompts))
    return torch.from_numpy(states), torch.from_numpy(mask)


def scheduler_config_of(manifest) -> dict:
    """The DPM-Solver++ config the runtime samples with (shipped ``scheduler/`` or the runtime default)."""
    from runtime.sampling import default_scheduler

    class _Root:  # default_scheduler only reads ``.root``
        root = manifest.root

    return dict(default_scheduler(_Root()).config)


def make_scheduler(config: dict):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config)


def rebuild_torch_model(manifest):
    """The diffusers model the export came from, fp32 eval mode, from what the manifest records."""
    from .model_weights import WeightsSource, build_model
    from .models import get_spec

    src = dict(manifest.model["source"])
    source = WeightsSource(**src)
    return build_model(get_spec(manifest.model["name"]), source, manifest.model["config"])


def initial_noise(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise of ``count`` samples from one ``torch.Generator(seed)``, in order: sample i always gets the same noise."""
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


# ---------------------------------------------------------------- sampling (runtime and PyTorch eager)


def runtime_generate(runtime, policy, embeds: torch.Tensor, mask: torch.Tensor, negative: tuple[torch.Tensor, torch.Tensor],
                     noise: torch.Tensor, *, guidance_scale: float | None = None, num_steps: int | None = None,
                     chunk: int | None = None, desc: str | None = None) -> torch.Tensor:
    """Final samples of the runtime for one conditioning row per noise row, in chunks the engines accept.
    ``guidance_scale`` None: the model's default (the manifest's); ``desc``: show a progress bar over the chunks."""
    from runtime.sampling import generate

    from .console import bar

    if guidance_scale is None:
        guidance_scale = runtime.manifest.default_guidance

    per_row = 2 if guidance_scale > 1.0 else 1
    chunk = chunk or max(1, runtime.manifest.max_batch // per_row)
    neg_e, neg_m = negative
    out = []
    starts = range(0, len(noise), chunk)
    for i in bar(starts, desc=desc, unit="batch") if desc else starts:
        n = len(noise[i:i + chunk])
        res = generate(runtime, prompt_embeds=embeds[i:i + n], prompt_mask=mask[i:i + n],
                       negative_embeds=neg_e.expand(n, -1, -1), negative_mask=neg_m.expand(n, -1),
                       guidance_scale=guidance_scale, policy=policy, num_steps=num_steps, latents=noise[i:i + n])
        out.append(res.latents)
    return torch.cat(out)


def has_cache_hooks(model) -> bool:
    """Whether any diffusers hook is registered on ``model`` or a submodule."""
    return any(hasattr(mod, "_diffusers_hook") for mod in model.modules())


@contextmanager
def cache_context(model, name: str, **fields):
    """diffusers' per-call cache context (what ``CacheMixin.cache_context`` does; PixArt lacks the mixin).

    Also publishes the current timestep as ``model.current_timestep`` for hooks that take a
    ``current_timestep_callback`` (Pyramid Attention Broadcast, FasterCache).
    """
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    model.current_timestep = fields.get("timestep")
    _set_cache_context(model, CacheContext(name, **fields))
    try:
        yield
    finally:
        _set_cache_context(model, None)


def reset_cache_hooks(model) -> None:
    """Forget every diffusers cache hook's state: a new generation must not start from an old one's cache."""
    from diffusers.hooks import HookRegistry

    if has_cache_hooks(model):
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)


def _call(model, x, t, states, mask):
    return model(x, encoder_hidden_states=states, timestep=t, encoder_attention_mask=mask,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


@torch.no_grad()
def torch_generate(model, scheduler_config: dict, embeds: torch.Tensor, mask: torch.Tensor,
                   negative: tuple[torch.Tensor, torch.Tensor], noise: torch.Tensor, *,
                   guidance_scale: float = DEFAULT_GUIDANCE, num_steps: int = 20, chunk: int | None = None,
                   forward: Callable | None = None, desc: str | None = None) -> torch.Tensor:
    """The same sampling loop as ``runtime.sampling.generate``, on the diffusers model in PyTorch eager.

    Same scheduler config, same noise scaling, guided batch (runtime/guidance.py), guidance and timesteps as
    float32 (what the engines take). diffusers cache hooks on ``model`` get a fresh state per chunk and
    one cache context per call (``"cond_uncond"``: both halves run as one batch). ``forward(x, t, states,
    mask)`` replaces the model call (calibration's Δ-DiT stepper uses it); ``desc``: a progress bar over the
    chunks. ``guidance_scale`` defaults to PixArt-α's (this loop does not know the model: callers pass the
    manifest's ``default_guidance``).
    """
    from runtime.guidance import Guidance

    from .console import bar

    chunk = chunk or len(noise)
    neg_e, neg_m = negative
    channels = noise.shape[1]
    # PixArt's guided batch and step, as PixArtAlphaPipeline (and runtime.generate) do them.
    guide = Guidance("pixart", guidance_scale, channels, int(getattr(model, "out_channels", None) or channels))
    hooked = forward is None and has_cache_hooks(model)
    out = []
    starts = range(0, len(noise), chunk)
    for i in bar(starts, desc=desc, unit="batch") if desc else starts:
        n = len(noise[i:i + chunk])
        sched = make_scheduler(scheduler_config)
        sched.set_timesteps(num_steps)
        x = guide.start(noise[i:i + n].to(torch.float32) * sched.init_noise_sigma, sched)
        states = guide.batch(embeds[i:i + n], neg_e.expand(n, -1, -1))
        m = guide.batch(mask[i:i + n], neg_m.expand(n, -1))
        rows = len(states)
        if hooked:
            reset_cache_hooks(model)
        for step, t in enumerate(sched.timesteps):
            xin = sched.scale_model_input(guide.model_input(x), t)
            tt = torch.full((rows,), float(t), dtype=torch.float32)
            if forward is not None:
                eps = forward(xin, tt, states, m)
            elif hooked:
                sigma = float(sched.sigmas[step]) if hasattr(sched, "sigmas") else None
                with cache_context(model, "cond_uncond", step_index=step, num_inference_steps=num_steps,
                                   timestep=float(t), sigma=sigma):
                    eps = _call(model, xin, tt, states, m)
            else:
                eps = _call(model, xin, tt, states, m)
            x = guide.step(sched, eps.float(), t, x, num_steps=num_steps)
        if hooked:
            reset_cache_hooks(model)
        out.append(guide.result(x))
    return torch.cat(out)
