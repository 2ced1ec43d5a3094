"""``deltadit-export`` (``deltadit export``): cut a diffusers DiT into subgraph engines and write their manifest."""

from __future__ import annotations

import dataclasses
import logging
import sys

import click

from runtime.backends import BackendError
from runtime.cli_options import CONTEXT_SETTINGS, version_option
from runtime.manifest import ManifestError
from runtime.schedule import POLICY_NAMES, ScheduleError, build_schedule, default_cached_blocks

from .cli_types import SEED, Command, FiniteFloat, user_error_types
from .console import quiet, verbosity_options
from .model_config import parse_overrides
from .models import DEFAULT_MODEL, DEFAULT_SCHEDULE, REGISTRY, ModelError
from .progress import Progress

# Errors that carry a complete message for the user (what is wrong, where, the fix): shown without a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (ModelError, ScheduleError, ManifestError, BackendError)


def user_errors() -> tuple[type[Exception], ...]:
    from .export_options import OptionError
    from .onnx_export import ExportError
    from .publish import OutputError

    return USER_ERRORS + (OptionError, ExportError, OutputError) + user_error_types()


def _registry_help() -> tuple[str, str]:
    """Help texts true for every registry model: their resolutions and their default N_c of L blocks."""
    from .export_options import ExportOptions, schedule_layers

    resolutions = "; ".join(f"{n} {'|'.join(map(str, REGISTRY[n].resolutions))}" for n in sorted(REGISTRY))
    by_layers: dict[int, list[str]] = {}
    for name in sorted(REGISTRY):
        try:
            by_layers.setdefault(schedule_layers(ExportOptions(model=name)), []).append(name)
        except (ModelError, OSError):  # a damaged shipped config must not break --help
            continue
    cached = ", ".join(f"{default_cached_blocks(L)} of {L} for {' and '.join(names)}"
                       for L, names in sorted(by_layers.items()))
    return resolutions, cached


RESOLUTIONS_HELP, CACHED_HELP = _registry_help()


@click.command(name="export", cls=Command, context_settings=CONTEXT_SETTINGS)
@click.option("--model", "model", default=DEFAULT_MODEL, show_default=True,
              help=f"Registry name: {', '.join(sorted(REGISTRY))}.")
@click.option("--resolution", type=int, default=None,
              help=f"Image resolution in pixels (default: the model's first; published: {RESOLUTIONS_HELP}).")
@click.option("--weights", type=click.Path(file_okay=False), default=None,
              help="Local diffusers folder (pipeline root or its transformer/). Default: the local HF cache.")
@click.option("--random-weights", is_flag=True, help="Build the architecture with seeded random weights.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of --random-weights.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a diffusers config field (with --random-weights), e.g. --set num_layers=12.")
@click.option("--cached-blocks", type=int, default=None,
              help=f"N_c, blocks skipped on cached steps; 1 ≤ N_c < L (default round(0.75·L): {CACHED_HELP}).")
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
@click.option("--steps", "num_steps", type=int, default=None,
              help=f"Default schedule: steps T ({DEFAULT_SCHEDULE['num_steps']}).")
@click.option("--interval", type=int, default=None,
              help=f"Default schedule: cache interval N ({DEFAULT_SCHEDULE['interval']}).")
@click.option("--boundary", type=int, default=None,
              help=f"Default schedule: boundary step b ({DEFAULT_SCHEDULE['boundary']} of "
                   f"{DEFAULT_SCHEDULE['num_steps']}; scaled as b/T with --steps).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["onnx", "tensorrt", "torch"]),
              help="Artifacts to build besides ONNX: tensorrt (needs the [tensorrt] extra), torch (torch.export).")
@click.option("--force", is_flag=True, help="Rebuild even if an identical export exists, and replace an export made "
              "with other options (without it that is refused). Files of yours in the folder are kept.")
@click.option("--print-schedule", is_flag=True,
              help="Print the per-step plan for these options and exit (needs only L: no weights are loaded).")
@click.option("--policy", type=click.Choice(POLICY_NAMES), default="delta-dit", show_default=True,
              help="With --print-schedule: the cache policy to plan.")
@click.option("--calibrate", is_flag=True,
              help="Sweep (N, N_c, b) in PyTorch first and export the fastest setting within --psnr-budget "
                   "(values given with --interval/--cached-blocks/--boundary are kept); with --precision int8 "
                   "also which block segments stay fp32 (--keep-fp32 given: kept).")
@click.option("--psnr-budget", type=FiniteFloat(0.0, 200.0), default=30.0, show_default=True,
              help="With --calibrate: worst per-sample PSNR vs full compute, dB.")
@click.option("--calibrate-prompts", type=click.IntRange(1, 64), default=4, show_default=True,
              help="With --calibrate: samples (prompts) the sweep measures.")
@verbosity_options
@version_option
def main(model, resolution, weights, random_weights, seed, overrides, cached_blocks, precision, keep_fp32,
         int8_tolerance, out, opset, exporter, max_batch, num_steps, interval, boundary, backends, force,
         print_schedule, policy,
         calibrate, psnr_budget, calibrate_prompts):
    """Export a PixArt-α, DiT-XL/2 or the shipped pixart-digits transformer as embed/front/middle/rear/head
    engines with a manifest."""
    from .export_options import ExportOptions, resolve_schedule, schedule_layers
    from .exporter import export
    from .models import get_spec

    try:
        options = ExportOptions(
            model=model, resolution=resolution, weights=weights, random_weights=random_weights, seed=seed,
            overrides=parse_overrides(overrides), cached_blocks=cached_blocks, precision=precision, out=out,
            opset=opset, exporter=exporter, max_batch=max_batch, num_steps=num_steps, interval=interval,
            boundary=boundary, backends=("onnx",) + tuple(b for b in backends if b != "onnx"), force=force,
            keep_fp32=keep_fp32, int8_tolerance=int8_tolerance,
        )
        if print_schedule:
            cuts, s = resolve_schedule(get_spec(model), options, schedule_layers(options))
            schedule = build_schedule(policy, num_steps=s["num_steps"], num_layers=cuts.num_layers,
                                      cached_blocks=cuts.cached_blocks, interval=s["interval"],
                                      boundary=s["boundary"])
            click.echo(schedule.format())
            return
        calibration = None
        if calibrate:
            from .calibrate import calibrate_export_options
            from .exporter import check_replaceable

            # Before the sweep: replacing an export made with other options is refused without --force (the
            # settings the sweep will choose cannot be compared yet).
            chosen = tuple(k for k in ("cached_blocks", "interval", "boundary") if getattr(options, k) is None)
            check_replaceable(dataclasses.replace(options, calibration={"psnr_budget_db": psnr_budget}), chosen)

            progress = Progress(stream=sys.stderr, quiet=quiet())
            progress.note("calibrating the cache schedule in PyTorch (sweep of N, N_c, b)")
            options, calibration = calibrate_export_options(options, psnr_budget=psnr_budget,
                                                            num_prompts=calibrate_prompts,
                                                            log=logging.getLogger("deltadit").debug)
        result = export(options, Progress(stream=sys.stderr, quiet=quiet()))
    except user_errors() as exc:
        if getattr(exc, "table", None):  # the int8 gate: each segment's precision and error, then the Error line
            click.echo(exc.table, err=True)
        raise click.ClickException(str(exc)) from None
    click.echo(result.summary())
    if calibration is not None:
        click.echo(calibration.summary())


