"""int8 segment engines (issue 12): parity against fp32 torch, what is quantized, the manifest fields and
their validation, --keep-fp32, the tolerance gate, the cache key, and every cache policy on mixed engines.

Tolerances. Per segment and for a whole call: ``INT8_TOLERANCE`` (5e-2, max |int8 − fp32| / max |fp32|),
the exporter's own gate; measured here 2e-3–1.2e-2 per segment and 2e-3–1.3e-2 for a whole call of the tiny
models (the noise of 8-bit weights per channel and 8-bit activations per tensor), while a wiring or dtype
mistake between segments is O(1). Whether int8 happened at all is checked too (the error is not fp32's ~1e-7,
and the graphs hold MatMulInteger), so a silently fp32 "int8" export fails.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from tiny import TINY_PIXART_SET, TINY_RESOLUTION, export_tiny, rebuild_model, set_args

from deltadit_export.cli import main as export_cli
from deltadit_export.export_options import ExportOptions, OptionError, resolve
from deltadit_export.exporter import export
from deltadit_export.onnx_export import ExportError
from deltadit_export.progress import Progress
from deltadit_export.quantize import INT8_TOLERANCE
from deltadit_export.split import diffusers_forward, model_shape, random_model_inputs, run_segments, split_model
from runtime import DeltaDiTRuntime, generate
from runtime.integrity import verify_segment_files
from runtime.manifest import ManifestError, load_manifest, manifest_from_dict
from runtime.schedule import POLICY_NAMES, Cuts

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FP32_TOL = 1e-4  # the exporter's fp32 parity tolerance (segments kept in fp32)
NOT_FP32 = 1e-6  # an int8 segment differs from fp32 by far more than fp32 rounding (~1e-7): it was quantized


def rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def pixart_int8(tmp_path_factory) -> Path:
    """The conftest's tiny PixArt (same seed and options) with --precision int8 and the default --keep-fp32."""
    return export_tiny(tmp_path_factory.mktemp("int8") / "pixart", "pixart-alpha", precision="int8")


@pytest.fixture(scope="module")
def dit_int8(tmp_path_factory) -> Path:
    """A tiny DiT with every segment quantized (--keep-fp32 none)."""
    return export_tiny(tmp_path_factory.mktemp("int8") / "dit", "dit-xl-2", precision="int8", keep_fp32="none")


def _options(tmp_path: Path, **kw) -> ExportOptions:
    base = dict(model="pixart-alpha", resolution=TINY_RESOLUTION, random_weights=True, overrides=dict(TINY_PIXART_SET),
                out=str(tmp_path / "out"), precision="int8")
    return ExportOptions(**{**base, **kw})


# ---------------------------------------------------------------- parity and what is quantized


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("which", ["pixart_int8", "dit_int8"])
def test_int8_segments_match_fp32_torch_within_the_tolerance(request, which, batch):
    folder = request.getfixturevalue(which)
    model = rebuild_model(folder)
    rt = DeltaDiTRuntime(folder, backend="onnxruntime", threads=1)
    m = rt.manifest
    tokens = m.conditioning.get("tokens", 0)
    feeds = random_model_inputs(model_shape(model, tokens), batch, torch.Generator().manual_seed(batch + 20))
    segments = split_model(model, Cuts(m.num_layers, m.cached_blocks), caption_tokens=tokens)
    with torch.no_grad():
        chain = run_segments(segments, feeds)  # the fp32 torch segments and their real inputs
        reference = diffusers_forward(model, feeds)
    for seg in segments:
        inputs = {t.name: chain.get(f"hidden@{seg.name}", chain["hidden"]) if t.name == "hidden" else chain[t.name]
                  for t in seg.inputs}
        with torch.no_grad():
            want = seg.module(*inputs.values())
        want = want if isinstance(want, tuple) else (want,)
        got = rt.engines[seg.name].run(inputs)
        err = max(rel(w, got[t.name]) for t, w in zip(seg.outputs, want))
        if m.segment(seg.name).precision == "int8":
            assert NOT_FP32 < err < INT8_TOLERANCE, (seg.name, err)
        else:
            assert err < FP32_TOL, (seg.name, err)
    err = rel(reference, rt.forward(feeds))
    assert NOT_FP32 < err < INT8_TOLERANCE


