"""The ``deltadit`` command: one click group over every tool, and the old script names as aliases.

    deltadit export | generate | bench | eval | runtime info | runtime schedule | serve ...

Subcommands are imported when used (``deltadit --help`` and ``deltadit runtime info`` stay instant), and
before anything imports torch the entry points set OpenMP's passive thread waiting for this process
(:func:`deltadit_export.timing.prefer_passive_wait`), the same waiting ONNX Runtime's CPU backend uses.
``serve`` comes from ``runtime/serving/cli.py`` when that package is installed; without it, ``deltadit serve``
says so.
"""

from __future__ import annotations

import importlib

import click

from runtime.cli_options import CONTEXT_SETTINGS, version_option

from .cli_types import Command, Group
from .timing import prefer_passive_wait

# name -> (module, attribute names to try, one-line help shown by `deltadit --help` without importing)
SUBCOMMANDS = {
    "export": ("deltadit_export.cli", ("main",), "Export a transformer as segment engines with a manifest."),
    "generate": ("deltadit_export.generate", ("main",), "Generate images with the engines; latency vs PyTorch."),
    "bench": ("deltadit_export.bench", ("cli",), "Benchmark eager, torch.compile, the runtime and Δ-DiT."),
    "eval": ("deltadit_export.evaluate", ("main",), "Quality and speed of Δ-DiT against other caches."),
    "runtime": ("runtime.__main__", ("cli",), "Inspect an export: its manifest and files, or a plan."),
    "serve": ("runtime.serving.cli", ("serve", "cli", "group", "main"), "Serve an export (Triton, Ray Serve)."),
}
SERVE_MODULES = ("runtime.serving", "runtime.serving.cli")


def _serving_missing(reason: str) -> click.Command:
    @click.command(name="serve", cls=Command, context_settings={**CONTEXT_SETTINGS, "ignore_unknown_options": True,
                                                   "allow_extra_args": True},
                   help=f"Serving is not installed: {reason}", add_help_option=False)
    @click.pass_context
    def serve(ctx):
        raise click.ClickException(f"serving is not installed: {reason}")

    return serve


def load_subcommand(name: str) -> click.Command | None:
    if name not in SUBCOMMANDS:
        return None
    module_name, attributes, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if name != "serve":
            raise
        if exc.name in SERVE_MODULES:
            return _serving_missing("this deltadit has no runtime.serving package; install a deltadit release "
                                    "that includes it, with pip install 'deltadit[serve]'")
        return _serving_missing(f"it needs the Python package {exc.name!r}: pip install 'deltadit[serve]'")
    for attribute in attributes:
        command = getattr(module, attribute, None)
        if isinstance(command, click.Command):
            return command
    raise click.ClickException(f"{module_name} defines none of {', '.join(attributes)} as a click command")


class LazyGroup(Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx):
        return list(SUBCOMMANDS)

    def get_command(self, ctx, name):
        return load_subcommand(name)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(n, h) for n, (_, _, h) in SUBCOMMANDS.items()])


@click.group(name="deltadit", cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@version_option
def deltadit():
    """deltadit: a deployment compiler for diffusion transformers (subgraph engines with the Δ-DiT cache).

    Run `deltadit COMMAND -h` for a command's options.
    """


def main(argv: list[str] | None = None):
    """``deltadit``."""
    prefer_passive_wait()  # before any subcommand imports torch
    return deltadit.main(args=argv, prog_name="deltadit")


def _alias(name: str, prog_name: str):
    def entry(argv: list[str] | None = None):
        prefer_passive_wait()
        return load_subcommand(name).main(args=argv, prog_name=prog_name)

    entry.__name__ = f"{name}_alias"
    entry.__doc__ = f"``{prog_name}``: the same as ``deltadit {name}``."
    return entry


export_alias = _alias("export", "deltadit-export")
generate_alias = _alias("generate", "deltadit-generate")
bench_alias = _alias("bench", "deltadit-bench")
eval_alias = _alias("eval", "deltadit-eval")
