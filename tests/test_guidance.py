"""Sampling equals diffusers' pipelines at every guidance scale (issue 9 §1).

The reference is the eager ``DiTPipeline`` / ``PixArtAlphaPipeline`` on the diffusers model the tiny export
came from (same noise, same scheduler): it shares no code with runtime/guidance.py. At guidance 1 a wrong
batch order is invisible, so every sampler is checked at guidance 4 too.

Tolerance 1e-4 relative (max|a−b| / max|b| of the final latents): the ONNX engines agree with the diffusers
forward to ~1e-6 per call in fp32 (test_runtime); guidance (1 + 2g) and 6 solver steps amplify that by at
most ~10², and a wrong batch order is off by O(1) (0.9 and more).
"""

import pytest
import torch
from tiny import rebuild_model

from runtime import DeltaDiTRuntime, InputError, generate

STEPS = 6
RTOL = 1e-4
# PyTorch against PyTorch: the same forward in other batch layouts; float32 rounding only.
EAGER_RTOL = 1e-5


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max())


def dpm():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=4, layers_per_block=1, scaling_factor=1.0).eval()


def dit_pipeline_latents(model, labels, g, seed=0, scheduler=None):
    """DiTPipeline's final latents (what it hands to the VAE; scaling_factor 1)."""
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=model, vae=tiny_vae(), scheduler=scheduler or dpm())
    pipe.set_progress_bar_config(disable=True)
    seen = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: (seen.append(z.clone()), decode(z, *a, **k))[1]
    pipe(class_labels=list(labels), guidance_scale=g, num_inference_steps=STEPS,
         generator=torch.Generator().manual_seed(seed), output_type="np")
    return seen[0]


def pixart_pipeline_latents(model, embeds, mask, neg, neg_mask, noise, g, scheduler=None):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=model,
                               scheduler=scheduler or dpm())
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=None, negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask, height=8, width=8,
                num_inference_steps=STEPS, guidance_scale=g, use_resolution_binning=False, latents=noise.clone(),
                output_type="latent").images


def pixart_conditioning(batch=2, seed=42):
    """Caption states and a tokenizer-style int64 mask (real tokenizers return int64), a negative of its own."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, 120, 24, generator=g)
    neg = torch.randn(batch, 120, 24, generator=g) * 0.5  # not zeros: a wrong order cannot hide behind symmetry
    mask = torch.ones(batch, 120, dtype=torch.int64)
    mask[:, 60:] = 0
    neg_mask = torch.zeros(batch, 120, dtype=torch.int64)
    neg_mask[:, :5] = 1
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    return embeds, mask, neg, neg_mask, noise


@pytest.fixture(scope="module")
def dit_model(dit_export):
    return rebuild_model(dit_export)


@pytest.fixture(scope="module")
def pixart_model(pixart_export):
    return rebuild_model(pixart_export)


@pytest.mark.parametrize("g", [1.0, 4.0])
def test_generate_equals_dit_pipeline(g, dit_export, dit_model, one_torch_thread):
    labels = [3, 7]
    ref = dit_pipeline_latents(dit_model, labels, g)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    rt = DeltaDiTRuntime(dit_export)
    ours = generate(rt, class_labels=torch.tensor(labels), guidance_scale=g, num_steps=STEPS, policy="none",
                    scheduler=dpm(), latents=noise).latents
    err = rel(ours, ref)
    print(f"DiT g={g}: relative error of runtime.generate vs DiTPipeline {err:.3e}")
    assert err < RTOL


@pytest.mark.parametrize("g", [1.0, 4.0])
def test_generate_equals_pixart_pipeline(g, pixart_export, pixart_model, one_torch_thread):
    embeds, mask, neg, neg_mask, noise = pixart_conditioning()
    ref = pixart_pipeline_latents(pixart_model, embeds, mask, neg, neg_mask, noise, g)
    rt = DeltaDiTRuntime(pixart_export)
    ours = generate(rt, prompt_embeds=embeds, prompt_mask=mask, negative_embeds=neg, negative_mask=neg_mask,
                    guidance_scale=g, num_steps=STEPS, policy="none", scheduler=dpm(), latents=noise).latents
    err = rel(ours, ref)
    print(f"PixArt g={g}: relative error of runtime.generate vs PixArtAlphaPipeline {err:.3e}")
    assert err < RTOL


def test_bench_eager_and_reference_equal_pipelines(dit_export, pixart_export, dit_model, pixart_model,
                                                   one_torch_thread):
    """deltadit-bench's eager baseline (and with it the Δ-DiT reference, which runs the same loop) at g=4."""
    from deltadit_export.bench_baseline import eager_generate, reference_delta_dit
    from runtime.manifest import load_manifest

    g = 4.0
    m = load_manifest(dit_export)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    ours = eager_generate(dit_model, m, {"latents": noise, "class_labels": torch.tensor([5])}, STEPS, g, dpm())
    assert rel(ours, dit_pipeline_latents(dit_model, [5], g)) < EAGER_RTOL
    # The reference Δ-DiT with N=1 (every step full) is the same loop with its block wrappers in place.
    ref, runs, _ = reference_delta_dit(dit_model, m, {"latents": noise, "class_labels": torch.tensor([5])},
                                       STEPS, 1, STEPS, g, dpm())
    assert runs == STEPS * m.num_layers and rel(ref, ours) < EAGER_RTOL

    m = load_manifest(pixart_export)
    embeds, mask, neg, neg_mask, noise = pixart_conditioning(batch=1)
    inputs = {"latents": noise, "prompt_embeds": embeds, "prompt_mask": mask, "negative_embeds": neg,
              "negative_mask": neg_mask}
    ours = eager_generate(pixart_model, m, inputs, STEPS, g, dpm())
    assert rel(ours, pixart_pipeline_latents(pixart_model, embeds, mask, neg, neg_mask, noise, g)) < EAGER_RTOL


