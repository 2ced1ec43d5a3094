"""``deltadit-bench``: latency, memory and accuracy of the runtime against PyTorch eager.

Three modes run the same generation (1 image, classifier-free guidance as one batch of 2 in the
order of the model's diffusers pipeline (runtime/guidance.py), T steps of the runtime's DPM-Solver++ scheduler, the same latents and conditioning):

- ``eager``: the diffusers transformer rebuilt from what the manifest records (same weights, same
  dtype), called in a plain sampling loop under ``torch.inference_mode()`` in eval mode;
- ``none``: the runtime with every step full;
- ``delta-dit``: the runtime with the Δ-DiT cache schedule.

Each mode runs in its own process (``python -m deltadit_export.bench --worker MODE ...``) so one
mode's peak RSS cannot hide another's: warm-up run(s), then the median of ``--repeats`` runs.
Accuracy: the final latents of ``none`` against eager, and of ``delta-dit`` against an independent
Δ-DiT written here on the diffusers block list (:func:`reference_delta_dit`, DESIGN.md §2 math; it
shares nothing with the runtime's plan execution).

Layout of this module: command line (:func:`cli`) → parent orchestration (:func:`run_bench`) →
one worker per mode (:func:`run_worker`) → eager loop (:func:`eager_generate`) and reference Δ-DiT
(:func:`reference_delta_dit`) → report (:func:`build_report`, :func:`format_report`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

MODES = ("eager", "none", "delta-dit")
WORKER_MODES = MODES + ("reference",)  # "reference": only the independent Δ-DiT (when eager is not run)
RUNTIME_POLICY = {"none": "none", "delta-dit": "delta-dit"}
SEGMENT_NAMES = ("embed", "front", "middle", "rear", "head")
# Issue 3 targets (2 CPU cores, fp32, T=20, guidance batch 2): printed next to the ratios, never asserted.
TARGETS = {
    "speedup_full_vs_eager": 1.25,
    "delta_fraction_of_bound": 0.95,
    "speedup_delta_vs_eager": 1.9,
    "rss_runtime_over_eager": 1.0,  # at most
}
DEFAULT_PROMPT = "a handwritten digit 7"  # for models shipped with the hashed-word text encoder


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ============================================================================ schedule rule (independent)


def step_kind(i: int, interval: int, boundary: int) -> str:
    """DESIGN.md §2, computed here on purpose (not read from runtime.schedule): full when i % N == 0,
    else cache the rear range before the boundary step b and the front range from b on."""
    if i % interval == 0:
        return "full"
    return "cache-rear" if i < boundary else "cache-front"


def ideal_bound(num_steps: int, num_layers: int, cached_blocks: int, interval: int) -> tuple[int, float]:
    """(block-runs, bound) = (F·L + C·(L−N_c), T·L / block-runs) of DESIGN.md §2."""
    full = sum(1 for i in range(num_steps) if i % interval == 0)
    runs = full * num_layers + (num_steps - full) * (num_layers - cached_blocks)
    return runs, num_steps * num_layers / runs


def default_boundary(manifest_schedule: dict[str, Any], num_steps: int) -> int:
    """The manifest's boundary for its own T; scaled as b/T otherwise (12/20 → round(0.6·T)), like the runtime."""
    d = manifest_schedule
    return d["boundary"] if num_steps == d["num_steps"] else round(d["boundary"] * num_steps / d["num_steps"])


# ============================================================================ inputs


