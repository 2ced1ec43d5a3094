"""The one measurement harness: every latency that deltadit prints (``deltadit-bench``,
``deltadit-generate``, ``deltadit-eval``) and the calibration sweep's elapsed time go through here.

Fair to both sides (DESIGN.md §4): PyTorch's OpenMP threads spin-wait by default, ONNX Runtime's CPU
backend runs with ``session.intra_op.allow_spinning=0``. On a busy machine spinning makes eager PyTorch
5–50× slower while ONNX Runtime is unaffected, so an unfair baseline can print any speedup. Every
timed row therefore runs in a timing worker process started with ``OMP_WAIT_POLICY=PASSIVE`` and
``OMP_NUM_THREADS=threads`` in its environment, i.e. set before torch starts its thread pool (the
OpenMP runtime reads them once, when it loads); the worker also sets ``torch.set_num_threads``, and
the rows build their runtime with the same thread count. What each worker actually got is read back
from torch and from the live ONNX Runtime sessions and printed.

Procedure of :func:`measure`: set up every row (untimed), then ``warmup`` untimed runs of **every**
row, then ``repeats`` timed rounds, each round running every row once in the same order
(round-robin), so a slow minute on the machine hits all rows alike. Reported: the median with the
min–max of the runs, and the 1-minute load average before and after, with a plain warning when it was
above the threads in use (other processes competed for the CPU: the figures are not comparable).

A row is a named callable that runs one generation, with its setup (cf. polygraphy's loaders): a
:class:`Row` names a module-level setup function and its arguments; in the worker the setup builds
what the row needs and returns a :class:`Runner`. Adding a peer row is one line, e.g.
``Row("openvino int8", my_rows.openvino, {"engines": folder})``. ``isolate=True`` gives every row its
own worker process, so its peak RSS is its own (``deltadit-bench``); otherwise all rows share one.
Rows that name the same ``worker`` share one process even then (and its peak RSS): two rows on the same
loaded engines (``deltadit-bench``'s ``none`` and ``delta-dit``) then hold one copy of the weights, and
their setups can share what they load through :attr:`WorkerContext.shared`.

This module imports no torch at import time: the command-line tools import it (through
:func:`prefer_passive_wait`) before torch is loaded.
"""

from __future__ import annotations

import logging
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

WAIT_POLICY = "PASSIVE"  # OpenMP's setting that matches ONNX Runtime's allow_spinning=0
ORT_SPINNING = "0"  # what runtime/backends/onnxruntime_backend.py sets for every CPU session
log = logging.getLogger("deltadit")


class TimingError(RuntimeError):
    """A timing worker failed; the message names the row and why."""


def default_threads() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``), the default thread count everywhere."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def prefer_passive_wait() -> str:
    """For the command-line process itself (untimed work: sample generation, calibration sweeps): make
    torch's OpenMP threads wait passively unless the user chose otherwise. Effective only before torch is
    imported, which is why the entry points call it first. Returns a note for the log."""
    if "torch" in sys.modules:
        return "torch was imported before the wait policy could be set in this process (timing workers set it)"
    if "OMP_WAIT_POLICY" in os.environ:
        return f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} from the environment (timing workers use {WAIT_POLICY})"
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return f"OMP_WAIT_POLICY={WAIT_POLICY} set before torch was imported"


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


@dataclass(frozen=True)
class ThreadSettings:
    """What both sides get: the thread count and OpenMP's wait policy (ONNX Runtime: spinning off)."""

    threads: int
    wait_policy: str = WAIT_POLICY

    def worker_env(self) -> dict[str, str]:
        """Environment of a timing worker: read by the OpenMP runtime when torch loads it."""
        return {"OMP_NUM_THREADS": str(self.threads), "OMP_WAIT_POLICY": self.wait_policy,
                # TorchInductor compiles in a pool of worker processes by default; one compile thread keeps
                # no idle pool alive next to the rows being timed.
                "TORCHINDUCTOR_COMPILE_THREADS": "1"}

    def describe(self) -> str:
        return (f"{self.threads} thread(s) for torch and ONNX Runtime; torch's OpenMP with "
                f"OMP_WAIT_POLICY={self.wait_policy} and OMP_NUM_THREADS={self.threads} set before torch started "
                f"(in each timing worker), ONNX Runtime with session.intra_op.allow_spinning={ORT_SPINNING}")


