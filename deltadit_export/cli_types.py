"""What every deltadit command shares on its command line: option types that refuse what the tools cannot use
(before any work starts), and the command classes that turn every failure into one ``Error:`` line.

- Types: :data:`SEED` (what ``torch.Generator.manual_seed`` takes), :data:`THREADS`, :data:`REPEATS`, and
  :class:`FiniteFloat` (click's ``float`` takes ``nan`` and ``inf``, which would silently disable guidance or
  poison every sample).
- :class:`Command` / :class:`Group`: refuse a name or path that is not valid UTF-8 (it could not be written into
  JSON or printed), map the errors that carry a complete user message (:func:`user_error_types`) to
  ``Error: <message>`` (exit 1), and anything else to one ``Error: unexpected …`` line instead of a traceback
  (the traceback is logged at DEBUG: ``-v`` shows it). Usage errors stay click's (exit 2).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import click

from .console import log

SEED = click.IntRange(0, 2**63 - 1)  # torch.Generator.manual_seed takes a signed 64-bit seed
THREADS = click.IntRange(1, 1024)
REPEATS = click.IntRange(1, 1000)
WARMUP = click.IntRange(0, 100)

# The engine-loading options of generate, bench and eval (the same meaning everywhere, so one definition).
TRUST_ARTIFACTS_OPTION = click.option(
    "--trust-artifacts", is_flag=True,
    help="Allow backends whose artifacts can run code when loaded (TensorRT plans, torch .pt2 programs): only for "
         "exports you made or trust. Without it auto uses ONNX Runtime.")
NO_VERIFY_OPTION = click.option(
    "--no-verify", is_flag=True,
    help="Load the engines without checking their sha256 against the manifest (files you changed on purpose); "
         "names and locations are still checked.")


class FiniteFloat(click.ParamType):
    """A float within ``[low, high]`` (``low`` excluded with ``low_open``), never NaN or infinite."""

    name = "float"

    def __init__(self, low: float | None = None, high: float | None = None, low_open: bool = False, hint: str = ""):
        self.low, self.high, self.low_open, self.hint = low, high, low_open, hint

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{'>' if self.low_open else '≥'} {self.low:g} and ≤ {self.high:g}"
        if self.low is not None:
            return f"{'>' if self.low_open else '≥'} {self.low:g}"
        return f"≤ {self.high:g}" if self.high is not None else "finite"

    def convert(self, value: Any, param, ctx) -> float:
        if isinstance(value, float) and math.isfinite(value) and self._within(value):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            self.fail(f"{value!r} is not a number: expected a number {self._range()}{self.hint}", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number: expected a number {self._range()}{self.hint}", param, ctx)
        if not self._within(number):
            self.fail(f"{number:g} is out of range: expected a number {self._range()}{self.hint}", param, ctx)
        return number

    def _within(self, x: float) -> bool:
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        return self.high is None or x <= self.high


GUIDANCE_HINT = "; 1 = no guidance, > 1 turns classifier-free guidance on"
GUIDANCE = FiniteFloat(1.0, 100.0, hint=GUIDANCE_HINT)


# ---------------------------------------------------------------- errors → one line

# Exception classes whose messages are complete (what is wrong, where, the fix), by the module that defines them.
# Looked up in sys.modules: an exception of a class can only exist once its module was imported, so checking
# for one never imports torch or onnx.
USER_ERROR_CLASSES = {
    "deltadit_export.models": ("ModelError",),
    "deltadit_export.export_options": ("OptionError",),
    "deltadit_export.onnx_export": ("ExportError",),
    "deltadit_export.quantize": ("QuantizeError",),
    "deltadit_export.calibrate": ("CalibrationError",),
    "deltadit_export.publish": ("OutputError",),
    "deltadit_export.timing": ("TimingError",),
    "deltadit_export.bench": ("BenchError",),
    "runtime.manifest_schema": ("ManifestError",),
    "runtime.schedule": ("ScheduleError",),
    "runtime.backends.base": ("BackendError",),
    "runtime.executor": ("InputError", "NonFiniteError"),
    "runtime.generation": ("GenerationError",),
}


def user_error_types() -> tuple[type[BaseException], ...]:
    found = []
    for module_name, names in USER_ERROR_CLASSES.items():
        module = sys.modules.get(module_name)
        found += [getattr(module, n) for n in names if module is not None and hasattr(module, n)]
    return tuple(found)


def one_line(text: str) -> str:
    """A message as one printable line (a path that is not UTF-8 is shown escaped)."""
    text = " ".join(str(text).split())
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def unexpected(exc: BaseException) -> str:
    log.debug("the unexpected error's traceback:", exc_info=exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (f"unexpected {type(exc).__name__}{f': {first}' if first else ''} (a deltadit bug: please report it with "
            "the command line; -v shows the traceback)")


def _refuse_undecodable(command: click.Command, ctx: click.Context) -> None:
    """Names and paths that are not valid UTF-8 (the shell passes them as surrogate escapes) are refused."""
    for param in command.params:
        values = ctx.params.get(param.name)
        for value in values if isinstance(values, (tuple, list)) else (values,):
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise click.BadParameter(f"'{one_line(value)}' is not valid UTF-8: deltadit writes names and "
                                             "paths into JSON and messages; rename it or pass a UTF-8 name",
                                             ctx=ctx, param=param) from None


class _OneErrorLine:
    def invoke(self, ctx: click.Context):
        _refuse_undecodable(self, ctx)
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except user_error_types() as exc:
            if getattr(exc, "table", None):  # e.g. the int8 gate: each segment's error above the Error line
                click.echo(exc.table, err=True)
            raise click.ClickException(one_line(exc)) from None
        except Exception as exc:  # noqa: BLE001  (the last guard: one line, not a traceback)
            raise click.ClickException(unexpected(exc)) from None


class Command(_OneErrorLine, click.Command):
    """A deltadit command: every failure is one ``Error:`` line (see the module docstring)."""


class Group(_OneErrorLine, click.Group):
    """A deltadit command group, with the same guard."""

    command_class = Command


def check_steps(num_steps: int | None) -> None:
    """``--steps`` past the runtime's limit, refused before any export or model work with the runtime's message
    (its ``ScheduleError``), not after the work that precedes building the schedule."""
    from runtime.schedule import MAX_STEPS, STEPS_HINT, ScheduleError

    if num_steps is not None and not 1 <= num_steps <= MAX_STEPS:
        raise ScheduleError(f"num_steps={num_steps} is out of range: expected 1 ≤ num_steps ≤ {MAX_STEPS}{STEPS_HINT}")
