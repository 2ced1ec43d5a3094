"""Request checks of the serving front ends: every refusal names its field and says what to send instead."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.manifest import load_manifest
from runtime.serving.schema import Limits, RequestError, parse_json_request
from runtime.serving.triton_model import input_specs, parse_tensors, result_tensors


@pytest.fixture(scope="module")
def digits_limits(digits_export) -> Limits:
    return Limits.from_manifest(load_manifest(digits_export), text_encoder=True)


def test_limits_from_the_manifests(digits_limits, pixart_export, dit_export):
    assert digits_limits.conditioning == "prompt" and digits_limits.pixel_space
    assert digits_limits.rows == 8 and digits_limits.max_images == 4  # --max-batch 4 images → 8 rows
    assert digits_limits.images_per_generation(3.0) == 4 and digits_limits.images_per_generation(1.0) == 8
    assert digits_limits.default_steps == 20
    pixart = Limits.from_manifest(load_manifest(pixart_export), text_encoder=False)
    assert pixart.conditioning == "prompt_embeds" and pixart.embeds_shape == (120, 24) and not pixart.pixel_space
    dit = Limits.from_manifest(load_manifest(dit_export), text_encoder=False)
    assert dit.conditioning == "class_label" and dit.num_classes == 1000 and dit.null_class == 1000


def test_a_good_request_and_its_defaults(digits_limits):
    parsed = parse_json_request({"prompt": "a handwritten digit 7"}, digits_limits)
    (image,) = parsed.images
    assert (image.prompt, image.seed, image.steps, image.policy, parsed.output) == (
        "a handwritten digit 7", 0, 20, "delta-dit", "png")
    assert image.guidance == digits_limits.default_guidance
    many = parse_json_request({"prompt": ["a", "b", "c"], "seed": 10, "steps": 8, "guidance": 3,
                               "policy": "none", "output": "base64"}, digits_limits)
    assert [im.seed for im in many.images] == [10, 11, 12]  # one int: image i gets seed + i
    assert {im.group_key for im in many.images} == {(8, "none", 3.0)}
    listed = parse_json_request({"prompt": ["a", "b"], "seed": [5, 3], "output": "latents"}, digits_limits)
    assert [im.seed for im in listed.images] == [5, 3]


BAD_JSON = [
    # (payload, field, words the message must hold)
    ({"prompt": 7}, "prompt", ["must be a string"]),
    ({"prompt": "x", "steps": "20"}, "steps", ["must be an integer", "steps"]),
    ({"prompt": "x", "steps": 20.5}, "steps", ["must be an integer"]),
    ({"prompt": "x", "steps": True}, "steps", ["must be an integer"]),
    ({"prompt": "x", "guidance": "high"}, "guidance", ["must be a number"]),
    ({"prompt": "x", "seed": -1}, "seed", ["0..2**63-1"]),
    ({"prompt": "x", "seed": 1.5}, "seed", ["0..2**63-1"]),
    ({"prompt": "x", "policy": "fast"}, "policy", ["delta-dit", "none"]),
    ({"prompt": "x", "output": "jpeg"}, "output", ["png", "base64", "latents"]),
    ({"seed": 3}, "prompt", ["missing 'prompt'", "a handwritten digit 7"]),
    ({"prompt": "   "}, "prompt", ["empty", "pass a caption"]),
    ({"prompt": "x", "steps": 0}, "steps", ["out of range", "1..100"]),
    ({"prompt": "x", "steps": 101}, "steps", ["out of range", "1..100"]),
    ({"prompt": "x", "guidance": -0.5}, "guidance", ["out of range", "0..20"]),
    ({"prompt": "x", "guidance": 21}, "guidance", ["out of range"]),
    ({"prompt": "x", "guidance": math.nan}, "guidance", ["out of range"]),
    ({"prompt": ["x"] * 5, "guidance": 3.0, "output": "base64"}, "prompt",
     ["5 images", "at most 4", "--max-batch"]),
    ({"prompt": ["x"] * 9, "guidance": 1.0, "output": "base64"}, "prompt", ["9 images", "at most 8"]),
    ({"prompt": "x" * (1 << 20)}, "prompt", ["1048576 characters", "at most 2000"]),
    ({"prompt": "x", "guidence": 3}, "guidence", ["unknown field", "guidance"]),
    ({"prompt": "x", "negative_embeds": [[0.0]]}, "negative_embeds", ["unknown field"]),  # its encoder makes it
    ({"prompt": ["a", "b"]}, "output", ["returns one image", "base64"]),
    ({"prompt": ["a", "b"], "seed": [1], "output": "base64"}, "seed", ["one seed per image"]),
    (["a handwritten digit 7"], "body", ["JSON object"]),
]


@pytest.mark.parametrize("payload, field, words", BAD_JSON, ids=[f"{i}-{c[1]}" for i, c in enumerate(BAD_JSON)])
def test_bad_json_requests_name_the_field_and_the_fix(digits_limits, payload, field, words):
    with pytest.raises(RequestError) as info:
        parse_json_request(payload, digits_limits)
    assert info.value.field == field
    for word in words:
        assert word in str(info.value)


def test_other_conditioning_kinds(pixart_export, dit_export):
    pixart = Limits.from_manifest(load_manifest(pixart_export), text_encoder=False)
    embeds = np.zeros((120, 24)).tolist()
    parsed = parse_json_request({"prompt_embeds": [embeds, embeds], "negative_embeds": embeds, "seed": [1, 2],
                                 "output": "latents"}, pixart)
    assert len(parsed.images) == 2 and parsed.images[0].prompt_embeds.shape == (120, 24)
    for payload, field, word in [
        ({"prompt": "a fox", "output": "latents"}, "prompt", "unknown field"),
        ({"prompt_embeds": np.zeros((119, 24)).tolist(), "output": "latents"}, "prompt_embeds", "[120, 24]"),
        ({"prompt_embeds": embeds, "guidance": 1}, "output", "latents"),  # no PNG without the model's VAE
        ({"prompt_embeds": embeds, "prompt_mask": [[1.0] * 120] * 2, "output": "latents"}, "prompt_mask", "expected [120]"),
    ]:
        with pytest.raises(RequestError) as info:
            parse_json_request(payload, pixart)
        assert info.value.field == field and word in str(info.value)
    dit = Limits.from_manifest(load_manifest(dit_export), text_encoder=False)
    assert parse_json_request({"class_label": [207, 3], "output": "latents"}, dit).images[1].class_label == 3
    for bad in (1000, -1, 2.0, "207"):
        with pytest.raises(RequestError) as info:
            parse_json_request({"class_label": bad, "output": "latents"}, dit)
        assert info.value.field == "class_label" and "0..999" in str(info.value)


@pytest.fixture(scope="module")
def pixart_limits(pixart_export) -> Limits:
    return Limits.from_manifest(load_manifest(pixart_export), text_encoder=False)


def _states(seed: int, shape=(120, 24)) -> list:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32).tolist()


def test_caption_states_carry_their_negatives_per_image(pixart_limits):
    a, b, neg_a, neg_b = _states(1), _states(2), _states(3), _states(4)
    mask = [1.0] * 10 + [0.0] * 110
    # One negative (and mask) for every image: the usual case, the embedding of "".
    shared = parse_json_request({"prompt_embeds": [a, b], "negative_embeds": neg_a, "negative_mask": mask,
                                 "output": "latents"}, pixart_limits).images
    assert all(np.array_equal(im.negative_embeds, np.float32(neg_a)) for im in shared)
    assert all(np.array_equal(im.negative_mask, np.float32(mask)) for im in shared)
    each = parse_json_request({"prompt_embeds": [a, b], "negative_embeds": [neg_a, neg_b], "guidance": 2,
                               "output": "latents"}, pixart_limits).images
    assert [im.negative_embeds[0, 0] for im in each] == [np.float32(neg_a[0][0]), np.float32(neg_b[0][0])]
    assert each[0].negative_mask is None  # all tokens kept (runtime.generate's default)
    (one,) = parse_json_request({"prompt_embeds": a, "negative_embeds": neg_b, "output": "latents"},
                                pixart_limits).images
    assert np.array_equal(one.negative_embeds, np.float32(neg_b))
    # Without guidance no unconditional half is computed, so none is needed.
    (unguided,) = parse_json_request({"prompt_embeds": a, "guidance": 1.0, "output": "latents"}, pixart_limits).images
    assert unguided.negative_embeds is None


NEGATIVE_JSON = [
    # (payload, field, words the message must hold)
    ({}, "negative_embeds", ["guidance 4.5 needs the unconditional half", "no text encoder", "pass 'negative_embeds'",
                             "'guidance' ≤ 1"]),
    ({"guidance": 2.0}, "negative_embeds", ["guidance 2 needs"]),
    ({"negative_embeds": np.zeros((120, 23)).tolist()}, "negative_embeds", ["has shape [120, 23]", "[120, 24]"]),
    ({"negative_embeds": [[[0.0] * 24] * 120] * 3}, "negative_embeds", ["3 entries for 2 images"]),
    ({"negative_embeds": np.full((120, 24), np.nan).tolist()}, "negative_embeds", ["NaN"]),
    ({"negative_embeds": "empty"}, "negative_embeds", ["must be numbers"]),
    ({"negative_embeds": np.zeros((120, 24)).tolist(), "negative_mask": [1.0] * 7}, "negative_mask",
     ["expected [120]"]),
    ({"negative_mask": [1.0] * 120, "guidance": 1.0}, "negative_mask", ["without 'negative_embeds'"]),
]


@pytest.mark.parametrize("extra, field, words", NEGATIVE_JSON, ids=[f"{i}-{c[1]}" for i, c in enumerate(NEGATIVE_JSON)])
def test_bad_negatives_name_the_field_and_the_fix(pixart_limits, extra, field, words):
    payload = {"prompt_embeds": [_states(1), _states(2)], "output": "latents"} | extra
    with pytest.raises(RequestError) as info:
        parse_json_request(payload, pixart_limits)
    assert info.value.field == field
    for word in words:
        assert word in str(info.value), str(info.value)


def test_triton_tensors_carry_negatives(pixart_limits):
    names = [s["name"] for s in input_specs(pixart_limits)]
    assert names[:4] == ["prompt_embeds", "prompt_mask", "negative_embeds", "negative_mask"]
    assert [s["optional"] for s in input_specs(pixart_limits)[:4]] == [False, True, True, True]
    embeds, negatives = np.float32([_states(1), _states(2)]), np.float32([_states(3), _states(4)])
    mask = np.ones((2, 120), np.float32)
    mask[1, 50:] = 0
    a, b = parse_tensors({"prompt_embeds": embeds, "negative_embeds": negatives, "negative_mask": mask,
                          "guidance": np.array([[4.0], [1.0]], np.float32)}, pixart_limits)
    assert np.array_equal(a.negative_embeds, negatives[0]) and np.array_equal(b.negative_embeds, negatives[1])
    assert np.array_equal(b.negative_mask, mask[1]) and a.prompt_mask is None
    # Rows without guidance need no negatives; a guided row without them is refused, naming the input and the fix.
    unguided = parse_tensors({"prompt_embeds": embeds, "guidance": np.array([[1.0], [0.0]], np.float32)},
                             pixart_limits)
    assert all(im.negative_embeds is None for im in unguided)
    for inputs, field, word in [
        ({"guidance": np.array([[1.0], [3.0]], np.float32)}, "negative_embeds", "pass 'negative_embeds'"),
        ({}, "negative_embeds", "guidance 4.5 needs"),
        ({"negative_embeds": negatives[:1]}, "negative_embeds", "1 rows for 2 images"),
        ({"negative_embeds": negatives[:, :, :20]}, "negative_embeds", "expected [120, 24]"),
        ({"negative_embeds": negatives, "negative_mask": mask[:, :60]}, "negative_mask", "expected [120]"),
        ({"negative_mask": mask, "guidance": np.array([[1.0], [1.0]], np.float32)}, "negative_mask",
         "without 'negative_embeds'"),
    ]:
        with pytest.raises(RequestError) as info:
            parse_tensors({"prompt_embeds": embeds} | inputs, pixart_limits)
        assert info.value.field == field and word in str(info.value), str(info.value)


def _text(rows: list[bytes]) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.array([list(r.ljust(width, b"\x00")) for r in rows], dtype=np.uint8)


def test_triton_tensors_become_image_requests(digits_limits):
    names = [s["name"] for s in input_specs(digits_limits)]
    assert names == ["prompt", "seed", "steps", "guidance", "policy"]
    inputs = {"prompt": _text(["a handwritten digit 7".encode(), "zwölf".encode()]),
              "seed": np.array([[4], [9]], np.int64), "steps": np.array([[8], [8]], np.int32),
              "guidance": np.array([[3.0], [1.0]], np.float32), "policy": _text([b"none", b"delta-dit"])}
    a, b = parse_tensors(inputs, digits_limits)
    assert (a.prompt, a.seed, a.steps, a.guidance, a.policy) == ("a handwritten digit 7", 4, 8, 3.0, "none")
    assert (b.prompt, b.seed, b.guidance, b.policy) == ("zwölf", 9, 1.0, "delta-dit")  # zero padding stripped
    (only,) = parse_tensors({"prompt": _text([b"seven"])}, digits_limits)
    assert (only.seed, only.steps, only.policy) == (0, 20, "delta-dit")


@pytest.mark.parametrize("inputs, field, word", [
    ({}, "prompt", "missing input"),
    ({"prompt": np.array([[0xff, 0xfe]], np.uint8)}, "prompt", "UTF-8"),
    ({"prompt": _text([b"x" * 3000])}, "prompt", "at most 2000"),
    ({"prompt": _text([b"x"]), "steps": np.array([[0]], np.int32)}, "steps", "1..100"),
    ({"prompt": _text([b"x"]), "guidance": np.array([[np.inf]], np.float32)}, "guidance", "out of range"),
    ({"prompt": _text([b"x"]), "policy": _text([b"turbo"])}, "policy", "delta-dit"),
    ({"prompt": _text([b"x"]), "seed": np.array([[1], [2]], np.int64)}, "seed", "one value per image"),
])
def test_bad_triton_tensors_name_the_field(digits_limits, inputs, field, word):
    with pytest.raises(RequestError) as info:
        parse_tensors(inputs, digits_limits)
    assert info.value.field == field and word in str(info.value)


def test_triton_outputs_pad_pngs_and_give_their_sizes(digits_limits):
    import torch

    from runtime.serving.batching import ImageResult

    samples = [torch.full((1, 16, 16), -1.0), torch.linspace(-1, 1, 256).reshape(1, 16, 16)]
    results = [ImageResult(s, 2) for s in samples]
    out = result_tensors(results, None, digits_limits)
    assert out["latents"].shape == (2, 1, 16, 16) and out["image"].dtype == np.uint8
    sizes = out["image_size"][:, 0]
    assert sizes[0] != sizes[1] and out["image"].shape == (2, max(sizes))
    for row, size, r in zip(out["image"], sizes, results):
        assert row[:size].tobytes() == r.png() and not row[size:].any()
    assert set(result_tensors(results, {"latents"}, digits_limits)) == {"latents"}  # only what was asked for


def test_triton_config_follows_the_conditioning(pixart_export, dit_export, digits_export):
    from runtime.serving.triton_repo import RepoOptions, config_text

    for folder, text_encoder, present, absent in [
        (pixart_export, False, ['name: "prompt_embeds"', "dims: [ 120, 24 ]", 'name: "prompt_mask"', 'name: "latents"',
                                'name: "negative_embeds"\n    data_type: TYPE_FP32\n    dims: [ 120, 24 ]\n    optional: true',
                                'name: "negative_mask"\n    data_type: TYPE_FP32\n    dims: [ 120 ]\n    optional: true',
                                "dims: [ 4, 8, 8 ]"], ['name: "prompt"\n', 'name: "image"', "max_batch_size: 1\n"]),
        (dit_export, False, ['name: "class_label"', "data_type: TYPE_INT64", 'name: "latents"'],
         ['name: "image"', "prompt"]),
        (digits_export, True, ['name: "prompt"', 'name: "image"', 'name: "image_size"', "dims: [ 1, 16, 16 ]"],
         ["prompt_embeds", "negative_", "TYPE_STRING"]),  # the shipped text encoder makes the negative itself
    ]:
        manifest = load_manifest(folder)
        limits = Limits.from_manifest(manifest, text_encoder=text_encoder)
        text = config_text(manifest, limits, RepoOptions(batching=False, threads=3), "cpu", "engines")
        assert "dynamic_batching" not in text and 'string_value: "3"' in text
        assert f"max_batch_size: {manifest.max_batch // 2}" in text
        for needle in present:
            assert needle in text, (folder.name, needle)
        for needle in absent:
            assert needle not in text, (folder.name, needle)
