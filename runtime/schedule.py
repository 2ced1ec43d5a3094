"""The Δ-DiT cache schedule as pure data.

A *policy* (a small frozen object) turns (T steps, L blocks) into a :class:`Schedule`: one
:class:`StepPlan` per denoising step saying which block segments run, which cached range is
skipped (and its stored delta applied), and which deltas are recorded. The runtime only
executes plans; it never decides anything about caching itself, so a person can print the
exact plan a generation will follow (``python -m runtime schedule ...``).

Segment math (DESIGN.md §2): with N_c cached blocks out of L, the cut points are
``a = min(N_c, L - N_c)`` and ``c = max(N_c, L - N_c)``; the segments are
front = blocks [0, a), middle = [a, c), rear = [c, L). The *front range* (cached in the detail
phase) is blocks [0, N_c); the *rear range* (cached in the outline phase) is [L - N_c, L). Each
range is a run of consecutive segments, so skipping a range means skipping whole engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SEGMENT_ORDER = ("front", "middle", "rear")
CACHE_RANGES = ("front", "rear")
CACHE_MODES = ("delta", "output")
# The longest schedule built: no diffusion sampler uses more than 1000 steps (DDPM), and a plan is built
# step by step, so an unbounded T (10**9 from a hostile manifest or a typo) would hang instead of failing.
MAX_STEPS = 10_000
STEPS_HINT = " (longer schedules are refused: no sampler uses more than 1000 steps)"


class ScheduleError(ValueError):
    """A schedule parameter is out of range; the message names it and its valid range."""


def _check_int(name: str, value: object, low: int, high: int | None, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScheduleError(f"{name} must be an integer, got {value!r}{hint}")
    if value < low or (high is not None and value > high):
        bound = f"{low} ≤ {name}" + (f" ≤ {high}" if high is not None else "")
        raise ScheduleError(f"{name}={value} is out of range: expected {bound}{hint}")
    return value


def default_cached_blocks(num_layers: int) -> int:
    """Default N_c: 21 of 28 blocks (the paper's PixArt setting), i.e. round(0.75·L), kept in 1..L-1."""
    _check_int("num_layers", num_layers, 2, None)
    return min(max(round(0.75 * num_layers), 1), num_layers - 1)


@dataclass(frozen=True)
class SegmentRange:
    """A block segment: blocks [start, end) (0-based) run by one engine."""

    name: str
    start: int
    end: int

    @property
    def num_blocks(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Cuts:
    """Cut points of L blocks for N_c cached blocks, and the segments and cache ranges they define."""

    num_layers: int
    cached_blocks: int

    def __post_init__(self) -> None:
        _check_int("num_layers", self.num_layers, 2, None)
        _check_int(
            "cached_blocks",
            self.cached_blocks,
            1,
            self.num_layers - 1,
            f" (N_c must leave at least one block uncached; L={self.num_layers})",
        )

    @property
    def a(self) -> int:
        return min(self.cached_blocks, self.num_layers - self.cached_blocks)

    @property
    def c(self) -> int:
        return max(self.cached_blocks, self.num_layers - self.cached_blocks)

    @property
    def segments(self) -> tuple[SegmentRange, ...]:
        """front, middle, rear in order; an empty middle (N_c = L/2) is omitted."""
        bounds = {"front": (0, self.a), "middle": (self.a, self.c), "rear": (self.c, self.num_layers)}
        return tuple(SegmentRange(n, *bounds[n]) for n in SEGMENT_ORDER if bounds[n][1] > bounds[n][0])

    def range_bounds(self, cache_range: str) -> tuple[int, int]:
        """Block interval [start, end) of the front range [0, N_c) or the rear range [L-N_c, L)."""
        if cache_range == "front":
            return 0, self.cached_blocks
        if cache_range == "rear":
            return self.num_layers - self.cached_blocks, self.num_layers
        raise ScheduleError(f"unknown cache range {cache_range!r}: expected one of {CACHE_RANGES}")

    def range_segments(self, cache_range: str) -> tuple[str, ...]:
        start, end = self.range_bounds(cache_range)
        return tuple(s.name for s in self.segments if s.start >= start and s.end <= end)


@dataclass(frozen=True)
class StepPlan:
    """What the runtime does at one denoising step.

    ``actions`` is the ordered list of what happens to the hidden tokens between embed and head:
    ``("run", segment)`` runs that segment's engine, ``("reuse", range)`` skips the cached range
    and takes its output as (input of the range) + stored delta (or, in output mode, the stored
    output). ``record`` names the ranges whose delta is stored at the end of the step.
    """

    index: int
    kind: str  # "full", "cache-front" or "cache-rear"
    actions: tuple[tuple[str, str], ...]
    record: tuple[str, ...]
    block_runs: int

    @property
    def segments_run(self) -> tuple[str, ...]:
        return tuple(name for verb, name in self.actions if verb == "run")

    @property
    def reused(self) -> str | None:
        return next((name for verb, name in self.actions if verb == "reuse"), None)


@dataclass(frozen=True)
class Schedule:
    """A per-step plan for one generation, plus the numbers a person wants to see."""

    policy: str
    num_steps: int
    cuts: Cuts
    interval: int
    boundary: int
    cache_mode: str
    steps: tuple[StepPlan, ...] = field(repr=False)

    @property
    def num_layers(self) -> int:
        return self.cuts.num_layers

    @property
    def cached_blocks(self) -> int:
        return self.cuts.cached_blocks

    @property
    def block_runs(self) -> int:
        return sum(s.block_runs for s in self.steps)

    @property
    def bound(self) -> float:
        """Ideal speedup of the block work over running every block at every step."""
        return self.num_steps * self.num_layers / self.block_runs

    @property
    def cached_ranges(self) -> tuple[str, ...]:
        """Ranges whose deltas this schedule ever records (the runtime allocates buffers for these)."""
        return tuple(r for r in CACHE_RANGES if any(r in s.record for s in self.steps))

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "num_steps": self.num_steps,
            "num_layers": self.num_layers,
            "cached_blocks": self.cached_blocks,
            "interval": self.interval,
            "boundary": self.boundary,
            "cache_mode": self.cache_mode,
            "cuts": {"a": self.cuts.a, "c": self.cuts.c},
            "block_runs": self.block_runs,
            "bound": round(self.bound, 4),
        }

    def format(self) -> str:
        """A table a person can read: one row per step."""
        segs = ", ".join(f"{s.name}=[{s.start},{s.end})" for s in self.cuts.segments)
        lines = [
            f"policy {self.policy}: T={self.num_steps} N={self.interval} N_c={self.cached_blocks} "
            f"b={self.boundary} L={self.num_layers} mode={self.cache_mode}",
            f"segments: {segs}",
            f"{'step':>4}  {'kind':<11}  {'actions':<40}  {'record':<12}  {'blocks':>6}",
        ]
        for s in self.steps:
            acts = " ".join(f"{v}:{n}" for v, n in s.actions)
            lines.append(
                f"{s.index:>4}  {s.kind:<11}  {acts:<40}  {','.join(s.record) or '-':<12}  {s.block_runs:>6}"
            )
        full = self.num_steps * self.num_layers
        lines.append(
            f"block-runs {self.block_runs} of {full}; ideal speedup bound {self.bound:.3f}x"
        )
        return "\n".join(lines)


def _full_step(index: int, cuts: Cuts, record: tuple[str, ...]) -> StepPlan:
    return StepPlan(
        index=index,
        kind="full",
        actions=tuple(("run", s.name) for s in cuts.segments),
        record=record,
        block_runs=cuts.num_layers,
    )


def _cached_step(index: int, cuts: Cuts, cache_range: str) -> StepPlan:
    skipped = set(cuts.range_segments(cache_range))
    actions: list[tuple[str, str]] = []
    for seg in cuts.segments:
        if seg.name not in skipped:
            actions.append(("run", seg.name))
        elif ("reuse", cache_range) not in actions:
            actions.append(("reuse", cache_range))
    return StepPlan(
        index=index,
        kind=f"cache-{cache_range}",
        actions=tuple(actions),
        record=(),
        block_runs=cuts.num_layers - cuts.cached_blocks,
    )


@dataclass(frozen=True)
class NoCachePolicy:
    """Every step runs every block (the reference the cache is measured against)."""

    name: str = "none"

    def plan(self, num_steps: int, cuts: Cuts) -> Schedule:
        _check_int("num_steps", num_steps, 1, MAX_STEPS, STEPS_HINT)
        steps = tuple(_full_step(i, cuts, ()) for i in range(num_steps))
        return Schedule(self.name, num_steps, cuts, 1, num_steps, "delta", steps)


@dataclass(frozen=True)
class DeltaDiTPolicy:
    """Δ-DiT: full step every ``interval`` steps; before ``boundary`` cache the rear range, after it the front.

    ``boundary=None`` means the model's default from the manifest. ``boundary = 0`` caches only the
    front (``delta-front``), ``boundary = T`` only the rear (``delta-rear``). ``cache_mode="output"``
    stores the range's output instead of its deviation (a FORA-like output cache, for comparison).
    """

    interval: int = 2
    boundary: int | None = None
    cache_mode: str = "delta"
    name: str = "delta-dit"

    def plan(self, num_steps: int, cuts: Cuts) -> Schedule:
        _check_int("num_steps", num_steps, 1, MAX_STEPS, STEPS_HINT)
        _check_int("interval", self.interval, 1, None, " (the cache interval N: a full step every N steps)")
        if self.boundary is None:
            raise ScheduleError("boundary is not set: pass boundary=b with 0 ≤ b ≤ num_steps")
        _check_int("boundary", self.boundary, 0, num_steps, f" (the boundary step b, with T={num_steps})")
        if self.cache_mode not in CACHE_MODES:
            raise ScheduleError(f"cache_mode={self.cache_mode!r} is not one of {CACHE_MODES}")
        # Record only what a later cached step will read: with b = 0 the rear delta is never used.
        used = {("rear" if i < self.boundary else "front") for i in range(num_steps) if i % self.interval}
        steps = []
        for i in range(num_steps):
            if i % self.interval == 0:
                steps.append(_full_step(i, cuts, tuple(r for r in CACHE_RANGES if r in used)))
            else:
                steps.append(_cached_step(i, cuts, "rear" if i < self.boundary else "front"))
        return Schedule(self.name, num_steps, cuts, self.interval, self.boundary, self.cache_mode, tuple(steps))


POLICY_NAMES = ("none", "delta-dit", "delta-front", "delta-rear", "output-cache")


def make_policy(name: str, *, interval: int = 2, boundary: int | None = None, num_steps: int | None = None):
    """Build a named policy. ``delta-front``/``delta-rear`` are Δ-DiT with b=0 / b=T."""
    if name == "none":
        return NoCachePolicy()
    if name == "delta-dit":
        return DeltaDiTPolicy(interval=interval, boundary=boundary)
    if name == "delta-front":
        return DeltaDiTPolicy(interval=interval, boundary=0, name=name)
    if name == "delta-rear":
        if num_steps is None:
            raise ScheduleError("delta-rear needs num_steps (it caches the rear range at every cached step)")
        return DeltaDiTPolicy(interval=interval, boundary=num_steps, name=name)
    if name == "output-cache":
        return DeltaDiTPolicy(interval=interval, boundary=boundary, cache_mode="output", name=name)
    raise ScheduleError(f"unknown policy {name!r}: expected one of {', '.join(POLICY_NAMES)}")


def build_schedule(
    policy: str,
    *,
    num_steps: int,
    num_layers: int,
    cached_blocks: int,
    interval: int = 2,
    boundary: int | None = None,
) -> Schedule:
    """The one entry point: (policy, T, L, N_c, N, b) -> Schedule."""
    cuts = Cuts(num_layers, cached_blocks)
    return make_policy(name=policy, interval=interval, boundary=boundary, num_steps=num_steps).plan(num_steps, cuts)


def scaled_boundary(boundary: int, for_steps: int, num_steps: int) -> int:
    """A default boundary given for ``for_steps`` steps, moved to ``num_steps``: b/T is kept (12/20 → 0.6·T)."""
    return boundary if num_steps == for_steps else round(boundary * num_steps / for_steps)


def bound(num_steps: int, num_layers: int, cached_blocks: int, interval: int) -> float:
    """The ideal speedup T·L / (F·L + C·(L−N_c)) of DESIGN.md §2."""
    full = len(range(0, num_steps, interval))
    cached = num_steps - full
    return num_steps * num_layers / (full * num_layers + cached * (num_layers - cached_blocks))
