"""``deltadit-eval`` (``deltadit eval``): the quality harness of Δ-DiT on the shipped ``pixart-digits`` model.

Every row generates the same samples (``--samples-per-digit`` per digit, digit-major, initial noise
from one ``torch.Generator(--seed)``, T=20 DPM-Solver++ with classifier-free guidance at the shipped
model's scale (its model card's) unless told otherwise) and reports:

- **bound**: ideal speedup of the block work. Δ-DiT rows: ``T·L / block-runs`` of their schedule;
  fewer steps: ``20 / T``; diffusers hook rows: the multiply-adds of every ``nn.Linear`` inside the
  transformer blocks in full compute divided by those actually executed during the row's run
  (counted with forward hooks; attention score products are left out, they are < 10% here).
- **speedup**: measured per-image latency (one image, so guidance batch 2; fp32; ``--threads``),
  median of ``--repeats`` runs taken round-robin across all rows after a warm-up, so a change of
  load on the machine hits every row alike. Runtime rows (ONNX Runtime) against runtime full
  compute; PyTorch rows (diffusers' own cache hooks) against PyTorch eager full compute.
- **accuracy**: share of samples that the reference digits classifier
  (``digits.train_digit_classifier(seed=0)``) recognizes as the prompted digit.
- **FD**: Fréchet distance between the classifier's 64-d penultimate features of the samples and
  of the real digits of the training split (the reference set); ``FD floor`` in the output is the
  distance of the real held-out digits to the same reference (what finite samples of real data give).
  ``±`` is its standard deviation over 200 bootstrap resamples of the samples; comparisons between rows
  use a paired bootstrap (same resampled indices for both rows, which share their seeds) and state the
  95% interval of the FD difference.
- **PSNR / max-abs** against the full-compute samples of the same seeds (runtime rows against runtime
  full compute, PyTorch rows against PyTorch full compute), pixels clamped to [-1, 1], PSNR over
  all pixels of all samples pooled: ``10·log10(2² / MSE)``.

Rows: full compute; ``delta-dit`` (the manifest's default N, N_c, b); ``delta-front`` (b=0);
``delta-rear`` (b=T); ``output-cache`` (FORA-like, stores the range's output instead of its
delta); fewer steps with the block compute of ``delta-dit`` (``block-runs / L`` steps, rounded down
and up: 12 and 13 for L=12); PyTorch eager full compute; and one row per diffusers cache hook that
applies to ``PixArtTransformer2DModel`` (FirstBlockCache, Pyramid Attention Broadcast, FasterCache
without its CFG part, TaylorSeer, MagCache), tuned to a block-work bound close to ``delta-dit``'s
where the method allows it. Output: a table, ``quality.json``, ``speedup_vs_fd.png`` and sample
grids in ``--out`` (default ``deltadit-out/<export folder name>/``: its own folder, never the committed
``docs/quality/`` of a clone, nor the export, which a re-export replaces). Samples are cached per row under ``--work`` (keyed on
the engines' sha256, the sampler and encoder configs, seed and row settings), so a rerun only recomputes
what changed.

Layout: this module is the command (open the export, choose the rows, write the report); scoring every
row (samples, accuracy, FD with its bootstrap, PSNR) is in eval_scoring.py, the rows and their sample
generation in eval_rows.py, the diffusers hooks in eval_hooks.py and their
tuning in eval_tuning.py, FD and the classifier in eval_metrics.py, table/plot/verdicts in
eval_report.py; PSNR and image grids in imaging.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from runtime.cli_options import CONTEXT_SETTINGS, version_option

from .cli_types import GUIDANCE, NO_VERIFY_OPTION, REPEATS, SEED, THREADS, TRUST_ARTIFACTS_OPTION, Command, check_steps
from .console import log, quiet, verbosity_options
from .eval_hooks import HOOK_ROWS
from .eval_metrics import CLASSIFIER_SEED, feature_stats, frechet_distance_from_stats, reference_classifier
from .eval_report import (
    _cpu_name, _finite, _json_default, format_table, gate_lines, precision_gate, verdicts, write_figures,
)
from .eval_rows import (
    EVAL_MAX_BATCH, EvalSetup, RowSpec, open_precision_runtimes, parse_precisions, precision_rows,
    runtime_rows, timing_rows,
)
from .eval_scoring import score_rows
from .eval_tuning import tune_hooks
from .publish import check_writable, write_file
from .timing import TimingError, default_threads, measure, ratio

DEFAULT_EVAL_ENGINES = Path("engines") / "pixart-digits-16-fp32-eval"
OUT_ROOT = Path("deltadit-out")  # as deltadit-generate: one folder per export, outside it
ALWAYS_ROWS = ("full", "pytorch full", "delta-dit")
ROW_NAMES = ("full", "delta-dit", "delta-front", "delta-rear", "output-cache", "pytorch full", *HOOK_ROWS)
FEWER_STEPS = re.compile(r"fewer steps T=\d+")


def parse_rows(ctx, param, value: str | None) -> tuple[str, ...] | None:
    """``--rows``: known row names only (a typo must not silently drop a row)."""
    if value is None:
        return None
    names = tuple(dict.fromkeys(s.strip() for s in value.split(",") if s.strip()))
    unknown = [n for n in names if n not in ROW_NAMES and not FEWER_STEPS.fullmatch(n)]
    if unknown or not names:
        raise click.BadParameter(f"{', '.join(map(repr, unknown)) or repr(value)}: expected a comma-separated subset of "
                                 f"{', '.join(ROW_NAMES)}, 'fewer steps T=<n>'", ctx=ctx, param=param)
    return names


def default_out(folder: Path) -> Path:
    return OUT_ROOT / (Path(folder).resolve().name or "engines")


@click.command(name="eval", cls=Command, context_settings=CONTEXT_SETTINGS)
@click.option("--engines", type=click.Path(file_okay=False), default=None,
              help=f"Export folder (default {DEFAULT_EVAL_ENGINES}, exported from the shipped model with "
                   f"--max-batch {EVAL_MAX_BATCH}; re-exported when the weights change).")
@click.option("--samples-per-digit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the initial noise (shared by all rows).")
@click.option("--steps", "num_steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--guidance", type=GUIDANCE, default=None,
              help="Classifier-free guidance scale, 1..100; 1 = none (default: the model's, recorded in the "
                   "manifest: the model card's for pixart-digits).")
@click.option("--repeats", type=REPEATS, default=15, show_default=True, help="Timed runs per row (median reported).")
@click.option("--threads", type=THREADS, default=None,
              help="CPU threads of ONNX Runtime and PyTorch for the latency measurement (default: all cores).")
@click.option("--gen-threads", type=THREADS, default=None,
              help="Threads for generating the samples (default: --threads); on a shared machine 1 is often faster.")
@click.option("--rows", "only", default=None, callback=parse_rows,
              help=f"Comma-separated subset of rows: {', '.join(ROW_NAMES)}, 'fewer steps T=<n>'; "
                   f"{', '.join(ALWAYS_ROWS)} always run.")
@click.option("--no-hooks", is_flag=True, help="Skip the diffusers cache-hook rows.")
@click.option("--precisions", default="int8,bf16", show_default=True,
              help="Reduced-precision rows (full and delta-dit each) and their quality gate: int8 (the int8 export "
                   "of the same model, made next to the eval export), bf16 (OpenVINO, bf16 inference); none: "
                   "no such rows.")
@click.option("--tuning-images", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Images (other noise than the eval's) on which hook thresholds are chosen.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help=f"Folder for quality.json, speedup_vs_fd.png and sample grids (default {OUT_ROOT}/<export folder "
                   "name>/; the committed results in docs/quality/ are rewritten only with --out docs/quality).")
@click.option("--work", type=click.Path(file_okay=False), default=None,
              help="Cache of per-row samples (default <engines>.eval-cache next to the export); --work '' disables it.")
@TRUST_ARTIFACTS_OPTION
@click.option("--weights", type=click.Path(file_okay=False), default=None,
              help="The weights folder the export was made from, for the PyTorch rows (needed when it was exported "
                   "from a local folder, deltadit-export --weights; checked against its weights fingerprint).")
@NO_VERIFY_OPTION
@verbosity_options
@version_option
def main(engines, samples_per_digit, seed, num_steps, guidance, repeats, threads, gen_threads, only, no_hooks,
         precisions, tuning_images, out, work, trust_artifacts, weights, no_verify):
    """Measure Δ-DiT's quality and speed on pixart-digits against full compute, fewer steps and other caches."""
    from runtime.schedule import ScheduleError

    from .digits import load_digit_split

    from .cli import user_errors

    wanted_precisions = parse_precisions(precisions)
    t_start = time.perf_counter()
    check_steps(num_steps)
    hooks_asked = [n for n in only or () if n in HOOK_ROWS]
    if no_hooks and hooks_asked:
        raise click.BadParameter(f"{', '.join(hooks_asked)}: diffusers hook rows, which --no-hooks skips; drop one of "
                                 "the two", param_hint="'--rows'")
    # Every folder this run writes is checked first: a read-only or full disk must not cost minutes of work.
    out_dir = check_writable(Path(out) if out else default_out(engines or DEFAULT_EVAL_ENGINES))
    if work != "":
        check_writable(Path(work) if work else work_folder(Path(engines or DEFAULT_EVAL_ENGINES)), "--work")
    torch.set_grad_enabled(False)
    threads = threads or default_threads()
    gen_threads = gen_threads or threads
    torch.set_num_threads(gen_threads)
    folder, runtime = open_engines(engines, gen_threads, trust_artifacts, verify=not no_verify)
    try:
        check_rows(runtime, num_steps, only)  # before any sample, classifier or tuning work
    except ScheduleError as exc:
        raise click.ClickException(str(exc)) from None
    m = runtime.manifest
    setup = eval_setup(runtime, folder, samples_per_digit, seed, guidance, work, weights)
    digits, guidance = setup.digits, setup.guidance
    try:
        setup.runtimes, missing = open_precision_runtimes(folder, wanted_precisions, gen_threads, trust_artifacts,
                                                          quiet_progress=quiet(), weights=weights)
    except user_errors() as exc:
        raise click.ClickException(str(exc)) from None

    log.info("training the reference classifier (seed %d) ...", CLASSIFIER_SEED)
    clf = reference_classifier(m.sample_shape[-1])
    (xtr, _), (xho, _) = load_digit_split(m.sample_shape[-1])
    ref_stats = feature_stats(clf.features(xtr))
    fd_floor = frechet_distance_from_stats(*feature_stats(clf.features(xho)), *ref_stats)
    log.info("classifier held-out accuracy %.4f; FD floor (real held-out vs real train) %.2f", clf.held_out_accuracy,
             fd_floor)

    try:
        rows, tuning = choose_rows(setup, num_steps, only, no_hooks, tuning_images)
        rows += precision_rows(num_steps, tuple(p for p in wanted_precisions if p in setup.runtimes))
    except ScheduleError as exc:
        raise click.ClickException(str(exc)) from None
    results, samples, boot = score_rows(setup, rows, clf, ref_stats, num_steps)

    log.info("timing one image per row, %d round-robin repeats ...", repeats)
    try:
        timing = measure(timing_rows(setup, rows, verify=not no_verify), repeats=repeats, threads=threads)
    except TimingError as exc:
        raise click.ClickException(str(exc)) from None
    for name, r in results.items():
        r["latency"] = timing.rows[name].to_dict()
        r["latency_ms"] = timing.rows[name].median_ms
        r["latency_min_ms"], r["latency_max_ms"] = timing.rows[name].min_ms, timing.rows[name].max_ms
        r["speedup"] = ratio(timing, r["reference"], name)
    ordered = [results[r.name] for r in rows]

    title = (f"{m.model['name']}: {len(digits)} samples/row, T={num_steps}, guidance {guidance}, "
             f"{threads} CPU threads")
    figures = write_figures(ordered, samples, samples_per_digit, out_dir, title)
    lines = verdicts(results, boot) if "delta-dit" in results and "full" in results else []
    gates = {p: precision_gate(results, p, boot) for p in wanted_precisions}
    for p in wanted_precisions:
        lines += gate_lines(gates[p], p, missing.get(p))
    report = {
        "model": {"name": m.model["name"], "params": m.model.get("params"), "num_layers": m.num_layers,
                  "cached_blocks": m.cached_blocks, "default_schedule": m.schedule,
                  "weights": m.model.get("source", {}).get("kind")},
        "setup": {"samples_per_row": len(digits), "samples_per_digit": samples_per_digit, "seed": seed,
                  "num_steps": num_steps, "guidance": guidance,
                  "sampler": "DPM-Solver++ (export's scheduler/scheduler_config.json)",
                  "threads": threads, "generation_threads": gen_threads,
                  "timing": f"per image (guidance batch 2), median of {repeats} round-robin runs after one warm-up "
                  "of every row; runtime rows vs runtime full, pytorch rows vs pytorch full",
                  "harness": {k: v for k, v in timing.to_dict().items() if k != "rows"},
                  "harness_header": timing.header(),
                  "eval_max_batch": m.max_batch // 2, "cpu": _cpu_name(),
                  "psnr": "pooled over all pixels of all samples, pixels clamped to [-1, 1], range 2",
                  "fd": "Fréchet distance of classifier penultimate features (64-d) to the real train split"},
        "classifier": {"seed": CLASSIFIER_SEED, "held_out_accuracy": clf.held_out_accuracy,
                       "train_accuracy": clf.train_accuracy},
        "fd_floor_real_held_out": fd_floor,
        "hook_tuning": tuning,
        "rows": ordered,
        "verdicts": lines,
        "precision_gate": {p: gates[p] if gates[p] is not None else {"precision": p, "passed": None,
                                                                     "not_measured": missing.get(p)}
                           for p in wanted_precisions},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    json_path = out_dir / "quality.json"
    write_file(json_path, json.dumps(_finite(report), indent=2, default=_json_default) + "\n")
    click.echo(f"{title}; classifier held-out accuracy {100 * clf.held_out_accuracy:.1f}%; FD floor (real held-out "
               f"digits) {fd_floor:.2f}")
    for line in timing.header():
        click.echo(line)
    click.echo(format_table(ordered))
    for line in lines:
        click.echo(line)
    click.echo(f"wrote {json_path}, {', '.join(map(str, figures))} in {time.perf_counter() - t_start:.0f} s")


def open_engines(engines: str | None, gen_threads: int, trust_artifacts: bool = False, verify: bool = True):
    """(folder, runtime for the samples): ``engines`` as given, or the default eval export of the shipped
    model (exported, or re-exported when its shipped configs changed). The timing builds its own runtimes."""
    from runtime import DeltaDiTRuntime, ManifestError
    from runtime.manifest import load_manifest
    from runtime.schedule import ScheduleError

    from .cli import user_errors
    from .export_options import ExportOptions, ReplaceRefused
    from .exporter import check_replaceable, export
    from .progress import Progress
    from .sampling import stale_extras

    try:
        if engines:
            folder = Path(engines)
        else:
            folder = DEFAULT_EVAL_ENGINES
            opts = ExportOptions(out=str(folder), max_batch=EVAL_MAX_BATCH)
            if (folder / "manifest.json").is_file() and stale_extras(load_manifest(folder)):
                log.info("the shipped model's sampler/encoder config changed since %s was exported: re-exporting",
                         folder)
                opts = dataclasses.replace(opts, force=True)
            try:
                check_replaceable(opts)
            except ReplaceRefused as exc:  # eval's own folder, made with other options (another version's defaults)
                log.info("%s was exported with other options than eval's (%s): re-exporting it", folder,
                         "; ".join(exc.changes))
                opts = dataclasses.replace(opts, force=True)
            res = export(opts, Progress(stream=sys.stderr, quiet=quiet()))
            if not res.reused:
                log.info("%s", res.summary())
        runtime = DeltaDiTRuntime(folder, threads=gen_threads, trust_artifacts=trust_artifacts, verify=verify)
    except (ManifestError, ScheduleError) + user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    return folder, runtime


def eval_setup(runtime, folder: Path, samples_per_digit: int, seed: int, guidance: float | None,
               work: str | None, weights: str | None = None) -> EvalSetup:
    """The inputs every row shares: prompts (digit-major), noise, the sampler config, the PyTorch model
    (``weights``: the user's --weights DIR, see rebuild.py)."""
    from .cli import user_errors
    from .digits import prompt_for_digit
    from .rebuild import rebuild_model
    from .sampling import default_guidance, encode_prompts, initial_noise, load_text_encoder, scheduler_config_of

    m = runtime.manifest
    encoder = load_text_encoder(m, warn=log.warning)
    guidance = guidance if guidance is not None else default_guidance(m)
    digits = np.repeat(np.arange(10), samples_per_digit)
    embeds, mask = encode_prompts(encoder, [prompt_for_digit(int(d)) for d in digits])
    negative = encode_prompts(encoder, [""])
    noise = initial_noise(len(digits), tuple(m.sample_shape), seed)
    sched_cfg = scheduler_config_of(m)
    try:
        torch_model = rebuild_model(m, weights)
    except user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    state = {k: v.clone() for k, v in torch_model.state_dict().items()}

    def factory():
        mdl = type(torch_model).from_config(torch_model.config)
        mdl.load_state_dict(state)
        return mdl.eval().requires_grad_(False)

    work_dir = None if work == "" else Path(work) if work else work_folder(folder)
    # Everything a row's samples depend on besides the row itself: engines, sampler config, text encoder, noise.
    fingerprint = json.dumps({"manifest": m.export.get("cache_key"), "segments": [s.sha256 for s in m.segments],
                              "scheduler": sched_cfg, "encoder": encoder.to_config(), "seed": seed, "n": len(digits),
                              "guidance": guidance}, sort_keys=True, default=str)
    return EvalSetup(runtime, m, factory, sched_cfg, embeds, mask, negative, noise, digits, guidance, work_dir,
                     fingerprint, weights)


def work_folder(folder: Path) -> Path:
    """The default sample cache: next to the export, not inside it (a re-export replaces the export folder)."""
    return folder.parent / f"{folder.name}.eval-cache"


def check_rows(runtime, num_steps: int, only: tuple[str, ...] | None) -> None:
    """``--rows`` names a fewer-steps row this export and T do not have (their T follow from delta-dit's
    block-runs): refused before any work."""
    names = [r.name for r in runtime_rows(runtime, num_steps)] + ["pytorch full"]
    missing = [n for n in only or () if FEWER_STEPS.fullmatch(n) and n not in names]
    if missing:
        raise click.BadParameter(f"{', '.join(map(repr, missing))}: this export's rows are {', '.join(names)} and "
                                 "the hooks", param_hint="'--rows'")


def choose_rows(setup: EvalSetup, num_steps: int, only: tuple[str, ...] | None, no_hooks: bool,
                tuning_images: int) -> tuple[list[RowSpec], dict[str, Any]]:
    """The rows to run (``--rows`` keeps the full-compute rows and delta-dit) and the hook tuning record."""
    runtime = setup.runtime
    rows = runtime_rows(runtime, num_steps)
    rows.append(RowSpec("pytorch full", "pytorch", num_steps))
    target = runtime.schedule("delta-dit", num_steps=num_steps).bound
    tuning: dict[str, Any] = {}
    wanted = None if not only else set(only) | set(ALWAYS_ROWS)
    hook_names = tuple(h for h in HOOK_ROWS if wanted is None or h in wanted)
    if not no_hooks and hook_names:
        log.info("choosing diffusers cache-hook settings ...")
        hook_rows, tuning = tune_hooks(setup, num_steps, target, tuning_images=tuning_images, names=hook_names)
        rows += hook_rows
    if wanted is not None:
        rows = [r for r in rows if r.name in wanted]
    return rows, tuning


if __name__ == "__main__":
    main()