def test_calibration_sampler_equals_pipelines(dit_model, pixart_model, one_torch_thread):
    """--calibrate's full-compute sampler (its reference for the PSNR budget) at g=4."""
    from deltadit_export.calibrate import BlockStepper, calibration_inputs, sample
    from deltadit_export.models import get_spec
    from runtime.schedule import Cuts, NoCachePolicy

    g = 4.0
    config = dict(dpm().config)
    plan = NoCachePolicy().plan(STEPS, Cuts(6, 4))
    inputs = calibration_inputs(get_spec("dit-xl-2"), dit_model, 2, guidance=g, seed=0)
    labels = [label for label in inputs.cond["class_labels"].tolist() if label != 1000]  # the null class is 1000
    ours = sample(BlockStepper(dit_model), plan, inputs, config)
    assert rel(ours, dit_pipeline_latents(dit_model, labels, g, seed=0)) < EAGER_RTOL

    inputs = calibration_inputs(get_spec("pixart-alpha"), pixart_model, 2, guidance=g, seed=0)
    c = inputs.cond
    ours = sample(BlockStepper(pixart_model), plan, inputs, config)
    ref = pixart_pipeline_latents(pixart_model, c["encoder_hidden_states"][2:], c["encoder_attention_mask"][2:],
                                  c["encoder_hidden_states"][:2], c["encoder_attention_mask"][:2], inputs.noise, g)
    assert rel(ours, ref) < EAGER_RTOL


def test_generate_cli_torch_sampler_equals_pixart_pipeline(pixart_model, one_torch_thread):
    """deltadit-generate / deltadit-eval's PyTorch sampler (torch_generate) at g=4."""
    from deltadit_export.sampling import torch_generate

    embeds, mask, neg, neg_mask, noise = pixart_conditioning()
    ours = torch_generate(pixart_model, dict(dpm().config), embeds, mask.float(), (neg[:1], neg_mask[:1]), noise,
                          guidance_scale=4.0, num_steps=STEPS)
    ref = pixart_pipeline_latents(pixart_model, embeds, mask, neg[:1].expand(2, -1, -1), neg_mask[:1].expand(2, -1),
                                  noise, 4.0)
    assert rel(ours, ref) < EAGER_RTOL


