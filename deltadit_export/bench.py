"""``deltadit-bench`` (``deltadit bench``): latency, memory and accuracy of the runtime against its peers.

The rows (``bench_rows.py``) run the same generation (1 image, classifier-free guidance as one batch of 2 in
the order of the model's diffusers pipeline (``runtime/guidance.py``), T steps of the runtime's DPM-Solver++
scheduler, the same latents and conditioning), or with ``--per-call`` one guided transformer call: the
peers ``eager`` (PyTorch fp32), ``eager-bf16``, ``torch-compile``, and the runtime with ``none`` and
``delta-dit`` on the export's engines, on its int8 export (``int8-*``, built from the same model by
``variants.export_options_like`` next to the export, reused when it exists) and on OpenVINO
(``openvino-*``). ``--modes`` picks the rows (default: eager, torch-compile, none, delta-dit; ``all``: every
row).

Timing goes through the measurement harness (``timing.py``): one worker process per PyTorch row and per
engine set (so one mode's peak RSS cannot hide another's, and one set's weights are held once), the same
threads and OpenMP/ONNX Runtime thread waiting for both sides, a warm-up of every row before any timed run,
then ``--repeats`` rounds round-robin across the rows; medians with min–max and the load average before
and after. Accuracy: the final latents (per call: the call's output) of every row against fp32 eager, and
of ``delta-dit`` against an independent Δ-DiT written on the diffusers block list
(``bench_baseline.reference_delta_dit``, DESIGN.md §2 math; it shares nothing with the runtime's plan
execution). Ratios against eager fp32 and against the best peer (the fastest PyTorch row).

Layout: command line (:func:`cli`) and orchestration (:func:`run_bench`) here → the rows
(``bench_rows.py``) → eager loop and reference Δ-DiT (``bench_baseline.py``) → report (``bench_report.py``).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from runtime.cli_options import CONTEXT_SETTINGS, version_option

from . import bench_rows as bench_rows_mod
from .bench_baseline import (
    DEFAULT_PROMPT, default_boundary, ideal_bound, make_inputs, make_scheduler, reference_delta_dit, step_kind,
)
from .bench_report import build_report, format_report
from .bench_rows import DEFAULT_MODES, MODES, PEERS, RUNTIME_MODES, SEGMENT_NAMES, call_feeds, per_step_ms
from .cli_types import (
    GUIDANCE_HINT, NO_VERIFY_OPTION, REPEATS, SEED, THREADS, TRUST_ARTIFACTS_OPTION, WARMUP, Command, FiniteFloat,
    check_steps,
)
from .console import log, quiet, verbosity_options
from .models import check_prompt
from .publish import check_writable, write_file
from .rebuild import WeightsNotNamed, rebuild_model, resolve_weights
from .timing import Row, TimingError, default_threads, measure


@dataclass(frozen=True)
class BenchSettings:
    num_steps: int | None = None  # None: the manifest's
    interval: int | None = None
    boundary: int | None = None
    guidance_scale: float | None = None  # None: the model's (the manifest's)
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None  # None: the CPUs this process may use
    seed: int = 0
    prompt: str = DEFAULT_PROMPT
    backend: str = "onnxruntime"  # the CPU backend, like the eager baseline
    modes: tuple[str, ...] = DEFAULT_MODES
    trust_artifacts: bool = False  # allow backends whose artifacts can run code (--trust-artifacts)
    weights: str | None = None  # the PyTorch rows' weights folder (--weights DIR; rebuild.py says when it is needed)
    per_call: bool = False  # time one guided transformer call per row instead of a whole generation
    verify: bool = True  # check the engines' sha256 at load (--no-verify: not)


class BenchError(RuntimeError):
    """A worker failed or the modes disagree on what they ran; the message says which and why."""


def bench_rows(engines: Path, modes: tuple[str, ...], common: dict[str, Any], backend: str,
               trust_artifacts: bool = False, int8_engines: Path | None = None, verify: bool = True) -> list[Row]:
    """The harness rows of the selected modes. A peer engine is one more line here (and its setup in
    ``bench_rows.py``). The two rows of one engine set share a worker process (and its loaded runtime)."""
    fp32 = dict(common, backend=backend, trust_artifacts=trust_artifacts, verify=verify)
    int8 = dict(common, engines=str(Path(int8_engines).resolve()) if int8_engines else None, backend="onnxruntime",
                verify=verify)
    openvino = dict(common, backend="openvino", verify=verify)
    rows = {
        "eager": Row("eager", bench_rows_mod.eager_row, dict(common, reference="delta-dit" in modes)),
        "eager-bf16": Row("eager-bf16", bench_rows_mod.eager_row, dict(common, dtype="bfloat16")),
        # Optional: torch.compile needs a C++ compiler; without one the row is left out with a warning.
        "torch-compile": Row("torch-compile", bench_rows_mod.eager_row, dict(common, compile=True), optional=True),
        "none": Row("none", bench_rows_mod.runtime_row, dict(fp32, policy="none"), worker="runtime"),
        "delta-dit": Row("delta-dit", bench_rows_mod.runtime_row, dict(fp32, policy="delta-dit"), worker="runtime"),
        "int8-none": Row("int8-none", bench_rows_mod.runtime_row, dict(int8, policy="none"), worker="runtime int8"),
        "int8-delta-dit": Row("int8-delta-dit", bench_rows_mod.runtime_row, dict(int8, policy="delta-dit"),
                              worker="runtime int8"),
        "openvino-none": Row("openvino-none", bench_rows_mod.runtime_row, dict(openvino, policy="none"),
                             worker="runtime openvino"),
        "openvino-delta-dit": Row("openvino-delta-dit", bench_rows_mod.runtime_row,
                                  dict(openvino, policy="delta-dit"), worker="runtime openvino"),
    }
    return [rows[m] for m in MODES if m in modes]


def _check_modes_usable(modes: tuple[str, ...]) -> None:
    import importlib.util

    if any(RUNTIME_MODES.get(m, ("",))[0] == "openvino" for m in modes) and importlib.util.find_spec("openvino") is None:
        raise BenchError("the openvino rows need OpenVINO: pip install 'deltadit[openvino]', or leave "
                         f"{', '.join(m for m in modes if m.startswith('openvino'))} out of --modes")


def _mode_result(t, num_steps: int) -> dict[str, Any]:
    """One mode's entry of the report: its timing, peak RSS and what it ran (from the worker's info/finish).

    Per call, a runtime row's figure per run is the mean per step, over the schedule it stands for (its
    ``kinds``), of the calls it timed (``bench_rows.per_step_ms``)."""
    final = dict(t.final)
    final.pop("latents", None)
    reference = final.pop("reference", None)
    runs = t.runs_ms
    per_call = bool(t.records) and "calls_ms" in t.records[0]
    if per_call:
        runs = [per_step_ms(t.info["kinds"], r["calls_ms"]) for r in t.records]
    out = {**t.info, **final, "runs_ms": runs, "warmup_ms": t.warmup_ms, "median_ms": statistics.median(runs),
           "min_ms": min(runs), "max_ms": max(runs), "peak_rss_mb": t.peak_rss_mb, "worker": t.worker,
           "load_s": t.setup_s}
    if per_call:
        out["calls_ms"] = {k: statistics.median(r["calls_ms"][k] for r in t.records) for k in t.records[0]["calls_ms"]}
        out["harness_runs_ms"] = t.runs_ms  # the whole timed run (one call, or one cycle of three)
    if reference is not None:
        out["reference"] = {k: v for k, v in reference.items() if k != "latents"}
    if t.records and not per_call:
        last = t.records[-1]
        out["segments"] = {n: {"calls": last[n][0], "ms": statistics.median(r[n][1] for r in t.records)}
                           for n in SEGMENT_NAMES if n in last}
    return out


def run_bench(engines: Path, settings: BenchSettings, json_path: Path | None = None) -> dict[str, Any]:
    """Time every selected mode (one worker process each, round-robin) and build the report (also written to
    ``json_path``)."""
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
    from .sampling import default_guidance

    threads = settings.threads or default_threads()
    if settings.guidance_scale is None:
        settings = dataclasses.replace(settings, guidance_scale=default_guidance(manifest))
    if (Path(engines) / "text_encoder" / "config.json").is_file():
        check_prompt(manifest.model["name"], settings.prompt)
    inputs = make_inputs(manifest, Path(engines), settings.seed, settings.prompt)
    _check_modes_usable(settings.modes)
    int8_engines = None
    if any(RUNTIME_MODES.get(m, ("",))[0] == "int8" for m in settings.modes):
        from .variants import VariantError, export_variant

        try:
            int8_engines = export_variant(engines, "int8", weights=settings.weights, quiet_progress=quiet(),
                                          in_child=True)
        except VariantError as exc:
            raise BenchError(f"int8 rows: {exc}") from None
    common = {"engines": str(Path(engines).resolve()), "inputs": inputs, "num_steps": T, "interval": N,
              "boundary": b, "guidance_scale": settings.guidance_scale, "weights": settings.weights,
              "per_call": settings.per_call}
    reference_here = _check_pytorch_weights(manifest, settings)
    if settings.per_call:
        common["feeds"] = call_feeds(manifest, Path(engines), inputs, settings.guidance_scale, T)
    try:
        timing = measure(bench_rows(engines, settings.modes, common, settings.backend, settings.trust_artifacts,
                                    int8_engines, settings.verify),
                         repeats=settings.repeats,
                         warmup=settings.warmup, threads=threads, isolate=True, desc="bench")
    except TimingError as exc:
        raise BenchError(str(exc)) from None
    results = {m: _mode_result(t, T) for m, t in timing.rows.items()}
    latents = {m: t.final["latents"] for m, t in timing.rows.items() if "latents" in t.final}
    ref = (timing.rows["eager"].final.get("reference") if "eager" in timing.rows else None)
    if ref is None and reference_here:
        # No eager worker to run it in: the independent Δ-DiT runs here (untimed).
        model = rebuild_model(manifest, settings.weights, as_exported=True)
        with torch.inference_mode():
            lat, r_runs, r_kinds = reference_delta_dit(model, manifest, inputs, T, N, b, settings.guidance_scale,
                                                       make_scheduler(Path(engines)))
        ref = {"latents": lat, "block_runs": r_runs, "kinds": r_kinds}
        results["reference"] = {"reference": {"block_runs": r_runs, "kinds": r_kinds}}
    if ref is not None:
        latents["reference"] = ref["latents"]
        if ref["kinds"] != kinds or ref["block_runs"] != runs:
            raise BenchError(f"the reference Δ-DiT ran {ref['block_runs']} block-runs, expected {runs}")
    for mode, (_, policy) in RUNTIME_MODES.items():
        if mode in results and results[mode]["kinds"] != (["full"] * T if policy == "none" else kinds):
            raise BenchError(f"the runtime's {mode} schedule {results[mode]['kinds']} is not the expected one")
    report = build_report(manifest, engines, settings, T, N, b, threads, schedule, results, latents, inputs, timing,
                          int8_engines)
    if json_path is not None:
        write_file(json_path, json.dumps(report, indent=2) + "\n", what="--json")
    return report


def _check_pytorch_weights(manifest, settings: BenchSettings) -> bool:
    """Before any worker starts: the PyTorch rows' weights can be read (rebuild.py), or one Error line says why.
    Returns whether the independent Δ-DiT runs here (delta-dit without the eager row that would run it); it is
    skipped, with a warning, when it would need a weights folder the user did not name."""
    pytorch_rows = any(m in settings.modes for m in PEERS)
    # The reference runs per generation only (a per-call run has no final latents to compare).
    reference_here = "delta-dit" in settings.modes and "eager" not in settings.modes and not settings.per_call
    if not (pytorch_rows or reference_here):
        return False
    try:
        resolve_weights(manifest, settings.weights, refusal_hint="or leave out the PyTorch rows (--modes none,delta-dit)")
    except WeightsNotNamed:
        if pytorch_rows:
            raise
        log.warning("delta-dit is not checked against the independent Δ-DiT: it runs on the diffusers model, and this "
                    "export's local weights are read only from a folder you name (--weights DIR)")
        return False
    return reference_here


EXPORT_FLAGS = {  # click parameter name -> flag, for "--engines excludes these" and the export call
    "model": "--model", "resolution": "--resolution", "weights": "--weights", "random_weights": "--random-weights",
    "seed": "--seed", "overrides": "--set", "cached_blocks": "--cached-blocks", "precision": "--precision",
    "out": "--out", "opset": "--opset", "exporter": "--exporter", "max_batch": "--max-batch", "force": "--force",
}


def _engines_folder(ctx: click.Context, engines: str | None, p: dict[str, Any]) -> Path:
    """--engines DIR as is; otherwise export with the model flags (reusing an identical export) or the defaults."""
    from .cli import user_errors
    from .export_options import ExportOptions, ReplaceRefused
    from .exporter import export
    from .model_config import parse_overrides
    from .models import DEFAULT_MODEL
    from .progress import Progress

    given = [flag for name, flag in EXPORT_FLAGS.items() if ctx.get_parameter_source(name) != ParameterSource.DEFAULT]
    if engines is not None:
        given = [flag for flag in given if flag != "--weights"]  # with --engines it names the PyTorch rows' weights
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
        log.info("%s", "exporting with the model flags, or reusing an identical earlier export" if given else
                 f"no --engines and no model flags: the default export of {options.model}")
        result = export(options, Progress(stream=sys.stderr, quiet=quiet()))
    except ReplaceRefused as exc:  # e.g. a calibrated export in the default folder: it can be benchmarked as it is
        raise click.ClickException(f"{exc}, or benchmark that export as it is with --engines {exc.out}") from None
    except user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    log.info("%s", result.summary())
    return result.out


@click.command(name="bench", cls=Command, context_settings=CONTEXT_SETTINGS)
@click.option("--engines", type=click.Path(exists=True, file_okay=False), default=None,
              help="An export folder (manifest.json). Without it, the model flags below export first "
                   "(reusing an identical export), or the default export is used.")
@click.option("--model", default=None, help="As deltadit-export --model (default pixart-digits).")
@click.option("--resolution", type=int, default=None, help="As deltadit-export.")
@click.option("--weights", type=click.Path(file_okay=False), default=None,
              help="As deltadit-export. With --engines: the weights folder that export was made from, for the PyTorch "
                   "rows (needed when it was exported from a local folder; checked against its weights fingerprint).")
@click.option("--random-weights", is_flag=True, help="As deltadit-export.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="As deltadit-export: seed of --random-weights.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="As deltadit-export.")
@click.option("--cached-blocks", type=int, default=None, help="As deltadit-export: N_c.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="As deltadit-export.")
@click.option("--opset", type=int, default=18, show_default=True, help="As deltadit-export.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True)
@click.option("--max-batch", type=int, default=4, show_default=True, help="As deltadit-export.")
@click.option("--force", is_flag=True, help="As deltadit-export: re-export even if an identical export exists.")
@click.option("--steps", "num_steps", type=click.IntRange(min=1), default=None,
              help="T steps to run (default: the manifest's). Run-time only: the export is not changed.")
@click.option("--interval", type=click.IntRange(min=1), default=None, help="Δ-DiT cache interval N (default: manifest).")
@click.option("--boundary", type=click.IntRange(min=0), default=None,
              help="Δ-DiT boundary step b, 0..T (default: the manifest's, scaled as b/T when --steps differs).")
@click.option("--guidance-scale", type=FiniteFloat(1.0, 100.0, low_open=True, hint=GUIDANCE_HINT), default=None,
              help="Classifier-free guidance scale, > 1 and ≤ 100: the batch is 2 = [uncond; cond] (default: the "
                   "model's, recorded in the manifest).")
@click.option("--repeats", type=REPEATS, default=5, show_default=True,
              help="Timed round-robin rounds; the median and min–max are reported.")
@click.option("--warmup", type=WARMUP, default=1, show_default=True,
              help="Untimed runs of every mode before any timed run (torch-compile also compiles in its setup).")
@click.option("--threads", type=THREADS, default=None,
              help="torch and onnxruntime intra-op threads (default: all this process may use).")
@click.option("--sample-seed", type=SEED, default=0, show_default=True, help="Seed of the latents and conditioning.")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True,
              help="Prompt, for exports that ship a text encoder (pixart-digits).")
@click.option("--backend", default="onnxruntime", show_default=True,
              help="Runtime backend (onnxruntime: the CPU, like the eager baseline; auto: the fastest usable).")
@TRUST_ARTIFACTS_OPTION
@NO_VERIFY_OPTION
@click.option("--modes", default=",".join(DEFAULT_MODES), show_default=True,
              help=f"Comma-separated rows of {','.join(MODES)}, or all (the full peer table; int8-* export the "
                   "int8 variant next to the export first, openvino-* need the [openvino] extra).")
@click.option("--per-call", is_flag=True,
              help="Time one guided transformer call (batch 2) per row instead of a whole generation; delta-dit "
                   "rows: the mean per step over the schedule of one timed call of each kind.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the results as JSON to this file.")
@verbosity_options
@version_option
@click.pass_context
def cli(ctx, engines, num_steps, interval, boundary, guidance_scale, repeats, warmup, threads, sample_seed, prompt,
        backend, trust_artifacts, no_verify, modes, per_call, json_path, **export_flags):
    """Benchmark the runtime (none, Δ-DiT; fp32, int8, OpenVINO engines) against PyTorch eager fp32/bf16 and
    torch.compile.

    Each PyTorch row and each engine set runs in its own process; all are warmed up before any timed run,
    then timed round-robin with the same threads and thread waiting for torch and ONNX Runtime.
    """
    from .cli import user_errors

    selected = tuple(m.strip() for m in modes.split(",") if m.strip())
    selected = MODES if selected == ("all",) else selected
    bad = [m for m in selected if m not in MODES]
    if bad or not selected:
        raise click.BadParameter(f"{bad or modes!r}: expected all or a comma-separated subset of {','.join(MODES)}",
                                 param_hint="'--modes'")
    from runtime.backends import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise click.BadParameter(f"{backend!r} is not auto or one of {', '.join(BACKENDS)}", param_hint="'--backend'")
    from runtime.backends import backend_class, untrusted

    if backend != "auto" and not trust_artifacts and getattr(backend_class(backend), "code_artifacts", None):
        raise click.ClickException(untrusted(backend, backend_class(backend)))  # before any export or worker
    if json_path is not None and not Path(json_path).resolve().parent.is_dir():
        raise click.BadParameter(f"the folder of {json_path} does not exist", param_hint="'--json'")
    if json_path is not None:
        check_writable(Path(json_path).resolve().parent, "--json")  # before the export and the timing
    check_steps(num_steps)
    if boundary is not None and num_steps is not None and boundary > num_steps:  # else known after the export
        from runtime.schedule import ScheduleError

        raise ScheduleError(f"boundary={boundary} is out of range: expected 0 ≤ boundary ≤ {num_steps} (the boundary "
                            f"step b, with T={num_steps})")  # the runtime's message, before any export
    folder = _engines_folder(ctx, engines, export_flags)
    settings = BenchSettings(num_steps=num_steps, interval=interval, boundary=boundary, guidance_scale=guidance_scale,
                             repeats=repeats, warmup=warmup, threads=threads, seed=sample_seed, prompt=prompt,
                             backend=backend, modes=tuple(m for m in MODES if m in selected),
                             trust_artifacts=trust_artifacts, weights=export_flags["weights"], per_call=per_call,
                             verify=not no_verify)
    try:
        report = run_bench(folder, settings, Path(json_path) if json_path else None)
    except user_errors() + (BenchError,) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(format_report(report))
    if json_path:
        log.info("wrote %s", json_path)


def main(argv: list[str] | None = None):
    args = sys.argv[1:] if argv is None else list(argv)
    return cli.main(args=args, prog_name="deltadit-bench")


if __name__ == "__main__":
    main()
