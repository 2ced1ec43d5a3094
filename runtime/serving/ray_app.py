"""Ray Serve deployment: N replicas, each with its own runtime and thread budget, JSON in, PNG or JSON out.

Routes (relative to the app's route prefix, ``/`` by default):

* ``POST /`` (or ``/generate``): a JSON request (:func:`runtime.serving.schema.parse_json_request`);
  answers ``image/png`` for ``"output": "png"`` (the default), else JSON with base64 PNGs or latents.
  Bad requests get HTTP 400 ``{"error": ..., "field": ...}``; the replica keeps serving.
* ``GET /health``: 200 when the replica's runtime is loaded; ``GET /info``: what this app serves.

Batching: requests are checked one by one in ``__call__`` (so a bad one never joins a batch), then
``@serve.batch`` gathers them up to the engines' row limit (``batch_size_fn`` counts rows: 2 per image
with guidance), and one :class:`~runtime.serving.batching.BatchExecutor` call turns them into as few
generations as their schedules allow. The generation runs in a worker thread, so the replica's event
loop keeps answering health checks while the engines work.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import threading
from dataclasses import asdict, dataclass, field
from functools import partial

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .schema import ParsedRequest, RequestError, example_request, parse_json_request

log = logging.getLogger("deltadit.serving")
APP_NAME = "deltadit"
MAX_BODY_BYTES = 8 << 20  # a 1 MB prompt still reaches the prompt check (and its precise message)


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    threads: int | None = None  # per replica; None: the machine's cores split between the replicas
    batching: bool = True
    # Requests reach a replica through Serve's Python proxy, which on a small busy machine hands them over in
    # bursts: a 20 ms window lets a batch fill (5 ms gave 3.2 images per batch of 4 at 16 concurrent clients).
    batch_wait_ms: float = 20.0
    limits: dict = field(default_factory=dict)  # max_steps, max_guidance, max_prompt_chars, default_guidance

    def replica_threads(self) -> int:
        return self.threads or max(1, len(os.sched_getaffinity(0)) // max(1, self.replicas))


def _rows(requests: list[ParsedRequest]) -> int:
    """A batch's size in engine rows: what the engines' max_batch limits (2 rows per image with guidance)."""
    return sum(len(r.images) * (2 if r.images[0].guidance > 1.0 else 1) for r in requests)


@serve.deployment(health_check_period_s=10, health_check_timeout_s=60, graceful_shutdown_timeout_s=30)
class DeltaDiTServer:
    def __init__(self, engines: str, options: dict):
        import torch

        from .batching import BatchExecutor

        opts = RayOptions(**options)
        threads = opts.replica_threads()
        torch.set_num_threads(threads)  # this replica's worker process is its own: its thread budget
        self.executor = BatchExecutor.from_folder(engines, threads=threads, **opts.limits)
        self.limits = self.executor.limits
        self.executor.warmup()
        self.batching = opts.batching
        self.info = {"engine": "ray", "model": self.executor.runtime.manifest.model.get("name"),
                     "engines": str(engines), "replicas": opts.replicas, "threads_per_replica": threads,
                     "batching": opts.batching, "max_rows": self.limits.rows, "max_images": self.limits.max_images,
                     "limits": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.limits).items()}}
        self._one_at_a_time = asyncio.Lock()
        self.generate_batch.set_max_batch_size(self.limits.rows)
        self.generate_batch.set_batch_wait_timeout_s(opts.batch_wait_ms / 1000.0)

    def check_health(self) -> None:
        if self.executor is None:
            raise RuntimeError("the runtime is not loaded")

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method == "GET" and path in ("health", "info"):
            return JSONResponse({"status": "ok"} if path == "health" else self.info)
        if request.method != "POST" or path not in ("", "generate"):
            return _error(404, "path", f"no route {request.method} {request.url.path}: POST / (or /generate) a JSON "
                                       "request; GET /health, /info")
        try:
            parsed = await self._parse(request)
        except RequestError as exc:
            return _error(400, exc.field, str(exc))
        if self.batching:
            results = await self.generate_batch(parsed)
        else:
            async with self._one_at_a_time:  # one generation at a time per replica, as without a batcher
                results = await asyncio.get_running_loop().run_in_executor(
                    None, partial(self.executor.run, parsed.images, return_exceptions=True))
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            return _error(500, "generation", f"generation failed: {type(failed).__name__}: {failed}")
        return _render(parsed, results)

    async def _parse(self, request: Request) -> ParsedRequest:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise RequestError("body", f"the request body is {int(length)} bytes; this server takes at most "
                                       f"{MAX_BODY_BYTES} bytes")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise RequestError("body", f"the request body is {len(body)} bytes; this server takes at most "
                                       f"{MAX_BODY_BYTES} bytes")
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError("body", f"the request body is not valid JSON ({exc}); send a JSON object such as "
                                       f"{example_request(self.limits)}") from None
        return parse_json_request(payload, self.limits)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, batch_size_fn=_rows)
    async def generate_batch(self, requests: list[ParsedRequest]) -> list[list]:
        images = [im for r in requests for im in r.images]
        results = await asyncio.get_running_loop().run_in_executor(
            None, partial(self.executor.run, images, return_exceptions=True))
        out, start = [], 0
        for r in requests:
            out.append(results[start:start + len(r.images)])
            start += len(r.images)
        return out


def _error(status: int, field_name: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "field": field_name}, status_code=status)


def _render(parsed: ParsedRequest, results: list) -> Response:
    seeds = [im.seed for im in parsed.images]
    batch = [r.batch_images for r in results]
    if parsed.output == "png":
        return Response(results[0].png(), media_type="image/png",
                        headers={"x-deltadit-seed": str(seeds[0]), "x-deltadit-batch-images": str(batch[0])})
    body = {"seeds": seeds, "batch_images": batch}
    if parsed.output == "base64":
        body["images"] = [base64.b64encode(r.png()).decode("ascii") for r in results]
    else:
        body["shape"] = [len(results), *results[0].sample.shape]
        body["latents"] = [r.sample.tolist() for r in results]
    return JSONResponse(body, headers={"x-deltadit-batch-images": str(max(batch))})


# ---------------------------------------------------------------- starting and stopping


def connect(address: str | None = None, *, num_cpus: int | None = None, worker_logs: bool = True) -> None:
    """Join the Ray cluster at ``address``, or start a private local one (no dashboard, small object store).
    ``worker_logs=False`` keeps the replicas' and Serve's own logs in Ray's log folder only."""
    import ray

    if not worker_logs:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's own progress lines in this process
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=worker_logs)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, object_store_memory=256 << 20,
                 logging_level=logging.WARNING, log_to_driver=worker_logs)


