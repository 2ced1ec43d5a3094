"""Backends beyond ONNX Runtime CPU (issue 6): what can be proved without a GPU, and GPU tests that skip.

CPU: the TensorRT optimization profile, engine and timing-cache names, the precision mode per TensorRT
major version, the engine build wiring and its failure path (against stand-ins for tensorrt and
polygraphy, which cannot be installed here), the manifest entries of ``--backend torch``, backend
selection and its errors, and the torch backend's results against diffusers and ONNX Runtime.
GPU (skipped here, with the reason): the torch backend on CUDA with CUDA graphs, TensorRT engines,
ONNX Runtime's CUDA provider.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tiny import TINY_PIXART_SET, edited_copy, export_tiny, rebuild_model, tiny_dit

from deltadit_export import backends as B
from deltadit_export.split import diffusers_forward, model_shape, random_model_inputs, run_segments, split_model
from runtime import DeltaDiTRuntime
from runtime.backends import AUTO_ORDER, BACKENDS, BackendError, make_backend
from runtime.integrity import file_sha256
from runtime.manifest import TensorSpec, load_manifest
from runtime.schedule import Cuts

HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("polygraphy") is not None


def _ort_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


HAS_ORT_CUDA = _ort_cuda()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: torch sees none here")
needs_trt = pytest.mark.skipif(not (HAS_CUDA and HAS_TRT),
                               reason="needs TensorRT and polygraphy (pip install 'deltadit[tensorrt]') and a CUDA GPU")
needs_ort_cuda = pytest.mark.skipif(not (HAS_CUDA and HAS_ORT_CUDA),
                                    reason="needs onnxruntime-gpu (CUDAExecutionProvider) and a CUDA GPU")

# A 2-block PixArt (N_c = 1: embed, front, rear, head; the middle is empty): torch.export traces every
# block symbolically, so fewer blocks keep this module's export to seconds.
TINY2 = {**TINY_PIXART_SET, "num_layers": 2}
# fp32, same kernels in the same process: the program and the eager module agree to rounding. 0.0 was
# measured here; 1e-5 leaves room for a kernel choice that differs, far below any real bug (O(1)).
TOL_SAME_KERNELS = 1e-5
# Against ONNX Runtime: the exporter's own fp32 ONNX parity tolerance (different kernels and orders).
TOL_ORT = 1e-4


def rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.float(), got.float().cpu()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def torch_export(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("torch-backend") / "pixart", "pixart-alpha", overrides=TINY2,
                       cached_blocks=1, backends=("onnx", "torch"))


@pytest.fixture(scope="module")
def torch_rt(torch_export):
    return DeltaDiTRuntime(torch_export, backend="torch", device="cpu", trust_artifacts=True)  # our own export


@pytest.fixture(scope="module")
def ort_rt(torch_export):
    return DeltaDiTRuntime(torch_export, backend="onnxruntime")




# ---------------------------------------------------------------- optimization profile and names


def test_batch_profile_is_one_guidance_batch_and_manifest_max():
    assert B.batch_profile(8) == {"min": 1, "opt": 2, "max": 8}
    assert B.batch_profile(2) == {"min": 1, "opt": 2, "max": 2}
    assert B.batch_profile(1) == {"min": 1, "opt": 1, "max": 1}  # opt never above max
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError):
            B.batch_profile(bad)


def test_optimization_profile_fixes_every_axis_but_the_batch():
    inputs = [TensorSpec("hidden", "float16", ("batch", 1024, 1152)), TensorSpec("timestep", "float16", ("batch",)),
              TensorSpec("context_bias", "float16", ("batch", 1, 120))]
    shapes = B.optimization_profile(inputs, max_batch=8)
    assert shapes == {
        "hidden": ((1, 1024, 1152), (2, 1024, 1152), (8, 1024, 1152)),
        "timestep": ((1,), (2,), (8,)),
        "context_bias": ((1, 1, 120), (2, 1, 120), (8, 1, 120)),
    }
    with pytest.raises(ValueError, match="no batch axis"):
        B.optimization_profile([TensorSpec("table", "float32", (4, 4))], 8)


def test_engine_and_timing_cache_names_carry_the_tensorrt_version():
    assert B.engine_file_name("front", "10.8.0.43") == "front.trt10.8.plan"
    assert B.engine_file_name("head", "11.1.0.106") == "head.trt11.1.plan"
    assert B.timing_cache_name("10.8.0.43", "NVIDIA H100 80GB HBM3") == "timing.trt10.8.nvidia-h100-80gb-hbm3.cache"
    for name in (B.engine_file_name("middle", "10.13.2.6"), B.timing_cache_name("10.13.2.6", "A/B:C")):
        assert "/" not in name and "\\" not in name and ":" not in name  # plain names inside the folder
    with pytest.raises(B.BackendUnavailable):
        B.trt_tag("ten")


def test_precision_mode_follows_the_tensorrt_major_version():
    assert B.trt_precision_mode("10.8.0.43", "fp16") == "fp16-flag"
    assert B.trt_precision_mode("10.0.1", "fp32") == "fp32"
    assert B.trt_precision_mode("11.1.0.106", "fp16") == "strongly-typed"
    assert B.trt_precision_mode("11.1.0.106", "fp32") == "strongly-typed"
    with pytest.raises(B.BackendUnavailable, match="TensorRT 10 or newer"):
        B.trt_precision_mode("8.6.1", "fp16")


# ---------------------------------------------------------------- TensorRT build, against stand-ins


class FakeTensor:
    def __init__(self, name, dtype="HALF"):
        self.name, self.dtype = name, dtype


class FakeLayer:
    def __init__(self, kind, in_dtype="HALF", outputs=1):
        self.type, self.num_inputs, self.num_outputs = kind, 1, outputs
        self._input = FakeTensor("x", in_dtype)
        self.precision = None
        self.output_types = {}

    def get_input(self, i):
        return self._input

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


class FakeNetwork:
    def __init__(self, inputs, layers):
        self.inputs, self.layers = [FakeTensor(n) for n in inputs], layers

    num_inputs = property(lambda self: len(self.inputs))
    num_layers = property(lambda self: len(self.layers))

    def get_input(self, i):
        return self.inputs[i]

    def get_layer(self, i):
        return self.layers[i]


FAKE_TRT = SimpleNamespace(
    __version__="10.8.0.43",
    DataType=SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT32="INT32", INT64="INT64"),
    LayerType=SimpleNamespace(NORMALIZATION="NORMALIZATION", REDUCE="REDUCE", MATRIX_MULTIPLY="MATRIX_MULTIPLY"),
)


class FakePoly:
    """Records what the build asks polygraphy for; writes a plan and a timing cache like polygraphy would."""

    class Profile(dict):
        def add(self, name, min, opt, max):
            self[name] = (tuple(min), tuple(opt), tuple(max))
            return self

    def __init__(self, inputs, fail_on=None):
        self.inputs, self.fail_on = inputs, fail_on
        self.networks, self.configs, self.parsed = [], [], []

    def network_from_onnx_path(self, path, strongly_typed=False):
        self.parsed.append((Path(path).name, strongly_typed))
        if self.fail_on and Path(path).name == self.fail_on:
            raise RuntimeError("In node 7 (importAttention): UNSUPPORTED_NODE: Assertion failed")
        net = FakeNetwork(self.inputs, [FakeLayer("NORMALIZATION"), FakeLayer("MATRIX_MULTIPLY"),
                                        FakeLayer("REDUCE", "HALF"), FakeLayer("REDUCE", "INT64")])
        self.networks.append(net)
        return "builder", net, "parser"

    def CreateConfig(self, **kwargs):
        if kwargs.get("load_timing_cache"):
            kwargs["loaded_cache_bytes"] = Path(kwargs["load_timing_cache"]).read_bytes()
        self.configs.append(kwargs)
        return kwargs

    def engine_bytes_from_network(self, network, config, save_timing_cache):
        with open(save_timing_cache, "ab") as f:
            f.write(b"+tactics")
        return b"PLAN " + repr(sorted(config["profiles"][0].items())).encode()


def test_norm_layers_are_pinned_to_fp32_and_nothing_else():
    net = FakePoly(["hidden"]).network_from_onnx_path("x.onnx")[1]
    assert B.constrain_norms_fp32(FAKE_TRT, net) == 2
    norm, matmul, freduce, ireduce = net.layers
    assert norm.precision == "FLOAT" and norm.output_types == {0: "FLOAT"}
    assert freduce.precision == "FLOAT"  # a decomposed LayerNorm's mean/variance
    assert matmul.precision is None and matmul.output_types == {}  # fp16 where it is safe
    assert ireduce.precision is None  # integer shape arithmetic keeps its type


@pytest.mark.parametrize("version,precision,mode", [("10.8.0.43", "fp16", "fp16-flag"), ("10.8.0.43", "fp32", "fp32"),
                                                    ("11.1.0.106", "fp16", "strongly-typed")])
def test_build_engine_asks_polygraphy_for_the_profile_and_precision(tmp_path, version, precision, mode):
    inputs = [TensorSpec("hidden", "float16", ("batch", 16, 32)), TensorSpec("t_cond", "float16", ("batch", 192))]
    poly = FakePoly(["hidden", "t_cond"])
    cache = tmp_path / "timing.cache"
    assert B.trt_precision_mode(version, precision) == mode
    plan, pinned = B.build_engine(FAKE_TRT, poly, tmp_path / "front.onnx", inputs, 8, mode, cache)
    cfg = poly.configs[0]
    assert poly.parsed == [("front.onnx", mode == "strongly-typed")]
    assert dict(cfg["profiles"][0]) == {"hidden": ((1, 16, 32), (2, 16, 32), (8, 16, 32)),
                                        "t_cond": ((1, 192), (2, 192), (8, 192))}
    assert cfg["fp16"] is (mode == "fp16-flag")  # TensorRT 11: no fp16 flag, the ONNX decides
    assert pinned == (2 if mode == "fp16-flag" else 0)
    assert cfg["precision_constraints"] == ("obey" if mode == "fp16-flag" else None)
    assert cfg["load_timing_cache"] is None and cache.read_bytes() == b"+tactics"  # saved for the next build
    assert plan.startswith(b"PLAN")


def test_build_engine_refuses_inputs_the_manifest_does_not_list(tmp_path):
    poly = FakePoly(["hidden", "surprise"])
    with pytest.raises(B.BackendBuildError, match="surprise"):
        B.build_engine(FAKE_TRT, poly, tmp_path / "front.onnx", [TensorSpec("hidden", "float32", ("batch", 4))], 2,
                       "fp32", tmp_path / "c")


def _fake_job(tmp_path, fail_on=None, monkeypatch=None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    poly = FakePoly(["hidden"], fail_on=fail_on)
    monkeypatch.setattr(B, "import_tensorrt", lambda: (FAKE_TRT, poly))
    staging, out = tmp_path / ".exp.tmp", tmp_path / "exp"
    staging.mkdir()
    segments = []
    for name in ("embed", "front", "middle", "rear", "head"):
        (staging / f"{name}.onnx").write_bytes(b"onnx " + name.encode())
        segments.append(SimpleNamespace(name=name, inputs=(TensorSpec("hidden", "float16", ("batch", 4, 8)),)))
    job = SimpleNamespace(out=out, options=SimpleNamespace(precision="fp16", max_batch=4))
    return job, segments, staging, poly


def test_tensorrt_manifest_entry_names_version_files_profile_and_cache(tmp_path, monkeypatch):
    job, segments, staging, poly = _fake_job(tmp_path, monkeypatch=monkeypatch)
    cache = B.timing_cache_name("10.8.0.43", "NVIDIA H100 80GB HBM3")
    job.out.mkdir()
    (job.out / cache).write_bytes(b"OLD")  # the previous export's cache is reused
    from deltadit_export.progress import Progress

    entry = B.build_backend_artifacts("tensorrt", job, segments, {}, staging, Progress(quiet=True))
    assert entry["version"] == "10.8.0.43" and entry["major"] == 10 and entry["precision_mode"] == "fp16-flag"
    assert entry["profile"] == {"min": 1, "opt": 2, "max": 8}  # max = 2 × --max-batch (guidance)
    assert entry["compute_capability"] == "9.0" and entry["timing_cache"] == cache
    assert poly.configs[0]["loaded_cache_bytes"] == b"OLD"
    for seg in segments:
        f = entry["files"][seg.name]
        assert f["file"] == f"{seg.name}.trt10.8.plan" and f["sha256"] == file_sha256(staging / f["file"])
        assert f["fp32_layers"] == 2


def test_tensorrt_build_failure_names_the_segment_and_keeps_the_onnx(tmp_path, monkeypatch):
    job, segments, staging, _ = _fake_job(tmp_path, fail_on="middle.onnx", monkeypatch=monkeypatch)
    from deltadit_export.progress import Progress

    with pytest.raises(B.BackendBuildError, match=r"segment 'middle': TensorRT 10\.8\.0\.43 engine build failed") as e:
        B.build_backend_artifacts("tensorrt", job, segments, {}, staging, Progress(quiet=True))
    kept = tmp_path / "exp.onnx-kept"
    assert str(kept) in str(e.value) and "UNSUPPORTED_NODE" in str(e.value)
    assert sorted(p.name for p in kept.iterdir()) == sorted(f"{s.name}.onnx" for s in segments)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: the missing-library error cannot happen")
def test_tensorrt_export_without_tensorrt_names_the_extra():
    with pytest.raises(B.BackendUnavailable, match=r"pip install 'deltadit\[tensorrt\]'"):
        B.build_backend_artifacts("tensorrt", None, [], {}, Path("."), None)


@pytest.mark.skipif(HAS_TRT and HAS_CUDA, reason="TensorRT and a GPU are here: the preflight passes")
def test_preflight_fails_fast_without_tensorrt_and_passes_for_torch_and_onnx():
    with pytest.raises(B.BackendUnavailable, match="tensorrt"):
        B.preflight("tensorrt")
    B.preflight("torch")
    B.preflight("onnx")
    with pytest.raises(B.BackendUnavailable, match="torch or tensorrt"):
        B.preflight("openvino")


def test_unknown_artifact_backend_is_refused():
    with pytest.raises(B.BackendUnavailable, match="torch or tensorrt"):
        B.build_backend_artifacts("openvino", None, [], {}, Path("."), None)


# ---------------------------------------------------------------- torch.export programs


def test_torch_export_writes_one_verified_program_per_segment(torch_export):
    m = load_manifest(torch_export)
    entry = m.engines["torch"]
    assert entry["format"] == "torch.export" and entry["torch"] == torch.__version__ and entry["dtype"] == "float32"
    assert set(entry["files"]) == set(m.segment_names) == {"embed", "front", "rear", "head"}
    for name, f in entry["files"].items():
        assert f["file"] == f"{name}.pt2"
        assert f["sha256"] == file_sha256(torch_export / f["file"])
        assert entry["parity"][name] <= TOL_ORT
    assert entry["batch"]["min"] == 1 and entry["batch"]["max"] >= m.max_batch
    assert entry["batch"]["example"] >= 2  # traced above batch 1, so the batch axis stays symbolic


def test_torch_programs_are_traced_in_eval_mode(tmp_path):
    """A segment left in training mode would trace DiT's label dropout (a random op) into the program."""
    from deltadit_export.progress import Progress
    from runtime.backends.torch_backend import load_program

    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        model = tiny_dit(num_layers=2)
        segments = split_model(model, Cuts(2, 1))
        chains = {b: run_segments(segments, random_model_inputs(model_shape(model), b, torch.Generator().manual_seed(b)))
                  for b in (1, 3)}
        head = segments[-1]
        head.module.train()  # what torch.onnx.export's mode restore once did to the DiT segments
        job = SimpleNamespace(options=SimpleNamespace(precision="fp32", parity_batches=(1, 3)))
        entry = B.build_torch_programs(job, [head], chains, tmp_path, Progress(quiet=True))
        assert not any(m.training for m in head.module.modules())
        program = torch.export.load(str(tmp_path / entry["files"]["head"]["file"]))
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert not [t for t in targets if "rand" in t or "bernoulli" in t or "dropout" in t], targets
        args = [chains[3][t.name] for t in head.inputs]
        assert rel(head.module(*args), load_program(tmp_path / "head.pt2", torch.device("cpu"))(*args)) <= \
            TOL_SAME_KERNELS
    finally:
        torch.set_grad_enabled(previous)


