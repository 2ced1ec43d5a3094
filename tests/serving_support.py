"""Shared by the serving tests: the reference images (generated alone, outside the serving code), ports, extras."""

from __future__ import annotations

import importlib.util
import io
import os
import socket
import threading

import numpy as np
import pytest
import torch

GUIDANCE = 3.0  # the shipped model card's scale
STEPS = 20
PROMPT = "a handwritten digit {}"


def require_extra(what: str, available: bool, install: str) -> None:
    """Skip when a serving extra is genuinely absent on a user's machine; fail loudly in CI, which installs them."""
    if available:
        return
    message = f"{what} is not installed ({install}; tools/setup.sh installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the serving tests: {message}")
    pytest.skip(message)


def require_ray() -> None:
    require_extra("ray[serve]", importlib.util.find_spec("ray") is not None, "pip install -e '.[serve]'")


def require_triton() -> None:
    from runtime.serving.triton_server import PYTRITON_INSTALL, TritonNotFound, find_tritonserver

    try:
        find_tritonserver()
        found = True
    except TritonNotFound:
        found = False
    require_extra("the bundled tritonserver (nvidia-pytriton)", found, PYTRITON_INSTALL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_png(latents: torch.Tensor) -> bytes:
    """The exporter's own pixel conversion (deltadit_export.generate.to_uint8) and Pillow: not the serving code."""
    from PIL import Image

    from deltadit_export.generate import to_uint8

    buf = io.BytesIO()
    Image.fromarray(to_uint8(latents[None])[0]).save(buf, format="PNG")
    return buf.getvalue()


def reference_alone(folder, seeds, *, guidance: float = GUIDANCE, steps: int = STEPS, prompt=PROMPT.format):
    """seed → (latents [1,H,W], PNG bytes): each seed generated alone (one image per generation) with
    runtime.generate, the prompt encoded by the shipped text encoder, the noise from torch.Generator(seed)."""
    from runtime import DeltaDiTRuntime
    from runtime.sampling import generate
    from runtime.text_encoder import HashedWordEncoder

    rt = DeltaDiTRuntime(folder, backend="onnxruntime", threads=1)
    enc = HashedWordEncoder.load(rt.root / "text_encoder")
    neg, neg_mask = enc.encode([""])
    out = {}
    for seed in seeds:
        states, mask = enc.encode([prompt(seed % 10)])
        noise = torch.randn((1, *rt.manifest.sample_shape), generator=torch.Generator().manual_seed(seed))
        res = generate(rt, prompt_embeds=torch.from_numpy(states), prompt_mask=torch.from_numpy(mask),
                       negative_embeds=torch.from_numpy(neg), negative_mask=torch.from_numpy(neg_mask),
                       guidance_scale=guidance, num_steps=steps, latents=noise)
        latents = res.latents[0].float()
        out[seed] = (latents, reference_png(latents))
    return out


def states_alone(folder, *, seed: int, steps: int, guidance: float, prompt_embeds, prompt_mask=None,
                 negative_embeds=None, negative_mask=None) -> torch.Tensor:
    """One caption-states image [C, H, W] through runtime.generate directly (not the serving code), its noise from
    torch.Generator(seed); arrays are one image's ([tokens, channels], [tokens])."""
    from runtime import DeltaDiTRuntime
    from runtime.sampling import generate

    rt = DeltaDiTRuntime(folder, backend="onnxruntime", threads=1)
    t = lambda a: None if a is None else torch.as_tensor(np.asarray(a, np.float32))[None]  # noqa: E731
    noise = torch.randn((1, *rt.manifest.sample_shape), generator=torch.Generator().manual_seed(seed))
    return generate(rt, prompt_embeds=t(prompt_embeds), prompt_mask=t(prompt_mask),
                    negative_embeds=t(negative_embeds), negative_mask=t(negative_mask), guidance_scale=guidance,
                    num_steps=steps, latents=noise).latents[0]


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def all_at_once(send, items) -> None:
    """``send(item)`` for every item, each in its own thread started before any is joined: concurrent requests
    that the server's batcher can join."""
    threads = [threading.Thread(target=send, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
