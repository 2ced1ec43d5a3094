"""Progress on long exports: one bar per segment (its phases and elapsed time), notes through the
``deltadit`` logger.

On a terminal each segment is a tqdm bar; in a log (not a TTY) each phase is one plain line, so CI logs
and services stay readable (and a supervisor can follow the phases). ``Progress(quiet=True)`` reports
nothing (library use, tests); the command-line tools pass ``quiet=console.quiet()``, so ``-q`` silences
the bars with the notes.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import IO, Iterator

log = logging.getLogger("deltadit")
WIDTH = 20


class SegmentBar:
    def __init__(self, progress: "Progress", name: str, phases: tuple[str, ...], bar=None):
        self.progress, self.name, self.phases, self.bar = progress, name, phases, bar
        self.started = 0  # phases started so far; the bar counts the finished ones
        self.t0 = time.perf_counter()

    def phase(self, label: str) -> None:
        """The segment starts phase ``label``: the previous phase is done."""
        if self.bar is not None:
            if self.started:
                self.bar.update()
            self.bar.set_description_str(f"{self.name:<7} {label:<8}", refresh=True)
        else:
            self.progress._line(self.name, self.started, len(self.phases), label, time.perf_counter() - self.t0)
        self.started += 1

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.update(len(self.phases) - self.bar.n)
            self.bar.set_description_str(f"{self.name:<7} {'done':<8}", refresh=True)
        else:
            self.progress._line(self.name, len(self.phases), len(self.phases), "done", time.perf_counter() - self.t0)


class Progress:
    """Reports to ``stream`` (stderr by default); ``quiet=True`` reports nothing."""

    def __init__(self, stream: IO[str] | None = None, quiet: bool = False):
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def note(self, message: str) -> None:
        if not self.quiet:
            log.info("%s", message)

    @contextmanager
    def segment(self, name: str, phases: tuple[str, ...]) -> Iterator[SegmentBar]:
        if self.quiet or not self.tty:
            seg = SegmentBar(self, name, phases)
            yield seg
            seg.finish()
            return
        from tqdm import tqdm

        with tqdm(total=len(phases), desc=f"{name:<7}", unit="phase", file=self.stream, leave=True,
                  bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} {elapsed}") as bar:
            seg = SegmentBar(self, name, phases, bar)
            yield seg
            seg.finish()

    def _line(self, name: str, done: int, total: int, label: str, seconds: float) -> None:
        if self.quiet:
            return
        filled = WIDTH * done // max(total, 1)
        print(f"{name:<7} [{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{total} {label:<8} {seconds:6.1f}s",
              file=self.stream, flush=True)
