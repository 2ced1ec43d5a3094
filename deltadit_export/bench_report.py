"""The report of ``deltadit-bench``: ratios, accuracy and per-segment times from the workers' results
(:func:`build_report`, also the JSON), and the printed table (:func:`format_report`)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from .bench_rows import MODES, SEGMENT_NAMES

# Issue 3 targets (2 CPU cores, fp32, T=20, guidance batch 2): printed next to the ratios, never asserted.
TARGETS = {
    "speedup_full_vs_eager": 1.25,
    "delta_fraction_of_bound": 0.95,
    "speedup_delta_vs_eager": 1.9,
    "rss_runtime_over_eager": 1.0,  # at most
}


def rel_err(a, b) -> float:
    """max|a − b| / max|b| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "onnxruntime", "diffusers", "numpy", "deltadit"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if hasattr(os, "sched_getaffinity"):
        info["affinity"] = len(os.sched_getaffinity(0))
    return info


def build_report(manifest, engines, settings, T, N, b, threads, schedule, results, latents, inputs,
                 timing) -> dict[str, Any]:
    def ms(mode):
        return results[mode]["median_ms"] if mode in results else None

    def ratio(x, y):
        return x / y if x is not None and y else None

    def err(x, y):
        return rel_err(latents[x], latents[y]) if x in latents and y in latents else None

    eager_ms, compile_ms, full_ms, delta_ms = ms("eager"), ms("torch-compile"), ms("none"), ms("delta-dit")
    speed_delta_full = ratio(full_ms, delta_ms)
    rss = {m: results[m]["peak_rss_mb"] for m in MODES if m in results}
    block_ms = {m: sum(s["ms"] for n, s in results[m]["segments"].items() if n in ("front", "middle", "rear"))
                for m in ("none", "delta-dit") if m in results}
    src = manifest.model["source"]
    return {
        "eager_ms": eager_ms,
        "full_ms": full_ms,
        "delta_ms": delta_ms,
        "compile_ms": compile_ms,
        "bound": schedule.bound,
        "speedup_full_vs_eager": ratio(eager_ms, full_ms),
        "speedup_delta_vs_full": speed_delta_full,
        "speedup_delta_vs_eager": ratio(eager_ms, delta_ms),
        "speedup_full_vs_compile": ratio(compile_ms, full_ms),
        "speedup_delta_vs_compile": ratio(compile_ms, delta_ms),
        "speedup_compile_vs_eager": ratio(eager_ms, compile_ms),
        "delta_fraction_of_bound": speed_delta_full / schedule.bound if speed_delta_full else None,
        "block_speedup_delta_vs_full": ratio(block_ms.get("none"), block_ms.get("delta-dit")),
        "full_vs_eager_rel_err": err("none", "eager"),
        "delta_vs_reference_rel_err": err("delta-dit", "reference"),
        "delta_vs_eager_rel_err": err("delta-dit", "eager"),
        "compile_vs_eager_rel_err": err("torch-compile", "eager"),
        "peak_rss_mb": rss,
        "ms_per_step": {m: results[m]["median_ms"] / T for m in MODES if m in results},
        "block_runs": {m: results[m]["block_runs"] for m in MODES if m in results},
        "cache_bytes": {m: results[m]["cache_bytes"] for m in ("none", "delta-dit") if m in results},
        "segments": {m: results[m]["segments"] for m in ("none", "delta-dit") if m in results},
        "modes": results,
        "targets": TARGETS,
        "config": {
            "engines": str(engines), "model": manifest.model["name"], "family": manifest.model["family"],
            "diffusers_class": manifest.model["diffusers_class"], "weights": src, "resolution": manifest.resolution,
            "precision": manifest.precision, "num_layers": manifest.num_layers,
            "cached_blocks": manifest.cached_blocks, "cuts": manifest.cuts, "tokens": manifest.export.get("tokens"),
            "width": manifest.export.get("width"), "params": manifest.model.get("params"),
            "num_steps": T, "interval": N, "boundary": b, "schedule_block_runs": schedule.block_runs,
            "full_block_runs": T * manifest.num_layers, "guidance_scale": settings.guidance_scale,
            "batch": 2, "images": 1, "scheduler": "DPMSolverMultistepScheduler (runtime default)",
            "conditioning": inputs["conditioning"], "seed": settings.seed, "repeats": settings.repeats,
            "warmup": settings.warmup, "backend": settings.backend,
        },
        "threads": {"torch": threads, "onnxruntime_intra_op": threads, "os_cpu_count": os.cpu_count(),
                    "omp_wait_policy": timing.settings.wait_policy, "read_back": {
                        m: {k: results[m].get(k) for k in ("torch", "onnxruntime")} for m in results}},
        "timing": {k: v for k, v in timing.to_dict().items() if k != "rows"},
        "timing_header": timing.header(),
        "machine": {**_machine(), "loadavg_start": timing.load_before, "loadavg_end": timing.load_after},
        "versions": _versions(),
    }


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _x(x) -> str:
    return "n/a (mode not run)" if x is None else f"{x:.3f}x"


def _target(value, key: str) -> str:
    goal = TARGETS[key]
    if value is None:
        return ""
    if key == "rss_runtime_over_eager":
        return f"(target ≤ {goal:g}: {'met' if value <= goal else 'MISSED'})"
    return f"(target ≥ {goal:g}: {'met' if value >= goal else 'MISSED'})"