def test_only_weight_matmuls_are_quantized_and_norms_softmax_attention_stay_fp32(pixart_int8, dit_int8):
    for folder in (pixart_int8, dit_int8):
        m = load_manifest(folder)
        for seg in m.segments:
            graph = onnx.load(str(folder / seg.file), load_external_data=False).graph
            ops = [n.op_type for n in graph.node]
            init = {t.name: t for t in graph.initializer}
            if seg.precision == "int8":
                assert seg.file == f"{seg.name}.int8.onnx" and "MatMulInteger" in ops
                # Every weight of a MatMulInteger is int8; every MatMul left has no weight (Q·Kᵀ, A·V).
                for n in graph.node:
                    if n.op_type == "MatMulInteger":
                        assert init[n.input[1]].data_type == onnx.TensorProto.INT8
                    if n.op_type == "MatMul":
                        assert n.input[1] not in init
                if seg.role == "blocks":
                    assert "Softmax" in ops and "LayerNormalization" in ops and "MatMul" in ops
            else:
                assert "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops
    # DiT's embed has no weight MatMul (a Conv and a sum): even with --keep-fp32 none it stays an fp32 file.
    assert load_manifest(dit_int8).segment_precisions == {"embed": "fp32", "front": "int8", "middle": "int8",
                                                        "rear": "int8", "head": "int8"}


def test_runtime_onnxruntime_session_fuses_the_int8_matmuls(pixart_int8, tmp_path):
    """The CPU backend's session options (full graph optimization) turn the quantizer's triples into ORT's
    fused int8 kernels (DynamicQuantizeMatMul / MatMulIntegerToFloat, u8·s8 MLAS, VNNI where the CPU has it)."""
    import onnxruntime as ort

    from runtime.backends.onnxruntime_backend import session_options

    opts = session_options(1)
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(pixart_int8 / "front.int8.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    assert "MatMulInteger" not in ops  # all fused


# ---------------------------------------------------------------- manifest


def test_per_segment_precision_and_error_round_trip_through_the_manifest(pixart_int8, tmp_path):
    m = load_manifest(pixart_int8)
    assert m.precision == "int8"
    assert m.segment_precisions == {"embed": "fp32", "front": "int8", "middle": "int8", "rear": "int8",
                                    "head": "fp32"}
    raw = json.loads((pixart_int8 / "manifest.json").read_text())
    assert [s["precision"] for s in raw["segments"]] == ["fp32", "int8", "int8", "int8", "fp32"]
    for seg in m.segments:  # the recorded error is the exporter's parity measurement of that file
        assert seg.rel_err == m.export["parity"][seg.name]
        assert seg.rel_err < (INT8_TOLERANCE if seg.precision == "int8" else FP32_TOL)
    assert m.export["int8"]["keep_fp32"] == ["embed", "head"] and m.export["int8"]["tolerance"] == INT8_TOLERANCE
    assert 0 < m.export["chain_rel_err"] < INT8_TOLERANCE
    again = manifest_from_dict(json.loads(json.dumps(m.to_dict())), root=m.root)
    assert again == m
    verify_segment_files(m)  # every int8 graph and data file is hashed


def test_export_leaves_no_scratch_and_hashes_every_file(pixart_int8):
    m = load_manifest(pixart_int8)
    named = {f for s in m.segments for f in (s.file, *s.extra_files)}
    onnx_files = {p.name for p in pixart_int8.iterdir() if ".onnx" in p.name}
    assert onnx_files == named
    assert not [p.name for p in pixart_int8.iterdir() if p.name.startswith(".")]  # no .fp32-*, .quant-*


def _edited(folder: Path, edit) -> dict:
    d = json.loads((folder / "manifest.json").read_text())
    edit(d)
    return d


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["segments"][1].update(precision="int4"),
     "`segments[1].precision` = 'int4' is not one of fp32, fp16, int8"),
    (lambda d: d["segments"][1].update(precision="fp16"), "`segments[1].precision` = 'fp16' does not fit the export's "
                                                          "precision 'int8' (its segments are int8 or fp32)"),
    (lambda d: d["segments"][2].pop("precision"), "`segments[2].precision` is missing: an int8 export names"),
    (lambda d: d.update(precision="fp8"), "manifest field `precision` = 'fp8' is not one of fp32, fp16, int8"),
    (lambda d: d["segments"][0].update(rel_err=-1.0), "`segments[0].rel_err` = -1.0 must be a finite number ≥ 0"),
    (lambda d: d["segments"][0].update(rel_err="small"), "`segments[0].rel_err` = 'small' must be a finite number"),
    (lambda d: d["segments"][0].update(rel_err=math.nan), "`segments[0].rel_err` = nan must be a finite number"),
], ids=["unknown", "wrong-for-export", "missing-in-int8", "top-level", "negative-err", "string-err", "nan-err"])
def test_bad_precision_fields_are_refused_with_the_field_and_the_fix(pixart_int8, edit, message):
    with pytest.raises(ManifestError) as info:
        manifest_from_dict(_edited(pixart_int8, edit))
    assert message in str(info.value) and "deltadit-export ... --force" in str(info.value)


