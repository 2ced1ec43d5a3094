"""The rows of ``deltadit-bench``, timed by :mod:`deltadit_export.timing` in worker processes:

- the **peers**, what a user has without deltadit (PyTorch, on the diffusers transformer rebuilt from what
  the manifest records, same weights, eval mode, ``torch.inference_mode()``):
  ``eager`` (fp32, the export's dtype), ``eager-bf16`` (the same model after ``model.to(torch.bfloat16)``,
  the way a CPU user casts a diffusers model; timesteps stay float32 as the diffusers pipelines pass them,
  the sampler runs in fp32), ``torch-compile`` (the whole transformer through ``torch.compile``,
  TorchInductor default mode, compiled in the row's setup, before any warm-up);
- the **runtime** with ``none`` (every step full) and ``delta-dit`` (the Δ-DiT cache schedule) on three
  engine sets: the export's own (``none``, ``delta-dit``; ``--backend``), its int8 export
  (``int8-none``, ``int8-delta-dit``: ONNX Runtime, int8 segments), and its fp32 ONNX compiled by OpenVINO
  (``openvino-none``, ``openvino-delta-dit``: bf16 arithmetic where the CPU has bf16 instructions).

Each PyTorch row has its own worker process; the two rows of one engine set share one (their setups share
the loaded runtime through ``WorkerContext.shared``), so each engine set's weights are held once: at full
width (611M parameters, ~2.5 GB fp32 per copy) the whole table is six copies, not nine.

Two timing units: a whole **generation** (1 image, classifier-free guidance as one batch of 2, T steps of
the runtime's DPM-Solver++ scheduler, the same latents and conditioning), or with ``per_call`` one
**guided transformer call** (batch 2) on the step-0 inputs: a delta-dit row then runs one cycle of its
three kinds of call (a full step, a cache-rear step, a cache-front step, each timed and recorded) and its
per-call figure is the mean over the schedule, ``(F·full + C_rear·rear + C_front·front) / T``
(:func:`per_step_ms`).

A new row is one more setup function here returning a :class:`~deltadit_export.timing.Runner` and one
line in ``bench.bench_rows``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .bench_baseline import eager_generate, make_scheduler, reference_delta_dit
from .rebuild import rebuild_model
from .timing import Runner, WorkerContext

MODES = ("eager", "eager-bf16", "torch-compile", "none", "delta-dit", "int8-none", "int8-delta-dit",
         "openvino-none", "openvino-delta-dit")
DEFAULT_MODES = ("eager", "torch-compile", "none", "delta-dit")
PEERS = ("eager", "eager-bf16", "torch-compile")  # the rows without deltadit: "the best peer" is the fastest
# runtime mode -> (engine set, policy)
RUNTIME_MODES = {"none": ("fp32", "none"), "delta-dit": ("fp32", "delta-dit"),
                 "int8-none": ("int8", "none"), "int8-delta-dit": ("int8", "delta-dit"),
                 "openvino-none": ("openvino", "none"), "openvino-delta-dit": ("openvino", "delta-dit")}
LABELS = {
    "eager": "PyTorch eager fp32", "eager-bf16": "PyTorch eager bf16 (model.to(torch.bfloat16))",
    "torch-compile": "torch.compile (TorchInductor, default mode)",
    "none": "runtime, export's engines, none", "delta-dit": "runtime, export's engines, delta-dit",
    "int8-none": "runtime, int8 engines (ONNX Runtime), none",
    "int8-delta-dit": "runtime, int8 engines (ONNX Runtime), delta-dit",
    "openvino-none": "runtime, OpenVINO (bf16 where the CPU has it), none",
    "openvino-delta-dit": "runtime, OpenVINO (bf16 where the CPU has it), delta-dit",
}
SEGMENT_NAMES = ("embed", "front", "middle", "rear", "head")
CALL_KINDS = ("full", "cache-rear", "cache-front")  # one per-call cycle of a delta-dit row, in this order
log = logging.getLogger("deltadit")


def call_feeds(manifest, root: Path, inputs: dict[str, Any], guidance_scale: float,
               num_steps: int) -> list[dict[str, Any]]:
    """Named inputs of three guided transformer calls (batch 2, fp32) at the first three timesteps of a
    ``num_steps`` schedule, on the step-0 model input: what the per-call rows run (the eager rows the first)."""
    import torch

    from runtime.guidance import guidance_for

    from .bench_baseline import guided_conditioning

    guide = guidance_for(manifest, guidance_scale)
    cond = guided_conditioning(manifest, inputs, torch.float32, guide)
    scheduler = make_scheduler(root)
    scheduler.set_timesteps(max(3, num_steps))
    state = guide.start(inputs["latents"].to(torch.float32) * scheduler.init_noise_sigma, scheduler)
    sample = scheduler.scale_model_input(guide.model_input(state), scheduler.timesteps[0])
    return [{"sample": sample, "timestep": torch.full((len(sample),), float(t), dtype=torch.float32), **cond}
            for t in scheduler.timesteps[:3]]


def per_step_ms(kinds: list[str], record: dict[str, float]) -> float:
    """The mean ms per step of a schedule with these step ``kinds``, from one cycle's ms per kind of call."""
    return sum(record[k] for k in kinds) / len(kinds)