def test_tokenizer_masks_accepted(pixart_export, one_torch_thread):
    """int64 and bool masks (what tokenizers return) are cast as the drop-in casts them: same results as 1/0 floats."""
    rt = DeltaDiTRuntime(pixart_export)
    embeds, mask, neg, neg_mask, noise = pixart_conditioning(batch=1)
    step = {"sample": noise, "timestep": torch.full((1,), 500.0), "encoder_hidden_states": embeds}
    ref = rt.forward({**step, "encoder_attention_mask": mask.float()})
    for m in (mask, mask.bool(), mask.int()):
        feeds = rt.prepare_inputs({**step, "encoder_attention_mask": m})
        assert feeds["encoder_attention_mask"].dtype == torch.float32
        assert torch.equal(rt.forward({**step, "encoder_attention_mask": m}), ref)
    kw = dict(prompt_embeds=embeds, negative_embeds=neg, guidance_scale=4.0, num_steps=2, policy="none",
              scheduler=dpm(), latents=noise)
    ref = generate(rt, prompt_mask=mask.float(), negative_mask=neg_mask.float(), **kw).latents
    for m, nm in ((mask, neg_mask), (mask.bool(), neg_mask.bool())):
        assert torch.equal(generate(rt, prompt_mask=m, negative_mask=nm, **kw).latents, ref)
    with pytest.raises(InputError, match="has dtype torch.complex64"):
        rt.prepare_inputs({**step, "encoder_attention_mask": mask.to(torch.complex64)})


def test_guidance_needs_a_real_negative_for_captions(pixart_export):
    """Zeros are not a text encoder's "" embedding: with guidance, generate asks for the negative."""
    rt = DeltaDiTRuntime(pixart_export)
    embeds = torch.randn(1, 120, 24)
    with pytest.raises(InputError, match=r"guidance_scale=4\.5 needs the unconditional half: pass negative_embeds"):
        generate(rt, prompt_embeds=embeds, num_steps=2)
    generate(rt, prompt_embeds=embeds, guidance_scale=1.0, num_steps=2)  # no guidance: no negative needed
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InputError, match="must be a finite number"):
            generate(rt, prompt_embeds=embeds, negative_embeds=embeds, guidance_scale=bad, num_steps=2)


@pytest.fixture(scope="module")
def dit10_export(tmp_path_factory):
    """A DiT with 10 classes (num_embeds_ada_norm=10): the export used to crash drawing parity labels 0..999."""
    from tiny import TINY_DIT_SET, export_tiny

    return export_tiny(tmp_path_factory.mktemp("dit10") / "dit10", "dit-xl-2",
                       overrides={**TINY_DIT_SET, "num_embeds_ada_norm": 10})


def test_dit_with_ten_classes_exports_and_runs(dit10_export, monkeypatch, one_torch_thread):
    from deltadit_export.split import diffusers_forward
    from runtime.manifest import load_manifest

    m = load_manifest(dit10_export)
    assert m.conditioning["num_classes"] == 10 and m.conditioning["null_class"] == 10
    rt = DeltaDiTRuntime(dit10_export)
    model = rebuild_model(dit10_export)
    x = {"sample": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
         "timestep": torch.tensor([900.0, 500.0, 20.0]), "class_labels": torch.tensor([0, 9, 10])}
    # The engines' null row is the model's own: reference the diffusers forward.
    assert rel(rt.forward(x), diffusers_forward(model, x)) < 1e-5
    for bad in (11, 500, 1000, -1):
        with pytest.raises(InputError, match=rf"holds {bad}, out of range: expected class ids 0\.\.9, or 10 for the "
                                             "unconditional"):
            rt.prepare_inputs({**x, "class_labels": torch.tensor([3, bad, 10])})
    seen = []
    head = rt.engines["head"]
    monkeypatch.setattr(rt, "engines", {**rt.engines, "head": type("Spy", (), {
        "run": lambda self, feeds: (seen.append(feeds["class_labels"].clone()), head.run(feeds))[1]})()})
    generate(rt, class_labels=torch.tensor([2, 7]), guidance_scale=4.0, num_steps=2)
    assert seen[0].tolist() == [2, 7, 10, 10]  # DiTPipeline's order [labels; null], null from the config


def test_manifest_null_class_must_match_the_class_count(dit_export, tmp_path):
    import json
    import shutil

    from runtime.manifest import ManifestError, load_manifest

    folder = tmp_path / "eng"
    shutil.copytree(dit_export, folder)
    d = json.loads((folder / "manifest.json").read_text())
    d["conditioning"]["num_classes"] = 10  # what the old exporter wrote for 10 classes: null 1000
    (folder / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"`conditioning.null_class` = 1000, but a model with 10 classes has its "
                                            r"unconditional class at 10; re-export"):
        load_manifest(folder)
    del d["conditioning"]["null_class"]
    (folder / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"`conditioning.null_class` is missing"):
        load_manifest(folder)
