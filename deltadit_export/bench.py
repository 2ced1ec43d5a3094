"""``deltadit-bench``: latency, memory and accuracy of the runtime against PyTorch eager.

Three modes run the same generation (1 image, classifier-free guidance as one batch of 2 =
[uncond; cond], T steps of the runtime's DPM-Solver++ scheduler, the same latents and conditioning):

- ``eager``: the diffusers transformer rebuilt from what the manifest records (same weights, same
  dtype), called in a plain sampling loop under ``torch.inference_mode()`` in eval mode;
- ``none``: the runtime with every step full;
- ``delta-dit``: the runtime with the Δ-DiT cache schedule.

Each mode runs in its own process (``python -m deltadit_export.bench --worker MODE ...``) so one
mode's peak RSS cannot hide another's: warm-up run(s), then the median of ``--repeats`` runs.
Accuracy: the final latents of ``none`` against eager, and of ``delta-dit`` against an independent
Δ-DiT written here on the diffusers block list (:func:`reference_delta_dit`, DESIGN.md §2 math; it
shares nothing with the runtime's plan execution).

Layout: command line (:func:`cli`) and parent orchestration (:func:`run_bench`) here → one worker per
mode (``bench_worker.py``) → eager loop and reference Δ-DiT (``bench_baseline.py``) → report
(``bench_report.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from .bench_baseline import DEFAULT_PROMPT, default_boundary, ideal_bound, make_inputs, progress, step_kind
from .bench_report import build_report, format_report
from .bench_worker import MODES, worker_main

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
                "backend": settings.backend, "reference": "delta-dit" in settings.modes}
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
@click.option("--modes", default=",".join(MODES), show_default=True,
              help="Comma-separated subset of eager,none,delta-dit.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the results as JSON to this file.")
@click.option("-q", "--quiet", is_flag=True, help="No export progress.")
@click.pass_context
def cli(ctx, engines, num_steps, interval, boundary, guidance_scale, repeats, warmup, threads, sample_seed, prompt,
        backend, modes, json_path, quiet, **export_flags):
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
    if json_path is not None and not Path(json_path).resolve().parent.is_dir():
        raise click.BadParameter(f"the folder of {json_path} does not exist", param_hint="'--json'")
    folder = _engines_folder(ctx, engines, export_flags, quiet)
    settings = BenchSettings(num_steps=num_steps, interval=interval, boundary=boundary, guidance_scale=guidance_scale,
                             repeats=repeats, warmup=warmup, threads=threads, seed=sample_seed, prompt=prompt,
                             backend=backend, modes=tuple(m for m in MODES if m in selected))
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
