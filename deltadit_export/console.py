"""Messages and progress of the command-line tools: one ``deltadit`` logger, tqdm bars that follow it.

Messages go through :mod:`logging` (logger ``deltadit``), so a service that embeds the library routes
them like its own; the command-line tools attach one stderr handler (:func:`setup_logging`) at the level
``-v`` / ``-q`` choose. Tables and results stay on stdout. Progress bars (:func:`bar`) are shown only
while the logger shows INFO messages, so ``-q`` silences bars and notes alike with one switch.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterable, TypeVar

LOGGER_NAME = "deltadit"
log = logging.getLogger(LOGGER_NAME)
T = TypeVar("T")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (click's test runner swaps it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):  # noqa: D401  (logging reads and sets this attribute)
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        return msg


def level_for(verbose: int = 0, quiet: bool = False) -> int:
    """``-q``: warnings and errors only; default: progress notes (INFO); ``-v``: also details (DEBUG)."""
    if quiet:
        return logging.WARNING
    return logging.DEBUG if verbose else logging.INFO


def setup_logging(verbose: int = 0, quiet: bool = False) -> int:
    """Attach the stderr handler to the ``deltadit`` logger (once) and set its level; returns the level."""
    level = level_for(verbose, quiet)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False  # the tools print their own lines; a service configures its own handlers
    log.setLevel(level)
    return level


def quiet() -> bool:
    """Whether progress is switched off (the ``deltadit`` logger hides INFO messages)."""
    return not log.isEnabledFor(logging.INFO)


def bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        leave: bool = False):
    """A tqdm progress bar on stderr, disabled when :func:`quiet`."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, disable=quiet(),
                dynamic_ncols=True, mininterval=0.5)


# ---------------------------------------------------------------- -v/-q, shared by every tool
# (-h and --version: runtime/cli_options.py, shared with the runtime's own commands)


def _set_level(ctx, param, value):
    chosen = ctx.meta.setdefault("deltadit.verbosity", {})
    chosen[param.name] = value
    setup_logging(chosen.get("verbose", 0), chosen.get("quiet", False))
    return value


def verbosity_options(f):
    """``-v/--verbose`` and ``-q/--quiet``: the ``deltadit`` logger's level, set before the command runs."""
    import click

    f = click.option("-v", "--verbose", count=True, expose_value=False, callback=_set_level,
                     help="More detail in the messages.")(f)
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_level,
                        help="Only warnings and errors: no progress bars or notes (tables and results still "
                             "print).")(f)
