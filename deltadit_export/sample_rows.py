"""Timing rows of ``deltadit-generate`` and ``deltadit-eval`` (see :mod:`deltadit_export.timing`): one
image per run on the runtime, or on the diffusers model in PyTorch eager (optionally with a diffusers
cache hook). Both run the sampling loops of :mod:`deltadit_export.sampling` on the same inputs.

``inputs`` is a list of one-image conditionings ``(embeds [1,S,C], mask [1,S], negative (embeds,
mask), noise [1,C,H,W])``; run ``i`` uses ``inputs[i % len(inputs)]`` (eval spreads its repeats over
several digits so that data-dependent caches are not timed on one lucky image).
"""

from __future__ import annotations

from typing import Any

from .timing import Row, Runner, WorkerContext

OneImage = tuple[Any, Any, tuple[Any, Any], Any]


def runtime_row(ctx: WorkerContext, engines: str, policy: str, num_steps: int | None, inputs: list[OneImage],
                guidance: float, trust_artifacts: bool = False, backend: str = "auto",
                backend_options: dict[str, Any] | None = None, verify: bool = True) -> Runner:
    from runtime import DeltaDiTRuntime

    from .sampling import runtime_generate
    from .timing_worker import runtime_thread_info

    rt = DeltaDiTRuntime(engines, backend=backend, threads=ctx.threads, trust_artifacts=trust_artifacts,
                         verify=verify, **(backend_options or {}))
    schedule = rt.schedule(policy, num_steps=num_steps)

    def run(i: int):
        e, m, neg, noise = inputs[i % len(inputs)]
        return runtime_generate(rt, schedule, e, m, neg, noise, guidance_scale=guidance)

    return Runner(run, info={"backend": rt.backend.name, "device": str(rt.device),
                             "onnxruntime": runtime_thread_info(rt)})


def eager_row(ctx: WorkerContext, engines: str, num_steps: int, inputs: list[OneImage], guidance: float,
              hook: str | None = None, params: dict[str, Any] | None = None, weights: str | None = None) -> Runner:
    """The diffusers model (fp32; ``weights``: the user's --weights DIR, see rebuild.py) in PyTorch eager."""
    from runtime.manifest import load_manifest

    from .rebuild import rebuild_model
    from .sampling import scheduler_config_of, torch_generate

    manifest = load_manifest(engines)
    model = rebuild_model(manifest, weights)
    if hook:
        from .eval_hooks import apply_hook

        apply_hook(hook, model, params or {}, num_steps)
    sched_cfg = scheduler_config_of(manifest)

    def run(i: int):
        e, m, neg, noise = inputs[i % len(inputs)]
        return torch_generate(model, sched_cfg, e, m, neg, noise, guidance_scale=guidance, num_steps=num_steps)

    return Runner(run, info={"backend": "pytorch eager", "device": "cpu", "hook": hook})


def runtime(name: str, engines, policy: str, num_steps: int | None, inputs: list[OneImage], guidance: float,
            trust_artifacts: bool = False, backend: str = "auto", backend_options: dict[str, Any] | None = None,
            verify: bool = True) -> Row:
    return Row(name, runtime_row, {"engines": str(engines), "policy": policy, "num_steps": num_steps,
                                   "inputs": inputs, "guidance": guidance, "trust_artifacts": trust_artifacts,
                                   "backend": backend, "backend_options": backend_options or {}, "verify": verify})


def eager(name: str, engines, num_steps: int, inputs: list[OneImage], guidance: float, hook: str | None = None,
          params: dict[str, Any] | None = None, weights: str | None = None) -> Row:
    return Row(name, eager_row, {"engines": str(engines), "num_steps": num_steps, "inputs": inputs,
                                 "guidance": guidance, "hook": hook, "params": params, "weights": weights})
