"""Progress on long exports: one bar per segment, its phases, and elapsed time.

On a terminal the bar is redrawn in place; in a log (not a TTY) each phase is one line, so CI logs
and services stay readable.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import IO, Iterator


class SegmentBar:
    def __init__(self, progress: "Progress", name: str, phases: tuple[str, ...]):
        self.progress, self.name, self.phases = progress, name, phases
        self.done = 0
        self.t0 = time.perf_counter()

    def phase(self, label: str) -> None:
        self.progress._draw(self.name, self.done, len(self.phases), label, time.perf_counter() - self.t0)
        self.done += 1

    def finish(self) -> None:
        self.progress._draw(self.name, len(self.phases), len(self.phases), "done", time.perf_counter() - self.t0,
                            final=True)


class Progress:
    """Reports to ``stream``; ``quiet=True`` reports nothing (library use, tests)."""

    width = 20

    def __init__(self, stream: IO[str] | None = None, quiet: bool = False):
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def note(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    @contextmanager
    def segment(self, name: str, phases: tuple[str, ...]) -> Iterator[SegmentBar]:
        bar = SegmentBar(self, name, phases)
        yield bar
        bar.finish()

    def _draw(self, name: str, done: int, total: int, label: str, seconds: float, final: bool = False) -> None:
        if self.quiet:
            return
        filled = self.width * done // max(total, 1)
        line = f"{name:<7} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {label:<8} {seconds:6.1f}s"
        if self.tty:
            print("\r" + line, end="\n" if final else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)
