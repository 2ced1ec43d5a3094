"""Classifier-free guidance as diffusers' pipelines do it: the one definition of the guided batch per family.

Which half of the guided batch is the unconditional one differs by family in diffusers, and at guidance 1
a wrong order is invisible, so every sampler of this project (``runtime.generate``, the exporter's eager
baseline and Δ-DiT reference, calibration, eval) takes the order and the step from here:

- **PixArt** (``PixArtAlphaPipeline``): caption rows ``[negative; positive]``; ``uncond, text = out.chunk(2)``;
  guidance on every output channel, then the learned-sigma half is dropped; the scheduler steps the B
  latents, with the pipeline's ``generator`` and ``eta`` where the scheduler's ``step`` takes them, after
  ``set_begin_index(0)``; with one step the pipeline keeps the scheduler's second output (the denoised
  sample) where there is one.
- **DiT** (``DiTPipeline``): class labels ``[labels; null]``; ``cond, uncond = split(eps)`` on the noise
  channels only (the variance channels pass through); both halves get the guided noise, the scheduler
  steps the doubled latents ``[x; x]`` (no generator) and the first half is the result.

The unconditional (null) class of DiT is the extra row of its label embedding, index ``num_classes``
(:func:`null_class`); ``DiTPipeline`` hard-codes 1000, which is the same for ImageNet's 1000 classes.

One difference is deliberate: ``DiTPipeline`` does not scale its initial noise by the scheduler's
``init_noise_sigma``; the samplers here always do (as PixArt's pipeline does). For the schedulers DiT
ships with (DPM-Solver, DDIM, DDPM: ``init_noise_sigma == 1``) that is the same thing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

FAMILIES = ("pixart", "dit")


def null_class(num_classes: int) -> int:
    """DiT's unconditional class id: its label embedding has ``num_classes + 1`` rows, the last for "no class"."""
    return int(num_classes)


@dataclass(frozen=True)
class Guidance:
    """The guided batch and the scheduler step of one family's diffusers pipeline.

    ``family``: "pixart" or "dit" (the manifest's ``model.family``); ``scale``: the guidance scale (> 1 runs
    the doubled batch); ``latent_channels``: channels of the latents; ``out_channels``: of the model output
    (2× the latent channels when the model learns its variance).

    A sampling loop keeps a *state* (the latents, doubled for guided DiT) and per step calls
    ``scheduler.scale_model_input(guide.model_input(state), t)``, runs the model on the conditioning
    ``guide.batch(cond, uncond)``, then ``state = guide.step(scheduler, out, t, state)``; ``guide.result(state)``
    gives the B latents.
    """

    family: str
    scale: float
    latent_channels: int
    out_channels: int

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}: expected one of {FAMILIES}")

    @property
    def guided(self) -> bool:
        return self.scale > 1.0  # both pipelines: guidance is on when guidance_scale > 1

    def rows(self, batch: int) -> int:
        """Rows per transformer call for ``batch`` images."""
        return 2 * batch if self.guided else batch

    def batch(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """The conditioning rows of one transformer call, in the family's order (``uncond`` unused unguided)."""
        if not self.guided:
            return cond
        if uncond is None:
            raise ValueError("guidance needs the unconditional rows")
        if self.family == "pixart":
            return torch.cat([uncond.to(cond.dtype), cond])
        return torch.cat([cond, uncond.to(cond.dtype)])

    def start(self, latents: torch.Tensor, scheduler=None) -> torch.Tensor:
        """The loop's state from the initial latents (already scaled by ``init_noise_sigma``)."""
        if self.family == "pixart" and scheduler is not None and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        if self.family == "dit" and self.guided:
            return torch.cat([latents, latents])
        return latents

    def model_input(self, state: torch.Tensor) -> torch.Tensor:
        """The transformer's latent input (before ``scale_model_input``)."""
        if not self.guided:
            return state
        if self.family == "pixart":
            return torch.cat([state, state])
        half = state[: len(state) // 2]
        return torch.cat([half, half])

    def noise_prediction(self, out: torch.Tensor) -> torch.Tensor:
        """The model output the scheduler steps with: guided, learned-sigma channels dropped."""
        c = self.latent_channels
        if self.family == "pixart":
            if self.guided:
                uncond, text = out.chunk(2)
                out = uncond + self.scale * (text - uncond)
        elif self.guided:
            eps, rest = out[:, :c], out[:, c:]
            cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
            half = uncond + self.scale * (cond - uncond)
            out = torch.cat([torch.cat([half, half], dim=0), rest], dim=1)
        if self.out_channels // 2 == c:  # learned sigma: keep the noise prediction
            out = out[:, :c]
        return out

    def step_kwargs(self, scheduler, generator: torch.Generator | None = None, eta: float = 0.0) -> dict:
        """Extra ``scheduler.step`` arguments the family's pipeline passes (PixArt: eta, generator)."""
        if self.family != "pixart":
            return {}
        params = inspect.signature(scheduler.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def step(self, scheduler, out: torch.Tensor, t, state: torch.Tensor, *, num_steps: int | None = None,
             **step_kwargs) -> torch.Tensor:
        """One scheduler step on the state, from the raw model output of the guided batch."""
        result = scheduler.step(self.noise_prediction(out), t, state, **step_kwargs, return_dict=False)
        if self.family == "pixart" and num_steps == 1 and len(result) > 1:
            return result[1]  # PixArtAlphaPipeline: a one-step sample is the scheduler's denoised output
        return result[0]

    def result(self, state: torch.Tensor) -> torch.Tensor:
        """The B latents of the state."""
        if self.family == "dit" and self.guided:
            return state[: len(state) // 2]
        return state


def guidance_for(manifest, scale: float) -> Guidance:
    """The :class:`Guidance` of an export (its family, latent and output channels) at ``scale``."""
    return Guidance(str(manifest.model["family"]), float(scale), int(manifest.sample_shape[0]),
                    int(manifest.out_channels))