@dataclass(frozen=True)
class Row:
    """A named generation to time. ``setup(ctx, **args)`` runs in the worker and returns a :class:`Runner`;
    it must be a module-level function (it travels to the worker by its import path)."""

    name: str
    setup: Callable[..., "Runner"]
    args: dict[str, Any] = field(default_factory=dict)
    optional: bool = False  # a failing setup or warm-up drops the row with a warning instead of failing all
    worker: str | None = None  # with isolate=True: rows naming the same worker share one process


@dataclass
class Runner:
    """What a row's setup returns. ``run(i)`` runs one generation (``i``: the repeat, for rows that vary
    their input); ``record(result)`` makes a small JSON-able record of a run's result (e.g. per-segment
    times); ``finish(result)`` runs once after the timed runs with the last result (e.g. to save the final
    latents); ``info`` says what the row runs on (backend, dtype, the thread settings read back)."""

    run: Callable[[int], Any]
    info: dict[str, Any] = field(default_factory=dict)
    record: Callable[[Any], Any] | None = None
    finish: Callable[[Any], dict[str, Any]] | None = None


@dataclass(frozen=True)
class WorkerContext:
    """Handed to every setup: the thread count the row must use, a folder for files it leaves, and a dict
    shared by the setups of the rows in this worker process (e.g. one loaded runtime for two rows)."""

    threads: int
    out_dir: Path
    shared: dict[str, Any] = field(default_factory=dict)


@dataclass
class RowTiming:
    name: str
    runs_ms: list[float]
    warmup_ms: list[float]
    setup_s: float
    info: dict[str, Any]
    records: list[Any] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    peak_rss_mb: float | None = None  # isolated rows only: the worker's own peak
    worker: str | None = None  # isolated rows sharing a process: its name (the peak RSS is the process's)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)

    @property
    def min_ms(self) -> float:
        return min(self.runs_ms)

    @property
    def max_ms(self) -> float:
        return max(self.runs_ms)

    def spread(self, digits: int = 1) -> str:
        """``median (min–max)`` in ms."""
        return f"{self.median_ms:.{digits}f} ({self.min_ms:.{digits}f}–{self.max_ms:.{digits}f})"

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "max_ms": self.max_ms,
                "repeats": len(self.runs_ms), "runs_ms": self.runs_ms, "warmup_ms": self.warmup_ms,
                "setup_s": self.setup_s, "peak_rss_mb": self.peak_rss_mb, "worker": self.worker, "info": self.info}


