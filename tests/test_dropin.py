"""The drop-in for pipe.transformer inside diffusers' PixArtAlphaPipeline and DiTPipeline (tiny, offline)."""

import numpy as np
import pytest
import torch
from tiny import rebuild_model

from runtime import DeltaDiTRuntime
from runtime.dropin import DeltaDiTTransformer, install

STEPS = 6
# Images decode latents that agree to ~1e-6 relative (fp32 engines vs torch, see test_runtime); the
# tiny VAE maps them to pixels in [0, 1] with no amplification beyond that scale: 1e-4 absolute.
ATOL = 1e-4


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    # One block: vae_scale_factor 1, so an 8×8 latent is an 8×8 image.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=4, layers_per_block=1).eval()


def scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


@pytest.fixture()
def pixart_pipe(pixart_export):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(),
                               transformer=rebuild_model(pixart_export), scheduler=scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_call(pipe, seed=0):
    g = torch.Generator().manual_seed(42)
    embeds = torch.randn(1, 120, 24, generator=g)
    mask = torch.ones(1, 120, dtype=torch.long)
    mask[:, 60:] = 0
    return pipe(prompt=None, negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                negative_prompt_embeds=torch.zeros_like(embeds), negative_prompt_attention_mask=torch.ones_like(mask),
                height=8, width=8, num_inference_steps=STEPS, guidance_scale=4.5, use_resolution_binning=False,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


def test_pixart_pipeline_none_reproduces_eager(pixart_pipe, pixart_export):
    eager = pixart_call(pixart_pipe)
    dropin = install(pixart_pipe, DeltaDiTRuntime(pixart_export), policy="none")
    ours = pixart_call(pixart_pipe)
    assert ours.shape == eager.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(ours, eager, atol=ATOL, rtol=0)
    assert dropin.generation.step_index == STEPS and dropin.generation.schedule.num_steps == STEPS


def test_pixart_pipeline_delta_dit_calls_start_fresh(pixart_pipe, pixart_export):
    eager = pixart_call(pixart_pipe)
    dropin = install(pixart_pipe, DeltaDiTRuntime(pixart_export), policy="delta-dit")
    first, second = pixart_call(pixart_pipe), pixart_call(pixart_pipe)
    np.testing.assert_array_equal(first, second)  # each call a fresh generation, no delta carried over
    assert np.abs(first - eager).max() > ATOL  # the cache really ran (it changes the image)
    # The scheduler hook sized the schedule to the pipeline's step count, with cached steps in it.
    sched = dropin.generation.schedule
    assert sched.num_steps == STEPS and sched.block_runs < STEPS * sched.num_layers
    other = pixart_call(pixart_pipe, seed=1)
    assert not np.array_equal(other, first)


def test_plain_assignment_detects_new_generations(pixart_pipe, pixart_export):
    """Without install()'s scheduler hook, a timestep that goes back up starts a new generation."""
    pixart_pipe.transformer = DeltaDiTTransformer(DeltaDiTRuntime(pixart_export), policy="delta-dit")
    first, second = pixart_call(pixart_pipe), pixart_call(pixart_pipe)
    np.testing.assert_array_equal(first, second)


def test_dit_pipeline_none_reproduces_eager(dit_export):
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=rebuild_model(dit_export), vae=tiny_vae(), scheduler=scheduler())
    pipe.set_progress_bar_config(disable=True)

    def call():
        return pipe(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=STEPS,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    eager = call()
    install(pipe, DeltaDiTRuntime(dit_export), policy="none")
    ours = call()
    assert ours.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(ours, eager, atol=ATOL, rtol=0)
    install(pipe, DeltaDiTRuntime(dit_export), policy="delta-dit")
    np.testing.assert_array_equal(call(), call())


def test_dropin_reads_like_a_diffusers_transformer(pixart_export):
    dropin = DeltaDiTTransformer(DeltaDiTRuntime(pixart_export))
    assert dropin.config.sample_size == 8 and dropin.config["in_channels"] == 4
    assert dropin.config.out_channels == 8
    assert dropin.dtype == torch.float32 and dropin.device == torch.device("cpu")
    with pytest.raises(AttributeError):
        dropin.config.no_such_field
