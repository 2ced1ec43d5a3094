"""Exporter: exact split, cut points, ONNX parity, manifest round trip, CLI on random and saved weights."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny import TINY_PIXART_SET, TINY_RESOLUTION, rebuild_model, set_args, tiny_dit, tiny_pixart

from deltadit_export.cli import main as export_cli
from deltadit_export.split import diffusers_forward, model_shape, random_model_inputs, run_segments, split_model
from runtime import DeltaDiTRuntime
from runtime.integrity import verify_segment_files
from runtime.manifest import load_manifest, manifest_from_dict, write_manifest
from runtime.schedule import Cuts, ScheduleError

# ---------------------------------------------------------------- exact split


@pytest.mark.parametrize("cached_blocks", [4, 3, 2], ids=["Nc>L/2", "Nc=L/2", "Nc<L/2"])
@pytest.mark.parametrize(
    "make, with_mask",
    [(lambda: tiny_pixart(), True), (lambda: tiny_pixart(), False), (lambda: tiny_pixart(micro=True), True),
     (lambda: tiny_dit(), False)],
    ids=["pixart-mask", "pixart-nomask", "pixart1024-micro", "dit"],
)
def test_split_equals_diffusers_forward_exactly(make, with_mask, cached_blocks):
    model = make()
    segments = split_model(model, Cuts(6, cached_blocks), caption_tokens=7)
    feeds = random_model_inputs(model_shape(model, 7), 3, torch.Generator().manual_seed(0), with_mask=with_mask)
    with torch.no_grad():
        reference = diffusers_forward(model, feeds)
        ours = run_segments(segments, feeds)["out"]
    assert torch.equal(ours, reference)
    names = [s.name for s in segments]
    assert names == (["embed", "front", "rear", "head"] if cached_blocks == 3 else
                     ["embed", "front", "middle", "rear", "head"])


def test_micro_conditions_matter():
    """The 1024 model's resolution/aspect inputs are real inputs: changing them changes the output."""
    model = tiny_pixart(micro=True)
    segments = split_model(model, Cuts(6, 4), caption_tokens=7)
    feeds = random_model_inputs(model_shape(model, 7), 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = run_segments(segments, feeds)["out"]
        b = run_segments(segments, feeds | {"aspect_ratio": feeds["aspect_ratio"] * 2})["out"]
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------- cut points


@pytest.mark.parametrize("L, n_c, a, c", [(28, 21, 7, 21), (28, 14, 14, 14), (28, 6, 6, 22), (12, 9, 3, 9), (2, 1, 1, 1)])
def test_cut_points(L, n_c, a, c):
    cuts = Cuts(L, n_c)
    assert (cuts.a, cuts.c) == (a, c)
    seg = {s.name: (s.start, s.end) for s in cuts.segments}
    assert seg["front"] == (0, a) and seg["rear"] == (c, L)
    assert ("middle" in seg) == (a != c)
    assert sum(s.num_blocks for s in cuts.segments) == L


@pytest.mark.parametrize("n_c", [0, -1, 28, 29])
def test_invalid_cached_blocks(n_c):
    with pytest.raises(ScheduleError, match="cached_blocks"):
        Cuts(28, n_c)


@pytest.mark.parametrize("n_c", ["0", "6"])
def test_cli_rejects_cached_blocks_out_of_range(tmp_path, n_c):
    result = CliRunner().invoke(export_cli, ["--model", "pixart-alpha", "--random-weights", "--resolution",
                                             str(TINY_RESOLUTION), *set_args(TINY_PIXART_SET), "--cached-blocks",
                                             n_c, "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "--cached-blocks" in result.output and "1..5" in result.output
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- ONNX parity (through the runtime)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("which", ["pixart_export", "dit_export"])
def test_onnx_parity_batch(request, which, batch):
    folder = request.getfixturevalue(which)
    model = rebuild_model(folder)
    runtime = DeltaDiTRuntime(folder)
    manifest = runtime.manifest
    tokens = manifest.conditioning.get("tokens", 0)
    feeds = random_model_inputs(model_shape(model, tokens), batch, torch.Generator().manual_seed(batch + 10))
    with torch.no_grad():
        reference = diffusers_forward(model, feeds)
    got = runtime.forward(feeds)
    # fp32: ORT and torch order reductions differently; six blocks of residual updates keep the
    # difference at a few ulps of the output scale, three orders below 1e-4.
    rel = (got - reference).abs().max() / reference.abs().max()
    assert rel < 1e-4
    # The exporter's own parity check ran and recorded its error per segment.
    assert set(manifest.export["parity"]) == set(manifest.segment_names)
    assert max(manifest.export["parity"].values()) < 1e-4


# ---------------------------------------------------------------- manifest


def test_manifest_round_trip(pixart_export, tmp_path):
    manifest = load_manifest(pixart_export)
    again = manifest_from_dict(json.loads(json.dumps(manifest.to_dict())), root=manifest.root)
    assert again == manifest
    write_manifest(manifest, tmp_path)
    assert load_manifest(tmp_path).to_dict() == manifest.to_dict()
    # What the runtime needs is all there.
    assert manifest.num_layers == 6 and manifest.cached_blocks == 4 and manifest.cuts == {"a": 2, "c": 4}
    assert manifest.schedule == {"policy": "delta-dit", "cached_blocks": 4, "num_steps": 20, "interval": 2,
                                 "boundary": 12}
    assert manifest.sample_shape == (4, 8, 8) and manifest.max_batch == 8
    embed = manifest.segment("embed")
    assert [t.name for t in embed.inputs] == ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
    assert embed.input("sample").shape == ("batch", 4, 8, 8)
    assert manifest.segment("front").blocks == (0, 2)
    verify_segment_files(manifest)


def test_runtime_does_not_need_diffusers(pixart_export):
    """The runtime runs from the manifest alone: no diffusers import on the way."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "class Block:\n"
        "    def find_spec(self, name, *a, **k):\n"
        "        if name.split('.')[0] in ('diffusers', 'deltadit_export'): raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from runtime import DeltaDiTRuntime\n"
        f"rt = DeltaDiTRuntime({str(pixart_export)!r})\n"
        "gen = rt.new_generation(2)\n"
        "x = {'sample': torch.randn(2, 4, 8, 8), 'timestep': torch.tensor([999, 999]),\n"
        "     'encoder_hidden_states': torch.randn(2, 120, 24)}\n"
        "for _ in range(3): out = rt.step(gen, x)\n"
        "print(tuple(out.shape), 'diffusers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 8, 8, 8) False"


# ---------------------------------------------------------------- CLI end to end


def test_cli_end_to_end_random(tmp_path):
    out = tmp_path / "engines" / "tiny"
    args = ["--model", "dit-xl-2", "--random-weights", "--resolution", str(TINY_RESOLUTION), "--set", "num_layers=4",
            "--set", "num_attention_heads=2", "--set", "attention_head_dim=8", "--cached-blocks", "1",
            "--out", str(out)]
    result = CliRunner().invoke(export_cli, args)
    assert result.exit_code == 0, result.output
    for seg in ("embed", "front", "middle", "rear", "head"):
        assert (out / f"{seg}.onnx").is_file()
        assert any(line.startswith(seg) for line in result.output.splitlines())
    assert "max rel err" in result.output
    m = load_manifest(out)
    assert (m.num_layers, m.cached_blocks, m.cuts) == (4, 1, {"a": 1, "c": 3})
    assert m.model["source"] == {"kind": "random", "seed": 0,
                                 "overrides": {"num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 8}}
    assert m.conditioning == {"kind": "class", "num_classes": 1000, "null_class": 1000, "guidance_scale": 4.0}
    # Nothing half-written is left next to it.
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def _save_tiny_pixart_pipeline_folder(root: Path) -> None:
    """A folder as diffusers' save_pretrained writes it, in the pipeline layout (transformer/ inside)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(3)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=4, cross_attention_dim=16, caption_channels=24, sample_size=64)
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))


def test_cli_on_save_pretrained_folder(tmp_path):
    weights = tmp_path / "PixArt-tiny"
    _save_tiny_pixart_pipeline_folder(weights)
    out = tmp_path / "out"
    result = CliRunner().invoke(export_cli, ["--model", "pixart-alpha", "--weights", str(weights), "--resolution",
                                             "512", "--out", str(out)])
    assert result.exit_code == 0, result.output
    m = load_manifest(out)
    assert m.model["source"]["kind"] == "local"
    assert Path(m.model["source"]["path"]) == (weights / "transformer").resolve()
    assert m.sample_shape == (4, 64, 64) and m.conditioning["tokens"] == 120
    # The engines reproduce the saved model.
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel.from_pretrained(weights / "transformer").eval()
    feeds = random_model_inputs(model_shape(model, 120), 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = diffusers_forward(model, feeds)
    got = DeltaDiTRuntime(out).forward(feeds)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-4


def test_hugging_face_cache_layout(tmp_path, monkeypatch):
    """Weights found offline in the local HF cache, under the repo id of the chosen resolution."""
    snapshot = tmp_path / "hub" / "models--PixArt-alpha--PixArt-XL-2-512x512" / "snapshots" / "abc123"
    _save_tiny_pixart_pipeline_folder(snapshot)
    (tmp_path / "hub" / "models--PixArt-alpha--PixArt-XL-2-512x512" / "refs").mkdir()
    (tmp_path / "hub" / "models--PixArt-alpha--PixArt-XL-2-512x512" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from deltadit_export.export_options import ExportOptions, resolve

    job = resolve(ExportOptions(model="pixart-alpha", out=str(tmp_path / "o")))
    assert job.source.kind == "hf-cache" and job.source.repo_id == "PixArt-alpha/PixArt-XL-2-512x512"
    assert Path(job.source.path) == snapshot / "transformer"
    assert job.cuts.num_layers == 4 and job.cuts.cached_blocks == 3


def test_missing_weights_error_names_repo_and_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    result = CliRunner().invoke(export_cli, ["--model", "pixart-alpha", "--resolution", "1024", "--out",
                                             str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "PixArt-alpha/PixArt-XL-2-1024-MS" in result.output
    assert "--weights DIR" in result.output and "--random-weights" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_reexport_reuses_and_force_rebuilds(pixart_export, tmp_path):
    from tiny import export_tiny

    folder = tmp_path / "copy"
    shutil.copytree(pixart_export, folder)
    from deltadit_export.export_options import ExportOptions
    from deltadit_export.exporter import export
    from deltadit_export.progress import Progress

    opts = ExportOptions(model="pixart-alpha", resolution=TINY_RESOLUTION, random_weights=True,
                         overrides=dict(TINY_PIXART_SET), out=str(folder))
    result = export(opts, Progress(quiet=True))
    assert result.reused and "reused" in result.summary()
    before = (folder / "front.onnx").stat().st_mtime_ns
    export_tiny(folder, force=True)
    assert (folder / "front.onnx").stat().st_mtime_ns != before


def test_every_weight_file_has_a_recorded_sha256(pixart_export):
    """Weights live in .onnx.data files: a manifest that leaves one without a sha256 is refused."""
    from runtime.manifest import ManifestError

    data = json.loads((pixart_export / "manifest.json").read_text())
    seg = data["segments"][1]
    assert seg["extra_files"] == [seg["file"] + ".data"] and set(seg["extra_sha256"]) == set(seg["extra_files"])
    del seg["extra_sha256"]
    with pytest.raises(ManifestError, match=r"segments\[1\].extra_sha256"):
        manifest_from_dict(data, root=pixart_export)


def test_backend_that_cannot_be_built_here_fails_before_any_work(tmp_path):
    """TensorRT is not installable in this workplace: --backend tensorrt must fail fast, naming the extra."""
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: this test covers its absence")
    except ImportError:
        pass
    result = CliRunner().invoke(export_cli, ["--model", "pixart-alpha", "--random-weights", "--resolution", "64",
                                             *set_args(TINY_PIXART_SET), "--backend", "tensorrt",
                                             "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "deltadit[tensorrt]" in result.output and "loading" not in result.output
    assert not (tmp_path / "o").exists()


def test_shipped_sampler_config_is_part_of_the_cache_key(tmp_path, monkeypatch):
    """The scheduler and text-encoder configs travel with a shipped model's engines: changing them re-exports."""
    import deltadit_export.models as models
    from deltadit_export.export_options import ExportOptions, resolve

    shutil.copytree(models.PACKAGE_WEIGHTS / "pixart-digits", tmp_path / "pixart-digits")
    monkeypatch.setattr(models, "PACKAGE_WEIGHTS", tmp_path)
    options = ExportOptions(out=str(tmp_path / "out"))
    before = resolve(options).cache_key
    assert resolve(options).cache_key == before
    config = tmp_path / "pixart-digits" / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"thresholding": true', '"thresholding": false'))
    assert resolve(options).cache_key != before