def deploy(engines: str, options: RayOptions, *, host: str = "127.0.0.1", port: int = 8000,
           route_prefix: str = "/") -> None:
    """Start Serve's HTTP proxy on host:port (once per cluster) and run the app; returns when replicas are up."""
    serve.start(http_options={"host": host, "port": port})
    app = DeltaDiTServer.options(
        num_replicas=options.replicas, ray_actor_options={"num_cpus": options.replica_threads()},
        max_ongoing_requests=64,
    ).bind(str(os.path.abspath(engines)), asdict(options))
    serve.run(app, name=APP_NAME, route_prefix=route_prefix,
              logging_config={"log_level": "WARNING", "enable_access_log": False})


def undeploy() -> None:
    serve.delete(APP_NAME)


def shutdown() -> None:
    import ray

    serve.shutdown()
    ray.shutdown()


def serve_until_stopped(engines: str, options: RayOptions, *, host: str, port: int, address: str | None,
                        announce=print) -> None:
    """``deltadit serve ray``: deploy, announce the URL, block until SIGINT/SIGTERM, then shut down gracefully
    (Serve lets in-flight requests finish within graceful_shutdown_timeout_s)."""
    stop = threading.Event()
    connect(address, num_cpus=None if address else max(os.cpu_count() or 1, options.replicas * options.replica_threads()))
    # After ray.init: Ray's core worker installs its own SIGTERM handler (it aborts the process); ours replaces it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(engines, options, host=host, port=port)
        announce(f"ready: http://{host}:{port}/ ({options.replicas} replica(s), {options.replica_threads()} thread(s) "
                 f"each, batching {'on' if options.batching else 'off'}); POST JSON to /, GET /health, /info")
        stop.wait()
        announce("stopping: letting in-flight requests finish")
    finally:
        shutdown()
