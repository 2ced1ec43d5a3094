"""``deltadit-generate`` (and a smoke run of ``deltadit-eval``): image helpers, and — on the shipped
``pixart-digits`` weights — the README's main path end to end: export, generate, PNGs, latency table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from deltadit_export.imaging import comparison_image, grid_image, to_uint8
from deltadit_export.sampling import initial_noise
from deltadit_export.models import PACKAGE_WEIGHTS

SHIPPED = PACKAGE_WEIGHTS / "pixart-digits"
needs_weights = pytest.mark.skipif(
    not (SHIPPED / "transformer" / "config.json").is_file(),
    reason=f"the shipped pixart-digits weights are not in {SHIPPED} yet (tools/train_digits.py writes them)",
)


def test_to_uint8_clamps_and_maps_the_pixel_range():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5)
    assert to_uint8(x).tolist() == [[[0, 0, 128, 255, 255]]]


def test_grid_geometry():
    imgs = np.zeros((6, 16, 16), dtype=np.uint8)
    g = grid_image(imgs, cols=3, scale=2, pad=2)
    assert g.shape == (2 + 2 * (32 + 2), 2 + 3 * (32 + 2))
    assert (g == 255).sum() == g.size - 6 * 32 * 32  # images black, padding white
    cmp = comparison_image(torch.zeros(4, 1, 16, 16), torch.zeros(4, 1, 16, 16), prompts=2, per_prompt=2, shown=2,
                           names=None)
    # 2 rows of 2 triples (full | delta | diff); a 6-pixel gap after each triple but the last
    assert cmp.shape == (2 + 2 * (64 + 2), 2 + 6 * (64 + 2) + 6)


def test_initial_noise_is_seeded():
    assert torch.equal(initial_noise(3, (1, 16, 16), 7), initial_noise(3, (1, 16, 16), 7))
    assert not torch.equal(initial_noise(3, (1, 16, 16), 7), initial_noise(3, (1, 16, 16), 8))


# ---------------------------------------------------------------- on the shipped weights


@needs_weights
def test_shipped_weights_load():
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    from runtime.text_encoder import HashedWordEncoder

    model = PixArtTransformer2DModel.from_pretrained(SHIPPED / "transformer", local_files_only=True)
    cfg = model.config
    assert (cfg.num_layers, cfg.in_channels, cfg.out_channels, cfg.sample_size) == (12, 1, 1, 16)
    encoder = HashedWordEncoder.load(SHIPPED / "text_encoder")
    assert encoder.dim == cfg.caption_channels
    DPMSolverMultistepScheduler.from_pretrained(SHIPPED / "scheduler")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    size = sum(f.stat().st_size for f in (SHIPPED / "transformer").iterdir())
    assert size <= 25e6
    assert (SHIPPED / "model_card.md").is_file()


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README's main command in a fresh folder: `deltadit-generate` with no export yet exports the
    shipped model into engines/pixart-digits-16-fp32 itself, then writes its PNGs outside it, into
    deltadit-out/pixart-digits-16-fp32/."""
    from deltadit_export.generate import main

    root = tmp_path_factory.mktemp("readme")
    cwd = Path.cwd()
    import os

    os.chdir(root)
    try:
        # one thread: this is a test of the path, and on a shared machine one thread is much faster
        res = CliRunner().invoke(main, ["--samples", "2", "--repeats", "1", "--threads", "1", "-q"])
    finally:
        os.chdir(cwd)
    return root, res


@needs_weights
@pytest.mark.slow
def test_generate_exports_generates_and_times(readme_run):
    root, res = readme_run
    assert res.exit_code == 0, res.output
    folder = root / "engines" / "pixart-digits-16-fp32"
    assert (folder / "manifest.json").is_file() and (folder / "text_encoder" / "config.json").is_file()
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    from PIL import Image

    outputs = root / "deltadit-out" / "pixart-digits-16-fp32"  # never inside the export (a re-export replaces it)
    assert not (folder / "grid.png").exists() and not (folder / "compare.png").exists()
    grid = Image.open(outputs / "grid.png")
    assert grid.size == (2 + 2 * (64 + 2), 2 + 10 * (64 + 2))  # 10 prompts × 2 samples, 4× upscaled
    assert (outputs / "compare.png").is_file()
    for needle in ("latency per image", "pytorch eager", "runtime none", "runtime delta-dit", "bound 1.60×",
                   "OMP_WAIT_POLICY=PASSIVE", "load average (1 min)", "guidance 3,",
                   f"wrote {Path('deltadit-out') / 'pixart-digits-16-fp32' / 'grid.png'}"):
        assert needle in res.output, (needle, res.output)