def test_torch_programs_move_to_another_device(torch_export):
    """The CUDA path loads CPU-traced programs onto the GPU (move_to_device_pass). The meta device stands in
    for it here: a device baked into the graph (arange(device=cpu), a CPU constant) would clash there too."""
    from runtime.backends.torch_backend import load_program

    m = load_manifest(torch_export)
    for seg in m.segments:
        module = load_program(torch_export / f"{seg.name}.pt2", torch.device("meta"))
        args = [torch.zeros(t.concrete_shape(3), dtype=getattr(torch, t.dtype), device="meta") for t in seg.inputs]
        out = module(*args)
        out = out if isinstance(out, tuple) else (out,)
        assert [(o.device.type, tuple(o.shape)) for o in out] == \
            [("meta", t.concrete_shape(3)) for t in seg.outputs], seg.name


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_torch_backend_matches_diffusers_and_onnxruntime_on_cpu(torch_export, torch_rt, ort_rt, batch):
    model = rebuild_model(torch_export)
    m = torch_rt.manifest
    feeds = random_model_inputs(model_shape(model, m.conditioning["tokens"]), batch,
                                torch.Generator().manual_seed(100 + batch))
    with torch.no_grad():
        ref = diffusers_forward(model, feeds)
    got = torch_rt.forward(feeds)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert rel(ref, got) <= TOL_SAME_KERNELS
    assert rel(ort_rt.forward(feeds), got) <= TOL_ORT


