"""The rows of ``deltadit-bench``, timed by :mod:`deltadit_export.timing` with one worker process each
(so each mode's peak RSS is its own):

- ``eager``: the diffusers transformer rebuilt from what the manifest records (same weights, same dtype),
  called in a plain sampling loop under ``torch.inference_mode()`` in eval mode;
- ``torch-compile``: the same model, the whole transformer through ``torch.compile`` (TorchInductor,
  default mode), what users try first; compiled in the row's setup, before any warm-up;
- ``none``: the runtime with every step full; ``delta-dit``: the runtime with the Δ-DiT cache schedule.

All rows run the same generation (1 image, classifier-free guidance as one batch of 2, T steps of the
runtime's DPM-Solver++ scheduler, the same latents and conditioning). A peer row (another engine) is one
more setup function here returning a :class:`~deltadit_export.timing.Runner` and one line in ``bench.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .bench_baseline import eager_generate, make_scheduler, rebuild_model, reference_delta_dit
from .timing import Runner, WorkerContext

MODES = ("eager", "torch-compile", "none", "delta-dit")
RUNTIME_POLICY = {"none": "none", "delta-dit": "delta-dit"}
SEGMENT_NAMES = ("embed", "front", "middle", "rear", "head")
log = logging.getLogger("deltadit")


def eager_row(ctx: WorkerContext, engines: str, inputs: dict[str, Any], num_steps: int, interval: int, boundary: int,
              guidance_scale: float, compile: bool = False, reference: bool = False, **_) -> Runner:
    """PyTorch eager (or ``torch.compile`` of the whole transformer); with ``reference`` its ``finish`` also runs
    the independent Δ-DiT on the same model (not timed, after the peak RSS is taken)."""
    import torch

    from runtime.manifest import load_manifest

    root = Path(engines)
    manifest = load_manifest(root)
    T, N, b, g = num_steps, interval, boundary, guidance_scale
    model = rebuild_model(manifest)
    target = model
    if compile:
        target = torch.compile(model)
    make_scheduler(root)  # imports the scheduler module now, not inside the first run

    def run(i: int):
        return eager_generate(target, manifest, inputs, T, g, make_scheduler(root))

    if compile:
        log.info("torch-compile: compiling the transformer (TorchInductor) with one untimed generation")
        with torch.inference_mode():
            run(0)

    def finish(latents) -> dict[str, Any]:
        out = {"latents": latents, "block_runs": T * manifest.num_layers}
        if reference:
            log.info("eager: independent reference Δ-DiT (T=%d, N=%d, b=%d, N_c=%d)", T, N, b, manifest.cached_blocks)
            ref, runs, kinds = reference_delta_dit(model, manifest, inputs, T, N, b, g, make_scheduler(root))
            out["reference"] = {"block_runs": runs, "kinds": kinds, "latents": ref}
        return out

    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    backend = "torch.compile (TorchInductor, default mode)" if compile else "pytorch eager"
    return Runner(run, info={"backend": backend, "device": "cpu", "dtype": dtype}, finish=finish)


def runtime_row(ctx: WorkerContext, engines: str, inputs: dict[str, Any], num_steps: int, interval: int,
                boundary: int, guidance_scale: float, policy: str, backend: str = "onnxruntime",
                trust_artifacts: bool = False, verify: bool = True, **_) -> Runner:
    """The runtime with ``policy`` (none or delta-dit), per-segment times recorded for every run."""
    from runtime import DeltaDiTRuntime
    from runtime.sampling import generate

    from .timing_worker import runtime_thread_info

    root = Path(engines)
    T, N, b, g = num_steps, interval, boundary, guidance_scale
    # The thread count is an option of the CPU backend only (auto passes it on to the candidates that take it).
    options = {"threads": ctx.threads} if backend in ("auto", "onnxruntime", "openvino") else {}
    rt = DeltaDiTRuntime(root, backend=backend, trust_artifacts=trust_artifacts, verify=verify, **options)
    if rt.device.type != "cpu":
        log.warning("the runtime runs on %s but the eager baseline on the CPU: the speedups against eager are not "
                    "like for like", rt.device)
    schedule = rt.schedule(RUNTIME_POLICY[policy], num_steps=T, interval=N, boundary=b)
    cond = {k: inputs[k] for k in ("prompt_embeds", "prompt_mask", "negative_embeds", "negative_mask",
                                   "class_labels") if k in inputs}
    make_scheduler(root)

    def run(i: int):
        res = generate(rt, **cond, guidance_scale=g, policy=schedule, scheduler=make_scheduler(root),
                       latents=inputs["latents"], profile=True)
        return res

    def record(res) -> dict[str, tuple[int, float]]:
        return {n: (s.calls, s.seconds * 1e3) for n, s in res.generation.stats.items()}

    def finish(res) -> dict[str, Any]:
        return {"latents": res.latents, "cache_bytes": res.generation.cache_bytes}

    info = {"backend": rt.backend.name, "device": str(rt.device), "block_runs": schedule.block_runs,
            "bound": schedule.bound, "kinds": [s.kind for s in schedule.steps],
            "onnxruntime": runtime_thread_info(rt)}
    return Runner(run, info=info, record=record, finish=finish)