def make_inputs(manifest, root: Path, seed: int, prompt: str) -> dict[str, Any]:
    """Latents and conditioning for one image, shared by all modes (written once, read by every worker).

    PixArt: real prompt embeddings from the shipped hashed-word text encoder when the export has one
    (``text_encoder/config.json``); otherwise seeded random caption states [1, tokens, channels] with a
    mask keeping a seeded number of leading tokens. The negative is zeros with an all-ones mask (there is
    no text encoder here to embed ""). DiT: a seeded class label; the negative is the null class.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    c, h, w = manifest.sample_shape
    inputs: dict[str, Any] = {"latents": torch.randn((1, c, h, w), generator=g, dtype=torch.float32)}
    from runtime.integrity import verify_companion_files

    verify_companion_files(manifest)  # the text encoder config below is read from the (untrusted) folder
    cond = manifest.conditioning
    if cond["kind"] == "caption":
        encoder_dir = root / "text_encoder"
        if (encoder_dir / "config.json").is_file():
            from runtime.text_encoder import HashedWordEncoder

            encoder = HashedWordEncoder.load(encoder_dir)
            emb, mask = encoder.encode([prompt])
            neg, neg_mask = encoder.encode([""])
            inputs.update(prompt_embeds=torch.from_numpy(emb), prompt_mask=torch.from_numpy(mask),
                          negative_embeds=torch.from_numpy(neg), negative_mask=torch.from_numpy(neg_mask))
            inputs["conditioning"] = f"prompt {prompt!r} via the shipped hashed-word text encoder, negative ''"
        else:
            tokens, channels = int(cond["tokens"]), int(cond["channels"])
            emb = torch.randn((1, tokens, channels), generator=g, dtype=torch.float32)
            keep = int(torch.randint(1, tokens + 1, (1,), generator=g))
            mask = (torch.arange(tokens) < keep).to(torch.float32)[None]
            inputs.update(prompt_embeds=emb, prompt_mask=mask, negative_embeds=torch.zeros_like(emb),
                          negative_mask=torch.ones_like(mask))
            inputs["conditioning"] = (f"random caption states [1, {tokens}, {channels}] (seed {seed}), "
                                      f"{keep} of {tokens} tokens unmasked; negative zeros")
    else:
        label = int(torch.randint(0, int(cond.get("num_classes", 1000)), (1,), generator=g))
        inputs["class_labels"] = torch.tensor([label], dtype=torch.int64)
        inputs["conditioning"] = f"class {label} (seed {seed}), negative the null class {cond.get('null_class', 1000)}"
    return inputs


def make_scheduler(root: Path):
    """The runtime's default scheduler for this export (DPM-Solver++), handed to every mode explicitly."""
    from types import SimpleNamespace

    from runtime.sampling import default_scheduler

    return default_scheduler(SimpleNamespace(root=Path(root)))


def guided_conditioning(manifest, inputs: dict[str, Any], dtype, guide=None) -> dict[str, Any]:
    """The diffusers forward's conditioning for the guided batch, in the family's order (eager and reference)."""
    import torch

    from runtime.guidance import guidance_for

    guide = guide or guidance_for(manifest, 2.0)  # any scale > 1: the guided order of the family

    c, h, w = manifest.sample_shape
    rows = 2
    if manifest.conditioning["kind"] == "caption":
        cond = {
            "encoder_hidden_states": guide.batch(inputs["prompt_embeds"], inputs["negative_embeds"]).to(dtype),
            "encoder_attention_mask": guide.batch(inputs["prompt_mask"].to(dtype), inputs["negative_mask"]).to(dtype),
        }
        if manifest.conditioning.get("micro_conditions"):
            vae = manifest.export.get("vae_scale_factor", 8)
            cond["resolution"] = torch.tensor([[h * vae, w * vae]], dtype=dtype).repeat(rows, 1)
            cond["aspect_ratio"] = torch.tensor([[h / w]], dtype=dtype).repeat(rows, 1)
        return cond
    labels = inputs["class_labels"].to(torch.int64)
    null = torch.full_like(labels, int(manifest.conditioning["null_class"]))
    return {"class_labels": guide.batch(labels, null)}


# ============================================================================ eager and the reference Δ-DiT


def rebuild_model(manifest):
    """The diffusers transformer the export came from: same weights (source recorded in the manifest), same dtype."""
    import torch

    from .exporter import keep_norms_fp32
    from .models import ModelError, WeightsSource, build_model, get_spec

    spec = get_spec(manifest.model["name"])
    src = dict(manifest.model["source"])
    kind = src.get("kind")
    if kind == "random":
        source = WeightsSource("random", seed=src.get("seed", 0), overrides=src.get("overrides", {}))
        exported_with = manifest.export.get("torch")
        if exported_with and exported_with != torch.__version__:
            progress(f"warning: random weights were drawn with torch {exported_with}, this is torch "
                     f"{torch.__version__}: the init may differ (the none-vs-eager error will show it)")
    else:
        path = src.get("path")
        if not path or not Path(path).is_dir():
            raise ModelError(f"the manifest's {kind} weights folder {path!r} does not exist any more: the eager "
                             "baseline needs the same weights; restore it or re-export (deltadit-export --force)")
        source = WeightsSource(kind, path=path, repo_id=src.get("repo_id"))
    model = build_model(spec, source, manifest.model["config"])
    if len(model.transformer_blocks) != manifest.num_layers:
        raise ModelError(f"the rebuilt model has {len(model.transformer_blocks)} blocks, the manifest "
                         f"{manifest.num_layers}: the weights changed since the export; re-export with --force")
    if manifest.precision == "fp16":
        model = model.half()
        keep_norms_fp32(model)  # as the exporter did
    return model.eval()


