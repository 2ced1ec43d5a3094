"""Run many image requests as few generations, and give each request back its own images.

Images whose schedule and guidance agree (:attr:`ImageRequest.group_key`: steps, policy, guidance)
are joined into one generation of up to ``Limits.images_per_generation`` images; the rest wait for
the next one. Each image's starting noise comes from its own seed alone (one ``torch.Generator`` per
image), and every row of a generation is computed independently of the other rows, so an image does
not depend on what it was batched with (tested byte for byte, see tests/test_serving_batching.py).

State: every generation gets a fresh :class:`~runtime.generation.Generation` (its own step counter
and delta buffers) from the shared runtime, so the Δ-DiT cache of one batch never reaches another,
and nothing is kept between calls.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..executor import DeltaDiTRuntime
from ..manifest import Manifest, ManifestError
from .images import sample_to_png
from .schema import ImageRequest, Limits

log = logging.getLogger("deltadit.serving")


@dataclass
class ImageResult:
    sample: torch.Tensor  # [C, H, W] float32: the final latents (pixels for pixel-space models)
    batch_images: int  # how many images the generation that made it held

    def png(self) -> bytes:
        return sample_to_png(self.sample)


def load_text_encoder(manifest: Manifest):
    """The caption encoder shipped next to the engines (``conditioning.text_encoder``), or None."""
    sub = manifest.conditioning.get("text_encoder")
    if manifest.conditioning.get("kind") != "caption" or not sub or manifest.root is None:
        return None
    from ..text_encoder import HashedWordEncoder

    config = manifest.path_of(f"{sub}/config.json")  # refuses a path (or a link) leaving the engine folder
    if not config.is_file():
        raise ManifestError(f"the manifest names a text encoder in {sub}/ but {config} is missing; re-export with "
                            "`deltadit-export ... --force`")
    try:
        return HashedWordEncoder.load(config.parent)
    except (ValueError, TypeError, KeyError) as exc:
        raise ManifestError(f"{config} is not a text encoder this runtime knows ({exc}); re-export with "
                            "`deltadit-export ... --force`") from None


class BatchExecutor:
    """One runtime, its text encoder and the server's limits; :meth:`run` turns image requests into samples."""

    def __init__(self, runtime: DeltaDiTRuntime, *, text_encoder=None, limits: Limits | None = None,
                 **limit_overrides):
        self.runtime = runtime
        self.encoder = text_encoder
        self.limits = limits or Limits.from_manifest(runtime.manifest, text_encoder=text_encoder is not None,
                                                     **limit_overrides)
        if self.encoder is not None:
            # The unconditional half of guidance is the empty caption, as the model was trained (one zero token).
            states, mask = self.encoder.encode([""])
            self._negative = (torch.from_numpy(states), torch.from_numpy(mask))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, backend: str = "onnxruntime", threads: int | None = None,
                    device: str | None = None, **limit_overrides) -> "BatchExecutor":
        options = {"threads": threads} if threads else {}
        if device is not None:
            options["device"] = device
        runtime = DeltaDiTRuntime(Path(folder), backend=backend, **options)
        return cls(runtime, text_encoder=load_text_encoder(runtime.manifest), **limit_overrides)

    def warmup(self) -> None:
        """One short generation at the engines' full batch, so a server's first requests do not pay for ONNX
        Runtime's first calls (memory planning and arena growth for the largest shapes)."""
        kind = self.limits.conditioning
        # Zeros for caption states are fine here: the warm-up's samples are thrown away, only its shapes matter.
        states = np.zeros(self.limits.embeds_shape or (0, 0), dtype=np.float32)
        cond = ({"prompt": "warm up"} if kind == "prompt" else {"class_label": 0} if kind == "class_label" else
                {"prompt_embeds": states, "negative_embeds": states})
        image = ImageRequest(seed=0, steps=2, guidance=2.0, policy="delta-dit", **cond)
        self.run([image] * self.limits.max_images)

    # ------------------------------------------------------------ batching

    def plan(self, images: Sequence[ImageRequest]) -> list[list[int]]:
        """Indices of ``images`` per generation: grouped by key in arrival order, each group cut to the limit."""
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.group_key, []).append(i)
        chunks = []
        for key, members in groups.items():
            size = self.limits.images_per_generation(key[2])
            chunks += [members[i:i + size] for i in range(0, len(members), size)]
        return chunks

    def run(self, images: Sequence[ImageRequest], *, return_exceptions: bool = False) -> list:
        """One :class:`ImageResult` per image, in order. With ``return_exceptions`` a generation that fails puts
        its exception in place of its images' results (the other generations still run), else it raises."""
        results: list = [None] * len(images)
        for chunk in self.plan(images):
            try:
                samples = self._generate([images[i] for i in chunk])
            except Exception as exc:
                if not return_exceptions:
                    raise
                log.exception("generation of %d image(s) failed", len(chunk))
                for i in chunk:
                    results[i] = exc
                continue
            for row, i in enumerate(chunk):
                results[i] = ImageResult(samples[row], len(chunk))
        return results

    # ------------------------------------------------------------ one generation

    def _generate(self, images: list[ImageRequest]) -> torch.Tensor:
        from ..sampling import generate

        first = images[0]
        channels, height, width = self.runtime.manifest.sample_shape
        # Each image's noise from its own generator: the same seed gives the same noise in any batch.
        noise = torch.cat([torch.randn((1, channels, height, width), generator=torch.Generator().manual_seed(im.seed),
                                       dtype=torch.float32) for im in images])
        result = generate(self.runtime, **self._conditioning(images), guidance_scale=first.guidance,
                          num_steps=first.steps, policy=first.policy, latents=noise)
        return result.latents.detach().to("cpu", torch.float32)

    def _conditioning(self, images: list[ImageRequest]) -> dict[str, torch.Tensor]:
        kind = self.limits.conditioning
        if kind == "class_label":
            return {"class_labels": torch.tensor([im.class_label for im in images], dtype=torch.int64)}
        if kind == "prompt":
            states, mask = self.encoder.encode([im.prompt for im in images])
            neg_states, neg_mask = self._negative
            n = len(images)
            return {"prompt_embeds": torch.from_numpy(states), "prompt_mask": torch.from_numpy(mask),
                    "negative_embeds": neg_states.expand(n, -1, -1), "negative_mask": neg_mask.expand(n, -1)}
        cond = {"prompt_embeds": _stack([im.prompt_embeds for im in images]),
                "prompt_mask": _stack_masks([im.prompt_mask for im in images], self.limits.embeds_shape[0])}
        # The requests' own unconditional states, one per image (the schema refuses a guided request without them;
        # runtime.generate refuses an ImageRequest built by hand without them).
        if all(im.negative_embeds is not None for im in images):
            cond["negative_embeds"] = _stack([im.negative_embeds for im in images])
            cond["negative_mask"] = _stack_masks([im.negative_mask for im in images], self.limits.embeds_shape[0])
        return cond


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(a) for a in arrays])


def _stack_masks(masks: list[np.ndarray | None], tokens: int) -> torch.Tensor:
    """Each image's mask, all tokens kept where a request sent none."""
    return torch.stack([torch.from_numpy(m) if m is not None else torch.ones(tokens) for m in masks])
