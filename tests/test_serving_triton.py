"""Triton Inference Server, for real: the repository this package writes, served by the tritonserver binary that
nvidia-pytriton bundles, on 127.0.0.1, started and stopped by these tests (one server for the module)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from runtime.serving.client import TritonClient
from runtime.serving.triton_repo import MARKER, RepoOptions, RepositoryError, write_repository
from serving_support import GUIDANCE, PROMPT, all_at_once, free_port, reference_alone, require_triton, states_alone

SEEDS = list(range(20))


@pytest.fixture(scope="module")
def alone(digits_export):
    return reference_alone(digits_export, SEEDS)


@pytest.fixture(scope="module")
def triton(digits_export, pixart_export, tmp_path_factory):
    require_triton()
    from runtime.serving.triton_server import TritonProcess

    work = tmp_path_factory.mktemp("triton")
    # One instance on one thread; a 20 ms batching window so that concurrent requests meet in batches. Next to the
    # shipped model (a text encoder), a tiny PixArt export without one: it is fed caption states and their negatives.
    write_repository(digits_export, work / "repo", RepoOptions(threads=1, batch_delay_us=20000))
    write_repository(pixart_export, work / "repo", RepoOptions(name="pixart", threads=1, batch_delay_us=20000))
    server = TritonProcess(work / "repo", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                           workdir=work / "run")
    server.start()
    try:
        server.wait_ready(timeout=300)
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


def test_repository_layout_and_overwrite_rules(digits_export, tmp_path):
    repo = tmp_path / "repo"
    model = write_repository(digits_export, repo, RepoOptions(instances=2, threads=1))
    files = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file())
    assert {"config.pbtxt", "configs/cpu.pbtxt", "configs/gpu.pbtxt", "1/model.py", "1/engines/manifest.json",
            "1/engines/text_encoder/config.json", "1/engines/scheduler/scheduler_config.json"} <= set(files)
    config = (model / "config.pbtxt").read_text()
    assert config.startswith(MARKER)
    for line in ('backend: "python"', "max_batch_size: 4", "max_queue_delay_microseconds: 5000", "count: 2",
                 "kind: KIND_CPU", 'name: "prompt"', "allow_ragged_batch: true",
                 'key: "engines"', 'string_value: "engines"', 'key: "threads"'):
        assert line in config
    assert "TYPE_STRING" not in config  # the 2.51 stub dies on string tensors under numpy 2
    gpu = (model / "configs" / "gpu.pbtxt").read_text()
    assert "kind: KIND_GPU" in gpu and "UNVERIFIED" in gpu and 'string_value: "auto"' in gpu
    assert "from runtime.serving.triton_model import TritonPythonModel" in (model / "1" / "model.py").read_text()
    assert not list(repo.glob(".*"))  # no temporary folder left behind

    with pytest.raises(RepositoryError, match="already exists"):
        write_repository(digits_export, repo)
    write_repository(digits_export, repo, RepoOptions(force=True, link=True))  # ours: replaced
    assert f'string_value: "{digits_export.resolve()}"' in (model / "config.pbtxt").read_text()
    assert not (model / "1" / "engines").exists()
    foreign = repo / "theirs"
    foreign.mkdir()
    (foreign / "config.pbtxt").write_text('name: "theirs"\n')
    with pytest.raises(RepositoryError, match="not written by deltadit"):
        write_repository(digits_export, repo, RepoOptions(name="theirs", force=True))
    assert (foreign / "config.pbtxt").read_text() == 'name: "theirs"\n'  # a user's model is left alone


def test_an_engine_folder_with_a_link_is_refused(digits_export, tmp_path):
    import shutil

    engines = tmp_path / "engines"
    shutil.copytree(digits_export, engines)
    (engines / "notes.txt").symlink_to("/etc/hostname")
    with pytest.raises(RepositoryError, match="is a link"):
        write_repository(engines, tmp_path / "repo")
    assert not (tmp_path / "repo" / "deltadit").exists()


def _request(server, **fields):
    with TritonClient(server.url) as client:
        return client.generate_one(**fields)


def test_twenty_concurrent_seeds_equal_the_seeds_alone(triton, alone):
    with TritonClient(triton.url) as client:
        before = client.stats()
    replies = {}

    def send(seed):
        replies[seed] = _request(triton, prompt=PROMPT.format(seed % 10), seed=seed, guidance=GUIDANCE)

    all_at_once(send, SEEDS)
    with TritonClient(triton.url) as client:
        after = client.stats()
    for seed in SEEDS:
        assert replies[seed].ok, replies[seed].body[:300]
        assert replies[seed].body == alone[seed][1], f"seed {seed}: the served PNG differs from the seed alone"
    assert after["inference_count"] - before["inference_count"] == len(SEEDS)
    # Fewer executions than requests: the dynamic batcher joined them (the PNGs above came from batches).
    assert after["execution_count"] - before["execution_count"] < len(SEEDS)


def test_latents_output_is_exact(triton, alone):
    with TritonClient(triton.url) as client:
        reply = client.infer(client.infer_body(prompt=PROMPT.format(5), seed=5, guidance=GUIDANCE,
                                               outputs=("latents",)))
    assert reply.ok
    (out,) = reply.json()["outputs"]
    assert out["shape"] == [1, 1, 16, 16]
    assert out["data"] == alone[5][0].flatten().tolist()


def _tensor(name, datatype, shape, data):
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _prompt(text="a handwritten digit 7", rows=1):
    data = list(text.encode())
    return _tensor("prompt", "UINT8", [rows, len(data)], data * rows)


BAD = [
    # (body, words the error must hold)
    ({"inputs": [_prompt(), _tensor("seed", "FP32", [1, 1], [1.0])]}, ["seed", "INT64"]),
    ({"inputs": [_tensor("prompt", "BYTES", [1, 1], ["a handwritten digit 7"])]}, ["prompt", "UINT8"]),
    ({"inputs": [_tensor("seed", "INT64", [1, 1], [1])]}, ["prompt"]),
    ({"inputs": [_prompt(), _tensor("steps", "INT32", [1, 1], [0])]}, ["'steps'=0", "1..100"]),
    ({"inputs": [_prompt(), _tensor("steps", "INT32", [1, 1], [5000])]}, ["'steps'=5000"]),
    ({"inputs": [_prompt(), _tensor("guidance", "FP32", [1, 1], [50.0])]}, ["'guidance'=50.0", "0..20"]),
    ({"inputs": [_prompt(), _tensor("policy", "UINT8", [1, 5], list(b"turbo"))]}, ["'policy'", "delta-dit"]),
    ({"inputs": [_prompt(rows=5)]}, ["batch", "4"]),
    ({"inputs": [_prompt("x" * (1 << 20))]}, ["'prompt' is 1048576 characters", "at most 2000"]),
    ({"inputs": [_tensor("prompt", "UINT8", [1, 2], [0xff, 0xfe])]}, ["UTF-8"]),
    # Unparsable JSON never reaches the model: Triton's own HTTP front end answers it (2.51: with 500).
    (b'{"inputs": [', ["failed to parse the request JSON"]),
]


def test_bad_requests_get_400_and_the_server_keeps_serving(triton, alone):
    with TritonClient(triton.url) as client:
        for body, words in BAD:
            reply = client.infer(body)
            expected = (400, 500) if isinstance(body, bytes) else (400,)
            assert reply.status in expected, (str(body)[:200], reply.body[:300])
            error = reply.json()["error"]
            for word in words:
                assert word in error, (word, error)
    assert triton.process.poll() is None
    good = _request(triton, prompt=PROMPT.format(3), seed=3, guidance=GUIDANCE)
    assert good.ok and good.body == alone[3][1]


def _first(tokens: int) -> np.ndarray:
    """A mask keeping the first ``tokens`` of 120."""
    return (np.arange(120) < tokens).astype(np.float32)


def test_caption_states_model_needs_negatives_and_batches_them(triton, pixart_export):
    """Guided requests to a model without a text encoder must bring the unconditional states (400 naming them, and
    the server keeps serving); with them, 8 concurrent requests give exactly runtime.generate's latents alone."""
    rng = np.random.default_rng(7)
    states = [rng.standard_normal((120, 24)).astype(np.float32) for _ in range(10)]
    mask = _first(40)
    with TritonClient(triton.url, model="pixart") as client:
        for fields, words in [({}, ["negative_embeds", "guidance 4.5 needs the unconditional half", "'guidance' ≤ 1"]),
                              ({"guidance": 3.0, "negative_mask": mask}, ["without 'negative_embeds'"])]:
            reply = client.generate_one(output="latents", prompt_embeds=states[0], seed=1, steps=4, **fields)
            assert reply.status == 400, reply.body[:300]
            for word in words:
                assert word in reply.json()["error"], reply.json()
        unguided = client.generate_one(output="latents", prompt_embeds=states[0], seed=1, steps=4, guidance=1.0)
        assert unguided.ok, unguided.body[:300]  # no guidance, no unconditional half needed
        before = client.stats()

    # Per image: its own states, one of two negatives, its own masks (Triton batches requests whose inputs agree).
    cases = {seed: dict(seed=seed, steps=4, guidance=4.0, prompt_embeds=states[seed], prompt_mask=_first(20 + seed),
                        negative_embeds=states[8 + seed % 2], negative_mask=_first(40 - seed)) for seed in range(8)}
    bodies = {seed: json.dumps(TritonClient(triton.url).infer_body(**fields, outputs=("latents",))).encode()
              for seed, fields in cases.items()}  # encoded beforehand: the requests then arrive together
    replies = {}
    ready = threading.Barrier(len(cases))

    def send(seed):
        with TritonClient(triton.url, model="pixart") as c:
            ready.wait()
            replies[seed] = c.infer(bodies[seed])

    all_at_once(send, cases)
    with TritonClient(triton.url, model="pixart") as client:
        after = client.stats()
    for seed, fields in cases.items():
        assert replies[seed].ok, replies[seed].body[:300]
        (out,) = replies[seed].json()["outputs"]
        assert out["shape"] == [1, 4, 8, 8]
        assert out["data"] == states_alone(pixart_export, **fields).flatten().tolist(), f"seed {seed}"
    assert after["inference_count"] - before["inference_count"] == len(cases)
    assert after["execution_count"] - before["execution_count"] < len(cases)  # some of them shared a generation


