"""What every deltadit command line shares, the runtime's and the exporter's alike: ``-h`` as well as ``--help``,
the help width, and ``--version``. Only click is imported here, so any command can use it and still answer
``-h`` at once."""

from __future__ import annotations

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def installed_version() -> str:
    """The installed deltadit version, or a plain note when it runs from a source tree that was not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deltadit")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _show_version(ctx, param, value):
    if not value or ctx.resilient_parsing:
        return
    # Not click.version_option: it keeps the first program name it printed for every later call in the process.
    click.echo(f"{ctx.find_root().info_name} {installed_version()}")
    ctx.exit()


def version_option(f):
    """``--version``: the program name as invoked and the installed deltadit version."""
    return click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
                        help="Show the version and exit.")(f)
