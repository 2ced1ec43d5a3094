"""``deltadit-generate`` (``deltadit generate``): run the exported engines for prompts and write PNGs.

What it does, on the shipped ``pixart-digits`` model by default:

1. loads the export at ``engines/pixart-digits-16-fp32`` (exporting it first, through the exporter
   library, when that folder has no manifest yet);
2. encodes the prompts with the text encoder shipped next to the engines (``text_encoder/``);
3. generates ``--samples`` images per prompt with the Δ-DiT cache and writes ``grid.png`` (one row
   per prompt) into ``--out`` (default ``deltadit-out/<export folder name>/``: never inside the export,
   which a re-export replaces; checked writable before any work);
4. generates the same seeds with full compute (runtime policy ``none``) and writes
   ``compare.png``: per prompt, full compute | Δ-DiT | 4× amplified absolute difference;
5. times one image (classifier-free guidance, so the engines run batch 2) with PyTorch eager (the
   diffusers model rebuilt from the weights the manifest records, same scheduler, same noise),
   runtime ``none`` and runtime ``delta-dit`` through the measurement harness (:mod:`.timing`: same
   threads and thread waiting for torch and ONNX Runtime, a warm-up of every mode, then ``--repeats``
   round-robin runs; median with min–max, load average before and after).

The sampling loops and the text encoder live in ``sampling.py`` (shared with ``deltadit-eval`` and the
benchmarks), the image helpers and PSNR in ``imaging.py``.
Pixel-space models only: a latent model (pixart-alpha, DiT-XL/2) would need its VAE to make images.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch

from runtime.cli_options import CONTEXT_SETTINGS, version_option
from runtime.schedule import POLICY_NAMES

from . import sample_rows
from .cli_types import GUIDANCE, NO_VERIFY_OPTION, REPEATS, SEED, THREADS, TRUST_ARTIFACTS_OPTION, Command
from .console import log, quiet, verbosity_options
from .imaging import comparison_image, grid_image, psnr, save_png, to_uint8
from .models import check_prompt, model_guidance
from .publish import check_writable
from .rebuild import resolve_weights
from .sampling import (
    default_guidance, encode_prompts, initial_noise, load_text_encoder, runtime_generate, stale_extras,
)
from .timing import TimingError, default_threads, format_table, measure

DEFAULT_MODEL = "pixart-digits"
DEFAULT_ENGINES = Path("engines") / "pixart-digits-16-fp32"
DEFAULT_SAMPLES = 8
OUT_ROOT = Path("deltadit-out")  # outputs of generate and eval, one folder per export: never the export itself
MAX_IMAGES = 10000  # prompts × samples of one run (the noise and embeddings are held in memory at once)


def default_out(engines: str | Path) -> Path:
    """``deltadit-out/<export folder name>/``: outside the export folder (a re-export replaces that folder)."""
    return OUT_ROOT / (Path(engines).resolve().name or "engines")


def default_prompts() -> list[str]:
    from .digits import prompt_for_digit

    return [prompt_for_digit(d) for d in range(10)]


def ensure_export(folder: str | Path, *, model: str = DEFAULT_MODEL, max_batch: int = 4, **options) -> Path:
    """The export at ``folder``; exports ``model`` there first (exporter library) when it has no manifest."""
    from runtime.manifest import MANIFEST_NAME

    folder = Path(folder)
    if (folder / MANIFEST_NAME).is_file():
        return folder
    from .export_options import ExportOptions
    from .exporter import export
    from .progress import Progress

    log.info("no export at %s: exporting %s first", folder, model)
    result = export(ExportOptions(model=model, out=str(folder), max_batch=max_batch, **options),
                    Progress(stream=sys.stderr, quiet=quiet()))
    log.info("%s", result.summary())
    return folder


@click.command(name="generate", cls=Command, context_settings=CONTEXT_SETTINGS)
@click.option("--engines", type=click.Path(file_okay=False), default=None,
              help=f"Export folder (default {DEFAULT_ENGINES}; exported first if it has no manifest).")
@click.option("--prompt", "prompts", multiple=True,
              help="Prompt (repeatable). Default: 'a handwritten digit 0'..'9' (all that pixart-digits knows).")
@click.option("--samples", type=click.IntRange(1, 1000), default=DEFAULT_SAMPLES, show_default=True,
              help="Images per prompt.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--steps", "num_steps", type=click.IntRange(min=1), default=None,
              help="Denoising steps T (default: the manifest's).")
@click.option("--guidance", type=GUIDANCE, default=None,
              help=f"Classifier-free guidance scale, 1..100; 1 = none (default: the model's, recorded in the "
                   f"manifest: {model_guidance(DEFAULT_MODEL):g} for {DEFAULT_MODEL}, from its model card).")
@click.option("--policy", type=click.Choice(POLICY_NAMES), default="delta-dit", show_default=True,
              help="Cache policy of the grid.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help=f"Folder for grid.png and compare.png (default {OUT_ROOT}/<export folder name>/, outside the "
                   "export).")
@click.option("--repeats", type=REPEATS, default=5, show_default=True,
              help="Timed rounds (median and min–max reported).")
@click.option("--no-timing", is_flag=True, help="Skip the latency comparison.")
@click.option("--threads", type=THREADS, default=None,
              help="CPU threads of ONNX Runtime and PyTorch (default: all this process may use).")
@TRUST_ARTIFACTS_OPTION
@click.option("--weights", type=click.Path(file_okay=False), default=None,
              help="The weights folder the export was made from, for the PyTorch eager timing (needed when it was "
                   "exported from a local folder, deltadit-export --weights; checked against its weights fingerprint).")
@NO_VERIFY_OPTION
@verbosity_options
@version_option
def main(engines, prompts, samples, seed, num_steps, guidance, policy, out, repeats, no_timing, threads,
         trust_artifacts, weights, no_verify):
    """Generate images with the exported engines and the Δ-DiT cache; compare with full compute and PyTorch eager."""
    from runtime import DeltaDiTRuntime, ManifestError
    from runtime.schedule import ScheduleError

    from .cli import user_errors

    t_start = time.perf_counter()
    torch.set_grad_enabled(False)
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    prompts = list(prompts) or default_prompts()
    if len(prompts) * samples > MAX_IMAGES:
        raise click.BadParameter(f"{len(prompts)} prompts × {samples} samples = {len(prompts) * samples} images, more "
                                 f"than the {MAX_IMAGES} one run generates; pass fewer", param_hint="'--samples'")
    out_dir = check_writable(Path(out) if out else default_out(engines or DEFAULT_ENGINES))  # before any work
    try:
        folder = Path(engines) if engines else ensure_export(DEFAULT_ENGINES)
        runtime = DeltaDiTRuntime(folder, threads=threads, trust_artifacts=trust_artifacts, verify=not no_verify)
        m = runtime.manifest
        if m.export.get("vae_scale_factor", 8) != 1:
            raise click.ClickException(f"{m.model['name']} works in a VAE latent space; deltadit-generate writes "
                                       "images for pixel-space models (pixart-digits) only")
        for p in prompts:
            check_prompt(m.model["name"], p)
        encoder = load_text_encoder(m, warn=log.warning)
        stale = stale_extras(m)
        if stale:
            log.warning("%s in %s differ from the shipped %s: this export predates the model's current "
                        "sampler/encoder config; re-export with `deltadit-export --force`", ", ".join(stale), folder,
                        m.model["name"])
        guidance = guidance if guidance is not None else default_guidance(m)
        schedule = runtime.schedule(policy, num_steps=num_steps)
        full_schedule = runtime.schedule("none", num_steps=schedule.num_steps)
        if not no_timing:  # before any image: the eager row's weights can be read (rebuild.py)
            resolve_weights(m, weights, refusal_hint="or skip the PyTorch timing (--no-timing)")
    except (ManifestError, ScheduleError) + user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    P, S = len(prompts), samples
    embeds, mask = encode_prompts(encoder, [p for p in prompts for _ in range(S)])
    negative = encode_prompts(encoder, [""])
    noise = initial_noise(P * S, tuple(m.sample_shape), seed)

    t0 = time.perf_counter()
    delta = runtime_generate(runtime, schedule, embeds, mask, negative, noise, guidance_scale=guidance,
                             desc=f"generating ({schedule.policy})")
    full = runtime_generate(runtime, full_schedule, embeds, mask, negative, noise, guidance_scale=guidance,
                            desc="generating (full compute)")
    t_gen = time.perf_counter() - t0
    if not (torch.isfinite(delta).all() and torch.isfinite(full).all()):
        raise click.ClickException("the generated samples contain NaN/Inf")
    labels = [_row_label(p) for p in prompts]
    grid_path = save_png(grid_image(to_uint8(delta), cols=S), out_dir / "grid.png")
    cmp_path = save_png(comparison_image(full, delta, P, S, shown=min(S, 3), row_labels=labels,
                                         names=("full", schedule.policy, "difference")), out_dir / "compare.png")

    s = schedule
    click.echo(f"{m.model['name']}: {P} prompts × {S} samples, T={s.num_steps}, guidance {guidance:g}, seed {seed}; "
               f"policy {s.policy} (N={s.interval}, N_c={s.cached_blocks}, b={s.boundary}: {s.block_runs} of "
               f"{s.num_steps * s.num_layers} block-runs, bound {s.bound:.2f}×)")
    # Not a speed comparison (the first policy would pay the warm-up): the latency table below is.
    click.echo(f"  generated {P * S} images with {s.policy} and the same {P * S} with full compute in {t_gen:.1f} s "
               f"({runtime.manifest.max_batch // 2} per engine call)")
    click.echo(f"  {s.policy} vs full compute, same seeds: PSNR {psnr(delta, full):.1f} dB, "
               f"max |Δpixel| {float((delta.clamp(-1, 1) - full.clamp(-1, 1)).abs().max()):.3f} (range [-1, 1])")

    if not no_timing:
        one = [(embeds[:1], mask[:1], negative, noise[:1])]
        rows = [sample_rows.eager("pytorch eager", folder, s.num_steps, one, guidance, weights=weights),
                sample_rows.runtime("runtime none", folder, "none", s.num_steps, one, guidance, trust_artifacts,
                                    verify=not no_verify)]
        if s.policy != "none":
            rows.append(sample_rows.runtime(f"runtime {s.policy}", folder, s.policy, s.num_steps, one, guidance,
                                            trust_artifacts, verify=not no_verify))
        try:
            lat = measure(rows, repeats=repeats, threads=threads)
        except TimingError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"latency per image (T={s.num_steps}, guidance batch 2, {m.precision}):")
        click.echo(format_table(lat, {"vs eager": "pytorch eager", "vs none": "runtime none"}, unit="ms/image"))
    click.echo(f"wrote {grid_path} (grid, {s.policy}: one row per prompt) and {cmp_path} (per prompt: full | "
               f"{s.policy} | 4×|difference|) in {time.perf_counter() - t_start:.0f} s")


def _row_label(prompt: str) -> str:
    """A comparison row's label: the digit of a digit prompt, else the prompt itself (shortened)."""
    words = prompt.split()
    if words and words[-1].isdigit() and "digit" in prompt:
        return words[-1]
    return prompt if len(prompt) <= 12 else prompt[:11] + "…"


if __name__ == "__main__":
    main()