def test_load_test_sends_caption_states_and_negatives(triton):
    """The load test against a model without a text encoder: states, a negative and latents output, no errors."""
    from runtime.serving.loadtest import run_load

    result = run_load(lambda: TritonClient(triton.url, model="pixart"), requests=4, concurrency=2, duration=120,
                      steps=2, progress=False)
    assert (result.ok, result.errors) == (4, 0), result.error_samples


def test_load_test_command_against_triton(triton, tmp_path):
    out = tmp_path / "load.json"
    run = subprocess.run([sys.executable, "-m", "runtime.serving", "load-test", "--url", triton.url, "--requests", "6",
                          "--concurrency", "3", "--warmup", "1", "--steps", "4", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[0].split()[:4] == ["engine", "inst", "thr", "batching"]
    (result,) = json.loads(out.read_text())["results"]
    assert (result["engine"], result["instances"], result["batching"]) == ("triton", 1, True)
    assert (result["ok"], result["errors"]) == (6, 0) and result["images_per_s"] > 0
    assert result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]


def test_graceful_shutdown(triton):
    """SIGTERM: Triton finishes, unloads the model (our finalize runs) and exits 0. Runs last in this module."""
    assert triton.stop() == 0
    log = triton.log_path.read_text(errors="replace")
    assert "shutting down" in log and "successfully unloaded 'deltadit'" in log
    assert "successfully unloaded 'pixart'" in log


def test_bench_command_end_to_end(digits_export, tmp_path):
    require_triton()
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "runtime.serving", "bench", str(digits_export), "--servers", "triton",
                          "--instances", "1", "--batching", "on,off", "--requests", "4", "--concurrency", "2",
                          "--warmup", "0", "--steps", "2", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [(r["engine"], r["instances"], r["batching"], r["errors"]) for r in data["results"]] == [
        ("triton", 1, True, 0), ("triton", 1, False, 0)]
    assert [(r["engine"], r["instances"]) for r in data["ratios"]] == [("triton", 1)]
    assert "triton × 1 batched:" in run.stdout and "without batching" in run.stdout


def test_serve_triton_command_with_a_named_config(digits_export, tmp_path, alone):
    """`serve triton REPO --model-config-name cpu` (configs/cpu.pbtxt) serves until SIGTERM, then exits 0."""
    require_triton()
    import signal
    import time
    import urllib.request

    write_repository(digits_export, tmp_path / "repo", RepoOptions(threads=1, device="gpu"))  # config.pbtxt: GPU
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "runtime.serving", "triton", str(tmp_path / "repo"),
                                "--http-port", str(port), "--grpc-port", str(free_port()), "--metrics-port",
                                str(free_port()), "--model-config-name", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        assert process.poll() is None, process.stdout.read()[-3000:]
        with TritonClient(f"http://127.0.0.1:{port}") as client:
            assert client.describe()["instances"] == 1
            reply = client.generate_one(prompt=PROMPT.format(8), seed=8, guidance=GUIDANCE)
        assert reply.ok and reply.body == alone[8][1]
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
        assert "stopping" in process.stdout.read()
    finally:
        if process.poll() is None:  # a failed check above: stop it the graceful way (it stops its tritonserver)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
