"""The baselines of ``deltadit-bench``, written here on the diffusers model and sharing nothing with the
runtime's plan execution: the inputs every mode runs on, the PyTorch eager sampling loop, and an
independent Δ-DiT (DESIGN.md §2 math on the diffusers block list) that the runtime's ``delta-dit`` is
checked against.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "a handwritten digit 7"  # for models shipped with the hashed-word text encoder
log = logging.getLogger("deltadit")


# ============================================================================ schedule rule (independent)


def step_kind(i: int, interval: int, boundary: int) -> str:
    """DESIGN.md §2, computed here on purpose (not read from runtime.schedule): full when i % N == 0,
    else cache the rear range before the boundary step b and the front range from b on."""
    if i % interval == 0:
        return "full"
    return "cache-rear" if i < boundary else "cache-front"


def ideal_bound(num_steps: int, num_layers: int, cached_blocks: int, interval: int) -> tuple[int, float]:
    """(block-runs, bound) = (F·L + C·(L−N_c), T·L / block-runs) of DESIGN.md §2."""
    full = sum(1 for i in range(num_steps) if i % interval == 0)
    runs = full * num_layers + (num_steps - full) * (num_layers - cached_blocks)
    return runs, num_steps * num_layers / runs


def default_boundary(manifest_schedule: dict[str, Any], num_steps: int) -> int:
    """The manifest's boundary for its own T; scaled as b/T otherwise (12/20 → round(0.6·T)), like the runtime."""
    d = manifest_schedule
    return d["boundary"] if num_steps == d["num_steps"] else round(d["boundary"] * num_steps / d["num_steps"])


# ============================================================================ inputs


def make_inputs(manifest, root: Path, seed: int, prompt: str) -> dict[str, Any]:
    """Latents and conditioning for one image, shared by all modes (written once, read by every worker).

    PixArt: real prompt embeddings from the shipped hashed-word text encoder when the export has one
    (``text_encoder/config.json``); otherwise seeded random caption states [1, tokens, channels] with a
    mask keeping a seeded number of leading tokens. The negative is zeros with an all-ones mask (there is
    no text encoder here to embed ""). DiT: a seeded class label; the negative is the null class.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    c, h, w = manifest.sample_shape
    inputs: dict[str, Any] = {"latents": torch.randn((1, c, h, w), generator=g, dtype=torch.float32)}
    from runtime.integrity import verify_companion_files

    verify_companion_files(manifest)  # the text encoder config below is read from the (untrusted) folder
    cond = manifest.conditioning
    if cond["kind"] == "caption":
        encoder_dir = root / "text_encoder"
        if (encoder_dir / "config.json").is_file():
            from runtime.text_encoder import HashedWordEncoder

            encoder = HashedWordEncoder.load(encoder_dir)
            emb, mask = encoder.encode([prompt])
            neg, neg_mask = encoder.encode([""])
            inputs.update(prompt_embeds=torch.from_numpy(emb), prompt_mask=torch.from_numpy(mask),
                          negative_embeds=torch.from_numpy(neg), negative_mask=torch.from_numpy(neg_mask))
            inputs["conditioning"] = f"prompt {prompt!r} via the shipped hashed-word text encoder, negative ''"
        else:
            tokens, channels = int(cond["tokens"]), int(cond["channels"])
            emb = torch.randn((1, tokens, channels), generator=g, dtype=torch.float32)
            keep = int(torch.randint(1, tokens + 1, (1,), generator=g))
            mask = (torch.arange(tokens) < keep).to(torch.float32)[None]
            inputs.update(prompt_embeds=emb, prompt_mask=mask, negative_embeds=torch.zeros_like(emb),
                          negative_mask=torch.ones_like(mask))
            inputs["conditioning"] = (f"random caption states [1, {tokens}, {channels}] (seed {seed}), "
                                      f"{keep} of {tokens} tokens unmasked; negative zeros")
    else:
        label = int(torch.randint(0, int(cond.get("num_classes", 1000)), (1,), generator=g))
        inputs["class_labels"] = torch.tensor([label], dtype=torch.int64)
        inputs["conditioning"] = f"class {label} (seed {seed}), negative the null class {cond.get('null_class', 1000)}"
    return inputs


def make_scheduler(root: Path):
    """The runtime's default scheduler for this export (DPM-Solver++), handed to every mode explicitly."""
    from types import SimpleNamespace

    from runtime.sampling import default_scheduler

    return default_scheduler(SimpleNamespace(root=Path(root)))


