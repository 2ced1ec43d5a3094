"""The serving benchmark: both engines × instances × batching on/off, each load-tested, in one run.

For every configuration it starts the server on 127.0.0.1 (Triton: a repository written for it and
the bundled tritonserver; Ray: one local Ray for the whole run, the app redeployed per
configuration), runs the same load test, stops the server, and prints one table with the batched
vs one-at-a-time throughput ratio per engine and instance count. Threads: each instance gets the
machine's cores divided by the instance count, so every configuration uses the same CPU budget.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path

from .client import RayClient, TritonClient
from .loadtest import LoadResult, run_load

log = logging.getLogger("deltadit.serving")
TARGET_RATIO = 1.6  # the serving issue's target: batched throughput ≥ 1.6× one-at-a-time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _triton_runs(engines, configs, load, workdir: Path, say) -> list[LoadResult]:
    from .triton_repo import RepoOptions, write_repository
    from .triton_server import TritonProcess

    results = []
    for instances, batching in configs:
        tag = f"triton-{instances}-{'on' if batching else 'off'}"
        repo = workdir / tag
        write_repository(engines, repo, RepoOptions(instances=instances, batching=batching))
        server = TritonProcess(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                               workdir=workdir / f"{tag}-work")
        say(f"{tag}: starting tritonserver on {server.url}")
        with server:
            results.append(load(lambda: TritonClient(server.url), tag))
        say(f"{tag}: {results[-1].images_per_s:.2f} img/s, {results[-1].errors} errors")
    return results


def _ray_runs(engines, configs, load, say) -> list[LoadResult]:
    from . import ray_app

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cores = len(os.sched_getaffinity(0))
    ray_app.connect(None, num_cpus=max(cores, max(n for n, _ in configs)), worker_logs=False)
    results = []
    try:
        for instances, batching in configs:
            tag = f"ray-{instances}-{'on' if batching else 'off'}"
            say(f"{tag}: deploying on {url}")
            ray_app.deploy(engines, ray_app.RayOptions(replicas=instances, batching=batching), port=port)
            try:
                results.append(load(lambda: RayClient(url), tag))
            finally:
                ray_app.undeploy()
            say(f"{tag}: {results[-1].images_per_s:.2f} img/s, {results[-1].errors} errors")
    finally:
        ray_app.shutdown()
    return results


def run_bench(engines: str | os.PathLike, *, servers=("triton", "ray"), instances=(1, 2), batching=(True, False),
              requests: int = 200, concurrency: int = 16, duration: float = 300.0, warmup: int = 8,
              steps: int | None = None, guidance: float | None = None, workdir: str | os.PathLike | None = None,
              say=print, progress: bool = False) -> list[LoadResult]:
    configs = [(n, b) for n in instances for b in batching]

    def load(make_client, tag):
        return run_load(make_client, requests=requests, concurrency=concurrency, duration=duration, warmup=warmup,
                        steps=steps, guidance=guidance, label=tag, progress=progress)

    results: list[LoadResult] = []
    with tempfile.TemporaryDirectory(prefix="deltadit-serve-bench-", dir=workdir) as tmp:
        for server in servers:
            if server == "triton":
                results += _triton_runs(engines, configs, load, Path(tmp), say)
            elif server == "ray":
                results += _ray_runs(engines, configs, load, say)
            else:
                raise ValueError(f"server {server!r} is not one of triton, ray")
    return results


def batching_ratios(results: list[LoadResult]) -> list[dict]:
    """Per batched configuration: its images per second ÷ the same engine and instance count without batching
    (``ratio``), and ÷ the engine's one instance without batching, the plain one-at-a-time server (``vs_single``)."""
    out = []
    by_key = {(r.engine, r.instances, bool(r.batching)): r for r in results}
    for (engine, instances, batched), r in by_key.items():
        if not batched:
            continue
        same = by_key.get((engine, instances, False))
        single = by_key.get((engine, 1, False))
        row = {"engine": engine, "instances": instances, "target": TARGET_RATIO}
        if same is not None and same.images_per_s > 0:
            row["ratio"] = round(r.images_per_s / same.images_per_s, 3)
            row["met"] = row["ratio"] >= TARGET_RATIO
        if single is not None and single.images_per_s > 0:
            row["vs_single"] = round(r.images_per_s / single.images_per_s, 3)
        if len(row) > 3:
            out.append(row)
    return out


def format_ratios(ratios: list[dict]) -> str:
    lines = []
    for r in ratios:
        parts = []
        if "ratio" in r:
            parts.append(f"{r['ratio']:.2f}× the same without batching (target ≥ {r['target']}×: "
                         f"{'met' if r['met'] else 'missed'})")
        if "vs_single" in r:
            parts.append(f"{r['vs_single']:.2f}× one instance without batching")
        lines.append(f"{r['engine']} × {r['instances']} batched: " + "; ".join(parts))
    return "\n".join(lines)


__all__ = ["run_bench", "batching_ratios", "format_ratios", "free_port"]
