"""Schedule calibration (``deltadit-export --calibrate``): the Δ-DiT stepper on diffusers blocks, the sweep's
choice on a case whose answer is known, and the CLI path into the manifest."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from tiny import TINY_PIXART_SET, TINY_RESOLUTION, set_args, tiny_dit, tiny_pixart

from deltadit_export.calibrate import (
    BlockStepper,
    CalibrationError,
    calibrate,
    calibration_inputs,
    default_boundaries,
    per_sample_psnr,
)
from deltadit_export.models import get_spec
from deltadit_export.split import diffusers_forward, random_model_inputs, model_shape
from runtime.schedule import Cuts, DeltaDiTPolicy, NoCachePolicy


# Tiny models: a second thread buys nothing there, and on a shared machine it costs a lot.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


SCHED = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
         "algorithm_type": "dpmsolver++", "solver_order": 2}


def make_identity(block) -> None:
    """Zero every residual branch's output projection: a PixArt block then returns its input exactly
    (hidden + gate·0 = hidden for attn1, attn2 and the MLP)."""
    for lin in (block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[-1]):
        lin.weight.zero_()
        lin.bias.zero_()


@pytest.mark.parametrize("family", ["pixart", "dit"])
def test_full_plan_equals_diffusers_forward(family):
    model = tiny_pixart() if family == "pixart" else tiny_dit()
    stepper = BlockStepper(model)
    feeds = random_model_inputs(model_shape(model, 6), 3, torch.Generator().manual_seed(0))
    plan = NoCachePolicy().plan(1, Cuts(6, 4)).steps[0]
    with torch.no_grad():
        assert torch.equal(stepper(plan, Cuts(6, 4), "delta", {}, feeds), diffusers_forward(model, feeds))


def test_cached_step_applies_the_recorded_delta():
    """A cached rear step = (front + middle run) + Δ_rear recorded at the full step, by hand."""
    model = tiny_pixart()
    stepper = BlockStepper(model)
    cuts = Cuts(6, 4)  # front [0,2), middle [2,4), rear [2,6) as range: rear range = blocks 2..5
    sched = DeltaDiTPolicy(interval=2, boundary=2).plan(2, cuts)
    f0 = random_model_inputs(model_shape(model, 6), 2, torch.Generator().manual_seed(1))
    f1 = dict(f0, sample=f0["sample"] + 0.1, timestep=f0["timestep"] - 7)
    state: dict = {}
    with torch.no_grad():
        stepper(sched.steps[0], cuts, "delta", state, f0)
        out = stepper(sched.steps[1], cuts, "delta", state, f1)
        # by hand on the diffusers modules
        def hidden_chain(feeds, upto):
            h, t_cond, emb_t, ctx, bias = stepper.embed(feeds["sample"], feeds["timestep"],
                                                        feeds["encoder_hidden_states"], feeds["encoder_attention_mask"])
            hs = [h]
            for blk in model.transformer_blocks[:upto]:
                hs.append(blk(hs[-1], encoder_hidden_states=ctx, encoder_attention_mask=bias, timestep=t_cond))
            return hs, emb_t
        h0, _ = hidden_chain(f0, 6)
        delta_rear = h0[6] - h0[2]
        h1, emb1 = hidden_chain(f1, 2)
        expected = stepper.head(h1[2] + delta_rear, emb1)
    assert sched.steps[1].kind == "cache-rear"
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_shared_prefix_sweep_equals_one_run_per_schedule():
    from deltadit_export.calibrate import sample, sample_many

    model = tiny_pixart(num_layers=4)
    stepper = BlockStepper(model)
    inputs = calibration_inputs(get_spec("pixart-alpha"), model, 2)
    cuts = Cuts(4, 3)
    schedules = [DeltaDiTPolicy(interval=n, boundary=b).plan(6, cuts) for n in (2, 3) for b in (0, 2, 3, 6)]
    many = sample_many(stepper, schedules, inputs, SCHED)
    for s, x in zip(schedules, many):
        assert torch.equal(x, sample(stepper, s, inputs, SCHED)), (s.interval, s.boundary)
    assert not torch.equal(many[0], many[3])


def test_psnr_per_sample_known_values():
    ref = torch.zeros(2, 1, 4, 4, dtype=torch.float64)  # float64: 0.2 is exact to 1e-17, so 1e-9 dB holds
    x = ref.clone()
    x[1] += 0.2  # MSE 0.04 on range 2: 10·log10(4 / 0.04) = 20 dB
    p = per_sample_psnr(x, ref, pixel_space=True)
    assert math.isinf(p[0]) and p[1] == pytest.approx(20.0, abs=1e-9)
    # latents: range = the reference's peak-to-peak (here 4), error 0.4 everywhere → 10·log10(16/0.16) = 20 dB
    ref = torch.tensor([[-2.0, 2.0, 0.0, 0.0]], dtype=torch.float64).reshape(1, 1, 2, 2)
    assert per_sample_psnr(ref + 0.4, ref, pixel_space=False)[0] == pytest.approx(20.0, abs=1e-9)


def test_default_boundaries():
    assert default_boundaries(20) == (0, 5, 10, 12, 15, 20)
    assert default_boundaries(6) == (0, 2, 3, 4, 6)


def test_calibration_picks_the_known_best_setting():
    """Known answer: the last 2 of 6 blocks are exact identities, so caching the rear range with N_c ≤ 2 and
    caching the rear at every cached step (b = T) reproduces full compute bit for bit (Δ_rear = 0 exactly);
    every setting that skips a non-identity block or caches the front is inexact. The budget, 150 dB, is above
    what fp32 round-off alone allows (relative error 2^-24 ≈ 144 dB; the nearest inexact setting here reaches
    ~130 dB), so exactly the bit-exact settings pass, and the fastest of them must be the largest interval,
    N_c = 2, b = T."""
    model = tiny_pixart(num_layers=6, seed=3)
    with torch.no_grad():
        for block in model.transformer_blocks[4:]:
            make_identity(block)
    inputs = calibration_inputs(get_spec("pixart-alpha"), model, 2, seed=0)
    T = 6
    result = calibrate(model, inputs, SCHED, num_steps=T, psnr_budget=150.0, intervals=(2, 3), pixel_space=False)
    c = result.chosen
    assert (c.interval, c.cached_blocks, c.boundary) == (3, 2, T)
    assert math.isinf(c.psnr_min)  # bit-exact
    assert c.bound == pytest.approx(T * 6 / (2 * 6 + 4 * 4))  # full steps 0, 3; cached 1, 2, 4, 5
    # N_c = 5, 4, 3 are measured in full and all inexact (they skip non-identity blocks); N_c = 2 is measured
    # in full; N_c = 1 is left out: its bounds (1.09×, 1.125×) are below the chosen 1.29×.
    nb = len(default_boundaries(T))
    assert len(result.sweep) == 4 * 2 * nb and result.pruned == 2 * nb
    assert {s.cached_blocks for s in result.sweep} == {2, 3, 4, 5}
    for s in result.sweep:
        if s.cached_blocks > 2:
            assert s.psnr_min < 150.0, s
    passing = {s.key for s in result.sweep if s.psnr_min >= 150.0}
    assert passing == {(2, 2, T), (3, 2, T)}  # the slower exact setting also passes; not chosen
    d = result.to_dict()
    assert d["chosen"]["psnr_min"] is None  # ∞ → null (JSON has no infinity)
    json.dumps(d)
    assert "← chosen" in result.summary()


def test_calibration_without_a_passing_setting_says_what_to_do():
    model = tiny_pixart(num_layers=4)
    inputs = calibration_inputs(get_spec("pixart-alpha"), model, 1)
    with pytest.raises(CalibrationError, match="lower --psnr-budget"):
        calibrate(model, inputs, SCHED, num_steps=4, psnr_budget=1e9, intervals=(2,), cached_blocks=(2,),
                  boundaries=(2,), pixel_space=False)


@pytest.mark.slow
def test_cli_calibrate_records_the_choice_in_the_manifest(tmp_path):
    from deltadit_export.cli import main
    from runtime.manifest import load_manifest

    out = tmp_path / "cal"
    base = ["--model", "pixart-alpha", "--random-weights", "--resolution", str(TINY_RESOLUTION),
            *set_args(TINY_PIXART_SET), "--steps", "4", "-q", "--calibrate", "--psnr-budget", "0",
            "--calibrate-prompts", "1"]
    res = CliRunner().invoke(main, base + ["--out", str(out)])
    assert res.exit_code == 0, res.output
    m = load_manifest(out)
    cal = m.calibration
    chosen = cal["chosen"]
    # budget 0 dB: everything passes, so the choice is the highest bound of the grid: N=4 > T-1 → one full step,
    # N_c = L-1 = 5; all boundaries then tie on bound, and the highest worst-case PSNR wins.
    assert (chosen["interval"], chosen["cached_blocks"]) == (4, 5)
    assert m.cached_blocks == 5 and m.schedule["interval"] == 4 and m.schedule["boundary"] == chosen["boundary"]
    # N_c = 5 is measured for every N and b; every lower N_c has a lower bound than the choice: left out
    nb = len(default_boundaries(4))
    assert len(cal["sweep"]) == 3 * nb and cal["pruned"] == 4 * 3 * nb
    assert "calibration:" in res.output and "← chosen" in res.output


def test_explicit_options_are_kept_and_only_the_rest_is_swept():
    from deltadit_export.calibrate import calibrate_export_options
    from deltadit_export.export_options import ExportOptions

    opts = ExportOptions(model="pixart-alpha", resolution=TINY_RESOLUTION, random_weights=True,
                         overrides=dict(TINY_PIXART_SET), num_steps=4, cached_blocks=3, boundary=2)
    new, result = calibrate_export_options(opts, psnr_budget=0.0, num_prompts=1)
    assert {(s.cached_blocks, s.boundary) for s in result.sweep} == {(3, 2)}
    assert {s.interval for s in result.sweep} == {2, 3, 4}
    assert (new.cached_blocks, new.boundary) == (3, 2) and new.interval == result.chosen.interval == 4
    assert new.calibration["chosen"]["interval"] == 4 and new.calibration["psnr_budget_db"] == 0.0


# ---------------------------------------------------------------- precision in the sweep (--precision int8)


def test_int8_block_chain_equals_the_int8_segment_engine(tmp_path):
    """The sweep runs an int8 segment as the chain of its blocks' int8 sessions. Dynamic quantization acts per
    MatMul, so that is the exported int8 segment itself: equal bit for bit here (same graphs per block, same
    kernels; measured equal, so equality is asserted)."""
    import numpy as np

    from deltadit_export.calibration_int8 import block_inputs_example, export_int8_blocks
    from deltadit_export.onnx_export import export_segment, ort_session
    from deltadit_export.quantize import quantize_segment
    from deltadit_export.split import split_model

    model = tiny_pixart(num_layers=6)
    inputs = calibration_inputs(get_spec("pixart-alpha"), model, 2)
    stepper = BlockStepper(model)
    (tmp_path / "blocks").mkdir()
    blocks = export_int8_blocks(model, stepper, inputs.cond, inputs.noise, tmp_path / "blocks", threads=1)
    example = block_inputs_example(stepper, inputs.cond, inputs.noise)
    middle = next(s for s in split_model(model, Cuts(6, 4), 120) if s.name == "middle")  # blocks 2, 3
    export_segment(middle, example, tmp_path / "middle.onnx")
    quantize_segment(tmp_path / "middle.onnx", tmp_path / "middle.int8.onnx")
    feeds = {n: example[n].numpy() for n in blocks.input_names}
    whole = ort_session(tmp_path / "middle.int8.onnx", 1).run(["hidden_out"], feeds)[0]
    args = [example[n] for n in blocks.input_names[1:]]
    chained = blocks.blocks[3](blocks.blocks[2](example["hidden"], *args), *args).numpy()
    assert np.array_equal(chained, whole)
    fp32 = middle.module(*[example[n] for n in blocks.input_names]).numpy()
    assert np.abs(whole - fp32).max() / np.abs(fp32).max() > 1e-6  # it is int8 (fp32 noise is ~1e-7)


def test_estimated_speedup_and_assignments():
    from deltadit_export.calibration_int8 import assignments, estimated_speedup

    cuts = Cuts(6, 2)  # front [0,2), middle [2,4), rear [4,6)
    s = DeltaDiTPolicy(interval=3, boundary=6).plan(6, cuts)  # full 0, 3; cache-rear 1, 2, 4, 5
    assert estimated_speedup(s, (), 0.5) == pytest.approx(s.bound) == pytest.approx(36 / 28)
    # full steps: 4 fp32 + 2 int8 blocks = 5; cached steps (rear skipped): 4 fp32 → 2·5 + 4·4 = 26
    assert estimated_speedup(s, ("rear",), 0.5) == pytest.approx(36 / 26)
    assert estimated_speedup(s, ("front", "middle", "rear"), 0.5) == pytest.approx(36 / 14)
    all_sets = assignments(cuts, None)
    assert len(all_sets) == 8 and all_sets[0] == ("front", "middle", "rear") and all_sets[-1] == ()
    assert assignments(Cuts(6, 3), None) == [("front", "rear"), ("front",), ("rear",), ()]  # no middle at L/2
    assert assignments(cuts, ("rear", "middle")) == [("middle", "rear")]


@pytest.fixture(scope="module")
def identity_rear_model(tmp_path_factory):
    """The known-answer model of test_calibration_picks_the_known_best_setting (blocks 4, 5 exact identities),
    with every block's int8 session."""
    from deltadit_export.calibration_int8 import export_int8_blocks

    torch.set_num_threads(1)
    model = tiny_pixart(num_layers=6, seed=3)
    with torch.no_grad():
        for block in model.transformer_blocks[4:]:
            make_identity(block)
    inputs = calibration_inputs(get_spec("pixart-alpha"), model, 2, seed=0)
    blocks = export_int8_blocks(model, BlockStepper(model), inputs.cond, inputs.noise,
                                tmp_path_factory.mktemp("int8-blocks"), threads=1)
    return model, inputs, blocks


