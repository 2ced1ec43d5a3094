"""``serve``: the click group for serving (``python -m runtime.serving ...``; ``deltadit serve ...``).

    serve triton-repo engines/pixart-digits-16-fp32 --out model_repository/   # a Triton model repository
    serve triton model_repository/ --http-port 8000                           # the bundled tritonserver
    serve ray engines/pixart-digits-16-fp32 --replicas 2 --port 8000           # Ray Serve
    serve load-test --url http://127.0.0.1:8000 --requests 200 --concurrency 16
    serve bench engines/pixart-digits-16-fp32                                  # the whole benchmark table

Self-contained and cheap to import: Ray, Triton and the engines load only inside the command that
needs them, so a parent CLI can attach this group without paying for them.
"""

from __future__ import annotations

import logging
import signal
import sys
import tempfile
import threading

import click

from ..cli_options import CONTEXT_SETTINGS, version_option  # -h and --version, as every deltadit command
from ..schedule import POLICY_NAMES

log = logging.getLogger("deltadit.serving")


def _known_errors() -> tuple[type[BaseException], ...]:
    from ..backends import BackendError
    from ..manifest import ManifestError
    from .client import ClientError
    from .triton_repo import RepositoryError
    from .triton_server import TritonNotFound

    return (ManifestError, BackendError, RepositoryError, TritonNotFound, ClientError, OSError, ValueError)


def _run(fn):
    """Run a command body; errors a user can cause become one ``Error:`` line (exit 1)."""
    try:
        return fn()
    except _known_errors() as exc:
        raise click.ClickException(str(exc)) from None


def _limit_options(f):
    for opt in reversed([
        click.option("--max-steps", type=click.IntRange(1, 10000), default=None,
                     help="Largest 'steps' a request may ask for (default 100)."),
        click.option("--max-guidance", type=click.FloatRange(0, 1000), default=None,
                     help="Largest 'guidance' a request may ask for (default 20)."),
        click.option("--max-prompt-chars", type=click.IntRange(1, 10**6), default=None,
                     help="Longest prompt in characters (default 2000)."),
        click.option("--default-guidance", type=click.FloatRange(0, 1000), default=None,
                     help="Guidance of requests that name none (default: the model's, recorded in the manifest)."),
    ]):
        f = opt(f)
    return f


def _limits(kw) -> dict:
    values = {k: kw.pop(k) for k in ("max_steps", "max_guidance", "max_prompt_chars", "default_guidance")}
    return {k: v for k, v in values.items() if v is not None}


@click.group(name="serve", context_settings=CONTEXT_SETTINGS)
@version_option
def serve() -> None:
    """Serve exported engines with Triton Inference Server or Ray Serve, and load-test them."""