@needs_weights
@pytest.mark.slow
def test_generate_refuses_a_prompt_the_model_cannot_know(readme_run):
    from deltadit_export.generate import main

    root, res = readme_run
    assert res.exit_code == 0, res.output
    out = CliRunner().invoke(main, ["--engines", str(root / "engines" / "pixart-digits-16-fp32"),
                                    "--prompt", "digit 11", "--no-timing"])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "Error: prompt 'digit 11': pixart-digits was trained on" in out.output and "'11'" in out.output


@needs_weights
@pytest.mark.slow
def test_export_cli_default_reuses_what_generate_exported(readme_run, monkeypatch):
    from deltadit_export.cli import main

    root, res = readme_run
    assert res.exit_code == 0, res.output
    monkeypatch.chdir(root)
    out = CliRunner().invoke(main, ["-q"])
    assert out.exit_code == 0, out.output
    assert "reused the existing export" in out.output


@needs_weights
@pytest.mark.slow
def test_delta_dit_samples_are_the_prompted_digits(readme_run):
    """Real digits come out of the engines with the Δ-DiT cache: the reference classifier recognizes most of
    one sample per digit (the model card reports ≥ 90% on 500 full-compute samples; 10 samples are noisy,
    so the bar here is 7 of 10)."""
    from runtime import DeltaDiTRuntime

    from deltadit_export.digits import prompt_for_digit
    from deltadit_export.eval_metrics import reference_classifier
    from deltadit_export.sampling import encode_prompts, load_text_encoder, runtime_generate

    root, res = readme_run
    assert res.exit_code == 0, res.output
    rt = DeltaDiTRuntime(root / "engines" / "pixart-digits-16-fp32")
    enc = load_text_encoder(rt.manifest)
    e, m = encode_prompts(enc, [prompt_for_digit(d) for d in range(10)])
    x = runtime_generate(rt, rt.schedule("delta-dit"), e, m, encode_prompts(enc, [""]),
                         initial_noise(10, (1, 16, 16), 123))
    assert torch.isfinite(x).all()
    pred = reference_classifier(16).predict(x.numpy())
    assert int((pred == np.arange(10)).sum()) >= 7, pred


@needs_weights
@pytest.mark.slow
def test_eval_smoke_on_the_shipped_model(readme_run, tmp_path):
    from deltadit_export.evaluate import main

    root, res = readme_run
    assert res.exit_code == 0, res.output
    out = CliRunner().invoke(main, ["--engines", str(root / "engines" / "pixart-digits-16-fp32"),
                                    "--samples-per-digit", "1", "--repeats", "1", "--rows", "TaylorSeer",
                                    "--threads", "1", "--precisions", "none",
                                    "--out", str(tmp_path), "--work", ""])
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "quality.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["full", "delta-dit", "pytorch full", "TaylorSeer"]
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["full"]["psnr"] is None and rows["delta-dit"]["bound"] == pytest.approx(1.6)
    # PyTorch eager and ONNX Runtime full compute give the same samples up to float error
    assert rows["pytorch full"]["psnr_vs_runtime_full"] is None or rows["pytorch full"]["psnr_vs_runtime_full"] > 60
    assert 1.0 < rows["TaylorSeer"]["bound"] < 2.0
    for f in ("speedup_vs_fd.png", "samples_delta-dit.png", "compare_full_vs_delta-dit.png"):
        assert (tmp_path / f).is_file()
    assert "target" in out.output and "delta-dit" in out.output
