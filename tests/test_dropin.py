"""The drop-in for pipe.transformer inside diffusers' PixArtAlphaPipeline and DiTPipeline (tiny, offline)."""

import numpy as np
import pytest
import torch
from tiny import rebuild_model

from runtime import DeltaDiTRuntime
from runtime.dropin import DeltaDiTTransformer, DropInError, install

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


def pixart_call(pipe, seed=0, steps=STEPS, **kwargs):
    g = torch.Generator().manual_seed(42)
    embeds = torch.randn(1, 120, 24, generator=g)
    mask = torch.ones(1, 120, dtype=torch.long)
    mask[:, 60:] = 0
    if "timesteps" in kwargs or "sigmas" in kwargs:
        steps = None
    return pipe(prompt=None, negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                negative_prompt_embeds=torch.zeros_like(embeds), negative_prompt_attention_mask=torch.ones_like(mask),
                height=8, width=8, num_inference_steps=steps, guidance_scale=4.5, use_resolution_binning=False,
                generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


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


def test_plain_assignment_refuses_without_a_step_count(pixart_pipe, pixart_export):
    """Without install() the drop-in cannot see the scheduler, so it cannot know a call's T: it refuses (it used to
    run the manifest's T=20 schedule over a 6-step call), and runs right when told the steps of each call."""
    installed = install(pixart_pipe, DeltaDiTRuntime(pixart_export), policy="delta-dit")
    reference = pixart_call(pixart_pipe)
    assert installed.generation.schedule.num_steps == STEPS
    plain = DeltaDiTTransformer(DeltaDiTRuntime(pixart_export), policy="delta-dit")
    pixart_pipe.transformer = plain
    with pytest.raises(DropInError, match=r"does not know how many steps this generation has .* without install\(\)"
                                          r".*begin_generation\(num_inference_steps\)"):
        pixart_call(pixart_pipe)
    for _ in range(2):
        plain.begin_generation(STEPS)
        np.testing.assert_array_equal(pixart_call(pixart_pipe), reference)
    with pytest.raises(DropInError, match="does not know how many steps"):
        pixart_call(pixart_pipe)  # a step count is for one generation: the next call must say it again


def test_scheduler_replaced_after_install_starts_fresh(pixart_pipe, pixart_export):
    """The usual idiom pipe.scheduler = X.from_config(...) after install: every call is still a fresh generation
    with its own T (it used to run slots 0-9, then 10-19 of the previous 20-step schedule)."""
    from diffusers import DPMSolverMultistepScheduler

    dropin = install(pixart_pipe, DeltaDiTRuntime(pixart_export), policy="delta-dit")
    ten = pixart_call(pixart_pipe, steps=10)
    pixart_call(pixart_pipe, steps=20)
    pixart_pipe.scheduler = DPMSolverMultistepScheduler.from_config(pixart_pipe.scheduler.config)
    first, second = pixart_call(pixart_pipe, steps=10), pixart_call(pixart_pipe, steps=10)
    np.testing.assert_array_equal(first, ten)
    np.testing.assert_array_equal(second, ten)
    assert dropin.generation.schedule.num_steps == 10 and dropin.generation.done
    # Swapped again, and never hooked by the first call: the timesteps of the new scheduler say it.
    pixart_pipe.scheduler = DPMSolverMultistepScheduler.from_config(pixart_pipe.scheduler.config)
    np.testing.assert_array_equal(pixart_call(pixart_pipe, steps=10), ten)


def test_timestep_going_back_starts_fresh_even_without_set_timesteps(pixart_pipe, pixart_export):
    """A hand-written loop over an installed drop-in that reuses the scheduler's timesteps: abandoned after 3
    steps, the next loop (timestep back at the start) is a fresh generation (the hook alone used to miss it)."""
    dropin = install(pixart_pipe, DeltaDiTRuntime(pixart_export), policy="delta-dit")
    sched = pixart_pipe.scheduler
    sched.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    states, mask = torch.randn(2, 120, 24, generator=g), torch.ones(2, 120)

    def loop(n=STEPS):
        return [dropin(x, encoder_hidden_states=states, timestep=t, encoder_attention_mask=mask,
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample for t in sched.timesteps[:n]]

    reference = loop()
    loop(3)
    assert dropin.generation.step_index == 3
    again = loop()
    assert all(torch.equal(a, b) for a, b in zip(again, reference))
    assert dropin.generation.done and dropin.generation.schedule.num_steps == STEPS


def test_repeated_timesteps_of_second_order_schedulers_stay_one_generation(pixart_pipe, pixart_export):
    """Heun repeats each timestep (two model calls per step): one pipeline call is still one generation."""
    from diffusers import HeunDiscreteScheduler

    pixart_pipe.scheduler = HeunDiscreteScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    eager = pixart_call(pixart_pipe, steps=4)
    dropin = install(pixart_pipe, DeltaDiTRuntime(pixart_export), policy="none")
    np.testing.assert_allclose(pixart_call(pixart_pipe, steps=4), eager, atol=ATOL, rtol=0)
    calls = len(pixart_pipe.scheduler.timesteps)  # 2·4 − 1 transformer calls
    assert calls == 7 and dropin.generation.step_index == calls and dropin.generation.schedule.num_steps == calls


def test_custom_timesteps_and_sigmas_after_install(pixart_pipe, pixart_export):
    """diffusers' retrieve_timesteps reads inspect.signature(scheduler.set_timesteps): the hook keeps it, so
    timesteps= / sigmas= work after install as without it (they used to raise ValueError)."""
    import inspect

    from diffusers import EulerDiscreteScheduler

    custom = [999, 800, 600, 400, 200, 50]
    eager = pixart_call(pixart_pipe, timesteps=custom)
    sigmas = [14.0, 8.0, 4.0, 2.0, 1.0, 0.5]
    euler = EulerDiscreteScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    dpm = pixart_pipe.scheduler
    pixart_pipe.scheduler = euler
    eager_sigmas = pixart_call(pixart_pipe, sigmas=sigmas)
    pixart_pipe.scheduler = dpm
    dropin = install(pixart_pipe, DeltaDiTRuntime(pixart_export), policy="none")
    assert "timesteps" in inspect.signature(pixart_pipe.scheduler.set_timesteps).parameters
    np.testing.assert_allclose(pixart_call(pixart_pipe, timesteps=custom), eager, atol=ATOL, rtol=0)
    assert dropin.generation.schedule.num_steps == len(custom)
    dropin = install(pixart_pipe, DeltaDiTRuntime(pixart_export), policy="none")
    pixart_pipe.scheduler = euler
    np.testing.assert_allclose(pixart_call(pixart_pipe, sigmas=sigmas), eager_sigmas, atol=ATOL, rtol=0)
    assert dropin.generation.schedule.num_steps == len(sigmas) - 1
    install(pixart_pipe, DeltaDiTRuntime(pixart_export), policy="none")  # hooking a hooked scheduler again
    assert "sigmas" in inspect.signature(pixart_pipe.scheduler.set_timesteps).parameters
    np.testing.assert_allclose(pixart_call(pixart_pipe, sigmas=sigmas), eager_sigmas, atol=ATOL, rtol=0)


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
