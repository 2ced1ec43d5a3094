"""``deltadit-export``: cut a diffusers DiT into subgraph engines and write their manifest."""

from __future__ import annotations

import sys

import click

from runtime.backends import BackendError
from runtime.manifest import ManifestError
from runtime.schedule import ScheduleError, build_schedule

from .models import DEFAULT_MODEL, REGISTRY, ModelError, parse_overrides
from .progress import Progress

# Errors that carry a complete message for the user (what is wrong, where, the fix): shown without a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (ModelError, ScheduleError, ManifestError, BackendError)


def user_errors() -> tuple[type[Exception], ...]:
    from .exporter import OptionError
    from .onnx_export import ExportError

    return USER_ERRORS + (OptionError, ExportError)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", "model", default=DEFAULT_MODEL, show_default=True,
              help=f"Registry name: {', '.join(sorted(REGISTRY))}.")
@click.option("--resolution", type=int, default=None,
              help="Image resolution in pixels (default: the model's; pixart-alpha 512|1024, dit-xl-2 256|512).")
@click.option("--weights", type=click.Path(file_okay=False), default=None,
              help="Local diffusers folder (pipeline root or its transformer/). Default: the local HF cache.")
@click.option("--random-weights", is_flag=True, help="Build the architecture with seeded random weights.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random-weights.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a diffusers config field (with --random-weights), e.g. --set num_layers=12.")
@click.option("--cached-blocks", type=int, default=None,
              help="N_c, blocks skipped on cached steps; 1 ≤ N_c < L (default round(0.75·L): 21 of 28).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp16 keeps LayerNorms in fp32; int8 quantizes the MatMul weights of the segments not in "
                   "--keep-fp32 (ONNX Runtime dynamic quantization).")
@click.option("--keep-fp32", "keep_fp32", default=None, metavar="SEGMENTS",
              help="With --precision int8: segments kept in fp32, comma-separated, or none (default: embed,head).")
@click.option("--int8-tolerance", type=float, default=None,
              help="With --precision int8: the largest max relative error an int8 segment may have against fp32 "
                   "(default 5e-2); a segment above it is refused.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default engines/<model>-<resolution>-<precision>).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset, 17–20.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True,
              help="torch ONNX exporter (chosen explicitly: torch's default changed in 2.9).")
@click.option("--max-batch", type=int, default=4, show_default=True,
              help="Images per call; engines accept up to 2× for classifier-free guidance.")
@click.option("--steps", "num_steps", type=int, default=None, help="Default schedule: steps T (20).")
@click.option("--interval", type=int, default=None, help="Default schedule: cache interval N (2).")
@click.option("--boundary", type=int, default=None, help="Default schedule: boundary step b (12).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["onnx", "tensorrt", "torch"]),
              help="Artifacts to build besides ONNX: tensorrt (needs the [tensorrt] extra), torch (torch.export).")
@click.option("--force", is_flag=True, help="Rebuild even if an identical export exists.")
@click.option("--print-schedule", is_flag=True, help="Print the Δ-DiT plan for these options and exit.")
@click.option("--policy", default="delta-dit", show_default=True,
              help="With --print-schedule: none, delta-dit, delta-front, delta-rear, output-cache.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output (the summary is still printed).")
@click.option("--calibrate", is_flag=True,
              help="Sweep (N, N_c, b) in PyTorch first and export the fastest setting within --psnr-budget "
                   "(values given with --interval/--cached-blocks/--boundary are kept).")
@click.option("--psnr-budget", type=float, default=30.0, show_default=True,
              help="With --calibrate: worst per-sample PSNR vs full compute, dB.")
@click.option("--calibrate-prompts", type=int, default=4, show_default=True,
              help="With --calibrate: samples (prompts) the sweep measures.")
def main(model, resolution, weights, random_weights, seed, overrides, cached_blocks, precision, keep_fp32,
         int8_tolerance, out, opset, exporter, max_batch, num_steps, interval, boundary, backends, force, print_schedule, policy, quiet,
         calibrate, psnr_budget, calibrate_prompts):
    """Export a PixArt-α or DiT-XL/2 transformer as embed/front/middle/rear/head engines with a manifest."""
    from .exporter import ExportOptions, export, resolve

    try:
        options = ExportOptions(
            model=model, resolution=resolution, weights=weights, random_weights=random_weights, seed=seed,
            overrides=parse_overrides(overrides), cached_blocks=cached_blocks, precision=precision, out=out,
            opset=opset, exporter=exporter, max_batch=max_batch, num_steps=num_steps, interval=interval,
            boundary=boundary, backends=("onnx",) + tuple(b for b in backends if b != "onnx"), force=force,
            keep_fp32=keep_fp32, int8_tolerance=int8_tolerance,
        )
        if print_schedule:
            job = resolve(options)
            s = job.schedule
            schedule = build_schedule(policy, num_steps=s["num_steps"], num_layers=job.cuts.num_layers,
                                      cached_blocks=job.cuts.cached_blocks, interval=s["interval"],
                                      boundary=s["boundary"])
            click.echo(schedule.format())
            return
        calibration = None
        if calibrate:
            from .calibrate import calibrate_export_options

            progress = Progress(stream=sys.stderr, quiet=quiet)
            progress.note("calibrating the cache schedule in PyTorch (sweep of N, N_c, b)")
            options, calibration = calibrate_export_options(options, psnr_budget=psnr_budget,
                                                            num_prompts=calibrate_prompts, log=progress.note)
        result = export(options, Progress(stream=sys.stderr, quiet=quiet))
    except user_errors() as exc:
        if getattr(exc, "table", None):  # the int8 gate: each segment's precision and error, then the Error line
            click.echo(exc.table, err=True)
        raise click.ClickException(str(exc)) from None
    click.echo(result.summary())
    if calibration is not None:
        click.echo(calibration.summary())