def eager_generate(model, manifest, inputs: dict[str, Any], num_steps: int, guidance_scale: float, scheduler,
                   on_step=None):
    """The PyTorch baseline: the diffusers forward in a plain guided DPM-Solver++ loop; returns final latents."""
    import torch

    from runtime.guidance import guidance_for

    from .split import diffusers_forward

    dtype = next(model.parameters()).dtype
    guide = guidance_for(manifest, guidance_scale)  # the family's guided batch, as its diffusers pipeline
    cond = guided_conditioning(manifest, inputs, dtype, guide)
    scheduler.set_timesteps(num_steps)
    state = guide.start(inputs["latents"].to(torch.float32) * scheduler.init_noise_sigma, scheduler)
    for i, t in enumerate(scheduler.timesteps):
        if on_step is not None:
            on_step(i)
        model_in = scheduler.scale_model_input(guide.model_input(state), t)
        feeds = {"sample": model_in.to(dtype), "timestep": torch.full((len(model_in),), float(t), dtype=dtype), **cond}
        out = diffusers_forward(model, feeds).float()
        state = guide.step(scheduler, out, t, state, num_steps=num_steps)
    return guide.result(state)


class _DeltaState:
    """What the reference keeps across steps: this step's kind, the recorded deltas, block-runs done."""

    def __init__(self, num_layers: int, cached_blocks: int):
        self.L, self.Nc = num_layers, cached_blocks
        self.kind = "full"
        self.h0 = self.h_rear_in = self.delta_front = self.delta_rear = None
        self.block_runs = 0


def _make_delta_block(block, k: int, state: _DeltaState):
    """Block k (0-based) of the reference: runs, records, skips or applies a delta per DESIGN.md §2."""
    import torch

    class DeltaBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def __getattr__(self, name):  # DiT's head reads transformer_blocks[0].norm1
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("block"), name)

        def run(self, hidden, args, kwargs):
            state.block_runs += 1
            return self.block(hidden, *args, **kwargs)

        def forward(self, hidden_states, *args, **kwargs):
            L, Nc, s = state.L, state.Nc, state
            if s.kind == "full":
                # Record h_0 and h_{L−N_c}; Δ_front = h_{N_c} − h_0, Δ_rear = h_L − h_{L−N_c}.
                if k == 0:
                    s.h0 = hidden_states.clone()
                if k == L - Nc:
                    s.h_rear_in = hidden_states.clone()
                out = self.run(hidden_states, args, kwargs)
                if k == Nc - 1:
                    s.delta_front = out - s.h0
                if k == L - 1:
                    s.delta_rear = out - s.h_rear_in
                return out
            if s.kind == "cache-rear":
                # Blocks L−N_c+1..L (1-based) skipped: h_L = h_{L−N_c} + Δ_rear, then identity.
                if k < L - Nc:
                    return self.run(hidden_states, args, kwargs)
                return hidden_states + s.delta_rear if k == L - Nc else hidden_states
            # cache-front: blocks 1..N_c skipped: h_{N_c} = h_0 + Δ_front, then blocks N_c+1..L run.
            if k >= Nc:
                return self.run(hidden_states, args, kwargs)
            return hidden_states + s.delta_front if k == 0 else hidden_states

    return DeltaBlock()


def reference_delta_dit(model, manifest, inputs: dict[str, Any], num_steps: int, interval: int, boundary: int,
                        guidance_scale: float, scheduler):
    """Independent Δ-DiT on the diffusers model: its block list is swapped for delta-aware wrappers
    for one generation (restored afterwards). Returns (latents, block-runs, step kinds)."""
    from torch import nn

    kinds = [step_kind(i, interval, boundary) for i in range(num_steps)]
    state = _DeltaState(len(model.transformer_blocks), manifest.cached_blocks)
    original = model.transformer_blocks
    model.transformer_blocks = nn.ModuleList(_make_delta_block(b, k, state) for k, b in enumerate(original))

    def on_step(i: int) -> None:
        state.kind = kinds[i]

    try:
        latents = eager_generate(model, manifest, inputs, num_steps, guidance_scale, scheduler, on_step=on_step)
    finally:
        model.transformer_blocks = original
    return latents, state.block_runs, kinds


