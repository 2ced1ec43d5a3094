"""Load test: a bounded number of requests, for a bounded time, to a server on 127.0.0.1.

``concurrency`` worker threads each keep one connection and send one request at a time (closed loop):
request i asks for one image of prompt ``"a handwritten digit {i % 10}"`` (or class ``i % 1000``, or
seeded caption states with one fixed negative) with seed ``seed + i``, as a PNG (latent models: the
latents). The run stops after ``requests`` requests or
``duration`` seconds, whichever comes first; ``warmup`` requests before it are not counted.
Reported: images per second over the measured wall time, latency percentiles of the successful
requests, errors, and the mean images per generation (Triton: from the model's statistics; Ray:
from the ``x-deltadit-batch-images`` header).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from .client import RayClient, TritonClient


@dataclass
class LoadResult:
    engine: str
    instances: int | None
    threads: str | None
    batching: bool | None
    concurrency: int
    requests: int  # sent in the measured part
    ok: int
    errors: int
    seconds: float
    images_per_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_batch: float | None
    label: str = ""
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def request_fields(i: int, *, seed: int, conditioning: str, embeds_shape, steps, guidance, policy,
                   pixel_space: bool = True) -> dict:
    fields = dict(seed=seed + i, steps=steps, guidance=guidance, policy=policy,
                  output="png" if pixel_space else "latents")
    if conditioning == "class_label":
        fields["class_label"] = i % 1000
    elif conditioning == "prompt_embeds":
        # Stand-ins for a text encoder's states: a different caption per request, and one fixed negative for
        # all of them (as the embedding of "" is), sent with every request since the server has no encoder.
        fields["prompt_embeds"] = np.random.default_rng(seed + i).standard_normal(embeds_shape).astype(np.float32)
        fields["negative_embeds"] = np.random.default_rng([seed, 1]).standard_normal(embeds_shape).astype(np.float32)
    else:
        fields["prompt"] = f"a handwritten digit {i % 10}"
    return fields


def _closed_loop(make_client, *, count: int, concurrency: int, deadline: float, fields_of, on_reply) -> float:
    """``concurrency`` threads, one connection each, send requests 0..count-1 one at a time until all are sent or
    ``deadline`` (monotonic) passes; ``on_reply(reply or None, seconds, failure or None)``. Returns the wall time."""
    lock = threading.Lock()
    next_index = [0]

    def worker():
        client = make_client()
        try:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= count or time.monotonic() >= deadline:
                        return
                    next_index[0] += 1
                t0 = time.perf_counter()
                try:
                    reply = client.generate_one(**fields_of(i))
                    failure = None if reply.ok else f"HTTP {reply.status}: {reply.body[:200].decode(errors='replace')}"
                except OSError as exc:
                    reply, failure = None, f"{type(exc).__name__}: {exc}"
                with lock:
                    on_reply(reply, time.perf_counter() - t0, failure)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def run_load(make_client, *, requests: int, concurrency: int, duration: float, warmup: int = 0, seed: int = 0,
             steps: int | None = None, guidance: float | None = None, policy: str | None = None, label: str = "",
             progress: bool = True) -> LoadResult:
    """Run the load; ``make_client()`` returns a new client (one per worker thread)."""
    if requests < 1 or concurrency < 1 or duration <= 0 or warmup < 0:
        raise ValueError("requests and concurrency must be ≥ 1, duration > 0 and warmup ≥ 0")
    probe = make_client()
    info = probe.describe()
    opts = dict(seed=seed, conditioning=info.get("conditioning") or "prompt", embeds_shape=info.get("embeds_shape"),
                steps=steps, guidance=guidance, policy=policy, pixel_space=info.get("pixel_space", True))
    if warmup:  # first calls of every instance pay one-time costs (engine warm-up): not measured
        _closed_loop(make_client, count=warmup, concurrency=concurrency, deadline=time.monotonic() + duration,
                     fields_of=lambda i: request_fields(10**6 + i, **opts), on_reply=lambda *a: None)
    stats_before = probe.stats() if isinstance(probe, TritonClient) else None

    latencies: list[float] = []
    batches: list[int] = []
    errors: list[str] = []
    bar = tqdm(total=requests, desc=f"load {info['engine']}", unit="req", disable=not progress, leave=False)

    def on_reply(reply, seconds, failure):
        if failure is None:
            latencies.append(seconds)
            if "x-deltadit-batch-images" in reply.headers:
                batches.append(int(reply.headers["x-deltadit-batch-images"]))
        else:
            errors.append(failure)
        bar.update(1)

    seconds = _closed_loop(make_client, count=requests, concurrency=concurrency, deadline=time.monotonic() + duration,
                           fields_of=lambda i: request_fields(i, **opts), on_reply=on_reply)
    bar.close()

    mean_batch = float(np.mean(batches)) if batches else None
    if stats_before is not None:
        after = probe.stats()
        runs = after["execution_count"] - stats_before["execution_count"]
        mean_batch = (after["inference_count"] - stats_before["inference_count"]) / runs if runs else None
    probe.close()
    ms = np.array(latencies) * 1000.0
    pct = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: None)
    return LoadResult(engine=info["engine"], instances=info.get("instances"), threads=info.get("threads"),
                      batching=info.get("batching"), concurrency=concurrency, requests=len(latencies) + len(errors),
                      ok=len(latencies), errors=len(errors), seconds=round(seconds, 3),
                      images_per_s=round(len(latencies) / seconds, 3) if seconds > 0 else 0.0,
                      p50_ms=pct(50), p95_ms=pct(95), p99_ms=pct(99), mean_batch=mean_batch, label=label,
                      error_samples=sorted(set(errors))[:5])


HEADER = ("engine", "inst", "thr", "batching", "conc", "req", "ok", "err", "img/s", "p50 ms", "p95 ms", "p99 ms",
          "batch")


def format_table(results: list[LoadResult]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [HEADER]
    for r in results:
        rows.append((r.engine, num(r.instances, "d"), str(r.threads or "-"),
                     "-" if r.batching is None else ("on" if r.batching else "off"), str(r.concurrency),
                     str(r.requests), str(r.ok), str(r.errors), f"{r.images_per_s:.2f}", num(r.p50_ms, ".0f"),
                     num(r.p95_ms, ".0f"), num(r.p99_ms, ".0f"), num(r.mean_batch, ".2f")))
    widths = [max(len(row[c]) for row in rows) for c in range(len(HEADER))]
    lines = ["  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def machine_info() -> dict:
    return {"cpus": len(os.sched_getaffinity(0)), "load_average": [round(x, 2) for x in os.getloadavg()]}


def write_json(path: str, results: list[LoadResult], **extra) -> None:
    """Write the results to ``path`` through a temporary file renamed into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"results": [r.to_dict() for r in results], "machine": machine_info(), **extra}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


__all__ = ["LoadResult", "run_load", "format_table", "write_json", "RayClient", "TritonClient"]
