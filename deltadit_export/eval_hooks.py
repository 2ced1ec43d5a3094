"""The diffusers cache hooks that ``deltadit-eval`` compares Δ-DiT against, and the counter of the block
work they actually do (the bound of a hook row is full block work / executed block work)."""

from __future__ import annotations

from typing import Any

import torch


class LinearWork:
    """Counts multiply-adds of every ``nn.Linear`` inside ``model.transformer_blocks`` that actually runs."""

    def __init__(self, model):
        self.macs = 0
        self.handles = []
        for mod in model.transformer_blocks.modules():
            if isinstance(mod, torch.nn.Linear):
                self.handles.append(mod.register_forward_hook(self._hook))

    def _hook(self, mod, args, out):
        self.macs += out.numel() * mod.in_features

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


HOOK_ROWS = ("FirstBlockCache", "PyramidAttentionBroadcast", "FasterCache", "TaylorSeer", "MagCache")
NOT_APPLICABLE = {
    "SeaCache": "needs a raw_vision_callback adapter returning video latents (C, T, H, W); diffusers ships adapters "
                "for Cosmos3 and Wan only",
    "TextKVCache": "hooks NucleusMoEImageTransformerBlock only",
    "FasterCache (CFG part)": "its unconditional-branch approximation permutes 5-D video latents and fails on "
                              "PixArt's 4-D samples; the row runs FasterCache with is_guidance_distilled=True "
                              "(attention reuse only)",
}


def hook_config(name: str, model, params: dict[str, Any], num_steps: int):
    """The diffusers config object of cache hook ``name`` with these parameters."""
    from diffusers import hooks as H

    ts = lambda: model.current_timestep  # noqa: E731  (set per call by generate.cache_context)
    if name == "FirstBlockCache":
        return H.FirstBlockCacheConfig(threshold=params["threshold"])
    if name == "PyramidAttentionBroadcast":
        return H.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=params["spatial_skip"],
            cross_attention_block_skip_range=params["cross_skip"],
            spatial_attention_timestep_skip_range=tuple(params["timestep_range"]),
            cross_attention_timestep_skip_range=tuple(params["timestep_range"]),
            current_timestep_callback=ts)
    if name == "FasterCache":
        return H.FasterCacheConfig(
            spatial_attention_block_skip_range=params["spatial_skip"],
            spatial_attention_timestep_skip_range=tuple(params["timestep_range"]),
            is_guidance_distilled=True, current_timestep_callback=ts,
            attention_weight_callback=lambda _: params["attention_weight"])
    if name == "TaylorSeer":
        return H.TaylorSeerCacheConfig(
            cache_interval=params["cache_interval"], disable_cache_before_step=params["disable_cache_before_step"],
            max_order=params["max_order"], taylor_factors_dtype=torch.float32,
            cache_identifiers=list(params["cache_identifiers"]))
    if name == "MagCache":
        if params.get("calibrate"):
            return H.MagCacheConfig(calibrate=True, num_inference_steps=num_steps)
        return H.MagCacheConfig(threshold=params["threshold"], max_skip_steps=params["max_skip_steps"],
                                retention_ratio=params["retention_ratio"], num_inference_steps=num_steps,
                                mag_ratios=list(params["mag_ratios"]))
    raise ValueError(f"unknown cache hook {name!r}: expected one of {HOOK_ROWS}")


def apply_hook(name: str, model, params: dict[str, Any], num_steps: int):
    """Apply cache hook ``name`` to ``model`` in place; returns the model."""
    import logging

    from diffusers import hooks as H

    appliers = {"FirstBlockCache": H.apply_first_block_cache, "PyramidAttentionBroadcast":
                H.apply_pyramid_attention_broadcast, "FasterCache": H.apply_faster_cache,
                "TaylorSeer": H.apply_taylorseer_cache, "MagCache": H.apply_mag_cache}
    log = logging.getLogger("diffusers.hooks.faster_cache")
    level = log.level
    log.setLevel(logging.ERROR)  # "FasterCache is a purely experimental feature ..." on every apply
    try:
        appliers[name](model, hook_config(name, model, params, num_steps))
    finally:
        log.setLevel(level)
    return model


# Settings chosen up front (not tuned on the eval samples). Attention-only methods cannot reach
# Δ-DiT's block-work bound (the MLPs, about 2/3 of the block work, always run): they get their most
# aggressive plain setting, skipping every other attention call at all timesteps but the first.
FIXED_HOOK_PARAMS: dict[str, dict[str, Any]] = {
    "PyramidAttentionBroadcast": {"spatial_skip": 2, "cross_skip": 6, "timestep_range": [-1, 1000]},
    # FasterCache's first call must compute (it skips at iteration 0 inside its timestep range and then finds
    # no cache): the range starts below the first timestep, 999.
    "FasterCache": {"spatial_skip": 2, "timestep_range": [-1, 990], "attention_weight": 0.5},
    # 20 steps: full at steps 0..3, then every other step computed (12 of 20) → attn/MLP work bound 1.67.
    "TaylorSeer": {"cache_interval": 2, "disable_cache_before_step": 4, "max_order": 1,
                   "cache_identifiers": [r"transformer_blocks\.\d+\.(attn1|attn2|ff)"]},
}
FBC_THRESHOLDS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4)
MAG_THRESHOLDS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3)