@dataclass
class Measurement:
    rows: dict[str, RowTiming]
    settings: ThreadSettings
    repeats: int
    warmup: int
    isolated: bool
    load_before: float | None
    load_after: float | None
    events: list[tuple[str, str]]  # ("setup" | "warmup" | "run" | "finish", row name), in the order done
    dropped: dict[str, str] = field(default_factory=dict)  # optional rows that failed: name -> why

    def busy(self) -> bool:
        """Whether the machine was busier than the threads in use, before or after."""
        return any(x is not None and x > self.settings.threads for x in (self.load_before, self.load_after))

    def header(self) -> list[str]:
        """What was set, how it was measured, the load average, and the warning when the machine was busy."""
        procs = "one worker process per row" if self.isolated else "one worker process"
        shared = sorted({r.worker for r in self.rows.values() if r.worker is not None})
        if shared:
            procs = "one worker process per row, " + "; ".join(
                f"{', '.join(n for n, r in self.rows.items() if r.worker == w)} share one ({w})" for w in shared)
        lines = [f"timing: {self.settings.describe()}; {procs}; {self.warmup} warm-up run(s) of every row before "
                 f"any timed run, then {self.repeats} round-robin rounds; median (min–max) of the rounds",
                 f"load average (1 min): {_load(self.load_before)} before, {_load(self.load_after)} after; "
                 f"{self.settings.threads} thread(s) in use, {os.cpu_count()} CPU(s)"]
        mismatch = self.mismatches()
        if mismatch:
            lines.append("warning: the rows did not all get the same thread settings: " + "; ".join(mismatch))
        if self.busy():
            lines.append(f"warning: the machine was busy (load average above the {self.settings.threads} thread(s) "
                         "in use): other processes competed for the CPU, so these figures are not comparable with "
                         "a quiet machine's")
        for name, why in self.dropped.items():
            lines.append(f"warning: row {name!r} left out: {why}")
        return lines

    def mismatches(self) -> list[str]:
        """Rows whose threads read back from torch / ONNX Runtime differ from the settings."""
        out = []
        for r in self.rows.values():
            t = r.info.get("torch", {})
            if t.get("threads") != self.settings.threads or t.get("omp_wait_policy") != self.settings.wait_policy:
                out.append(f"{r.name}: torch {t}")
            o = r.info.get("onnxruntime")
            if o and (o.get("intra_op_num_threads") != self.settings.threads or o.get("allow_spinning") != ORT_SPINNING):
                out.append(f"{r.name}: onnxruntime {o}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.settings.threads, "omp_wait_policy": self.settings.wait_policy,
                "onnxruntime_allow_spinning": ORT_SPINNING, "repeats": self.repeats, "warmup": self.warmup,
                "isolated": self.isolated, "loadavg_before": self.load_before, "loadavg_after": self.load_after,
                "busy": self.busy(), "dropped": self.dropped, "rows": {n: r.to_dict() for n, r in self.rows.items()}}


