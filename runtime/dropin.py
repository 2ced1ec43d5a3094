"""A drop-in for ``pipe.transformer`` in diffusers' PixArtAlphaPipeline and DiTPipeline.

    from runtime import DeltaDiTRuntime, install
    install(pipe, DeltaDiTRuntime("engines/pixart-alpha-512-fp32"), policy="delta-dit")
    image = pipe(...).images[0]

The pipelines call the transformer once per step and never say when a generation starts, so the
drop-in must know it. ``install`` hooks ``pipe.scheduler.set_timesteps`` (called once at the start of
every pipeline call): each call starts a fresh generation whose schedule has exactly that many steps.
Without the hook (``pipe.transformer = DeltaDiTTransformer(...)``), a new generation starts when the
timestep does not decrease (the sampler went back to the start) or the schedule is exhausted.
State is per thread, so two threads driving two pipelines that share one drop-in never mix deltas.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from .executor import DeltaDiTRuntime
from .generation import Generation


class ModelConfig(dict):
    """The diffusers config the pipelines read (``transformer.config.sample_size``), attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class TransformerOutput:
    sample: torch.Tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.sample,)[index]


class _ThreadState(threading.local):
    generation: Generation | None = None
    last_timestep: float | None = None
    planned_steps: int | None = None  # set by the set_timesteps hook


class DeltaDiTTransformer(torch.nn.Module):
    """Same call signature and the attributes the pipelines read; runs the engines with a cache policy."""

    def __init__(self, runtime: DeltaDiTRuntime, policy: str = "delta-dit", *, interval: int | None = None,
                 boundary: int | None = None):
        super().__init__()
        self.runtime = runtime
        self.policy = policy
        self.interval = interval
        self.boundary = boundary
        self.runtime.schedule(policy, interval=interval, boundary=boundary)  # validate now, not mid-pipeline
        self.config = ModelConfig(runtime.manifest.model["config"])
        self.family = runtime.manifest.model["family"]
        self.out_channels = runtime.manifest.out_channels
        self._state = _ThreadState()

    # What pipelines read besides config.
    @property
    def dtype(self) -> torch.dtype:
        # What the drop-in takes and returns: pipelines keep latents in fp32 even when engines are fp16.
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def generation(self) -> Generation | None:
        """The current thread's generation (its step index, stats and cache size)."""
        return self._state.generation

    def begin_generation(self, num_steps: int | None = None) -> None:
        """Forget the current generation; the next call starts a fresh one with ``num_steps`` steps."""
        self._state.generation = None
        self._state.last_timestep = None
        self._state.planned_steps = num_steps

    def _generation_for(self, batch: int, timestep: float) -> Generation:
        st = self._state
        gen = st.generation
        fresh = (
            gen is None
            or gen.done
            or gen.batch_size != batch
            or (st.planned_steps is None and st.last_timestep is not None and timestep >= st.last_timestep)
        )
        if fresh:
            schedule = self.runtime.schedule(self.policy, num_steps=st.planned_steps, interval=self.interval,
                                             boundary=self.boundary)
            gen = st.generation = self.runtime.new_generation(batch, schedule)
        st.last_timestep = timestep
        return gen

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, added_cond_kwargs: dict | None = None,
                cross_attention_kwargs: dict | None = None, attention_mask: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        batch = hidden_states.shape[0]
        t = torch.as_tensor(timestep).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        inputs: dict[str, torch.Tensor] = {"sample": hidden_states, "timestep": t.to(torch.float32)}
        if self.family == "pixart":
            inputs["encoder_hidden_states"] = encoder_hidden_states
            if encoder_attention_mask is not None:
                mask = encoder_attention_mask
                if mask.ndim == 3:  # already a bias [B, 1, S] (0 keep, -10000 drop): back to a 1/0 mask
                    mask = (mask[:, 0] > -1).to(torch.float32)
                inputs["encoder_attention_mask"] = mask.to(torch.float32)
            for key in ("resolution", "aspect_ratio"):
                if (added_cond_kwargs or {}).get(key) is not None and key in self.runtime.model_inputs:
                    inputs[key] = added_cond_kwargs[key].reshape(batch, -1)
        else:
            inputs["class_labels"] = class_labels.reshape(-1).to(torch.int64)
        gen = self._generation_for(batch, float(t[0]))
        out = self.runtime.step(gen, inputs).to(device=hidden_states.device, dtype=hidden_states.dtype)
        return TransformerOutput(out) if return_dict else (out,)


def install(pipe, runtime: DeltaDiTRuntime, policy: str = "delta-dit", **schedule_options) -> DeltaDiTTransformer:
    """Put a drop-in into ``pipe.transformer`` and hook the scheduler so each pipeline call starts fresh."""
    dropin = DeltaDiTTransformer(runtime, policy, **schedule_options)
    scheduler = pipe.scheduler
    original = scheduler.set_timesteps

    def set_timesteps(num_inference_steps=None, *args, **kwargs):
        result = original(num_inference_steps, *args, **kwargs)
        dropin.begin_generation(len(scheduler.timesteps))
        return result

    scheduler.set_timesteps = set_timesteps
    pipe.transformer = dropin
    return dropin