def test_fp32_manifest_without_per_segment_fields_still_loads(pixart_export):
    """Manifests written before per-segment precision existed (format_version 1 as well): every segment is in
    the export's precision, the error unknown."""
    def strip(d):
        for s in d["segments"]:
            s.pop("precision", None)
            s.pop("rel_err", None)
    m = manifest_from_dict(_edited(pixart_export, strip))
    assert set(m.segment_precisions.values()) == {"fp32"} and all(s.rel_err is None for s in m.segments)
    fp16 = _edited(pixart_export, lambda d: (strip(d), d.update(precision="fp16")))
    assert set(manifest_from_dict(fp16).segment_precisions.values()) == {"fp16"}


# ---------------------------------------------------------------- --keep-fp32, the gate, options


def test_keep_fp32_names_the_fp32_segments_and_replaces_the_default(tmp_path):
    result = CliRunner().invoke(export_cli, [
        "--model", "pixart-alpha", "--random-weights", "--resolution", str(TINY_RESOLUTION), *set_args(TINY_PIXART_SET),
        "--precision", "int8", "--keep-fp32", "rear", "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 0, result.output
    m = load_manifest(tmp_path / "o")
    assert m.segment_precisions == {"embed": "int8", "front": "int8", "middle": "int8", "rear": "fp32", "head": "int8"}
    assert m.segment("rear").file == "rear.onnx" and m.segment("front").file == "front.int8.onnx"
    # The closing table shows each segment's precision, error and limit.
    table = result.output.splitlines()
    assert table[0].split()[:2] == ["segment", "precision"]
    rear = next(line for line in table if line.startswith("rear"))
    assert rear.split()[1] == "fp32" and rear.split()[-1] == "1e-04"
    front = next(line for line in table if line.startswith("front"))
    assert front.split()[1] == "int8" and front.split()[-1] == "5e-02"
    assert "whole chain" in result.output


def test_the_gate_refuses_an_int8_segment_above_the_tolerance_and_names_the_fix(tmp_path):
    # 1e-6 is below any int8 error (≥ 1e-3 here) and above fp32's (~1e-7): the int8 segments fail, the rest pass.
    result = CliRunner().invoke(export_cli, [
        "--model", "pixart-alpha", "--random-weights", "--resolution", str(TINY_RESOLUTION), *set_args(TINY_PIXART_SET),
        "--precision", "int8", "--int8-tolerance", "1e-6", "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert "'front'" in errors[0] and "'middle'" in errors[0] and "'rear'" in errors[0]
    assert "'embed'" not in errors[0] and "'head'" not in errors[0]
    assert "--keep-fp32 embed,front,middle,rear,head" in errors[0] and "int8 tolerance 1e-06" in errors[0]
    assert "← above the limit" in result.output  # the table was shown above the Error line
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())  # nothing written, no staging left


def test_the_gate_passes_the_same_tolerance_when_those_segments_are_kept_fp32(tmp_path):
    result = export(_options(tmp_path, int8_tolerance=1e-6, keep_fp32=("embed", "front", "middle", "rear", "head")),
                    Progress(quiet=True))
    assert set(result.manifest.segment_precisions.values()) == {"fp32"}


def test_gate_refusal_through_the_api_is_an_export_error_whose_fix_keeps_the_kept_segments(tmp_path):
    with pytest.raises(ExportError) as info:
        export(_options(tmp_path, int8_tolerance=1e-6, keep_fp32="head"), Progress(quiet=True))
    message = str(info.value)
    assert all(f"'{n}'" in message for n in ("embed", "front", "middle", "rear")) and "'head'" not in message
    assert "--keep-fp32 embed,front,middle,rear,head " in message  # head stays kept: the option replaces the default


@pytest.mark.parametrize("kw, message", [
    (dict(keep_fp32="embed,bogus"), "--keep-fp32 bogus: not a segment; expected a comma-separated list of embed, "
                                    "front, middle, rear, head (or none)"),
    (dict(precision="fp32", keep_fp32="embed"), "--keep-fp32 needs --precision int8"),
    (dict(precision="fp16", int8_tolerance=0.1), "--int8-tolerance needs --precision int8"),
    (dict(int8_tolerance=0.0), "--int8-tolerance=0.0 is out of range: expected a positive number"),
    (dict(int8_tolerance=math.inf), "--int8-tolerance=inf is out of range"),
    (dict(cached_blocks=3, keep_fp32="middle"), "--keep-fp32 middle: this export has no such segment"),
    (dict(backends=("onnx", "torch")), "--backend torch builds from the fp32/fp16 model, not from int8 ONNX"),
])
def test_int8_options_out_of_range_are_refused_before_any_work(tmp_path, kw, message):
    with pytest.raises(OptionError) as info:
        resolve(_options(tmp_path, **kw))
    assert message in str(info.value)


def test_cli_int8_option_errors_are_one_error_line(tmp_path):
    result = CliRunner().invoke(export_cli, ["--model", "pixart-alpha", "--random-weights", "--resolution",
                                             str(TINY_RESOLUTION), "--keep-fp32", "embed",
                                             "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.strip()] == [
        "Error: --keep-fp32 needs --precision int8 (with --precision fp32 no segment is quantized)"]


def test_cache_key_covers_precision_keep_fp32_and_tolerance(tmp_path):
    key = resolve(_options(tmp_path)).cache_key
    assert resolve(_options(tmp_path, keep_fp32="head,embed")).cache_key == key  # the default, spelled out
    assert resolve(_options(tmp_path, keep_fp32=("embed", "head"), int8_tolerance=INT8_TOLERANCE)).cache_key == key
    others = {resolve(_options(tmp_path, **kw)).cache_key for kw in
              (dict(keep_fp32="none"), dict(keep_fp32="embed"), dict(int8_tolerance=0.1), dict(precision="fp32"))}
    assert key not in others and len(others) == 4


def test_identical_int8_reexport_is_reused(pixart_int8):
    opts = ExportOptions(model="pixart-alpha", resolution=TINY_RESOLUTION, random_weights=True,
                         overrides=dict(TINY_PIXART_SET), out=str(pixart_int8), precision="int8")
    assert export(opts, Progress(quiet=True)).reused


# ---------------------------------------------------------------- mixed-precision schedules


@pytest.fixture(scope="module")
def fp32_and_int8(pixart_export, pixart_int8):
    return DeltaDiTRuntime(pixart_export, threads=1), DeltaDiTRuntime(pixart_int8, threads=1)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_runs_on_mixed_engines_close_to_fp32(fp32_and_int8, policy):
    """Same model, same seed: the mixed int8/fp32 engines follow the same plan (same segment calls) and land
    within the int8 tolerance of the fp32 engines (measured 5e-3–7e-3 after 8 guided steps)."""
    fp32, int8 = fp32_and_int8
    emb = torch.randn(2, 120, 24, generator=torch.Generator().manual_seed(0))
    runs = [generate(rt, prompt_embeds=emb, negative_embeds=torch.zeros_like(emb), guidance_scale=3.0, policy=policy, num_steps=8, profile=True,
                     generator=torch.Generator().manual_seed(1)) for rt in (fp32, int8)]
    a, b = (r.latents for r in runs)
    assert torch.isfinite(b).all()
    assert NOT_FP32 < rel(a, b) < INT8_TOLERANCE
    calls = [{name: s.calls for name, s in r.generation.stats.items()} for r in runs]
    assert calls[0] == calls[1]
    if policy != "none":
        assert calls[1]["middle"] < 8  # the cache skipped int8 segments
    assert runs[1].generation.cache_bytes == runs[0].generation.cache_bytes


# ---------------------------------------------------------------- the same model at another precision (hooks)


def test_options_like_an_export_rebuild_it_exactly_and_at_int8(pixart_export, pixart_int8, tmp_path):
    from deltadit_export.variants import export_options_like

    for folder in (pixart_export, pixart_int8):  # same cache key: export() would reuse the folder
        assert resolve(export_options_like(folder)).cache_key == load_manifest(folder).export["cache_key"]
    as_int8 = export_options_like(pixart_export, precision="int8", out=str(pixart_int8))
    assert resolve(as_int8).cache_key == load_manifest(pixart_int8).export["cache_key"]
    assert export(as_int8, Progress(quiet=True)).reused
    back = export_options_like(pixart_int8, precision="fp32")
    assert back.keep_fp32 is None and back.int8_tolerance is None and back.out is None
    assert resolve(replace(back, out=str(pixart_export))).cache_key == load_manifest(pixart_export).export["cache_key"]
