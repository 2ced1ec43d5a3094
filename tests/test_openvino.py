"""The OpenVINO backend (issue 12): results against ONNX Runtime in fp32 and bf16, int8 engines, zero-copy I/O,
two threads at once, the precision choice and its note, the manifest's hashed files, never chosen by auto.

Tolerances (max |a − b| / max |b| of one transformer call):
- fp32 inference (``inference_precision="f32"``) against ONNX Runtime: 1e-4, the exporter's fp32 parity
  tolerance (same graph, other kernels and summation orders; measured 2e-7–3e-7 here).
- bf16 inference against ONNX Runtime fp32: 1e-1. bf16 keeps 8 significant bits (a relative rounding of
  2^-9 ≈ 2e-3 at every rounded op) and OpenVINO runs the matmuls, norms and softmax of all six blocks in it:
  measured 2e-2–5.3e-2 on the tiny models (4e-2 on the quick benchmark model, DESIGN.md §4). 1e-1 leaves 2×
  headroom; the wiring itself is held to 1e-4 by the fp32 test, and bf16 must differ from fp32 by more
  than 1e-4 (so the precision setting is proved to take effect).
- int8 engines against the fp32 torch model: the int8 gate's tolerance (OpenVINO quantizes the activations
  its own way; measured 2e-3–1.2e-2), plus the bf16 tolerance when bf16 is on.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

ov = pytest.importorskip("openvino", reason="openvino is not installed: pip install 'deltadit[openvino]' "
                                            "(tools/setup.sh installs it)")

from tiny import edited_copy, export_tiny, rebuild_model  # noqa: E402

from deltadit_export.quantize import INT8_TOLERANCE  # noqa: E402
from deltadit_export.split import diffusers_forward, model_shape, random_model_inputs  # noqa: E402
from runtime import DeltaDiTRuntime, ManifestError, generate  # noqa: E402
from runtime.backends import AUTO_ORDER, BackendError, make_backend  # noqa: E402
from runtime.backends.openvino_backend import OpenVinoBackend  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FP32_TOL = 1e-4
BF16_TOL = 1e-1
HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 instructions (OpenVINO lists no BF16)")


def rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def _feeds(folder: Path, batch: int):
    model = rebuild_model(folder)
    tokens = DeltaDiTRuntime(folder, backend="onnxruntime", threads=1).manifest.conditioning.get("tokens", 0)
    return model, random_model_inputs(model_shape(model, tokens), batch, torch.Generator().manual_seed(batch + 30))


@pytest.fixture(scope="module")
def pixart_int8_all(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("ov") / "pixart-int8", "pixart-alpha", precision="int8",
                       keep_fp32="none")


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("which", ["pixart_export", "dit_export"])
def test_fp32_inference_equals_onnxruntime(request, which, batch):
    folder = request.getfixturevalue(which)
    _, feeds = _feeds(folder, batch)
    ort_out = DeltaDiTRuntime(folder, backend="onnxruntime", threads=1).forward(feeds)
    ov_rt = DeltaDiTRuntime(folder, backend="openvino", threads=1, inference_precision="f32")
    assert ov_rt.backend.inference_precision == "f32"
    assert "inference precision fp32 (asked for)" in ov_rt.backend.describe()
    assert rel(ort_out, ov_rt.forward(feeds)) < FP32_TOL


@needs_bf16
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("which", ["pixart_export", "dit_export"])
def test_bf16_inference_is_the_default_on_a_bf16_cpu_and_within_its_tolerance(request, which, batch):
    folder = request.getfixturevalue(which)
    _, feeds = _feeds(folder, batch)
    ort_out = DeltaDiTRuntime(folder, backend="onnxruntime", threads=1).forward(feeds)
    ov_rt = DeltaDiTRuntime(folder, backend="openvino", threads=1)
    assert ov_rt.backend.inference_precision == "bf16"
    assert "inference precision bf16 (the CPU has bf16 instructions" in ov_rt.backend.precision_note
    assert FP32_TOL < rel(ort_out, ov_rt.forward(feeds)) < BF16_TOL


@pytest.mark.parametrize("precision", ["f32", "auto"])
@pytest.mark.parametrize("which", ["pixart_int8_all", "dit_export"])
def test_int8_engines_run_on_openvino(request, which, precision, tmp_path):
    folder = request.getfixturevalue(which)
    if which == "dit_export":  # a DiT int8 export, embed and head kept fp32 (the default)
        folder = export_tiny(tmp_path / "dit-int8", "dit-xl-2", precision="int8")
    model, feeds = _feeds(folder, 5)
    with torch.no_grad():
        reference = diffusers_forward(model, feeds)
    ov_rt = DeltaDiTRuntime(folder, backend="openvino", threads=1, inference_precision=precision)
    assert "int8" in ov_rt.manifest.segment_precisions.values()
    limit = INT8_TOLERANCE + (BF16_TOL if ov_rt.backend.inference_precision == "bf16" else 0.0)
    assert rel(reference, ov_rt.forward(feeds)) < limit


def test_inputs_and_outputs_share_memory_with_the_torch_tensors(pixart_export):
    rt = DeltaDiTRuntime(pixart_export, backend="openvino", threads=1, inference_precision="f32")
    engine = rt.engines["front"]
    _, feeds = _feeds(pixart_export, 2)
    env = rt.engines["embed"].run(rt.prepare_inputs(feeds))
    out = engine.run(env)["hidden_out"]
    request = engine._idle.get_nowait()  # the request that just ran (the only one: one call at a time)
    try:
        assert request.get_tensor("hidden_out").data.ctypes.data == out.data_ptr()  # written in place
        assert request.get_tensor("hidden").data.ctypes.data == env["hidden"].data_ptr()  # read in place
    finally:
        engine._idle.put(request)


def test_two_threads_run_two_generations_at_once(pixart_export):
    rt = DeltaDiTRuntime(pixart_export, backend="openvino", threads=1, inference_precision="f32")
    prompts = [torch.randn(1, 120, 24, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]

    def run(i):
        return generate(rt, prompt_embeds=prompts[i], negative_embeds=torch.zeros_like(prompts[i]),
                        guidance_scale=3.0, num_steps=6, policy="delta-dit",
                        generator=torch.Generator().manual_seed(i)).latents

    alone = [run(0), run(1)]
    together: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def worker(i):
        barrier.wait()
        together[i] = run(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # fp32 OpenVINO is deterministic per input: a generation in a thread equals the same one run alone
    # (deltas of one generation never reach the other).
    for i in (0, 1):
        assert torch.equal(together[i], alone[i])
    assert not torch.equal(alone[0], alone[1])


def test_auto_never_picks_openvino(pixart_export):
    assert "openvino" not in AUTO_ORDER
    assert make_backend("auto", threads=1).name == "onnxruntime"
    assert DeltaDiTRuntime(pixart_export, threads=1).backend.name == "onnxruntime"


@pytest.mark.parametrize("options, message", [
    (dict(inference_precision="fp8"), "inference_precision='fp8' is not one of auto, bf16, f32"),
    (dict(threads=0), "threads=0 is out of range"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(BackendError, match=message):
        OpenVinoBackend(**options)


def test_a_cpu_without_bf16_gets_fp32_and_says_so(monkeypatch):
    real = ov.Core.get_property

    def no_bf16(core, device, name):
        if name == "OPTIMIZATION_CAPABILITIES":
            return ["FP32", "INT8"]
        return real(core, device, name)

    monkeypatch.setattr(ov.Core, "get_property", no_bf16)
    backend = OpenVinoBackend()
    assert backend.inference_precision == "f32"
    assert "inference precision fp32 (this CPU has no bf16 instructions (OpenVINO capabilities: FP32, INT8))" \
        in backend.describe()
    with pytest.raises(BackendError, match="inference_precision='bf16' needs a CPU with bf16 instructions"):
        OpenVinoBackend(inference_precision="bf16")




def test_weights_the_manifest_does_not_hash_are_refused(pixart_export, tmp_path):
    """front.onnx still reads front.onnx.data, but the manifest no longer lists (so never verified) it."""
    def unlist(d):
        d["segments"][1]["extra_files"] = []
        d["segments"][1]["extra_sha256"] = {}
    folder = edited_copy(pixart_export, tmp_path / "x", unlist)
    with pytest.raises(ManifestError, match=r"segment 'front': .*front.onnx keeps the data of tensor .* in "
                                            r"'front.onnx.data', which is not one of the segment's hashed weight files"):
        DeltaDiTRuntime(folder, backend="openvino", threads=1)


def test_only_onnx_files_are_read(pixart_export, tmp_path):
    def rename(d):
        d["segments"][1]["file"] = "front.xml"
    folder = edited_copy(pixart_export, tmp_path / "x", rename)
    shutil.copy(folder / "front.onnx", folder / "front.xml")
    with pytest.raises(BackendError, match="front.xml is not an .onnx file; the openvino backend reads the export's "
                                           "ONNX segments only"):
        DeltaDiTRuntime(folder, backend="openvino", threads=1, verify=False)