def test_calibration_with_precision_picks_the_known_best_setting(identity_rear_model):
    """Known answer: blocks 4 and 5 are exact identities in fp32 and in int8 (their output projections are
    zero, so every quantized product there is exactly 0: measured equal); every other block's int8 version is
    inexact (~5e-3 per block). At 150 dB (above fp32 round-off, see the fp32 test) exactly the bit-exact settings
    pass: N_c ≤ 2, b = T, with int8 only on the rear segment (the identity blocks) or nowhere. With int8 blocks
    at half the cost of fp32 ones, the fastest is N = 3, N_c = 2, b = T with the rear in int8: estimated
    36 / (2·(4 + 2·0.5) + 4·4) = 1.385× against 1.286× for the same schedule in fp32."""
    from deltadit_export.calibration_int8 import block_inputs_example

    model, inputs, blocks = identity_rear_model
    T = 6
    args = [block_inputs_example(BlockStepper(model), inputs.cond, inputs.noise)[n] for n in blocks.input_names]
    assert torch.equal(blocks.blocks[4](*args), args[0]) and not torch.equal(blocks.blocks[0](*args), args[0])
    result = calibrate(model, inputs, SCHED, num_steps=T, psnr_budget=150.0, intervals=(2, 3), pixel_space=False,
                       int8=blocks, int8_cost=0.5)
    c = result.chosen
    assert (c.interval, c.cached_blocks, c.boundary, c.int8) == (3, 2, T, ("rear",))
    assert math.isinf(c.psnr_min) and c.speedup == pytest.approx(36 / 26)
    for s in result.sweep:  # every int8 set touching an inexact block fails the budget
        if set(s.int8) - {"rear"} or (s.int8 and s.cached_blocks != 2):
            assert s.psnr_min < 150.0, s
    assert result.precision == {"int8_cost": 0.5}
    d = result.to_dict()
    assert d["chosen"]["int8"] == ["rear"] and "int8/fp32 per block segment" in d["method"]
    assert "rear" in result.summary() and "← chosen" in result.summary()
    # int8 slower than fp32 (cost 2): the same schedule is chosen, all in fp32.
    slow = calibrate(model, inputs, SCHED, num_steps=T, psnr_budget=150.0, intervals=(2, 3), pixel_space=False,
                     int8=blocks, int8_cost=2.0, cached_blocks=(2,))
    assert (slow.chosen.interval, slow.chosen.cached_blocks, slow.chosen.int8) == (3, 2, ())


