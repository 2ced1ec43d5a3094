"""deltadit-bench: the report's keys and numbers on a tiny export, the independent reference Δ-DiT, bad flags.

Never a timing test: speeds are printed by the benchmark, never asserted here.

Tolerance (fp32): ``FP32_TOL = 1e-4`` relative (max|a−b| / max|b|) on the final latents after 4 guided
DPM-Solver++ steps. ONNX Runtime (MLAS GEMMs, fused attention) and torch (ATen GEMMs, SDPA) sum in different
orders, so each op differs by a few fp32 ulps (eps 1.2e-7); measured here ~1e-6 after the whole loop. 1e-4 is
the exporter's per-segment parity tolerance (onnx_export.TOLERANCES) and leaves ~100× margin, while what the
cache itself changes (delta-dit vs eager, ~3e-3 on this model) is asserted to be more than 10× above it, so
the tolerance does tell a correct cache from a wrong or missing one.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from deltadit_export import bench, bench_baseline, rebuild
from runtime.manifest import load_manifest

FP32_TOL = 1e-4
T, N, B = 4, 2, 2  # steps, interval, boundary: steps 0, 2 full; 1 cache-rear; 3 cache-front


def hand_bound(L: int, Nc: int) -> tuple[int, float]:
    # T=4, N=2: full steps 0 and 2 (L blocks each), cached steps 1 and 3 (L − N_c blocks each).
    runs = 2 * L + 2 * (L - Nc)
    return runs, T * L / runs


@pytest.fixture(scope="module")
def bench_report(pixart_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # One thread: on a shared 2-core machine a second OpenMP thread in torch can stall for a scheduler
    # time slice at every op, and this is not a timing test.
    result = CliRunner().invoke(bench.cli, [
        "--engines", str(pixart_export), "--steps", str(T), "--interval", str(N), "--boundary", str(B),
        "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(out.read_text()), result.stdout


def test_report_keys_and_schedule_numbers(bench_report, pixart_export):
    report, stdout = bench_report
    for key in ("eager_ms", "full_ms", "delta_ms", "bound", "speedup_full_vs_eager", "speedup_delta_vs_full",
                "speedup_delta_vs_eager", "full_vs_eager_rel_err", "peak_rss_mb", "delta_vs_reference_rel_err",
                "segments", "threads", "versions", "machine"):
        assert key in report, key
    assert set(report["peak_rss_mb"]) == {"eager", "torch-compile", "none", "delta-dit"}
    assert all(v > 0 for v in report["peak_rss_mb"].values())
    for key in ("eager_ms", "compile_ms", "full_ms", "delta_ms"):
        assert report[key] > 0
    assert report["speedup_full_vs_eager"] == pytest.approx(report["eager_ms"] / report["full_ms"])
    assert report["speedup_delta_vs_full"] == pytest.approx(report["full_ms"] / report["delta_ms"])

    m = load_manifest(pixart_export)
    L, Nc = m.num_layers, m.cached_blocks
    assert (L, Nc) == (6, 4)
    runs, bound = hand_bound(L, Nc)
    assert (runs, bound) == (16, 1.5)
    assert report["bound"] == pytest.approx(bound, abs=1e-12)
    assert report["block_runs"] == {"eager": T * L, "torch-compile": T * L, "none": T * L, "delta-dit": runs}
    assert report["modes"]["eager"]["reference"]["block_runs"] == runs
    assert report["modes"]["eager"]["reference"]["kinds"] == ["full", "cache-rear", "full", "cache-front"]
    # Two delta buffers (front and rear range), batch 2 rows of tokens × width fp32; none keeps no deltas.
    tokens, width = m.export["tokens"], m.export["width"]
    assert report["cache_bytes"] == {"none": 0, "delta-dit": 2 * 2 * tokens * width * 4}
    # Segment calls: none runs every segment every step; delta-dit skips front+middle on the cache-front
    # step (range [0, 4)) and middle+rear on the cache-rear step (range [2, 6)).
    assert {n: s["calls"] for n, s in report["segments"]["none"].items()} == dict.fromkeys(
        ("embed", "front", "middle", "rear", "head"), T)
    assert {n: s["calls"] for n, s in report["segments"]["delta-dit"].items()} == {
        "embed": 4, "front": 3, "middle": 2, "rear": 3, "head": 4}
    assert "1.500" in stdout and "none vs eager" in stdout and "peak RSS" in stdout


def test_accuracy(bench_report):
    report, _ = bench_report
    assert report["full_vs_eager_rel_err"] <= FP32_TOL
    assert report["delta_vs_reference_rel_err"] <= FP32_TOL
    # The cache really changes the result: far outside the tolerance from full compute.
    assert report["delta_vs_eager_rel_err"] > 10 * FP32_TOL
    # torch.compile computes the same transformer: only float error (Inductor fuses and reorders sums).
    assert report["compile_vs_eager_rel_err"] <= FP32_TOL


@pytest.fixture(scope="module")
def tiny_model(pixart_export):
    m = load_manifest(pixart_export)
    inputs = bench_baseline.make_inputs(m, pixart_export, 0, bench_baseline.DEFAULT_PROMPT)
    return rebuild.rebuild_model(m, as_exported=True), m, inputs


def test_reference_all_full_is_the_eager_loop_bit_for_bit(tiny_model, pixart_export):
    model, m, inputs = tiny_model
    with torch.inference_mode():
        eager = bench_baseline.eager_generate(model, m, inputs, T, 4.5, bench_baseline.make_scheduler(pixart_export))
        ref, runs, kinds = bench_baseline.reference_delta_dit(model, m, inputs, T, 1, B, 4.5, bench_baseline.make_scheduler(pixart_export))
    assert kinds == ["full"] * T and runs == T * m.num_layers
    assert torch.equal(ref, eager)  # the wrappers call the same blocks on the same tensors
    assert isinstance(model.transformer_blocks[0], type(model.transformer_blocks[1]))  # blocks restored
    assert not hasattr(model.transformer_blocks[0], "block")


def test_reference_delta_math_on_one_cached_step(tiny_model, pixart_export):
    """Step 1 (cache-rear) of the reference equals hand-written Δ math on the diffusers blocks."""
    from deltadit_export.split import diffusers_forward

    model, m, inputs = tiny_model
    L, Nc = m.num_layers, m.cached_blocks
    seen = []

    def capture(mod, args, kwargs, out):
        seen.append(out)

    feeds0 = {"sample": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
              "timestep": torch.full((2,), 900.0), **bench_baseline.guided_conditioning(m, inputs, torch.float32)}
    feeds1 = dict(feeds0, sample=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)),
                  timestep=torch.full((2,), 700.0))

    # Hand-computed: block outputs at a full step (h_k), then the cached step with h_L = h_{L−N_c} + Δ_rear.
    def block_outputs(feeds):
        hooks = [blk.register_forward_hook(capture, with_kwargs=True) for blk in model.transformer_blocks]
        try:
            seen.clear()
            diffusers_forward(model, feeds)
            return list(seen)
        finally:
            for h in hooks:
                h.remove()

    with torch.inference_mode():
        h_full = block_outputs(feeds0)  # h_1..h_L at step 0
        delta_rear = h_full[L - 1] - h_full[L - Nc - 1]
        h_cached = block_outputs(feeds1)  # every block of step 1, run in full
        expected_hidden_L = h_cached[L - Nc - 1] + delta_rear

        # The reference's wrapped model on the same two calls.
        state = bench_baseline._DeltaState(L, Nc)
        original = model.transformer_blocks
        model.transformer_blocks = torch.nn.ModuleList(
            bench_baseline._make_delta_block(blk, k, state) for k, blk in enumerate(original))
        try:
            state.kind = "full"
            diffusers_forward(model, feeds0)
            state.kind = "cache-rear"
            got_hidden = []
            hook = model.transformer_blocks[L - 1].register_forward_hook(lambda mod, a, out: got_hidden.append(out))
            diffusers_forward(model, feeds1)
            hook.remove()
        finally:
            model.transformer_blocks = original
    assert state.block_runs == L + (L - Nc)
    assert torch.equal(got_hidden[0], expected_hidden_L)


def test_bad_flags_exit_with_a_message_naming_the_flag(pixart_export, tmp_path):
    runner = CliRunner()
    r = runner.invoke(bench.cli, ["--engines", str(pixart_export), "--repeats", "0"])
    assert r.exit_code == 2 and "--repeats" in r.output
    r = runner.invoke(bench.cli, ["--engines", str(pixart_export), "--model", "dit-xl-2"])
    assert r.exit_code == 2 and "--engines" in r.output and "--model" in r.output
    r = runner.invoke(bench.cli, ["--engines", str(pixart_export), "--modes", "eager,fast"])
    assert r.exit_code == 2 and "--modes" in r.output
    r = runner.invoke(bench.cli, ["--engines", str(pixart_export), "--backend", "fastest"])
    assert r.exit_code == 2 and "--backend" in r.output
    r = runner.invoke(bench.cli, ["--engines", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "--engines" in r.output
    r = runner.invoke(bench.cli, ["--engines", str(tmp_path)])  # a folder without manifest.json
    assert r.exit_code == 1 and "manifest" in r.output
    r = runner.invoke(bench.cli, ["--engines", str(pixart_export), "--steps", "4", "--boundary", "9"])
    assert r.exit_code == 1 and "boundary" in r.output