def test_torch_backend_runs_the_delta_dit_schedule_like_onnxruntime(torch_rt, ort_rt):
    """Deltas are recorded from and added in place to the torch backend's outputs, step by step."""
    sched_t = torch_rt.schedule("delta-dit", num_steps=6, interval=2, boundary=3)
    assert {p.kind for p in sched_t.steps} > {"full"}  # cached steps of both phases are exercised
    gen_t, gen_o = torch_rt.new_generation(2, sched_t), ort_rt.new_generation(2, sched_t)
    model = rebuild_model(torch_rt.root)
    shape = model_shape(model, torch_rt.manifest.conditioning["tokens"])
    for i in range(6):
        feeds = random_model_inputs(shape, 2, torch.Generator().manual_seed(i))
        a, b = torch_rt.step(gen_t, feeds), ort_rt.step(gen_o, feeds)
        assert rel(b, a) <= TOL_ORT, f"step {i}"
    assert gen_t.done and set(gen_t.recorded) == {"front", "rear"}


def test_torch_backend_serves_two_threads_at_once(torch_rt):
    """Two generations in flight (a service's threads) share one runtime and its loaded programs."""
    from concurrent.futures import ThreadPoolExecutor

    model = rebuild_model(torch_rt.root)
    shape = model_shape(model, torch_rt.manifest.conditioning["tokens"])
    feeds = [random_model_inputs(shape, 1 + i % 2, torch.Generator().manual_seed(200 + i)) for i in range(6)]
    alone = [torch_rt.forward(f) for f in feeds]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(torch_rt.forward, feeds))
    # Thread scheduling may change a kernel's blocking, not the result beyond rounding; mixing up two
    # requests' data would be an O(1) error.
    assert max(rel(a, b) for a, b in zip(alone, together)) <= TOL_SAME_KERNELS