def eager_row(ctx: WorkerContext, engines: str, inputs: dict[str, Any], num_steps: int, interval: int, boundary: int,
              guidance_scale: float, compile: bool = False, reference: bool = False, dtype: str = "float32",
              per_call: bool = False, feeds: list[dict[str, Any]] | None = None, weights: str | None = None,
              **_) -> Runner:
    """PyTorch eager (``dtype`` bfloat16: the model cast with ``model.to``; ``compile``: ``torch.compile`` of the
    whole transformer). With ``reference`` its ``finish`` also runs the independent Δ-DiT on the same model
    (not timed, after the peak RSS is taken). ``weights``: the user's --weights DIR (rebuild.py)."""
    import torch

    from runtime.manifest import load_manifest

    from .split import diffusers_forward

    root = Path(engines)
    manifest = load_manifest(root)
    T, N, b, g = num_steps, interval, boundary, guidance_scale
    model = rebuild_model(manifest, weights, as_exported=True)  # weights: --weights DIR (rebuild.py)
    if dtype != "float32":
        # What a CPU user does with a diffusers model. diffusers warns about "modules that should be kept in
        # float32: []" on every cast, also when the list is empty (PixArt, DiT): noise here.
        quiet_cast = logging.getLogger("diffusers.models.modeling_utils")
        level = quiet_cast.level
        quiet_cast.setLevel(logging.ERROR)
        try:
            model = model.to(getattr(torch, dtype))
        finally:
            quiet_cast.setLevel(level)
    target = torch.compile(model) if compile else model
    make_scheduler(root)  # imports the scheduler module now, not inside the first run
    model_dtype = next(model.parameters()).dtype

    if per_call:
        keep_fp32 = {"timestep"} if model_dtype == torch.bfloat16 else set()  # as eager_generate feeds them
        call = {k: v.to(model_dtype) if v.is_floating_point() and k not in keep_fp32 else v
                for k, v in feeds[0].items()}

        def run(i: int):
            return diffusers_forward(target, call).float()
    else:
        def run(i: int):
            return eager_generate(target, manifest, inputs, T, g, make_scheduler(root))

    if compile:
        log.info("torch-compile: compiling the transformer (TorchInductor) with one untimed %s",
                 "call" if per_call else "generation")
        with torch.inference_mode():
            run(0)

    def finish(latents) -> dict[str, Any]:
        out = {"latents": latents, "block_runs": T * manifest.num_layers}
        if reference and not per_call:
            log.info("eager: independent reference Δ-DiT (T=%d, N=%d, b=%d, N_c=%d)", T, N, b, manifest.cached_blocks)
            ref, runs, kinds = reference_delta_dit(model, manifest, inputs, T, N, b, g, make_scheduler(root))
            out["reference"] = {"block_runs": runs, "kinds": kinds, "latents": ref}
        return out

    backend = "torch.compile (TorchInductor, default mode)" if compile else "pytorch eager"
    return Runner(run, info={"backend": backend, "device": "cpu", "dtype": str(model_dtype).replace("torch.", "")},
                  finish=finish)


