"""``deltadit-runtime`` (``deltadit runtime``, ``python -m runtime``): inspect an export without loading any engine.

    deltadit-runtime info engines/pixart-digits-16-fp32          # model, segments, I/O, files verified
    deltadit-runtime schedule engines/pixart-digits-16-fp32 --policy delta-dit --steps 20

Needs only the manifest (no torch, no diffusers): both commands answer at once.
"""

from __future__ import annotations

import sys

import click

from .cli_options import CONTEXT_SETTINGS, version_option
from .integrity import verify_companion_files, verify_segment_files
from .manifest import ManifestError, load_manifest
from .schedule import POLICY_NAMES, ScheduleError, build_schedule, scaled_boundary

class OneErrorLineGroup(click.Group):
    """Every failure is one ``Error:`` line: the manifest's own errors with their message, anything else (a bug)
    as one line naming the exception, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (ManifestError, ScheduleError) as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:  # noqa: BLE001  (the last guard)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise click.ClickException(f"unexpected {type(exc).__name__}{f': {first}' if first else ''} (a deltadit "
                                       "bug: please report it with the command line)") from None
FOLDER = click.Path(exists=True, file_okay=False)


def describe(folder: str, verify: bool = True) -> str:
    m = load_manifest(folder)
    if verify:
        verify_segment_files(m)
        verify_companion_files(m)
    lines = [
        f"{m.model['name']} ({m.model['diffusers_class']}, {m.model.get('params', 0):,} params), "
        f"resolution {m.resolution}, sample {list(m.sample_shape)}, {m.precision}, batch 1..{m.max_batch}",
        f"L={m.num_layers} N_c={m.cached_blocks} cuts a={m.cuts['a']} c={m.cuts['c']}; default schedule "
        f"T={m.schedule['num_steps']} N={m.schedule['interval']} b={m.schedule['boundary']}; default guidance "
        f"{m.default_guidance:g}",
        f"files {'verified (sha256)' if verify else 'not verified'}",
    ]
    for s in m.segments:
        blocks = f"blocks {s.blocks[0]}..{s.blocks[1] - 1}" if s.blocks else s.role
        ins = ", ".join(f"{t.name}{list(t.shape)}" for t in s.inputs)
        outs = ", ".join(f"{t.name}{list(t.shape)}" for t in s.outputs)
        lines.append(f"  {s.name:<7} {blocks:<14} {s.file}: ({ins}) -> ({outs})")
    for backend, entry in m.engines.items():
        lines.append(f"  engines[{backend}]: {', '.join(sorted(entry)) if isinstance(entry, dict) else entry}")
    return "\n".join(lines)


def plan(folder: str, policy: str, steps: int | None, interval: int | None, boundary: int | None) -> str:
    m = load_manifest(folder)
    d = m.schedule
    steps = steps if steps is not None else d["num_steps"]
    if boundary is None:
        boundary = scaled_boundary(d["boundary"], d["num_steps"], steps)
    return build_schedule(policy, num_steps=steps, num_layers=m.num_layers, cached_blocks=m.cached_blocks,
                          interval=interval if interval is not None else d["interval"], boundary=boundary).format()


@click.group(name="runtime", cls=OneErrorLineGroup, context_settings=CONTEXT_SETTINGS)
@version_option
def cli():
    """Inspect an export folder: its manifest and files, or the per-step plan of a cache policy."""


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=FOLDER)
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the segment files.")
@version_option
def info(folder, no_verify):
    """Describe an export folder and verify its files."""
    try:
        click.echo(describe(folder, verify=not no_verify))
    except (ManifestError, ScheduleError) as exc:
        raise click.ClickException(str(exc)) from None


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=FOLDER)
@click.option("--policy", type=click.Choice(POLICY_NAMES), default="delta-dit", show_default=True,
              help="Cache policy to plan.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps T (default: the manifest's).")
@click.option("--interval", type=click.IntRange(min=1), default=None,
              help="Cache interval N (default: the manifest's).")
@click.option("--boundary", type=click.IntRange(min=0), default=None,
              help="Boundary step b (default: the manifest's, scaled as b/T with --steps).")
@version_option
def schedule(folder, policy, steps, interval, boundary):
    """Print the per-step plan of a policy for an export."""
    try:
        click.echo(plan(folder, policy, steps, interval, boundary))
    except (ManifestError, ScheduleError) as exc:
        raise click.ClickException(str(exc)) from None


def main(argv: list[str] | None = None):
    return cli.main(args=argv, prog_name="deltadit-runtime")


if __name__ == "__main__":
    sys.exit(main())