def guided_conditioning(manifest, inputs: dict[str, Any], dtype, guide=None) -> dict[str, Any]:
    """The diffusers forward's conditioning for the guided batch, in the family's order (eager and reference)."""
    import torch

    from runtime.guidance import guidance_for

    guide = guide or guidance_for(manifest, 2.0)  # any scale > 1: the guided order of the family

    c, h, w = manifest.sample_shape
    rows = 2
    if manifest.conditioning["kind"] == "caption":
        cond = {
            "encoder_hidden_states": guide.batch(inputs["prompt_embeds"], inputs["negative_embeds"]).to(dtype),
            "encoder_attention_mask": guide.batch(inputs["prompt_mask"].to(dtype), inputs["negative_mask"]).to(dtype),
        }
        if manifest.conditioning.get("micro_conditions"):
            vae = manifest.export.get("vae_scale_factor", 8)
            cond["resolution"] = torch.tensor([[h * vae, w * vae]], dtype=dtype).repeat(rows, 1)
            cond["aspect_ratio"] = torch.tensor([[h / w]], dtype=dtype).repeat(rows, 1)
        return cond
    labels = inputs["class_labels"].to(torch.int64)
    null = torch.full_like(labels, int(manifest.conditioning["null_class"]))
    return {"class_labels": guide.batch(labels, null)}


# ============================================================================ eager and the reference Δ-DiT


def rebuild_model(manifest):
    """The diffusers transformer the export came from: same weights (source recorded in the manifest), same dtype."""
    import torch

    from .export_build import keep_norms_fp32
    from .model_weights import WeightsSource, build_model
    from .models import ModelError, get_spec

    spec = get_spec(manifest.model["name"])
    src = dict(manifest.model["source"])
    kind = src.get("kind")
    if kind == "random":
        source = WeightsSource("random", seed=src.get("seed", 0), overrides=src.get("overrides", {}))
        exported_with = manifest.export.get("torch")
        if exported_with and exported_with != torch.__version__:
            log.warning("random weights were drawn with torch %s, this is torch %s: the init may differ (the "
                        "none-vs-eager error will show it)", exported_with, torch.__version__)
    else:
        path = src.get("path")
        if not path or not Path(path).is_dir():
            raise ModelError(f"the manifest's {kind} weights folder {path!r} does not exist any more: the eager "
                             "baseline needs the same weights; restore it or re-export (deltadit-export --force)")
        source = WeightsSource(kind, path=path, repo_id=src.get("repo_id"))
    model = build_model(spec, source, manifest.model["config"])
    if len(model.transformer_blocks) != manifest.num_layers:
        raise ModelError(f"the rebuilt model has {len(model.transformer_blocks)} blocks, the manifest "
                         f"{manifest.num_layers}: the weights changed since the export; re-export with --force")
    if manifest.precision == "fp16":
        model = model.half()
        keep_norms_fp32(model)  # as the exporter did
    return model.eval()