def test_calibration_with_fixed_int8_segments_sweeps_only_the_schedule(identity_rear_model):
    model, inputs, blocks = identity_rear_model
    result = calibrate(model, inputs, SCHED, num_steps=6, psnr_budget=0.0, intervals=(2,), cached_blocks=(2, 4),
                       boundaries=(3,), pixel_space=False, int8=blocks, int8_cost=0.5, fixed_int8=("middle",))
    assert {s.int8 for s in result.sweep} == {("middle",)}


@pytest.mark.slow
def test_export_calibrate_int8_keeps_the_chosen_fp32_segments(tmp_path):
    """The CLI path: --precision int8 --calibrate measures the int8 cost, sweeps precision with the schedule, and
    the export keeps in fp32 exactly the block segments the calibration left in fp32 (plus embed and head)."""
    from deltadit_export.cli import main
    from runtime.manifest import load_manifest

    out = tmp_path / "cal-int8"
    res = CliRunner().invoke(main, [
        "--model", "pixart-alpha", "--random-weights", "--resolution", str(TINY_RESOLUTION), *set_args(TINY_PIXART_SET),
        "--steps", "4", "-q", "--calibrate", "--psnr-budget", "20", "--calibrate-prompts", "1", "--cached-blocks", "4",
        "--precision", "int8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = load_manifest(out)
    cal = m.calibration
    chosen = cal["chosen"]
    assert cal["precision"]["int8_cost"] > 0 and cal["precision"]["fixed"] is False
    assert {s["cached_blocks"] for s in cal["sweep"]} == {4}
    int8_segments = {s.name for s in m.segments if s.precision == "int8"}
    assert int8_segments == set(chosen["int8"])
    assert m.segment_precisions["embed"] == m.segment_precisions["head"] == "fp32"
    assert "int8 blocks cost" in res.output