@serve.command("triton-repo")
@click.argument("engines", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The model repository folder.")
@click.option("--name", default="deltadit", show_default=True, help="Model name inside the repository.")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True, help="Instances (stub processes).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="Threads per instance (default: the cores divided by --instances).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Instance group of config.pbtxt (both are written to configs/; gpu is unverified).")
@click.option("--batching/--no-batching", default=True, show_default=True, help="Triton's dynamic batcher.")
@click.option("--batch-delay-us", type=click.IntRange(0, 10**7), default=5000, show_default=True,
              help="How long the batcher may hold a request to fill a batch.")
@click.option("--link", is_flag=True, help="Reference the engine folder by absolute path instead of copying it.")
@click.option("--force", is_flag=True, help="Replace a model folder this tool wrote before.")
@_limit_options
@version_option
def triton_repo(engines, out, **kw):
    """Write a Triton model repository (Python backend) for the engine folder ENGINES."""
    from .triton_repo import RepoOptions, write_repository

    limits = _limits(kw)
    folder = _run(lambda: write_repository(engines, out, RepoOptions(**kw, **limits)))
    click.echo(f"wrote {folder} (config.pbtxt, configs/cpu.pbtxt, configs/gpu.pbtxt [unverified], 1/model.py"
               f"{'' if kw['link'] else ', 1/engines/'}); run: tritonserver --model-repository {out}")


@serve.command("triton")
@click.argument("repository", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--model-config-name", default=None, help="Use configs/<name>.pbtxt (cpu or gpu) instead of config.pbtxt.")
@version_option
def triton(repository, host, http_port, grpc_port, metrics_port, model_config_name):
    """Run the tritonserver bundled with nvidia-pytriton on REPOSITORY until Ctrl-C / SIGTERM."""
    from .triton_server import TritonProcess

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="deltadit-triton-") as work:
        server = TritonProcess(repository, host=host, http_port=http_port, grpc_port=grpc_port,
                               metrics_port=metrics_port, workdir=work, model_config_name=model_config_name)
        try:
            _run(server.start)
            _run(server.wait_ready)
        except BaseException:
            server.stop()
            raise
        click.echo(f"ready: {server.url} (KServe v2; metrics on :{metrics_port}); log: {server.log_path}", err=True)
        while not stop.wait(1.0):
            if server.process.poll() is not None:
                raise click.ClickException(f"tritonserver exited with code {server.process.returncode}:\n"
                                           f"{server.log_tail()}")
        click.echo("stopping: Triton finishes in-flight requests, then unloads the models", err=True)
        code = server.stop()
    if code:
        raise click.ClickException(f"tritonserver stopped with exit code {code}")


@serve.command("ray")
@click.argument("engines", type=click.Path(file_okay=False))
@click.option("--replicas", type=click.IntRange(1, 1024), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="Threads per replica (default: the cores divided by --replicas).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address of Serve's HTTP proxy.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--address", default=None, help="A Ray cluster to join (e.g. auto, ray://head:10001); default: a "
                                              "private local Ray.")
@click.option("--batching/--no-batching", default=True, show_default=True, help="@serve.batch.")
@click.option("--batch-wait-ms", type=click.FloatRange(0, 10000), default=20.0, show_default=True,
              help="How long @serve.batch may hold a request to fill a batch.")
@_limit_options
@version_option
def ray(engines, replicas, threads, host, port, address, batching, batch_wait_ms, **kw):
    """Serve the engine folder ENGINES with Ray Serve until Ctrl-C / SIGTERM."""
    from ..manifest import load_manifest

    _run(lambda: load_manifest(engines))  # a wrong folder fails here, before Ray is imported or started
    from .ray_app import RayOptions, serve_until_stopped

    options = RayOptions(replicas=replicas, threads=threads, batching=batching, batch_wait_ms=batch_wait_ms,
                         limits=_limits(kw))
    serve_until_stopped(engines, options, host=host, port=port, address=address,
                        announce=lambda m: click.echo(m, err=True))


@serve.command("load-test")
@click.option("--url", required=True, help="The server, on this machine: http://127.0.0.1:PORT.")
@click.option("--protocol", type=click.Choice(["auto", "triton", "ray"]), default="auto", show_default=True)
@click.option("--model", default="deltadit", show_default=True, help="Triton model name.")
@click.option("--requests", type=click.IntRange(1, 10**6), default=200, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--duration", type=click.FloatRange(0.1, 86400), default=300.0, show_default=True,
              help="Stop sending after this many seconds even if requests are left.")
@click.option("--warmup", type=click.IntRange(0, 10**4), default=8, show_default=True,
              help="Requests sent first and not measured.")
@click.option("--seed", type=click.IntRange(0, 2**62), default=0, show_default=True)
@click.option("--steps", type=click.IntRange(1, 10000), default=None)
@click.option("--guidance", type=float, default=None)
@click.option("--policy", type=click.Choice(POLICY_NAMES), default=None)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the result here.")
@version_option
def load_test(url, protocol, model, requests, concurrency, duration, warmup, seed, steps, guidance, policy, json_path):
    """Send a bounded load to a server on 127.0.0.1 and print throughput, latency percentiles and errors."""
    from .client import connect
    from .loadtest import format_table, run_load, write_json

    probe = _run(lambda: connect(url, protocol, model))
    kind = probe.engine
    probe.close()
    result = _run(lambda: run_load(lambda: connect(url, kind, model), requests=requests, concurrency=concurrency,
                                   duration=duration, warmup=warmup, seed=seed, steps=steps, guidance=guidance,
                                   policy=policy, progress=sys.stderr.isatty()))
    click.echo(format_table([result]))
    for sample in result.error_samples:
        click.echo(f"error: {sample}", err=True)
    if json_path:
        _run(lambda: write_json(json_path, [result], url=url))


@serve.command("bench")
@click.argument("engines", type=click.Path(file_okay=False))
@click.option("--servers", default="triton,ray", show_default=True, help="Comma list of triton, ray.")
@click.option("--instances", default="1,2", show_default=True, help="Comma list of instance/replica counts.")
@click.option("--batching", "batching_modes", default="on,off", show_default=True, help="Comma list of on, off.")
@click.option("--requests", type=click.IntRange(1, 10**6), default=200, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--duration", type=click.FloatRange(0.1, 86400), default=300.0, show_default=True)
@click.option("--warmup", type=click.IntRange(0, 10**4), default=8, show_default=True)
@click.option("--steps", type=click.IntRange(1, 10000), default=None)
@click.option("--guidance", type=float, default=None)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@version_option
def bench(engines, servers, instances, batching_modes, requests, concurrency, duration, warmup, steps, guidance,
          json_path):
    """Load-test both engines × instance counts × batching on/off on ENGINES, in one run, on 127.0.0.1."""
    from ..manifest import load_manifest
    from .bench import batching_ratios, format_ratios, run_bench
    from .loadtest import format_table, machine_info, write_json

    server_list = _choices(servers, ("triton", "ray"), "--servers")
    modes = [m == "on" for m in _choices(batching_modes, ("on", "off"), "--batching")]
    try:
        counts = [int(x) for x in instances.split(",")]
        if not counts or min(counts) < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{instances!r}: expected positive integers, e.g. 1,2", param_hint="--instances")
    _run(lambda: load_manifest(engines))
    results = _run(lambda: run_bench(engines, servers=server_list, instances=counts, batching=modes,
                                     requests=requests, concurrency=concurrency, duration=duration, warmup=warmup,
                                     steps=steps, guidance=guidance, say=lambda m: click.echo(m, err=True),
                                     progress=sys.stderr.isatty()))
    ratios = batching_ratios(results)
    info = machine_info()
    click.echo(f"{engines}: {requests} requests, concurrency {concurrency}, {info['cpus']} CPUs, load average "
               f"{info['load_average']}")
    click.echo(format_table(results))
    if ratios:
        click.echo(format_ratios(ratios))
    if json_path:
        _run(lambda: write_json(json_path, results, engines=str(engines), ratios=ratios, requests=requests,
                                concurrency=concurrency))


def _choices(text: str, allowed: tuple[str, ...], hint: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if not items or bad:
        raise click.BadParameter(f"{text!r}: expected a comma list of {', '.join(allowed)}", param_hint=hint)
    return items


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    serve.main(args=argv, prog_name="python -m runtime.serving")
