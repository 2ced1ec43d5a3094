"""Ray Serve, for real: `python -m runtime.serving ray` (a private local Ray, 2 replicas) on 127.0.0.1, started
once for the module (Ray takes 30–120 s to start on two cores) and stopped by SIGTERM at the end."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.serving.client import RayClient
from serving_support import GUIDANCE, PROMPT, all_at_once, free_port, reference_alone, require_ray

SEEDS = list(range(20))
START_TIMEOUT = 400  # seconds: Ray's start on a loaded 2-core machine, plus two replicas loading the engines


@dataclass
class RayServer:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@pytest.fixture(scope="module")
def alone(digits_export):
    return reference_alone(digits_export, SEEDS)


@pytest.fixture(scope="module")
def ray_server(digits_export, tmp_path_factory):
    require_ray()
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "runtime.serving", "ray", str(digits_export), "--replicas", "2", "--threads", "1",
             "--port", str(port), "--batch-wait-ms", "20"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = RayServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"`serve ray` exited with code {process.returncode} while starting:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Ray Serve was not up after {START_TIMEOUT} s:\n{server.log_tail()}")
            time.sleep(1)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the group this fixture started: the server and its Ray
                process.wait()


def _post(server, payload):
    with RayClient(server.url) as client:
        return client.generate(payload)


def test_info_and_health(ray_server):
    with RayClient(ray_server.url) as client:
        info = client.request("GET", "/info").json()
        assert client.request("GET", "/health").json() == {"status": "ok"}
        assert client.request("GET", "/nowhere").status == 404
    assert (info["engine"], info["replicas"], info["threads_per_replica"], info["batching"]) == ("ray", 2, 1, True)
    assert (info["max_rows"], info["max_images"], info["model"]) == (8, 4, "pixart-digits")


def test_twenty_concurrent_seeds_equal_the_seeds_alone(ray_server, alone):
    replies = {}

    def send(seed):
        replies[seed] = _post(ray_server, {"prompt": PROMPT.format(seed % 10), "seed": seed, "guidance": GUIDANCE})

    all_at_once(send, SEEDS)
    for seed in SEEDS:
        reply = replies[seed]
        assert reply.ok and reply.headers["content-type"] == "image/png", reply.body[:300]
        assert reply.body == alone[seed][1], f"seed {seed}: the served PNG differs from the seed alone"
        assert reply.headers["x-deltadit-seed"] == str(seed)
    # Some of them shared a generation: the PNGs above came from batches.
    assert max(int(replies[s].headers["x-deltadit-batch-images"]) for s in SEEDS) > 1


def test_base64_and_latents_outputs(ray_server, alone):
    reply = _post(ray_server, {"prompt": [PROMPT.format(1), PROMPT.format(2)], "seed": [1, 2], "guidance": GUIDANCE,
                               "output": "base64"})
    assert reply.ok, reply.body[:300]
    body = reply.json()
    assert body["seeds"] == [1, 2] and body["batch_images"] == [2, 2]
    assert [base64.b64decode(x) for x in body["images"]] == [alone[1][1], alone[2][1]]
    reply = _post(ray_server, {"prompt": PROMPT.format(4), "seed": 4, "guidance": GUIDANCE, "output": "latents"})
    body = reply.json()
    assert body["shape"] == [1, 1, 16, 16] and body["latents"] == [alone[4][0].tolist()]  # exact floats


BAD = [
    # (payload, field, words the error must hold)
    ({"prompt": "a handwritten digit 7", "steps": "twenty"}, "steps", ["must be an integer"]),
    ({"prompt": ["a", 7], "output": "base64"}, "prompt", ["must be a string"]),
    ({"seed": 1}, "prompt", ["missing 'prompt'"]),
    ({"prompt": "x", "steps": 0}, "steps", ["out of range"]),
    ({"prompt": "x", "guidance": 1e9}, "guidance", ["out of range"]),
    ({"prompt": ["x"] * 5, "guidance": 3.0, "output": "base64"}, "prompt", ["5 images", "at most 4"]),
    ({"prompt": "x" * (1 << 20)}, "prompt", ["1048576 characters"]),
    (b'{"prompt": "a handwritten digit 7"', "body", ["not valid JSON", "a handwritten digit 7"]),
    (b"\xff\xfe", "body", ["not valid JSON"]),
    (b"x" * (9 << 20), "body", ["bytes; this server takes at most"]),
]


def test_bad_requests_get_400_and_the_server_keeps_serving(ray_server, alone):
    with RayClient(ray_server.url) as client:
        for payload, field, words in BAD:
            reply = client.generate(payload)
            assert reply.status == 400, (str(payload)[:100], reply.body[:300])
            error = reply.json()
            assert error["field"] == field
            for word in words:
                assert word in error["error"], (word, error)
    assert ray_server.process.poll() is None
    good = _post(ray_server, {"prompt": PROMPT.format(3), "seed": 3, "guidance": GUIDANCE})
    assert good.ok and good.body == alone[3][1]


def test_load_test_command_against_ray(ray_server, tmp_path):
    out = tmp_path / "load.json"
    run = subprocess.run([sys.executable, "-m", "runtime.serving", "load-test", "--url", ray_server.url,
                          "--requests", "6", "--concurrency", "3", "--warmup", "1", "--steps", "4", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (result,) = json.loads(out.read_text())["results"]
    assert (result["engine"], result["instances"], result["batching"]) == ("ray", 2, True)
    assert (result["ok"], result["errors"]) == (6, 0) and result["mean_batch"] >= 1


def _asgi_post(handler, payload: dict):
    """POST a JSON body straight to the deployment's handler (a starlette Request, as Serve's proxy hands it over)."""
    import asyncio

    from starlette.requests import Request

    body = json.dumps(payload).encode()

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"", "root_path": "", "scheme": "http",
             "server": ("127.0.0.1", 8000), "headers": [(b"content-length", str(len(body)).encode())]}
    return asyncio.run(handler(Request(scope, receive)))


def test_caption_states_model_needs_negatives(pixart_export, one_torch_thread):
    """The deployment's handler on a model without a text encoder, in this process (no Ray cluster: starting a
    second one costs a minute): a guided request without the unconditional states gets 400 naming them; with them
    the latents are exactly runtime.generate's."""
    require_ray()
    import numpy as np

    from runtime.serving.ray_app import DeltaDiTServer
    from serving_support import states_alone

    handler = DeltaDiTServer.func_or_class(str(pixart_export), {"threads": 1, "batching": False})
    rng = np.random.default_rng(3)
    states, negative = (rng.standard_normal((120, 24)).astype(np.float32) for _ in range(2))
    request = {"prompt_embeds": states.tolist(), "seed": 5, "steps": 4, "output": "latents"}
    refused = _asgi_post(handler, request)
    error = json.loads(refused.body)
    assert refused.status_code == 400 and error["field"] == "negative_embeds"
    assert "pass 'negative_embeds'" in error["error"] and "'guidance' ≤ 1" in error["error"]
    mask = [1.0] * 30 + [0.0] * 90
    reply = _asgi_post(handler, request | {"negative_embeds": negative.tolist(), "negative_mask": mask})
    assert reply.status_code == 200, reply.body[:300]
    guidance = handler.limits.default_guidance  # the request names none: the model's, from the manifest
    assert guidance > 1
    expected = states_alone(pixart_export, seed=5, steps=4, guidance=guidance, prompt_embeds=states,
                            negative_embeds=negative, negative_mask=mask)
    assert json.loads(reply.body)["latents"] == [expected.tolist()]
    assert _asgi_post(handler, request | {"guidance": 1.0}).status_code == 200  # no guidance: no negative needed


def test_graceful_shutdown(ray_server):
    """SIGTERM: `serve ray` shuts Serve and Ray down and exits 0. Runs last in this module."""
    ray_server.process.send_signal(signal.SIGTERM)  # to the server alone, as a service manager does
    assert ray_server.process.wait(120) == 0, ray_server.log_tail()
    assert "stopping" in ray_server.log_tail()