# ============================================================================ worker (one mode per process)


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
        rt = DeltaDiTRuntime(root, backend=spec["backend"], trust_artifacts=bool(spec.get("trust_artifacts")), **options)
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


# ============================================================================ parent


@dataclass(frozen=True)
class BenchSettings:
    num_steps: int | None = None  # None: the manifest's
    interval: int | None = None
    boundary: int | None = None
    guidance_scale: float = 4.5
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None  # None: os.cpu_count()
    seed: int = 0
    prompt: str = DEFAULT_PROMPT
    backend: str = "onnxruntime"  # the CPU backend, like the eager baseline
    modes: tuple[str, ...] = MODES
    trust_artifacts: bool = False  # allow backends whose artifacts can run code (--trust-artifacts)


class BenchError(RuntimeError):
    """A worker failed or the modes disagree on what they ran; the message says which and why."""


def _spawn(mode: str, spec_path: Path, out_dir: Path) -> dict[str, Any]:
    result_path = out_dir / f"result-{mode}.json"
    cmd = [sys.executable, "-m", "deltadit_export.bench", "--worker", mode, "--spec", str(spec_path),
           "--result", str(result_path)]
    # Progress and errors reach our stderr live; anything a library prints on stdout is passed on to stderr
    # afterwards, so stdout carries the report only.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.stdout:
        sys.stderr.write(proc.stdout)
    if proc.returncode != 0 or not result_path.is_file():
        raise BenchError(f"the {mode} worker failed (exit code {proc.returncode}); its error is printed above")
    return json.loads(result_path.read_text())


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


