"""A timing worker (``python -m deltadit_export.timing_worker THREADS OUT_DIR LOG_LEVEL``), started by
:func:`deltadit_export.timing.measure` with the thread settings already in its environment.

It serves pickled requests from the parent, one at a time: ``setup`` (build a row), ``warmup`` and
``run`` (one generation, timed here with ``time.perf_counter`` around the call only), ``finish``
(the last result, the peak RSS), ``exit``. Between requests it blocks on a read, so an idle worker
takes no CPU from the row being timed. Also: what a row's threads really are, read back from torch
and from live ONNX Runtime sessions (:func:`torch_thread_info`, :func:`runtime_thread_info`).
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def torch_thread_info() -> dict[str, Any]:
    """torch's intra-op threads and the OpenMP wait policy this process started with."""
    import torch

    return {"threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def runtime_thread_info(runtime) -> dict[str, Any]:
    """Thread settings of a runtime's ONNX Runtime sessions, read back from the sessions themselves
    (``{}`` for backends without sessions)."""
    sessions = [getattr(e, "session", None) for e in getattr(runtime, "engines", {}).values()]
    sessions = [s for s in sessions if s is not None and hasattr(s, "get_session_options")]
    if not sessions:
        return {}
    seen = set()
    for s in sessions:
        o = s.get_session_options()
        seen.add((o.intra_op_num_threads, o.get_session_config_entry("session.intra_op.allow_spinning")))
    if len(seen) != 1:
        return {"sessions_differ": sorted(map(str, seen))}
    threads, spinning = seen.pop()
    return {"intra_op_num_threads": threads, "allow_spinning": spinning}


def peak_rss_mb() -> float:
    """This process's peak RSS. On Linux, VmHWM of /proc/self/status: ru_maxrss is carried over from
    the parent across fork+exec, so every worker would report at least the (large) parent's RSS."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is complete for a user (what, where, the fix): reported without a traceback."""
    from runtime import InputError, ManifestError, ScheduleError
    from runtime.backends import BackendError

    from .models import ModelError

    return (BackendError, InputError, ManifestError, ModelError, ScheduleError)


def serve(threads: int, out_dir: Path, requests, replies) -> None:
    import torch

    from .timing import WorkerContext

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    ctx = WorkerContext(threads, out_dir)
    runners: dict[int, Any] = {}
    last: dict[int, Any] = {}
    names: dict[int, str] = {}
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        kind, index = request[0], request[1]
        if kind == "exit":
            return
        try:
            if kind == "setup":
                names[index], setup, args = request[2], request[3], request[4]
                t0 = time.perf_counter()
                runner = setup(ctx, **args)
                runners[index] = runner
                info = {"torch": torch_thread_info(), **runner.info}
                reply = ("ready", info, time.perf_counter() - t0)
            elif kind in ("warmup", "run"):
                runner = runners[index]
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    result = runner.run(request[2])
                    ms = (time.perf_counter() - t0) * 1e3
                last[index] = result
                record = runner.record(result) if kind == "run" and runner.record is not None else None
                reply = ("ran", ms, record)
            elif kind == "finish":
                peak = peak_rss_mb()  # before finish(): what finish does (a reference run) is not the row's
                runner = runners[index]
                with torch.inference_mode():
                    final = runner.finish(last.get(index)) if runner.finish is not None else {}
                reply = ("done", final, peak)
            else:
                reply = ("error", f"unknown request {kind!r}")
        except _user_errors() as exc:
            reply = ("error", f"row {names.get(index, index)!r}, {kind}: {exc}")
        except Exception as exc:  # a bug: the traceback goes to stderr, one line to the parent
            traceback.print_exc(file=sys.stderr)
            reply = ("error", f"row {names.get(index, index)!r}, {kind} failed: {type(exc).__name__}: {exc}")
        pickle.dump(reply, replies)
        replies.flush()


def main(argv: list[str]) -> int:
    threads, out_dir, level = int(argv[0]), Path(argv[1]), int(argv[2])
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the replies
    sys.stdout = sys.stderr
    from .console import setup_logging

    setup_logging()
    logging.getLogger("deltadit").setLevel(level)  # the parent's: -q and -v reach the worker's messages too
    serve(threads, out_dir, sys.stdin.buffer, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