def format_report(r: dict[str, Any]) -> str:
    c, v = r["config"], r["versions"]
    mi = r["machine"]
    w = c["weights"]
    weights = f"random weights seed {w.get('seed', 0)}" + (
        f", --set {' '.join(f'{k}={x}' for k, x in w.get('overrides', {}).items())}" if w.get("overrides") else "")
    if w.get("kind") != "random":
        weights = f"{w.get('kind')} weights {w.get('path')}"
    lines = [
        f"deltadit-bench: {c['model']} {c['resolution']}px ({weights}), {c['diffusers_class']}, {c['precision']}, "
        f"{c['params'] or 0:,} params",
        f"  L={c['num_layers']} blocks × width {c['width']}, {c['tokens']} tokens; N_c={c['cached_blocks']} "
        f"(cuts a={c['cuts']['a']} c={c['cuts']['c']})",
        f"  T={c['num_steps']} steps DPM-Solver++ (the runtime's scheduler), guidance {c['guidance_scale']:g} "
        f"(batch 2 = 1 image × [uncond; cond]); Δ-DiT N={c['interval']} b={c['boundary']}",
        f"  conditioning: {c['conditioning']}",
        "  eager baseline: the diffusers transformer rebuilt from the manifest (same weights and dtype) in a plain "
        "loop, torch.inference_mode(), eval(), same scheduler, latents and conditioning",
        "  torch-compile: the same model, the whole transformer through torch.compile (TorchInductor, default "
        "mode), compiled before its warm-up",
        *[f"  runtime: backend {rt['backend']} on {rt['device']}; eager on cpu" for rt in
          [r["modes"].get("none") or r["modes"].get("delta-dit")] if rt],
        f"  {mi['cpu']}; torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, diffusers {v.get('diffusers')}",
        *[f"  {h}" for h in r.get("timing_header", [])],
        "",
        f"{'mode':<13} {'total ms':>10} {'min–max':>19} {'ms/step':>9} {'block-runs':>11} {'bound':>7} "
        f"{'peak RSS MB':>12} {'Δ cache bytes':>14}",
    ]
    for m in MODES:
        res = r["modes"].get(m)
        if res is None:
            continue
        bound = "1.000" if m != "delta-dit" else f"{r['bound']:.3f}"
        cache = f"{res['cache_bytes']:,}" if "cache_bytes" in res else "-"
        spread = f"{res['min_ms']:.1f}–{res['max_ms']:.1f}"
        lines.append(f"{m:<13} {res['median_ms']:>10.1f} {spread:>19} {res['median_ms'] / c['num_steps']:>9.2f} "
                     f"{res['block_runs']:>5}/{c['full_block_runs']:<5} {bound:>7} {res['peak_rss_mb']:>12.1f} "
                     f"{cache:>14}")
    seg_modes = [m for m in ("none", "delta-dit") if m in r["segments"]]
    if seg_modes:
        lines += ["", "per segment (ms per generation, calls), runtime modes:"]
        lines.append(f"{'segment':<10}" + "".join(f" {m + ' ms':>14} {'calls':>6}" for m in seg_modes))
        for name in SEGMENT_NAMES:
            if not any(name in r["segments"][m] for m in seg_modes):
                continue
            row = f"{name:<10}"
            for m in seg_modes:
                s = r["segments"][m].get(name)
                row += f" {_f(s and s['ms'], '14.1f'):>14} {_f(s and s['calls'], 'd'):>6}"
            lines.append(row)
        row = f"{'other':<10}"
        for m in seg_modes:
            other = r["modes"][m]["median_ms"] - sum(s["ms"] for s in r["segments"][m].values())
            row += f" {other:>14.1f} {'':>6}"
        lines.append(row + "   (scheduler, guidance, input checks)")
    rss = r["peak_rss_mb"]
    runtime_rss = [rss[m] for m in ("none", "delta-dit") if m in rss]
    rss_ratio = max(runtime_rss) / rss["eager"] if "eager" in rss and runtime_rss else None
    lines += [
        "",
        "ratios:",
        f"  none vs eager              {_x(r['speedup_full_vs_eager'])} "
        f"{_target(r['speedup_full_vs_eager'], 'speedup_full_vs_eager')}",
        f"  delta-dit vs none          {_x(r['speedup_delta_vs_full'])} = "
        f"{_f(r['delta_fraction_of_bound'], '.3f')} of the bound {r['bound']:.3f}x "
        f"{_target(r['delta_fraction_of_bound'], 'delta_fraction_of_bound')}; block segments alone "
        f"{_x(r['block_speedup_delta_vs_full'])}",
        f"  delta-dit vs eager         {_x(r['speedup_delta_vs_eager'])} "
        f"{_target(r['speedup_delta_vs_eager'], 'speedup_delta_vs_eager')}",
        f"  none vs torch-compile      {_x(r['speedup_full_vs_compile'])}",
        f"  delta-dit vs torch-compile {_x(r['speedup_delta_vs_compile'])}",
        f"  torch-compile vs eager     {_x(r['speedup_compile_vs_eager'])}",
        f"  runtime / eager peak RSS   {_f(rss_ratio, '.3f')} {_target(rss_ratio, 'rss_runtime_over_eager')}",
        "",
        "accuracy (max|a−b| / max|b| of the final latents):",
        f"  none vs eager                          {_f(r['full_vs_eager_rel_err'], '.2e')}",
        f"  delta-dit vs independent Δ-DiT (torch) {_f(r['delta_vs_reference_rel_err'], '.2e')}",
        f"  delta-dit vs eager (the cache's own approximation) {_f(r['delta_vs_eager_rel_err'], '.2e')}",
        f"  torch-compile vs eager                 {_f(r['compile_vs_eager_rel_err'], '.2e')}",
    ]
    return "\n".join(lines)
