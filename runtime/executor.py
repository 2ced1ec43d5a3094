"""DeltaDiTRuntime: load the engines a manifest names and execute one step plan per transformer call.

The runtime object is shared and stateless between calls (engines are read-only once loaded);
everything that belongs to one generation lives in its :class:`~runtime.generation.Generation`.
So one runtime serves many generations at once, from many threads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .backends import Backend, BackendError, make_backend
from .generation import Generation, GenerationError
from .integrity import (check_companion_paths, check_onnx_external_data, check_segment_paths, verify_companion_files,
                        verify_segment_files)
from .manifest import Manifest, ManifestError, TensorSpec, load_manifest
from .schedule import Cuts, Schedule, StepPlan, build_schedule, scaled_boundary

NAN_POLICIES = ("error", "fallback", "off")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32}


class InputError(ValueError):
    """A runtime input has the wrong name, shape, dtype or batch; the message names it, expected and given."""


class NonFiniteError(RuntimeError):
    """NaN or Inf appeared in a segment's output; the message names the step and the segment."""


@dataclass(frozen=True)
class ModelInput:
    spec: TensorSpec
    optional: bool  # filled by the runtime when absent (the caption mask: all tokens kept)


class DeltaDiTRuntime:
    """Runs an exported model. ``verify`` checks every file's sha256 before loading (``False`` skips it).

    ``trust_artifacts``: allow backends whose artifacts can run code when loaded (torch.export ``.pt2``
    programs unpickle, TensorRT plans are native code); without it they are refused, and ``auto`` skips them.
    Whatever the options, nothing is read from outside the folder, and no ONNX graph whose external data
    points anywhere but its hashed weight files is handed to an engine library.
    """

    def __init__(self, folder: str | os.PathLike | Manifest, backend: str | Backend = "auto", *,
                 verify: bool = True, nan_policy: str = "error", trust_artifacts: bool = False, **backend_options):
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy={nan_policy!r} is not one of {NAN_POLICIES}: 'error' (raise "
                             "NonFiniteError), 'fallback' (recompute a cached step in full), 'off' (no check)")
        self.manifest = folder if isinstance(folder, Manifest) else load_manifest(folder)
        check_segment_paths(self.manifest)
        check_companion_paths(self.manifest)
        self.verified = bool(verify)  # companion files read later (the sampler config) are checked likewise
        if verify:
            verify_segment_files(self.manifest)
            verify_companion_files(self.manifest)
        self.trust_artifacts = trust_artifacts  # what the user opted into (runtimes opened alongside reuse it)
        self.backend = (make_backend(backend, manifest=self.manifest, trust_artifacts=trust_artifacts,
                                     **backend_options) if isinstance(backend, str) else backend)
        if getattr(self.backend, "reads_onnx", True):  # every graph, before the first engine is created
            check_onnx_external_data(self.manifest)
        self.nan_policy = nan_policy
        self.engines = {s.name: self._load(s) for s in self.manifest.segments}
        self.cuts = Cuts(self.manifest.num_layers, self.manifest.cached_blocks)
        self.device = self.backend.device
        self.dtype = self.backend.dtype
        hidden = next(t for t in self.manifest.segment("embed").outputs if t.name == "hidden")  # validated
        self.token_shape = (int(hidden.shape[1]), int(hidden.shape[2]))
        self.model_inputs = self._model_inputs()

    def _load(self, segment) -> object:
        try:
            return self.backend.load(self.manifest, segment)
        except (BackendError, ManifestError):
            raise
        except Exception as exc:  # a backend bug or an unexpected library error: still name the file
            raise BackendError(
                f"segment {segment.name!r}: {self.manifest.root / segment.file if self.manifest.root else segment.file}"
                f" could not be loaded by the {getattr(self.backend, 'name', 'engine')} backend "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                "re-export with `deltadit-export ... --force`"
            ) from exc

    # ------------------------------------------------------------ description

    @property
    def root(self) -> Path | None:
        return self.manifest.root

    def _model_inputs(self) -> dict[str, ModelInput]:
        """Inputs of the whole model: what segments read that no earlier segment produces."""
        produced = {"hidden"}
        found: dict[str, ModelInput] = {}
        for seg in self.manifest.segments:
            for t in seg.inputs:
                if t.name not in produced and t.name not in found:
                    found[t.name] = ModelInput(t, optional=t.name == "encoder_attention_mask")
            produced.update(t.name for t in seg.outputs)
        return found

    def schedule(self, policy: str = "delta-dit", *, num_steps: int | None = None, interval: int | None = None,
                 boundary: int | None = None) -> Schedule:
        """A schedule for this model; unset values come from the manifest's default schedule."""
        d = self.manifest.schedule
        num_steps = num_steps if num_steps is not None else d["num_steps"]
        if boundary is None:
            # The default boundary scales with T: b/T of the manifest's default (12/20 → 0.6·T).
            boundary = scaled_boundary(d["boundary"], d["num_steps"], num_steps)
        return build_schedule(policy, num_steps=num_steps, num_layers=self.cuts.num_layers,
                              cached_blocks=self.cuts.cached_blocks,
                              interval=interval if interval is not None else d["interval"], boundary=boundary)

    def new_generation(self, batch_size: int, schedule: Schedule | None = None, *, profile: bool = False) -> Generation:
        """Fresh state (delta buffers) for one generation of ``batch_size`` rows (2× images with guidance)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= self.manifest.max_batch:
            raise InputError(f"batch size {batch_size!r} is out of range: the engines were exported for 1.."
                             f"{self.manifest.max_batch} rows (with classifier-free guidance a generation runs 2 rows "
                             "per image); pass fewer images, or re-export with a larger --max-batch")
        schedule = schedule or self.schedule()
        if schedule.cuts != self.cuts:
            raise InputError(f"the schedule is for N_c={schedule.cached_blocks}, L={schedule.num_layers}, but the "
                             f"engines were cut for N_c={self.cuts.cached_blocks}, L={self.cuts.num_layers}")
        return Generation(schedule, batch_size, self.token_shape, self.device, self.dtype, profile=profile)

    # ------------------------------------------------------------ inputs

    def prepare_inputs(self, inputs: dict[str, torch.Tensor], batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """Check names, shapes, dtypes and batch; cast floats to the engine dtype and move to the device."""
        if not isinstance(inputs, Mapping):
            raise InputError(f"inputs must be a dict of name -> torch.Tensor, got {type(inputs).__name__}; this "
                             f"model takes {sorted(self.model_inputs)}")
        unknown = sorted(map(repr, set(inputs) - set(self.model_inputs)))
        if unknown:
            raise InputError(f"unknown input(s) {', '.join(unknown)}: this model takes {sorted(self.model_inputs)}")
        feeds: dict[str, torch.Tensor] = {}
        batch = batch_size
        if batch is None and isinstance(inputs.get("sample"), torch.Tensor) and inputs["sample"].ndim:
            batch = int(inputs["sample"].shape[0])  # the latents say the batch; the others must agree
        for name, mi in self.model_inputs.items():
            value = inputs.get(name)
            if value is None:
                if mi.optional:
                    continue
                raise InputError(f"missing input {name!r} (shape {list(mi.spec.shape)}, {mi.spec.dtype})")
            if not isinstance(value, torch.Tensor):
                raise InputError(f"input {name!r} must be a torch.Tensor of shape {list(mi.spec.shape)} "
                                 f"({mi.spec.dtype}), got {type(value).__name__}")
            value = value.detach()  # engines take plain data (a tensor that requires grad cannot be exported)
            if value.ndim == 0 and name == "timestep":
                value = value.reshape(1)
            if batch is None:
                batch = int(value.shape[0]) if value.ndim else 0
            expected = mi.spec.concrete_shape(batch)
            if tuple(value.shape) != expected:
                raise InputError(f"input {name!r} has shape {list(value.shape)}, expected {list(expected)} "
                                 f"(batch {batch}; {list(mi.spec.shape)} in the manifest)")
            want = TORCH_DTYPES[mi.spec.dtype]
            if want.is_floating_point:
                # Timesteps may come as integers (diffusers schedulers) and the caption mask as a tokenizer
                # gives it (int64 or bool 1/0); anything else must be floating.
                integral_ok = (name == "timestep" and value.dtype != torch.bool) or name == "encoder_attention_mask"
                if not (value.dtype.is_floating_point or (integral_ok and not value.dtype.is_complex)):
                    raise InputError(f"input {name!r} has dtype {value.dtype}, expected a floating dtype "
                                     f"(the engines take {mi.spec.dtype})")
                want = self.dtype
            elif value.dtype.is_floating_point or value.dtype == torch.bool or value.dtype.is_complex:
                raise InputError(f"input {name!r} has dtype {value.dtype}, expected an integer dtype ({mi.spec.dtype})")
            if name == "class_labels" and value.numel():
                self._check_labels(value)
            feeds[name] = value.to(device=self.device, dtype=want)
        if batch is None or not 1 <= batch <= self.manifest.max_batch:
            raise InputError(f"batch {batch} is out of range: the engines were exported for 1..{self.manifest.max_batch}"
                             " (re-export with a larger --max-batch)")
        if "encoder_attention_mask" in self.model_inputs and "encoder_attention_mask" not in feeds:
            spec = self.model_inputs["encoder_attention_mask"].spec
            feeds["encoder_attention_mask"] = torch.ones(spec.concrete_shape(batch), device=self.device,
                                                         dtype=self.dtype)
        return feeds

    @property
    def null_class(self) -> int | None:
        """The unconditional class id of a class-conditioned model (from the manifest), else None."""
        cond = self.manifest.conditioning
        return int(cond["null_class"]) if cond.get("kind") == "class" else None

    def _check_labels(self, labels: torch.Tensor) -> None:
        """Class ids index an embedding table: out of range they crash the engine or, negative, wrap silently."""
        classes, null = int(self.manifest.conditioning["num_classes"]), self.null_class
        bad = (labels < 0) | ((labels >= classes) & (labels != null))
        if bool(bad.any()):
            value = int(labels[bad].flatten()[0])
            raise InputError(f"input 'class_labels' holds {value}, out of range: expected class ids "
                             f"0..{classes - 1}, or {null} for the unconditional (null) class")

    # ------------------------------------------------------------ execution

    def step(self, generation: Generation, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One transformer call at the generation's current step; returns the model output and advances."""
        if not isinstance(generation, Generation):
            raise InputError(f"step() needs a Generation from runtime.new_generation(...), got "
                             f"{type(generation).__name__}")
        if generation.schedule.cuts != self.cuts or tuple(generation.token_shape) != self.token_shape:
            raise InputError("this generation was made by another runtime (other engines): start it with "
                             "this runtime's new_generation(...)")
        feeds = self.prepare_inputs(inputs, generation.batch_size)
        if not generation.lock.acquire(blocking=False):
            raise GenerationError("this generation is already running a step in another thread: one generation "
                                  "is one sequence of steps; give each thread its own new_generation(...)")
        try:
            plan = generation.current_plan()
            try:
                out = self._execute(generation, plan, feeds)
            except NonFiniteError:
                if self.nan_policy != "fallback" or plan.kind == "full":
                    raise
                # Recompute this step in full; it records fresh deltas, replacing a corrupted one.
                generation.nan_fallbacks.append(plan.index)
                out = self._execute(generation, self._full_plan(generation, plan.index), feeds)
            generation.advance()
        finally:
            generation.lock.release()
        return out

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One full-compute call (no cache), e.g. for parity checks."""
        if not isinstance(inputs, Mapping) or not isinstance(inputs.get("sample"), torch.Tensor) \
                or inputs["sample"].ndim == 0:
            raise InputError(f"forward() needs a dict with a 'sample' tensor [batch, ...]; this model takes "
                             f"{sorted(self.model_inputs)}")
        gen = self.new_generation(int(inputs["sample"].shape[0]), self.schedule("none", num_steps=1))
        return self.step(gen, inputs)

    def _full_plan(self, generation: Generation, index: int) -> StepPlan:
        return StepPlan(index, "full", tuple(("run", s.name) for s in self.cuts.segments),
                        generation.schedule.cached_ranges, self.cuts.num_layers)

    def _run(self, generation: Generation, name: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            with generation.timed(name, self.backend.synchronize):
                return self.engines[name].run(feeds)
        except (BackendError, NonFiniteError, InputError):
            raise
        except Exception as exc:  # the engine library's own error names an op, not where we are: add it
            raise BackendError(
                f"segment {name!r} failed at step {generation.step_index} ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}); the engine file may not "
                "match the manifest: re-export with `deltadit-export ... --force`"
            ) from exc

    def _check_finite(self, checks: list, name: str, tensor: torch.Tensor) -> None:
        """Queue a NaN/Inf check. The flags stay on the device until the end of the step, where one
        synchronization reads them all: no host round trip between segments on a GPU."""
        if self.nan_policy != "off" and tensor.is_floating_point():
            checks.append((name, torch.isfinite(tensor).all()))

    def _raise_if_nonfinite(self, checks: list, generation: Generation, plan: StepPlan) -> None:
        if not checks or bool(torch.stack([flag for _, flag in checks]).all()):
            return
        name = next(name for name, flag in checks if not bool(flag))  # the first, in execution order
        if name.startswith("input "):
            raise NonFiniteError(
                f"{name} holds NaN/Inf at step {generation.step_index}: the engines would turn it into NaN output. "
                "Fix the caller's tensor (a NaN latent usually comes from the sampler or a fp16 overflow upstream)"
            )
        fix = ("nan_policy='fallback' recomputes cached steps in full" if plan.kind != "full" else
               "a full step cannot fall back")
        raise NonFiniteError(
            f"NaN/Inf in the output of segment {name!r} at step {plan.index} ({plan.kind}); check the inputs "
            f"for extreme values and the weights for corruption (re-export from good weights); {fix}"
        )

    def _execute(self, generation: Generation, plan: StepPlan, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        checks: list = []
        for name, value in feeds.items():
            self._check_finite(checks, f"input {name!r}", value)
        env = dict(feeds)
        embedded = self._run(generation, "embed", env)
        for value in embedded.values():  # hidden tokens and the conditioning the blocks read
            self._check_finite(checks, "embed", value)
        env.update(embedded)
        segments = {s.name: s for s in self.cuts.segments}
        hidden = env["hidden"]
        at: dict[int, torch.Tensor] = {0: hidden}  # hidden tokens at block boundaries
        for verb, name in plan.actions:
            if verb == "run":
                hidden = self._run(generation, name, {**env, "hidden": hidden})["hidden_out"]
                self._check_finite(checks, name, hidden)
                at[segments[name].end] = hidden
            else:
                start, end = self.cuts.range_bounds(name)
                hidden = generation.reuse(name, at[start])
                # A NaN here came from the stored delta (the range's input is checked where it was made).
                self._check_finite(checks, f"{name} range (cached: input + delta stored at a full step)", hidden)
                at[end] = hidden
        out = self._run(generation, "head", {**env, "hidden": hidden})["out"]
        self._check_finite(checks, "head", out)
        # Checked before recording: a NaN step must not leave its values in the delta buffers.
        self._raise_if_nonfinite(checks, generation, plan)
        for cache_range in plan.record:
            start, end = self.cuts.range_bounds(cache_range)
            generation.record(cache_range, at[end], at[start])
        return out


__all__ = ["DeltaDiTRuntime", "InputError", "NonFiniteError", "BackendError", "ManifestError"]