def test_torch_backend_without_programs_says_how_to_export_them(torch_export, tmp_path):
    folder = edited_copy(torch_export, tmp_path / "onnx-only", lambda d: d["engines"].pop("torch"))
    with pytest.raises(BackendError, match=r"--backend torch"):
        DeltaDiTRuntime(folder, backend="torch", device="cpu", trust_artifacts=True)


def test_torch_backend_refuses_a_changed_program(torch_export, tmp_path):
    folder = edited_copy(torch_export, tmp_path / "tampered", lambda d: None)
    with open(folder / "front.pt2", "ab") as f:
        f.write(b"\0")
    m = load_manifest(folder)
    with pytest.raises(BackendError, match=r"front.*changed after export"):
        make_backend("torch", device="cpu", trust_artifacts=True).load(m, m.segment("front"))


def test_torch_backend_refuses_a_file_outside_the_folder(torch_export, tmp_path):
    def escape(d):
        d["engines"]["torch"]["files"]["head"]["file"] = "../head.pt2"

    m = load_manifest(edited_copy(torch_export, tmp_path / "escape", escape))
    with pytest.raises(BackendError, match="not a plain file name"):
        make_backend("torch", device="cpu", trust_artifacts=True).load(m, m.segment("head"))


def test_torch_backend_warns_when_another_torch_saved_the_programs(torch_export, tmp_path):
    def older(d):
        d["engines"]["torch"]["torch"] = "2.0.0"

    m = load_manifest(edited_copy(torch_export, tmp_path / "older", older))
    with pytest.warns(UserWarning, match=r"saved by torch 2\.0\.0"):
        engine = make_backend("torch", device="cpu", trust_artifacts=True).load(m, m.segment("head"))
    assert engine.spec.name == "head"