def eager_generate(model, manifest, inputs: dict[str, Any], num_steps: int, guidance_scale: float, scheduler,
                   on_step=None):
    """The PyTorch baseline: the diffusers forward in a plain guided DPM-Solver++ loop; returns final latents."""
    import torch

    from runtime.guidance import guidance_for

    from .split import diffusers_forward

    dtype = next(model.parameters()).dtype
    guide = guidance_for(manifest, guidance_scale)  # the family's guided batch, as its diffusers pipeline
    cond = guided_conditioning(manifest, inputs, dtype, guide)
    scheduler.set_timesteps(num_steps)
    state = guide.start(inputs["latents"].to(torch.float32) * scheduler.init_noise_sigma, scheduler)
    for i, t in enumerate(scheduler.timesteps):
        if on_step is not None:
            on_step(i)
        model_in = scheduler.scale_model_input(guide.model_input(state), t)
        feeds = {"sample": model_in.to(dtype), "timestep": torch.full((len(model_in),), float(t), dtype=dtype), **cond}
        out = diffusers_forward(model, feeds).float()
        state = guide.step(scheduler, out, t, state, num_steps=num_steps)
    return guide.result(state)


class _DeltaState:
    """What the reference keeps across steps: this step's kind, the recorded deltas, block-runs done."""

    def __init__(self, num_layers: int, cached_blocks: int):
        self.L, self.Nc = num_layers, cached_blocks
        self.kind = "full"
        self.h0 = self.h_rear_in = self.delta_front = self.delta_rear = None
        self.block_runs = 0


def _make_delta_block(block, k: int, state: _DeltaState):
    """Block k (0-based) of the reference: runs, records, skips or applies a delta per DESIGN.md §2."""
    import torch

    class DeltaBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def __getattr__(self, name):  # DiT's head reads transformer_blocks[0].norm1
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("block"), name)

        def run(self, hidden, args, kwargs):
            state.block_runs += 1
            return self.block(hidden, *args, **kwargs)

        def forward(self, hidden_states, *args, **kwargs):
            L, Nc, s = state.L, state.Nc, state
            if s.kind == "full":
                # Record h_0 and h_{L−N_c}; Δ_front = h_{N_c} − h_0, Δ_rear = h_L − h_{L−N_c}.
                if k == 0:
                    s.h0 = hidden_states.clone()
                if k == L - Nc:
                    s.h_rear_in = hidden_states.clone()
                out = self.run(hidden_states, args, kwargs)
                if k == Nc - 1:
                    s.delta_front = out - s.h0
                if k == L - 1:
                    s.delta_rear = out - s.h_rear_in
                return out
            if s.kind == "cache-rear":
                # Blocks L−N_c+1..L (1-based) skipped: h_L = h_{L−N_c} + Δ_rear, then identity.
                if k < L - Nc:
                    return self.run(hidden_states, args, kwargs)
                return hidden_states + s.delta_rear if k == L - Nc else hidden_states
            # cache-front: blocks 1..N_c skipped: h_{N_c} = h_0 + Δ_front, then blocks N_c+1..L run.
            if k >= Nc:
                return self.run(hidden_states, args, kwargs)
            return hidden_states + s.delta_front if k == 0 else hidden_states

    return DeltaBlock()


def reference_delta_dit(model, manifest, inputs: dict[str, Any], num_steps: int, interval: int, boundary: int,
                        guidance_scale: float, scheduler):
    """Independent Δ-DiT on the diffusers model: its block list is swapped for delta-aware wrappers
    for one generation (restored afterwards). Returns (latents, block-runs, step kinds)."""
    from torch import nn

    kinds = [step_kind(i, interval, boundary) for i in range(num_steps)]
    state = _DeltaState(len(model.transformer_blocks), manifest.cached_blocks)
    original = model.transformer_blocks
    model.transformer_blocks = nn.ModuleList(_make_delta_block(b, k, state) for k, b in enumerate(original))

    def on_step(i: int) -> None:
        state.kind = kinds[i]

    try:
        latents = eager_generate(model, manifest, inputs, num_steps, guidance_scale, scheduler, on_step=on_step)
    finally:
        model.transformer_blocks = original
    return latents, state.block_runs, kinds