def run_bench(engines: Path, settings: BenchSettings, json_path: Path | None = None) -> dict[str, Any]:
    """Run every selected mode in its own process and build the report (also written to ``json_path``)."""
    import torch

    from runtime.manifest import load_manifest
    from runtime.schedule import ScheduleError, build_schedule

    manifest = load_manifest(engines)
    d = manifest.schedule
    T = settings.num_steps if settings.num_steps is not None else int(d["num_steps"])
    N = settings.interval if settings.interval is not None else int(d["interval"])
    b = settings.boundary if settings.boundary is not None else default_boundary(d, T)
    L, Nc = manifest.num_layers, manifest.cached_blocks
    schedule = build_schedule("delta-dit", num_steps=T, num_layers=L, cached_blocks=Nc, interval=N, boundary=b)
    kinds = [step_kind(i, N, b) for i in range(T)]
    runs, bound = ideal_bound(T, L, Nc, N)
    if [s.kind for s in schedule.steps] != kinds or schedule.block_runs != runs or abs(schedule.bound - bound) > 1e-12:
        raise ScheduleError(f"runtime schedule {[s.kind for s in schedule.steps]} ({schedule.block_runs} block-runs) "
                            f"disagrees with DESIGN.md §2 {kinds} ({runs} block-runs)")
    threads = settings.threads or os.cpu_count() or 1
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if load_start and load_start[0] > 0.5 * (os.cpu_count() or 1):
        progress(f"warning: load average {load_start[0]:.2f} on {os.cpu_count()} cores: other processes compete "
                 "for the CPU and the timings will be noisy (torch's OpenMP threads suffer most when a core is taken)")
    with tempfile.TemporaryDirectory(prefix="deltadit-bench-") as tmp:
        tmp = Path(tmp)
        inputs = make_inputs(manifest, Path(engines), settings.seed, settings.prompt)
        torch.save(inputs, tmp / "inputs.pt")
        spec = {"engines": str(Path(engines).resolve()), "inputs": str(tmp / "inputs.pt"), "out_dir": str(tmp),
                "num_steps": T, "interval": N, "boundary": b, "guidance_scale": settings.guidance_scale,
                "repeats": settings.repeats, "warmup": settings.warmup, "threads": threads,
                "backend": settings.backend, "reference": "delta-dit" in settings.modes,
                "trust_artifacts": settings.trust_artifacts}
        (tmp / "spec.json").write_text(json.dumps(spec))
        results = {mode: _spawn(mode, tmp / "spec.json", tmp) for mode in MODES if mode in settings.modes}
        if "delta-dit" in settings.modes and "eager" not in settings.modes:
            results["reference"] = _spawn("reference", tmp / "spec.json", tmp)
        latents = {p.stem.removeprefix("latents-"): torch.load(p) for p in tmp.glob("latents-*.pt")}
    ref_info = (results.get("eager") or results.get("reference") or {}).get("reference")
    if ref_info is not None and (ref_info["kinds"] != kinds or ref_info["block_runs"] != runs):
        raise BenchError(f"the reference Δ-DiT ran {ref_info['block_runs']} block-runs, expected {runs}")
    for mode in ("none", "delta-dit"):
        if mode in results and results[mode]["kinds"] != (["full"] * T if mode == "none" else kinds):
            raise BenchError(f"the runtime's {mode} schedule {results[mode]['kinds']} is not the expected one")
    report = build_report(manifest, engines, settings, T, N, b, threads, schedule, results, latents, inputs)
    report["machine"]["loadavg_start"] = load_start
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_report(manifest, engines, settings, T, N, b, threads, schedule, results, latents, inputs) -> dict[str, Any]:
    def ms(mode):
        return results[mode]["median_ms"] if mode in results else None

    def ratio(x, y):
        return x / y if x is not None and y else None

    def err(x, y):
        return rel_err(latents[x], latents[y]) if x in latents and y in latents else None

    eager_ms, full_ms, delta_ms = ms("eager"), ms("none"), ms("delta-dit")
    speed_delta_full = ratio(full_ms, delta_ms)
    rss = {m: results[m]["peak_rss_mb"] for m in MODES if m in results}
    block_ms = {m: sum(s["ms"] for n, s in results[m]["segments"].items() if n in ("front", "middle", "rear"))
                for m in ("none", "delta-dit") if m in results}
    src = manifest.model["source"]
    return {
        "eager_ms": eager_ms,
        "full_ms": full_ms,
        "delta_ms": delta_ms,
        "bound": schedule.bound,
        "speedup_full_vs_eager": ratio(eager_ms, full_ms),
        "speedup_delta_vs_full": speed_delta_full,
        "speedup_delta_vs_eager": ratio(eager_ms, delta_ms),
        "delta_fraction_of_bound": speed_delta_full / schedule.bound if speed_delta_full else None,
        "block_speedup_delta_vs_full": ratio(block_ms.get("none"), block_ms.get("delta-dit")),
        "full_vs_eager_rel_err": err("none", "eager"),
        "delta_vs_reference_rel_err": err("delta-dit", "reference"),
        "delta_vs_eager_rel_err": err("delta-dit", "eager"),
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
        "threads": {"torch": threads, "onnxruntime_intra_op": threads, "os_cpu_count": os.cpu_count()},
        "machine": {**_machine(), "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "versions": _versions(),
    }


# ============================================================================ table


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
    c, th, v = r["config"], r["threads"], r["versions"]
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
        f"  threads: torch {th['torch']}, onnxruntime intra-op {th['onnxruntime_intra_op']} (os.cpu_count() = "
        f"{th['os_cpu_count']}); each mode in its own process; {c['warmup']} warm-up, median of {c['repeats']} runs",
        *[f"  runtime: backend {rt['backend']} on {rt['device']}; eager on cpu" for rt in
          [r["modes"].get("none") or r["modes"].get("delta-dit")] if rt],
        f"  {mi['cpu']}; torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, diffusers {v.get('diffusers')}"
        + (f"; load avg {mi['loadavg_start'][0]:.2f} at start, {mi['loadavg_end'][0]:.2f} at end"
           if mi.get("loadavg_start") and mi.get("loadavg_end") else ""),
        "",
        f"{'mode':<10} {'total ms':>10} {'ms/step':>9} {'block-runs':>11} {'bound':>7} {'peak RSS MB':>12} "
        f"{'Δ cache bytes':>14}",
    ]
    for m in MODES:
        res = r["modes"].get(m)
        if res is None:
            continue
        bound = "1.000" if m != "delta-dit" else f"{r['bound']:.3f}"
        cache = "-" if m == "eager" else f"{res['cache_bytes']:,}"
        lines.append(f"{m:<10} {res['median_ms']:>10.1f} {res['median_ms'] / c['num_steps']:>9.2f} "
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
    rss_ratio = max(rss[m] for m in ("none", "delta-dit") if m in rss) / rss["eager"] if "eager" in rss and len(
        rss) > 1 else None
    lines += [
        "",
        "ratios:",
        f"  none vs eager        {_x(r['speedup_full_vs_eager'])} "
        f"{_target(r['speedup_full_vs_eager'], 'speedup_full_vs_eager')}",
        f"  delta-dit vs none    {_x(r['speedup_delta_vs_full'])} = "
        f"{_f(r['delta_fraction_of_bound'], '.3f')} of the bound {r['bound']:.3f}x "
        f"{_target(r['delta_fraction_of_bound'], 'delta_fraction_of_bound')}; block segments alone "
        f"{_x(r['block_speedup_delta_vs_full'])}",
        f"  delta-dit vs eager   {_x(r['speedup_delta_vs_eager'])} "
        f"{_target(r['speedup_delta_vs_eager'], 'speedup_delta_vs_eager')}",
        f"  runtime / eager peak RSS {_f(rss_ratio, '.3f')} {_target(rss_ratio, 'rss_runtime_over_eager')}",
        "",
        "accuracy (max|a−b| / max|b| of the final latents):",
        f"  none vs eager                          {_f(r['full_vs_eager_rel_err'], '.2e')}",
        f"  delta-dit vs independent Δ-DiT (torch) {_f(r['delta_vs_reference_rel_err'], '.2e')}",
        f"  delta-dit vs eager (the cache's own approximation) {_f(r['delta_vs_eager_rel_err'], '.2e')}",
    ]
    return "\n".join(lines)


# ============================================================================ command line

EXPORT_FLAGS = {  # click parameter name -> flag, for "--engines excludes these" and the export call
    "model": "--model", "resolution": "--resolution", "weights": "--weights", "random_weights": "--random-weights",
    "seed": "--seed", "overrides": "--set", "cached_blocks": "--cached-blocks", "precision": "--precision",
    "out": "--out", "opset": "--opset", "exporter": "--exporter", "max_batch": "--max-batch", "force": "--force",
}


def _engines_folder(ctx: click.Context, engines: str | None, p: dict[str, Any], quiet: bool) -> Path:
    """--engines DIR as is; otherwise export with the model flags (reusing an identical export) or the defaults."""
    from .cli import user_errors
    from .exporter import ExportOptions, export
    from .models import DEFAULT_MODEL, parse_overrides
    from .progress import Progress

    given = [flag for name, flag in EXPORT_FLAGS.items() if ctx.get_parameter_source(name) != ParameterSource.DEFAULT]
    if engines is not None:
        if given:
            raise click.UsageError(f"--engines and {', '.join(given)} exclude each other: --engines benchmarks an "
                                   "existing export as it is; the model flags export one (or reuse an identical one)")
        return Path(engines)
    try:
        options = ExportOptions(
            model=p["model"] or DEFAULT_MODEL, resolution=p["resolution"], weights=p["weights"],
            random_weights=p["random_weights"], seed=p["seed"], overrides=parse_overrides(p["overrides"]),
            cached_blocks=p["cached_blocks"], precision=p["precision"], out=p["out"], opset=p["opset"],
            exporter=p["exporter"], max_batch=p["max_batch"], force=p["force"],
        )
        if not quiet:
            progress("exporting with the model flags, or reusing an identical earlier export" if given else
                     f"no --engines and no model flags: the default export of {options.model}")
        result = export(options, Progress(stream=sys.stderr, quiet=quiet))
    except user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    if not quiet:
        print(result.summary(), file=sys.stderr, flush=True)
    return result.out


@click.command(name="deltadit-bench", context_settings={"help_option_names": ["-h", "--help"],
                                                         "max_content_width": 100})
@click.option("--engines", type=click.Path(exists=True, file_okay=False), default=None,
              help="An export folder (manifest.json). Without it, the model flags below export first "
                   "(reusing an identical export), or the default export is used.")
@click.option("--model", default=None, help="As deltadit-export --model (default pixart-digits).")
@click.option("--resolution", type=int, default=None, help="As deltadit-export.")
@click.option("--weights", type=click.Path(file_okay=False), default=None, help="As deltadit-export.")
@click.option("--random-weights", is_flag=True, help="As deltadit-export.")
@click.option("--seed", type=int, default=0, show_default=True, help="As deltadit-export: seed of --random-weights.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="As deltadit-export.")
@click.option("--cached-blocks", type=int, default=None, help="As deltadit-export: N_c.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="As deltadit-export.")
@click.option("--opset", type=int, default=18, show_default=True, help="As deltadit-export.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True)
@click.option("--max-batch", type=int, default=4, show_default=True, help="As deltadit-export.")
@click.option("--force", is_flag=True, help="As deltadit-export: re-export even if an identical export exists.")
@click.option("--steps", "num_steps", type=click.IntRange(min=1), default=None,
              help="T steps to run (default: the manifest's, 20). Run-time only: the export is not changed.")
@click.option("--interval", type=click.IntRange(min=1), default=None, help="Δ-DiT cache interval N (default: manifest).")
@click.option("--boundary", type=click.IntRange(min=0), default=None,
              help="Δ-DiT boundary step b, 0..T (default: the manifest's, scaled as b/T when --steps differs).")
@click.option("--guidance-scale", type=click.FloatRange(min=1.0, min_open=True), default=4.5, show_default=True,
              help="Classifier-free guidance scale (> 1: the batch is 2 = [uncond; cond]).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed runs per mode; the median is reported.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch and onnxruntime intra-op threads (default os.cpu_count()).")
@click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed of the latents and conditioning.")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True,
              help="Prompt, for exports that ship a text encoder (pixart-digits).")
@click.option("--backend", default="onnxruntime", show_default=True,
              help="Runtime backend (onnxruntime: the CPU, like the eager baseline; auto: the fastest usable).")
@click.option("--trust-artifacts", is_flag=True,
              help="Allow backends whose artifacts can run code when loaded (TensorRT plans, torch .pt2 programs): only "
              "for exports you made or trust. Without it auto uses ONNX Runtime.")
@click.option("--modes", default=",".join(MODES), show_default=True,
              help="Comma-separated subset of eager,none,delta-dit.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the results as JSON to this file.")
@click.option("-q", "--quiet", is_flag=True, help="No export progress.")
@click.pass_context
def cli(ctx, engines, num_steps, interval, boundary, guidance_scale, repeats, warmup, threads, sample_seed, prompt,
        backend, trust_artifacts, modes, json_path, quiet, **export_flags):
    """Benchmark PyTorch eager vs the runtime (policy none) vs Δ-DiT, each mode in its own process."""
    from .cli import user_errors

    selected = tuple(m.strip() for m in modes.split(",") if m.strip())
    bad = [m for m in selected if m not in MODES]
    if bad or not selected:
        raise click.BadParameter(f"{bad or modes!r}: expected a comma-separated subset of {','.join(MODES)}",
                                 param_hint="'--modes'")
    from runtime.backends import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise click.BadParameter(f"{backend!r} is not auto or one of {', '.join(BACKENDS)}", param_hint="'--backend'")
    from runtime.backends import backend_class, untrusted

    if backend != "auto" and not trust_artifacts and getattr(backend_class(backend), "code_artifacts", None):
        raise click.ClickException(untrusted(backend, backend_class(backend)))  # before any export or worker
    if json_path is not None and not Path(json_path).resolve().parent.is_dir():
        raise click.BadParameter(f"the folder of {json_path} does not exist", param_hint="'--json'")
    folder = _engines_folder(ctx, engines, export_flags, quiet)
    settings = BenchSettings(num_steps=num_steps, interval=interval, boundary=boundary, guidance_scale=guidance_scale,
                             repeats=repeats, warmup=warmup, threads=threads, seed=sample_seed, prompt=prompt,
                             backend=backend, modes=tuple(m for m in MODES if m in selected),
                             trust_artifacts=trust_artifacts)
    try:
        report = run_bench(folder, settings, Path(json_path) if json_path else None)
    except user_errors() + (BenchError,) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(format_report(report))
    if json_path:
        progress(f"wrote {json_path}")


def main(argv: list[str] | None = None):
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["--worker"]:
        sys.exit(worker_main(args[1:]))
    return cli.main(args=args, prog_name="deltadit-bench")


if __name__ == "__main__":
    main()