# ---------------------------------------------------------------- backend selection


def test_registry_and_auto_preference():
    assert AUTO_ORDER == ("tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime")
    assert set(AUTO_ORDER) <= set(BACKENDS) and "torch" in BACKENDS
    with pytest.raises(BackendError, match="unknown backend 'nope'.*tensorrt"):
        make_backend("nope")


@pytest.mark.skipif(HAS_CUDA or HAS_TRT or HAS_ORT_CUDA, reason="a GPU backend is usable here, so auto prefers it")
def test_auto_on_a_cpu_machine_is_onnxruntime_and_gets_only_its_options(torch_export):
    b = make_backend("auto", threads=1, cuda_graphs=True)  # cuda_graphs is for GPU backends: not passed on
    assert b.name == "onnxruntime" and b.threads == 1
    # With the manifest (as the runtime passes it), the CPU still gets ONNX Runtime, not the torch programs.
    assert DeltaDiTRuntime(torch_export).backend.name == "onnxruntime"


def test_explicit_backend_with_an_option_it_does_not_take():
    with pytest.raises(BackendError, match=r"takes no option\(s\) \['cuda_graphs'\]"):
        make_backend("onnxruntime", cuda_graphs=True)


def test_auto_skips_a_backend_whose_artifacts_the_export_lacks(monkeypatch):
    import runtime.backends as RB

    class NeedsEngines:
        name = "gpu"

        def __init__(self):
            pass

        @classmethod
        def missing_artifacts(cls, manifest):
            return None if manifest.engines.get("gpu") else "no gpu engines in this export"

    class Cpu:
        name = "cpu"

        def __init__(self, threads=None):
            self.threads = threads

    monkeypatch.setattr(RB, "AUTO_ORDER", ("gpu", "cpu"))
    monkeypatch.setattr(RB, "backend_class", lambda n: {"gpu": NeedsEngines, "cpu": Cpu}[n])
    assert RB.make_backend("auto", manifest=SimpleNamespace(engines={})).name == "cpu"
    assert RB.make_backend("auto", manifest=SimpleNamespace(engines={"gpu": {}})).name == "cpu"  # empty entry
    assert RB.make_backend("auto", manifest=SimpleNamespace(engines={"gpu": {"files": 1}})).name == "gpu"
    assert RB.make_backend("auto").name == "gpu"  # no manifest: only usability decides
    monkeypatch.setattr(RB, "AUTO_ORDER", ("gpu",))
    with pytest.raises(BackendError, match="no usable backend: gpu: no gpu engines in this export"):
        RB.make_backend("auto", manifest=SimpleNamespace(engines={}))


