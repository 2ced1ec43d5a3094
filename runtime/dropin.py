"""A drop-in for ``pipe.transformer`` in diffusers' PixArtAlphaPipeline and DiTPipeline.

    from runtime import DeltaDiTRuntime, install
    install(pipe, DeltaDiTRuntime("engines/pixart-alpha-512-fp32"), policy="delta-dit")
    image = pipe(...).images[0]

The pipelines call the transformer once per step and never say when a generation starts, so the
drop-in must know it, and how many steps it has (the Δ-DiT schedule depends on T). ``install`` binds
the drop-in to the pipeline: a call starts a fresh generation, sized to the scheduler's timesteps,
whenever any of these says so:

- the scheduler's ``set_timesteps`` ran (``install`` hooks it, keeping its signature, so diffusers'
  ``retrieve_timesteps`` still accepts custom ``timesteps=`` / ``sigmas=``);
- ``pipe.scheduler`` is another object than at the last call, or its ``timesteps`` are a new
  tensor (``pipe.scheduler = X.from_config(pipe.scheduler.config)`` after ``install``, or a
  ``set_timesteps`` on a scheduler the hook never saw);
- the timestep did not decrease (the sampler went back to the start); a repeat is accepted only
  where the scheduler's own timesteps repeat (Heun-type second-order steps).

Without ``install`` (``pipe.transformer = DeltaDiTTransformer(...)``) the drop-in cannot see the
scheduler, so it does not know a call's step count: it refuses to run (a clear error) unless the
caller announces every generation with ``begin_generation(num_steps)`` (for hand-written loops).
State is per thread, so two threads driving one drop-in never mix deltas; share the runtime between
pipelines and give each pipeline its own ``install``.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

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


class DropInError(RuntimeError):
    """The drop-in cannot tell how many steps a generation has; the message says how to fix the call."""


class _ThreadState(threading.local):
    generation: Generation | None = None
    last_timestep: float | None = None
    restart: bool = False  # the next call starts a new generation (set_timesteps hook, begin_generation)
    planned_steps: int | None = None  # from begin_generation(num_steps), for the next generation only
    scheduler: Any = None  # the scheduler (and its timesteps tensor) the current generation follows
    timesteps: Any = None


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
        self._pipe: Callable[[], Any] | None = None  # weak reference to the pipeline install() bound us to

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
        """Forget the current generation: the next call starts a fresh one.

        ``num_steps``: its number of steps, needed when the drop-in is not installed (a hand-written loop
        that assigned ``pipe.transformer`` itself); installed, the scheduler's timesteps decide.
        """
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise DropInError(f"begin_generation(num_steps={num_steps!r}): expected a positive integer")
        st = self._state
        st.generation = None
        st.last_timestep = None
        st.restart = True
        st.planned_steps = num_steps

    @property
    def pipeline(self):
        """The pipeline ``install`` bound this drop-in to (None when it was assigned without install)."""
        return self._pipe() if self._pipe is not None else None

    def _continues(self, gen: Generation, timestep: float, scheduler, timesteps) -> bool:
        """Whether this call is the next step of the current generation."""
        st = self._state
        if gen is None or gen.done or st.restart:
            return False
        if scheduler is not None and (scheduler is not st.scheduler or timesteps is not st.timesteps):
            return False
        last = st.last_timestep
        if last is None or timestep < last:
            return True
        # A repeated timestep continues only where the scheduler's own sequence repeats (second-order steps).
        return (timestep == last and st.timesteps is not None and gen.step_index < len(st.timesteps)
                and float(st.timesteps[gen.step_index]) == timestep)

    def _generation_for(self, batch: int, timestep: float) -> Generation:
        st = self._state
        pipe = self.pipeline
        scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None
        timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
        gen = st.generation
        if not self._continues(gen, timestep, scheduler, timesteps) or gen.batch_size != batch:
            if scheduler is not None and scheduler is not st.scheduler:
                _hook_scheduler(scheduler, self)  # a scheduler swapped in after install: hook it too
            if st.planned_steps is not None:  # begin_generation(num_steps): the caller said so
                num_steps = st.planned_steps
            elif timesteps is not None and len(timesteps) > 0:
                num_steps = len(timesteps)
            else:
                raise DropInError(
                    "DeltaDiTTransformer does not know how many steps this generation has (the Δ-DiT schedule "
                    "depends on it), because it was assigned to pipe.transformer without install(). Use "
                    "runtime.install(pipe, runtime, policy=...) instead, or call "
                    "transformer.begin_generation(num_inference_steps) before each pipeline call")
            schedule = self.runtime.schedule(self.policy, num_steps=num_steps, interval=self.interval,
                                             boundary=self.boundary)
            gen = st.generation = self.runtime.new_generation(batch, schedule)
            st.restart, st.planned_steps = False, None
            st.scheduler, st.timesteps = scheduler, timesteps
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


HOOK_MARK = "_deltadit_dropin"  # on the set_timesteps wrapper: the drop-in it signals (weak reference)


def _hook_scheduler(scheduler, dropin: DeltaDiTTransformer) -> None:
    """Wrap ``scheduler.set_timesteps`` so that each call starts a fresh generation of ``dropin``.

    The wrapper keeps the original's signature (``__signature__`` and ``__wrapped__``): diffusers'
    ``retrieve_timesteps`` reads ``inspect.signature(scheduler.set_timesteps)`` to decide whether custom
    ``timesteps=`` / ``sigmas=`` are accepted. Hooking again (a second install) replaces the old hook.
    """
    current = scheduler.set_timesteps
    original = getattr(current, "__wrapped__", current) if hasattr(current, HOOK_MARK) else current
    ref = weakref.ref(dropin)

    @functools.wraps(original)
    def set_timesteps(*args, **kwargs):
        result = original(*args, **kwargs)
        target = ref()
        if target is not None:
            target.begin_generation()
        return result

    set_timesteps.__signature__ = inspect.signature(original)
    setattr(set_timesteps, HOOK_MARK, ref)
    scheduler.set_timesteps = set_timesteps


def install(pipe, runtime: DeltaDiTRuntime, policy: str = "delta-dit", **schedule_options) -> DeltaDiTTransformer:
    """Put a drop-in into ``pipe.transformer``, bound to ``pipe``: each pipeline call starts fresh, with its steps."""
    dropin = DeltaDiTTransformer(runtime, policy, **schedule_options)
    dropin._pipe = weakref.ref(pipe)
    _hook_scheduler(pipe.scheduler, dropin)
    pipe.transformer = dropin
    return dropin