def _load(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def ratio(m: Measurement, baseline: str, row: str) -> float | None:
    """How many times faster ``row`` ran than ``baseline`` (medians); None when either is missing."""
    if baseline not in m.rows or row not in m.rows:
        return None
    return m.rows[baseline].median_ms / m.rows[row].median_ms


def format_table(m: Measurement, against: dict[str, str], unit: str = "ms", indent: str = "  ") -> str:
    """The header (settings, load average, warnings) and one line per row: median (min–max) and the
    speedup against each baseline row of ``against`` (column title -> row name)."""
    width = max([len(n) for n in m.rows] + [4])
    spreads = {n: r.spread() for n, r in m.rows.items()}
    sw = max([len(s) for s in spreads.values()] + [len(unit) + 10])
    lines = [indent + h for h in m.header()]
    lines.append(indent + f"{'mode':<{width}}  {unit + ' (min–max)':>{sw}}" + "".join(f" {t:>9}" for t in against))
    for name in m.rows:
        cells = []
        for base in against.values():
            x = ratio(m, base, name)
            cells.append(f" {'-':>9}" if x is None else f" {x:>8.2f}×")
        lines.append(indent + f"{name:<{width}}  {spreads[name]:>{sw}}" + "".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------- the parent side of a worker


class _Worker:
    """A timing worker process: pickled requests on its stdin, pickled replies on a private copy of its stdout
    (its own stdout is pointed at stderr, so a library that prints cannot garble the replies)."""

    def __init__(self, settings: ThreadSettings, out_dir: Path):
        env = dict(os.environ)
        env.update(settings.worker_env())
        # The worker imports the row setups by module path: give it the modules this process sees.
        paths = [p for p in sys.path if p and Path(p).is_dir()]
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        cmd = [sys.executable, "-m", "deltadit_export.timing_worker", str(settings.threads), str(out_dir),
               str(log.getEffectiveLevel())]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=env)

    def ask(self, *request, row: str = "") -> tuple:
        try:
            pickle.dump(request, self.proc.stdin)
            self.proc.stdin.flush()
            reply = pickle.load(self.proc.stdout)
        except (BrokenPipeError, EOFError, pickle.UnpicklingError):
            code = self.proc.wait()
            raise TimingError(f"the timing worker of row {row!r} died (exit code {code}) during {request[0]}; "
                              "its error is printed above") from None
        if reply[0] == "error":
            raise TimingError(reply[1])
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                pickle.dump(("exit", ""), self.proc.stdin)
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure(rows: list[Row], *, repeats: int, warmup: int = 1, threads: int | None = None, isolate: bool = False,
            desc: str = "timing") -> Measurement:
    """Time ``rows`` fairly (see the module docstring); returns every run, the settings and the load average."""
    from .console import bar

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be ≥ 1 and warmup ≥ 0, got {repeats} and {warmup}")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"row names must be unique, got {names}")
    settings = ThreadSettings(threads or default_threads())
    events: list[tuple[str, str]] = []
    dropped: dict[str, str] = {}
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="deltadit-timing-") as tmp, _workers(rows, settings, Path(tmp),
                                                                                 isolate) as workers:
        live: dict[str, RowTiming] = {}
        for i, row in enumerate(rows):
            log.info("%s: setting up %s", desc, row.name)
            try:
                _, info, seconds = workers[row.name].ask("setup", i, row.name, row.setup, row.args, row=row.name)
            except TimingError as exc:
                if not row.optional:
                    raise
                dropped[row.name] = str(exc)
                log.warning("row %r left out: %s", row.name, exc)
                continue
            events.append(("setup", row.name))
            live[row.name] = RowTiming(row.name, [], [], seconds, info, worker=row.worker if isolate else None)
        index = {r.name: i for i, r in enumerate(rows)}
        with bar(total=len(live) * (warmup + repeats), desc=desc, unit="run") as progress:
            for name in list(live):
                for _ in range(warmup):
                    try:
                        ms = workers[name].ask("warmup", index[name], 0, row=name)[1]
                    except TimingError as exc:
                        if not next(r for r in rows if r.name == name).optional:
                            raise
                        dropped[name] = str(exc)
                        log.warning("row %r left out: %s", name, exc)
                        del live[name]
                        break
                    live[name].warmup_ms.append(ms)
                    events.append(("warmup", name))
                    progress.update()
            for k in range(repeats):
                for name, timing in live.items():
                    _, ms, record = workers[name].ask("run", index[name], k, row=name)
                    timing.runs_ms.append(ms)
                    if record is not None:
                        timing.records.append(record)
                    events.append(("run", name))
                    progress.update()
        load_after = load_average()
        peaks: dict[int, float] = {}  # per process: its peak before the first finish (rows sharing it get one)
        for name, timing in live.items():
            _, final, peak = workers[name].ask("finish", index[name], row=name)
            timing.final = final or {}
            timing.peak_rss_mb = peaks.setdefault(id(workers[name]), peak) if isolate else None
            events.append(("finish", name))
    return Measurement(live, settings, repeats, warmup, isolate, load_before, load_after, events, dropped)


@contextmanager
def _workers(rows: list[Row], settings: ThreadSettings, out_dir: Path, isolate: bool) -> Iterator[dict[str, _Worker]]:
    started: list[_Worker] = []
    try:
        if isolate:
            workers = {}
            by_group: dict[str, _Worker] = {}
            for r in rows:
                if r.worker is not None and r.worker in by_group:
                    workers[r.name] = by_group[r.worker]
                    continue
                workers[r.name] = _Worker(settings, out_dir)
                started.append(workers[r.name])
                if r.worker is not None:
                    by_group[r.worker] = workers[r.name]
        else:
            shared = _Worker(settings, out_dir)
            started.append(shared)
            workers = {r.name: shared for r in rows}
        yield workers
    finally:
        for w in started:
            w.close()


# ---------------------------------------------------------------- elapsed time of work that is not a comparison


@dataclass
class Elapsed:
    seconds: float = 0.0
    load_before: float | None = None
    load_after: float | None = None

    def describe(self) -> str:
        return f"{self.seconds:.0f} s (load average {_load(self.load_before)} before, {_load(self.load_after)} after)"


class Stopwatch:
    """Wall time and load average of a stretch of work that is not a comparison (the calibration sweep):
    ``watch = Stopwatch()`` ... ``watch.seconds`` while it runs ... ``watch.stop()`` → :class:`Elapsed`."""

    def __init__(self):
        self.load_before = load_average()
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def stop(self) -> Elapsed:
        return Elapsed(self.seconds, self.load_before, load_average())
