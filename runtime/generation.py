"""The state of one generation: its schedule, its step counter and its delta buffers.

Deltas belong to one generation (DESIGN.md §2 "State"): every generation gets its own buffers,
allocated once for its batch size on the engines' device, so two requests in flight never read
each other's deltas and a new generation never starts from an old one's. The runtime object
itself holds no per-generation state.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from .schedule import Schedule, StepPlan


class GenerationError(RuntimeError):
    """The generation was driven wrongly (too many steps, a cached step before any full step)."""


@dataclass
class SegmentStats:
    calls: int = 0
    seconds: float = 0.0


@dataclass
class Generation:
    schedule: Schedule
    batch_size: int
    token_shape: tuple[int, int]  # (tokens, width) of the hidden states
    device: torch.device
    dtype: torch.dtype
    profile: bool = False  # time each segment call (synchronizes the device)
    step_index: int = 0
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    recorded: set[str] = field(default_factory=set)
    stats: dict[str, SegmentStats] = field(default_factory=dict)
    nan_fallbacks: list[int] = field(default_factory=list)  # steps recomputed in full after a NaN
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)  # one step at a time

    def __post_init__(self) -> None:
        shape = (self.batch_size, *self.token_shape)
        # Two token tensors per sample at most (front and rear range), allocated once.
        self.deltas = {r: torch.empty(shape, device=self.device, dtype=self.dtype) for r in self.schedule.cached_ranges}

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.deltas.values())

    @property
    def done(self) -> bool:
        return self.step_index >= self.schedule.num_steps

    def current_plan(self) -> StepPlan:
        if self.done:
            raise GenerationError(
                f"this generation's schedule has {self.schedule.num_steps} steps and all have run; start a new "
                "generation (runtime.new_generation(...)), or build the schedule for more steps"
            )
        return self.schedule.steps[self.step_index]

    def advance(self) -> None:
        self.step_index += 1

    def record(self, cache_range: str, out: torch.Tensor, inp: torch.Tensor) -> None:
        """At a full step: Δ = out − in (or the output itself in output-cache mode), in place."""
        buf = self.deltas[cache_range]
        if self.schedule.cache_mode == "delta":
            torch.sub(out, inp, out=buf)
        else:
            buf.copy_(out)
        self.recorded.add(cache_range)

    def reuse(self, cache_range: str, inp: torch.Tensor) -> torch.Tensor:
        """At a cached step: the skipped range's output = in + Δ (added in place), or the stored output."""
        if cache_range not in self.recorded:
            raise GenerationError(f"step {self.step_index} reuses the {cache_range} range but no full step has "
                                  "recorded it yet (a schedule must start with a full step)")
        if self.schedule.cache_mode == "delta":
            return inp.add_(self.deltas[cache_range])
        return self.deltas[cache_range].clone()

    def timed(self, name: str, sync) -> "_Timer":
        return _Timer(self, name, sync)


class _Timer:
    def __init__(self, gen: Generation, name: str, sync):
        self.gen, self.name, self.sync = gen, name, sync

    def __enter__(self):
        if self.gen.profile:
            self.sync()
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.gen.profile and exc[0] is None:
            self.sync()
            s = self.gen.stats.setdefault(self.name, SegmentStats())
            s.calls += 1
            s.seconds += time.perf_counter() - self.t0
        return False