@pytest.mark.parametrize("name,options,missing", [
    pytest.param("tensorrt", {}, r"TensorRT.*pip install 'deltadit\[tensorrt\]'",
                 marks=pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")),
    pytest.param("onnxruntime-cuda", {}, r"no CUDAExecutionProvider.*pip install 'deltadit\[gpu\]'",
                 marks=pytest.mark.skipif(HAS_ORT_CUDA, reason="onnxruntime-gpu is installed here")),
    pytest.param("torch-cuda", {}, "needs an NVIDIA GPU",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is present here")),
    pytest.param("torch", {"device": "cuda"}, "needs an NVIDIA GPU",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is present here")),
    pytest.param("torch", {"device": "cpu", "cuda_graphs": True}, "CUDA graphs do not exist on the CPU"),
])
def test_gpu_backends_name_what_is_missing(name, options, missing):
    with pytest.raises(BackendError, match=missing):
        make_backend(name, **options)


# ---------------------------------------------------------------- GPU (skipped without one)


@needs_cuda
@pytest.mark.gpu
def test_torch_backend_on_cuda_with_and_without_graphs(torch_export, torch_rt):
    model = rebuild_model(torch_export)
    shape = model_shape(model, torch_rt.manifest.conditioning["tokens"])
    eager = DeltaDiTRuntime(torch_export, backend="torch", device="cuda", trust_artifacts=True)
    graphed = DeltaDiTRuntime(torch_export, backend="torch", device="cuda", cuda_graphs=True, trust_artifacts=True)
    for batch in (2, 1, 2):  # a new batch size captures a new graph; the old one is replayed again
        feeds = random_model_inputs(shape, batch, torch.Generator().manual_seed(batch))
        ref = torch_rt.forward(feeds)
        # fp32 on the GPU: cuDNN's TF32 convolution (patch embedding) and other kernels: 5e-3.
        assert rel(ref, eager.forward(feeds)) <= 5e-3
        assert rel(ref, graphed.forward(feeds)) <= 5e-3
    sched = graphed.schedule("delta-dit", num_steps=4, interval=2, boundary=2)
    g1, g2 = graphed.new_generation(2, sched), eager.new_generation(2, sched)
    for i in range(4):
        feeds = random_model_inputs(shape, 2, torch.Generator().manual_seed(50 + i))
        assert rel(eager.step(g2, feeds), graphed.step(g1, feeds)) <= 5e-3


@needs_trt
@pytest.mark.gpu
def test_tensorrt_engines_build_and_match_onnxruntime(tmp_path):
    out = export_tiny(tmp_path / "trt", "pixart-alpha", overrides=TINY2, cached_blocks=1,
                      backends=("onnx", "tensorrt"))
    m = load_manifest(out)
    import tensorrt

    assert m.engines["tensorrt"]["version"] == tensorrt.__version__
    ort = DeltaDiTRuntime(out, backend="onnxruntime")
    shape = model_shape(rebuild_model(out), m.conditioning["tokens"])
    for graphs in (False, True):
        rt = DeltaDiTRuntime(out, backend="tensorrt", cuda_graphs=graphs, trust_artifacts=True)
        assert rt.backend.scratch_bytes >= 0
        for batch in (1, 2, m.max_batch):
            feeds = random_model_inputs(shape, batch, torch.Generator().manual_seed(batch))
            # fp32 engine without TF32: kernel choice and fusion only, the exporter's ONNX tolerance.
            assert rel(ort.forward(feeds), rt.forward(feeds)) <= TOL_ORT * 10


@needs_ort_cuda
@pytest.mark.gpu
def test_onnxruntime_cuda_matches_cpu(torch_export, ort_rt):
    shape = model_shape(rebuild_model(torch_export), ort_rt.manifest.conditioning["tokens"])
    for graphs in (False, True):
        rt = DeltaDiTRuntime(torch_export, backend="onnxruntime-cuda", cuda_graphs=graphs)
        for batch in (1, 2, 1):
            feeds = random_model_inputs(shape, batch, torch.Generator().manual_seed(batch))
            assert rel(ort_rt.forward(feeds), rt.forward(feeds)) <= 5e-3  # TF32 convolutions on the GPU


def test_torch_compile_backend_matches_the_eager_programs_across_batch_sizes(torch_export, torch_rt):
    """Inductor-compiled segments (``torch-compile``) give the eager programs' result at a new batch size
    too. Tolerance TOL_ORT: Inductor fuses and reorders fp32 reductions like ONNX Runtime does."""
    compiled = DeltaDiTRuntime(torch_export, backend="torch-compile", threads=1, trust_artifacts=True)
    assert compiled.backend.name == "torch-compile"
    assert all(isinstance(e.module, torch._dynamo.eval_frame.OptimizedModule) for e in compiled.engines.values())
    model = rebuild_model(torch_export)
    shape = model_shape(model, torch_rt.manifest.conditioning["tokens"])
    for batch in (2, 3):
        feeds = random_model_inputs(shape, batch, torch.Generator().manual_seed(300 + batch))
        assert rel(torch_rt.forward(feeds), compiled.forward(feeds)) <= TOL_ORT, f"batch {batch}"


def test_onnxruntime_sessions_share_one_cpu_arena_without_changing_results(torch_export, ort_rt):
    """The CPU backend's sessions allocate from one environment arena (so chained segments reuse the
    same activation memory); the arena is only where tensors live, so results are bit-identical to
    sessions with their own arenas."""
    own = DeltaDiTRuntime(torch_export, backend="onnxruntime", shared_arena=False)
    for rt, expected in ((ort_rt, "1"), (own, None)):
        for engine in rt.engines.values():
            entries = engine.session.get_session_options().get_session_config_entry
            if expected is None:
                with pytest.raises(RuntimeError, match="does not have configuration"):
                    entries("session.use_env_allocators")
            else:
                assert entries("session.use_env_allocators") == expected
    model = rebuild_model(torch_export)
    shape = model_shape(model, ort_rt.manifest.conditioning["tokens"])
    for batch in (1, 3):
        feeds = random_model_inputs(shape, batch, torch.Generator().manual_seed(400 + batch))
        assert torch.equal(ort_rt.forward(feeds), own.forward(feeds))
