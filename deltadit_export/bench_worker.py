"""One ``deltadit-bench`` mode in its own process (``python -m deltadit_export.bench --worker MODE``), so
one mode's peak RSS cannot hide another's: load, warm up, time the repeats, write the final latents."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .bench_baseline import eager_generate, make_scheduler, progress, rebuild_model, reference_delta_dit

MODES = ("eager", "none", "delta-dit")
WORKER_MODES = MODES + ("reference",)  # "reference": only the independent Δ-DiT (when eager is not run)
RUNTIME_POLICY = {"none": "none", "delta-dit": "delta-dit"}
SEGMENT_NAMES = ("embed", "front", "middle", "rear", "head")


def _peak_rss_mb() -> float:
    """This process's peak RSS. On Linux, VmHWM of /proc/self/status: ru_maxrss is carried over from
    the parent across fork+exec, so every worker would report at least the (large) bench driver's RSS."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _current_rss_mb() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def run_worker(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Load one mode, warm up, time ``repeats`` generations; write its final latents; report stats."""
    import torch

    from runtime.manifest import load_manifest

    threads = int(spec["threads"])
    torch.set_num_threads(threads)
    root = Path(spec["engines"])
    manifest = load_manifest(root)
    inputs = torch.load(spec["inputs"], weights_only=False)
    T, N, b, g = int(spec["num_steps"]), int(spec["interval"]), int(spec["boundary"]), float(spec["guidance_scale"])
    out_dir = Path(spec["out_dir"])
    result: dict[str, Any] = {"mode": mode, "threads": {"torch": torch.get_num_threads()}}

    t0 = time.perf_counter()
    progress(f"{mode}: loading")
    if mode in ("eager", "reference"):
        model = rebuild_model(manifest)
        result["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")

        def one_run():
            return eager_generate(model, manifest, inputs, T, g, make_scheduler(root)), None
    else:
        from runtime import DeltaDiTRuntime
        from runtime.sampling import generate

        # The thread count is an option of the CPU backend only (auto passes it on to the candidates that take it).
        options = {"threads": threads} if spec["backend"] in ("auto", "onnxruntime") else {}
        rt = DeltaDiTRuntime(root, backend=spec["backend"], **options)
        if rt.device.type != "cpu":
            progress(f"warning: the runtime runs on {rt.device} but the eager baseline on the CPU: the speedups "
                     "against eager are not like for like")
        schedule = rt.schedule(RUNTIME_POLICY[mode], num_steps=T, interval=N, boundary=b)
        result.update(threads={**result["threads"], "onnxruntime": threads}, backend=rt.backend.name,
                      device=str(rt.device), block_runs=schedule.block_runs, bound=schedule.bound,
                      kinds=[s.kind for s in schedule.steps])
        cond = {k: inputs[k] for k in ("prompt_embeds", "prompt_mask", "negative_embeds", "negative_mask",
                                       "class_labels") if k in inputs}

        def one_run():
            res = generate(rt, **cond, guidance_scale=g, policy=schedule, scheduler=make_scheduler(root),
                           latents=inputs["latents"], profile=True)
            return res.latents, res.generation

    make_scheduler(root)  # imports the scheduler module now, not inside the first run
    result["load_s"] = time.perf_counter() - t0
    result["rss_after_load_mb"] = _peak_rss_mb()

    runs_ms: list[float] = []
    seg_runs: list[dict[str, tuple[int, float]]] = []
    latents = gen = None
    if mode != "reference":
        with torch.inference_mode():
            for w in range(int(spec["warmup"])):
                t = time.perf_counter()
                one_run()
                progress(f"{mode}: warm-up {w + 1}/{spec['warmup']}: {(time.perf_counter() - t) * 1e3:.1f} ms")
            for r in range(int(spec["repeats"])):
                t = time.perf_counter()
                latents, gen = one_run()
                runs_ms.append((time.perf_counter() - t) * 1e3)
                progress(f"{mode}: run {r + 1}/{spec['repeats']}: {runs_ms[-1]:.1f} ms")
                if gen is not None:
                    seg_runs.append({n: (s.calls, s.seconds * 1e3) for n, s in gen.stats.items()})
        # Peak RSS of this mode: measured after its runs and before the reference (which is not part of it).
        result["peak_rss_mb"] = _peak_rss_mb()
        result["rss_end_mb"] = _current_rss_mb()
        result["runs_ms"] = runs_ms
        result["median_ms"] = statistics.median(runs_ms)
        if mode == "eager":
            result["block_runs"] = T * manifest.num_layers
        else:
            result["cache_bytes"] = gen.cache_bytes
            result["segments"] = {n: {"calls": seg_runs[-1][n][0], "ms": statistics.median(r[n][1] for r in seg_runs)}
                                  for n in SEGMENT_NAMES if n in seg_runs[-1]}
        torch.save(latents, out_dir / f"latents-{mode}.pt")

    if mode == "reference" or (mode == "eager" and spec.get("reference")):
        progress(f"{mode}: independent reference Δ-DiT (T={T}, N={N}, b={b}, N_c={manifest.cached_blocks})")
        with torch.inference_mode():
            ref, runs, kinds = reference_delta_dit(model, manifest, inputs, T, N, b, g, make_scheduler(root))
        torch.save(ref, out_dir / "latents-reference.pt")
        result["reference"] = {"block_runs": runs, "kinds": kinds}
    return result


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m deltadit_export.bench --worker",
                                description="internal: run one benchmark mode in this process")
    p.add_argument("mode", choices=WORKER_MODES)
    p.add_argument("--spec", required=True, help="JSON file written by the parent")
    p.add_argument("--result", required=True, help="where this worker writes its JSON result")
    a = p.parse_args(argv)
    from runtime import InputError, ManifestError, ScheduleError
    from runtime.backends import BackendError

    from .models import ModelError

    try:
        result = run_worker(a.mode, json.loads(Path(a.spec).read_text()))
    except (BackendError, InputError, ManifestError, ModelError, ScheduleError) as exc:  # complete messages
        print(f"[bench] {a.mode}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    Path(a.result).write_text(json.dumps(result))
    return 0