def _runtime(ctx: WorkerContext, engines: str, backend: str, trust_artifacts: bool, backend_options: dict[str, Any],
             verify: bool = True):
    """The runtime of these engines in this worker: built once, shared by the rows of the worker."""
    from runtime import DeltaDiTRuntime

    key = repr((engines, backend, trust_artifacts, verify, sorted(backend_options.items())))
    if key not in ctx.shared:
        # The thread count is an option of the CPU backends only (auto passes it on to the candidates that take it).
        options = dict(backend_options)
        if backend in ("auto", "onnxruntime", "openvino"):
            options["threads"] = ctx.threads
        ctx.shared[key] = DeltaDiTRuntime(engines, backend=backend, trust_artifacts=trust_artifacts, verify=verify,
                                          **options)
    return ctx.shared[key]


def runtime_row(ctx: WorkerContext, engines: str, inputs: dict[str, Any], num_steps: int, interval: int,
                boundary: int, guidance_scale: float, policy: str, backend: str = "onnxruntime",
                trust_artifacts: bool = False, backend_options: dict[str, Any] | None = None, per_call: bool = False,
                feeds: list[dict[str, Any]] | None = None, verify: bool = True, **_) -> Runner:
    """The runtime with ``policy`` (none or delta-dit), per-segment times (or, per call, the time of each kind of
    call) recorded for every run."""
    from runtime.sampling import generate

    from .timing_worker import runtime_thread_info

    root = Path(engines)
    T, N, b, g = num_steps, interval, boundary, guidance_scale
    rt = _runtime(ctx, engines, backend, trust_artifacts, backend_options or {}, verify)
    if rt.device.type != "cpu":
        log.warning("the runtime runs on %s but the eager baseline on the CPU: the speedups against eager are not "
                    "like for like", rt.device)
    schedule = rt.schedule(policy, num_steps=T, interval=N, boundary=b)
    info = {"backend": rt.backend.name, "device": str(rt.device), "block_runs": schedule.block_runs,
            "bound": schedule.bound, "kinds": [s.kind for s in schedule.steps],
            "onnxruntime": runtime_thread_info(rt), "precision": rt.manifest.precision,
            "segment_precision": {s.name: s.precision for s in rt.manifest.segments}}
    note = getattr(rt.backend, "precision_note", None)
    if note:
        info["precision_note"] = note
    if per_call:
        return _per_call_runner(rt, policy, feeds, info)
    cond = {k: inputs[k] for k in ("prompt_embeds", "prompt_mask", "negative_embeds", "negative_mask",
                                   "class_labels") if k in inputs}
    make_scheduler(root)

    def run(i: int):
        return generate(rt, **cond, guidance_scale=g, policy=schedule, scheduler=make_scheduler(root),
                        latents=inputs["latents"], profile=True)

    def record(res) -> dict[str, tuple[int, float]]:
        return {n: (s.calls, s.seconds * 1e3) for n, s in res.generation.stats.items()}

    def finish(res) -> dict[str, Any]:
        return {"latents": res.latents, "cache_bytes": res.generation.cache_bytes}

    return Runner(run, info=info, record=record, finish=finish)


def _per_call_runner(rt, policy: str, feeds: list[dict[str, Any]], info: dict[str, Any]) -> Runner:
    """One guided call (none), or one cycle full → cache-rear → cache-front (delta-dit: a 3-step Δ-DiT schedule
    with N=3, b=2 has exactly these plans), each call timed; the output of the full call is the row's result."""
    kinds = CALL_KINDS if policy == "delta-dit" else CALL_KINDS[:1]
    cycle = rt.schedule(policy, num_steps=len(kinds), interval=3, boundary=2)
    assert [s.kind for s in cycle.steps] == list(kinds), cycle.steps
    batch = int(feeds[0]["sample"].shape[0])
    cache_bytes = []

    def run(i: int):
        generation = rt.new_generation(batch, cycle)
        cache_bytes[:] = [generation.cache_bytes]
        times, first = {}, None
        for kind, call in zip(kinds, feeds):
            t0 = time.perf_counter()
            out = rt.step(generation, call)
            times[kind] = (time.perf_counter() - t0) * 1e3
            first = out if first is None else first
        return first, times

    def finish(res) -> dict[str, Any]:
        return {"latents": res[0], "cache_bytes": cache_bytes[0] if cache_bytes else 0}

    return Runner(run, info=info, record=lambda res: {"calls_ms": res[1]}, finish=finish)
