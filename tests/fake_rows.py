"""Row setups for the harness tests (imported by the timing worker through the PYTHONPATH it inherits)."""

from __future__ import annotations

import os
import time

from deltadit_export.timing import Runner


def sleeper(ctx, seconds: float = 0.001, tag: str = "") -> Runner:
    calls = []

    def run(i: int):
        calls.append(i)
        time.sleep(seconds)
        return i

    return Runner(run, info={"tag": tag, "pid": os.getpid()}, record=lambda i: {"i": i},
                  finish=lambda last: {"calls": list(calls), "last": last, "threads": ctx.threads})


def broken(ctx) -> Runner:
    raise RuntimeError("this row cannot be built here")


def fails_later(ctx) -> Runner:
    def run(i: int):
        raise ValueError("no luck")

    return Runner(run)
