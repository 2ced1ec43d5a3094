"""The batch executor: requests joined into generations and split back, and an image that does not depend on
what it was batched with (byte for byte, against the same seed generated alone outside the serving code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.serving.batching import BatchExecutor
from runtime.serving.images import sample_to_png, to_uint8
from runtime.serving.schema import ImageRequest, parse_json_request
from serving_support import GUIDANCE, PROMPT, decode_png, reference_alone, reference_png, states_alone

SEEDS = list(range(7))


@pytest.fixture(scope="module")
def executor(digits_export) -> BatchExecutor:
    return BatchExecutor.from_folder(digits_export, threads=1)


@pytest.fixture(scope="module")
def alone(digits_export):
    return reference_alone(digits_export, SEEDS)


def _image(seed: int, **kw) -> ImageRequest:
    base = dict(seed=seed, steps=20, guidance=GUIDANCE, policy="delta-dit", prompt=PROMPT.format(seed % 10))
    return ImageRequest(**(base | kw))


def test_plan_groups_by_schedule_and_guidance_and_cuts_to_the_engines(executor):
    images = [_image(0), _image(1, steps=8), _image(2), _image(3), _image(4), _image(5), _image(6, guidance=1.0),
              _image(7, steps=8)]
    plan = executor.plan(images)
    # guided: 4 images per generation (8 rows); arrival order kept inside a group
    assert plan == [[0, 2, 3, 4], [5], [1, 7], [6]]
    unguided = [_image(i, guidance=1.0) for i in range(10)]
    assert [len(c) for c in executor.plan(unguided)] == [8, 2]  # 1 row per image without guidance


def test_an_image_is_the_same_whatever_it_is_batched_with(executor, alone):
    """Seven requests of mixed schedules at once, then other compositions: every PNG equals the seed alone."""
    mixed = [_image(s) for s in SEEDS] + [_image(100, steps=8), _image(101, policy="none")]
    first = executor.run(mixed)
    assert [r.batch_images for r in first[:7]] == [4, 4, 4, 4, 3, 3, 3]  # batched indeed
    for seed, result in zip(SEEDS, first):
        latents, png = alone[seed]
        assert torch.equal(result.sample, latents), f"seed {seed}: latents differ from the seed alone"
        assert result.png() == png, f"seed {seed}: PNG bytes differ from the seed alone"
    for composition in ([6, 0], [3, 5, 1], [2]):
        for seed, result in zip(composition, executor.run([_image(s) for s in composition])):
            assert result.png() == alone[seed][1]
    assert len({alone[s][1] for s in SEEDS}) == len(SEEDS)  # seven different images: the test can tell them apart


def test_json_requests_run_through_the_executor(executor, alone):
    parsed = parse_json_request({"prompt": [PROMPT.format(3), PROMPT.format(4)], "seed": [3, 4],
                                 "guidance": GUIDANCE, "output": "base64"}, executor.limits)
    results = executor.run(parsed.images)
    assert [r.png() for r in results] == [alone[3][1], alone[4][1]]


def test_png_pixels_are_the_exporters_conversion(alone):
    from deltadit_export.generate import to_uint8 as exporter_to_uint8

    ramp = torch.linspace(-1.2, 1.2, 256).reshape(1, 1, 16, 16)  # beyond [-1, 1] on both ends: clamped
    assert np.array_equal(to_uint8(ramp), exporter_to_uint8(ramp))
    assert np.array_equal(decode_png(sample_to_png(ramp[0])), exporter_to_uint8(ramp)[0])
    assert sample_to_png(ramp[0]) == reference_png(ramp[0])
    rgb = to_uint8(torch.zeros(3, 2, 2))
    assert rgb.shape == (2, 2, 3) and (rgb == 128).all()  # 0 → 127.5 → 128 (round half to even)


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_other_conditioning_batched_equals_alone(kind, dit_export, pixart_export, one_torch_thread):
    folder = dit_export if kind == "dit" else pixart_export
    ex = BatchExecutor.from_folder(folder, threads=1)
    rng = np.random.default_rng(0)
    if kind == "dit":
        images = [ImageRequest(seed=s, steps=4, guidance=4.0, policy="delta-dit", class_label=c)
                  for s, c in [(1, 207), (2, 3), (3, 999)]]
    else:  # every image brings its own unconditional states (a server without a text encoder cannot make them)
        images = [ImageRequest(seed=s, steps=4, guidance=4.0, policy="delta-dit",
                               prompt_embeds=rng.standard_normal((120, 24)).astype(np.float32),
                               prompt_mask=(np.arange(120) < 10 * s).astype(np.float32),
                               negative_embeds=rng.standard_normal((120, 24)).astype(np.float32),
                               negative_mask=(np.arange(120) < 5 * s).astype(np.float32)) for s in (1, 2, 3)]
    together = ex.run(images)
    assert all(r.batch_images == 3 for r in together)
    for image, result in zip(images, together):
        (single,) = ex.run([image])
        assert torch.equal(result.sample, single.sample)
    assert not torch.equal(together[0].sample, together[1].sample)


def _pixart_alone(folder, image: ImageRequest) -> torch.Tensor:
    return states_alone(folder, seed=image.seed, steps=image.steps, guidance=image.guidance,
                        prompt_embeds=image.prompt_embeds, prompt_mask=image.prompt_mask,
                        negative_embeds=image.negative_embeds, negative_mask=image.negative_mask)


def test_caption_states_requests_use_their_own_negatives(pixart_export, one_torch_thread):
    """JSON requests carrying negatives (one shared, or one per image) give exactly runtime.generate's latents for
    the same states, batched or not; another negative gives another image; a guided image without one is refused."""
    from runtime.executor import InputError

    ex = BatchExecutor.from_folder(pixart_export, threads=1)
    ex.warmup()  # the warm-up of a caption-states server runs (it brings its own stand-in negatives)
    rng = np.random.default_rng(5)
    states = [rng.standard_normal((120, 24)).astype(np.float32) for _ in range(4)]
    empty = rng.standard_normal((120, 24)).astype(np.float32)  # stands in for the encoder's embedding of ""
    shared = parse_json_request({"prompt_embeds": [s.tolist() for s in states[:3]], "negative_embeds": empty.tolist(),
                                 "seed": 11, "steps": 4, "guidance": 4.0, "output": "latents"}, ex.limits)
    each = parse_json_request({"prompt_embeds": [states[0].tolist(), states[3].tolist()],
                               "negative_embeds": [states[3].tolist(), empty.tolist()], "negative_mask": [
                                   [1.0] * 30 + [0.0] * 90, [1.0] * 120], "seed": [11, 14], "steps": 4,
                               "guidance": 4.0, "output": "latents"}, ex.limits)
    results = ex.run(shared.images + each.images)
    assert [r.batch_images for r in results] == [4, 4, 4, 4, 1]  # one generation of 4, then the fifth alone
    for image, result in zip(shared.images + each.images, results):
        assert torch.equal(result.sample, _pixart_alone(pixart_export, image)), f"seed {image.seed}"
    # Same seed and caption states, another negative: another image (the request's negative is the one used).
    assert not torch.equal(results[0].sample, results[3].sample)

    bare = ImageRequest(seed=0, steps=4, guidance=4.0, policy="delta-dit", prompt_embeds=states[0])
    with pytest.raises(InputError, match="pass negative_embeds"):
        ex.run([bare])
    (unguided,) = ex.run([ImageRequest(seed=0, steps=4, guidance=1.0, policy="delta-dit", prompt_embeds=states[0])])
    assert torch.isfinite(unguided.sample).all()


def test_a_failing_generation_fails_only_its_own_images(executor, alone, monkeypatch):
    real = executor._generate

    def flaky(images):
        if images[0].steps == 3:
            raise RuntimeError("engine fault")
        return real(images)

    monkeypatch.setattr(executor, "_generate", flaky)
    results = executor.run([_image(0), _image(50, steps=3), _image(1)], return_exceptions=True)
    assert isinstance(results[1], RuntimeError)
    assert results[0].png() == alone[0][1] and results[2].png() == alone[1][1]
    with pytest.raises(RuntimeError, match="engine fault"):
        executor.run([_image(50, steps=3)])


def test_warmup_runs_a_full_batch(executor):
    executor.warmup()  # no error, and the executor serves afterwards
    assert executor.run([_image(0)])[0].batch_images == 1
