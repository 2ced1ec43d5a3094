"""``deltadit-eval``: the quality harness of Δ-DiT on the shipped ``pixart-digits`` model.

Every row generates the same samples (``--samples-per-digit`` per digit, digit-major, initial noise
from one ``torch.Generator(--seed)``, T=20 DPM-Solver++ with classifier-free guidance at the shipped
model's scale (its model card's) unless told otherwise) and reports:

- **bound**: ideal speedup of the block work. Δ-DiT rows: ``T·L / block-runs`` of their schedule;
  fewer steps: ``20 / T``; diffusers hook rows: the multiply-adds of every ``nn.Linear`` inside the
  transformer blocks in full compute divided by those actually executed during the row's run
  (counted with forward hooks; attention score products are left out, they are < 10% here).
- **speedup**: measured per-image latency (one image, so guidance batch 2; fp32; ``--threads``),
  median of ``--repeats`` runs taken round-robin across all rows after a warm-up, so a change of
  load on the machine hits every row alike. Runtime rows (ONNX Runtime) against runtime full
  compute; PyTorch rows (diffusers' own cache hooks) against PyTorch eager full compute.
- **accuracy**: share of samples that the reference digits classifier
  (``digits.train_digit_classifier(seed=0)``) recognizes as the prompted digit.
- **FD**: Fréchet distance between the classifier's 64-d penultimate features of the samples and
  of the real digits of the training split (the reference set); ``FD floor`` in the output is the
  distance of the real held-out digits to the same reference (what finite samples of real data give).
  ``±`` is its standard deviation over 200 bootstrap resamples of the samples; comparisons between rows
  use a paired bootstrap (same resampled indices for both rows, which share their seeds) and state the
  95% interval of the FD difference.
- **PSNR / max-abs** against the full-compute samples of the same seeds (runtime rows against runtime
  full compute, PyTorch rows against PyTorch full compute), pixels clamped to [-1, 1], PSNR over
  all pixels of all samples pooled: ``10·log10(2² / MSE)``.

Rows: full compute; ``delta-dit`` (the manifest's default N, N_c, b); ``delta-front`` (b=0);
``delta-rear`` (b=T); ``output-cache`` (FORA-like, stores the range's output instead of its
delta); fewer steps with the block compute of ``delta-dit`` (``block-runs / L`` steps, rounded down
and up: 12 and 13 for L=12); PyTorch eager full compute; and one row per diffusers cache hook that
applies to ``PixArtTransformer2DModel`` (FirstBlockCache, Pyramid Attention Broadcast, FasterCache
without its CFG part, TaylorSeer, MagCache), tuned to a block-work bound close to ``delta-dit``'s
where the method allows it. Output: a table, ``quality.json``, ``speedup_vs_fd.png`` and sample
grids in ``--out`` (default ``docs/quality``). Samples are cached per row under ``--work`` (keyed on
the engines' sha256, the sampler and encoder configs, seed and row settings), so a rerun only recomputes
what changed.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
import torch

DEFAULT_EVAL_ENGINES = Path("engines") / "pixart-digits-16-fp32-eval"
DEFAULT_OUT = Path("docs") / "quality"
EVAL_MAX_BATCH = 100  # images per engine call in the eval export (engines take 200 rows with guidance)
CLASSIFIER_SEED = 0
# The reference classifier's documented held-out accuracy (digits.py: 0.9805 for seed 0, i.e. 352 of 359),
# less one image of slack for float differences between CPUs (training is deterministic on one machine).
CLASSIFIER_DOCUMENTED_ACCURACY = 0.9805
CLASSIFIER_MIN_ACCURACY = CLASSIFIER_DOCUMENTED_ACCURACY - 1 / 359
TARGETS = {"speedup": 1.5, "accuracy_points": 2.0, "fd_relative": 0.10}


# ================================================================ metrics


def _images(x) -> np.ndarray:
    return torch.as_tensor(x).detach().double().clamp(-1, 1).numpy()


def psnr(a, b, data_range: float = 2.0) -> float:
    """PSNR (dB) of two image sets in [-1, 1] (clamped first, as shown), over all pixels pooled:
    ``10·log10(range² / MSE)``; ``inf`` for identical sets."""
    mse = float(np.mean((_images(a) - _images(b)) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(data_range ** 2 / mse))


def max_abs(a, b) -> float:
    """Largest pixel difference of two image sets in [-1, 1] (clamped first)."""
    return float(np.max(np.abs(_images(a) - _images(b))))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``[N, D]`` features, float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need [N >= 2, D] features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """``|μ1−μ2|² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½)``.

    ``Tr((Σ1Σ2)^½)`` is computed as the sum of the square roots of the eigenvalues of the symmetric
    PSD matrix ``Σ1^½ Σ2 Σ1^½`` (same eigenvalues as ``Σ1Σ2``), which avoids the complex round-off of
    a general matrix square root.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def bootstrap_fd(features: dict[str, np.ndarray], ref_stats, resamples: int = 200,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """FD of each set to the reference on ``resamples`` bootstrap resamples of the samples.

    The same resampled indices are used for every set: the sets share their seeds (sample i of every
    row starts from the same noise and prompt), so differences between rows are judged paired.
    """
    n = len(next(iter(features.values())))
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, n, size=(resamples, n))
    return {name: np.array([frechet_distance_from_stats(*feature_stats(f[i]), *ref_stats) for i in idx])
            for name, f in features.items()}


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance of the Gaussians fitted to two feature sets ``[N, D]`` (the FID formula)."""
    return frechet_distance_from_stats(*feature_stats(features_a), *feature_stats(features_b))


@functools.lru_cache(maxsize=2)
def reference_classifier(size: int = 16):
    """The reference digits classifier (``digits.train_digit_classifier(seed=0)``, trained on one thread, so
    identical for every caller), trained once per process."""
    from .digits import train_digit_classifier

    with torch.enable_grad():
        return train_digit_classifier(seed=CLASSIFIER_SEED, size=size)


# ================================================================ counting block work in PyTorch


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


# ================================================================ diffusers cache hooks


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


# ================================================================ rows


@dataclasses.dataclass
class RowSpec:
    name: str
    engine: str  # "runtime" or "pytorch"
    num_steps: int
    policy: str = "none"  # runtime rows
    hook: str | None = None  # pytorch rows: None is full compute
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    chunk: int | None = None  # images per call (None: the engines' maximum)
    note: str = ""

    @property
    def reference(self) -> str:
        return "full" if self.engine == "runtime" else "pytorch full"

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "engine": self.engine, "num_steps": self.num_steps, "policy": self.policy,
                "hook": self.hook, "params": self.params, "chunk": self.chunk}


def runtime_rows(runtime, num_steps: int) -> list[RowSpec]:
    d = runtime.schedule("delta-dit", num_steps=num_steps)
    L = d.num_layers
    rows = [RowSpec("full", "runtime", num_steps, "none"),
            RowSpec("delta-dit", "runtime", num_steps, "delta-dit"),
            RowSpec("delta-front", "runtime", num_steps, "delta-front"),
            RowSpec("delta-rear", "runtime", num_steps, "delta-rear"),
            RowSpec("output-cache", "runtime", num_steps, "output-cache")]
    eq = d.block_runs / L  # steps with the same block compute as delta-dit
    for t in sorted({math.floor(eq), math.ceil(eq)}):
        if 1 <= t < num_steps:
            rows.append(RowSpec(f"fewer steps T={t}", "runtime", t, "none",
                                note=f"{t * L} block-runs vs delta-dit's {d.block_runs}"))
    return rows


# ================================================================ sample generation


@dataclasses.dataclass
class EvalSetup:
    runtime: Any
    manifest: Any
    torch_model_factory: Callable[[], Any]
    scheduler_config: dict
    embeds: torch.Tensor
    mask: torch.Tensor
    negative: tuple[torch.Tensor, torch.Tensor]
    noise: torch.Tensor
    digits: np.ndarray
    guidance: float
    cache_dir: Path | None
    fingerprint: str


def _row_cache_path(setup: EvalSetup, row: RowSpec) -> Path | None:
    if setup.cache_dir is None:
        return None
    key = json.dumps({"row": row.key(), "fp": setup.fingerprint}, sort_keys=True, default=str)
    return setup.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


def generate_row(setup: EvalSetup, row: RowSpec, log: Callable[[str], None]) -> dict[str, Any]:
    """Samples of one row (cached on disk) plus, for PyTorch rows, the Linear multiply-adds executed."""
    from .generate import runtime_generate, torch_generate

    path = _row_cache_path(setup, row)
    if path is not None and path.is_file():
        data = np.load(path)
        return {"samples": torch.from_numpy(data["samples"]), "macs": int(data["macs"]),
                "seconds": float(data["seconds"]), "cached": True}
    t0 = time.perf_counter()
    macs = 0
    if row.engine == "runtime":
        schedule = setup.runtime.schedule(row.policy, num_steps=row.num_steps)
        samples = runtime_generate(setup.runtime, schedule, setup.embeds, setup.mask, setup.negative, setup.noise,
                                   guidance_scale=setup.guidance, chunk=row.chunk)
    else:
        model = setup.torch_model_factory()
        if row.hook:
            apply_hook(row.hook, model, row.params, row.num_steps)
        work = LinearWork(model)
        samples = torch_generate(model, setup.scheduler_config, setup.embeds, setup.mask, setup.negative,
                                 setup.noise, guidance_scale=setup.guidance, num_steps=row.num_steps,
                                 chunk=row.chunk or EVAL_MAX_BATCH)
        macs = work.macs
        work.close()
    seconds = time.perf_counter() - t0
    if not torch.isfinite(samples).all():
        log(f"warning: row {row.name!r} produced NaN/Inf samples")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, samples=samples.numpy(), macs=macs, seconds=seconds)
    return {"samples": samples, "macs": macs, "seconds": seconds, "cached": False}


def _tuning_inputs(setup: EvalSetup, count: int, seed: int):
    """``count`` images (one per digit, cycling) with noise from another seed than the eval's."""
    from .generate import initial_noise

    digits = np.arange(count) % 10
    first = {int(d): int(np.flatnonzero(setup.digits == d)[0]) for d in np.unique(setup.digits)}
    idx = [first[int(d)] for d in digits]
    noise = initial_noise(count, tuple(setup.noise.shape[1:]), seed)
    return setup.embeds[idx], setup.mask[idx], noise


def _hook_bound(setup: EvalSetup, name: str, params: dict, num_steps: int, inputs, chunk: int,
                full_macs_per_image: float) -> float:
    from .generate import torch_generate

    model = apply_hook(name, setup.torch_model_factory(), params, num_steps)
    work = LinearWork(model)
    e, m, noise = inputs
    torch_generate(model, setup.scheduler_config, e, m, setup.negative, noise, guidance_scale=setup.guidance,
                   num_steps=num_steps, chunk=chunk)
    work.close()
    return full_macs_per_image * len(noise) / max(work.macs, 1)


def tune_hooks(setup: EvalSetup, num_steps: int, target_bound: float, log: Callable[[str], None],
               tuning_images: int = 10, tuning_seed: int = 1000,
               names: tuple[str, ...] = HOOK_ROWS) -> tuple[list[RowSpec], dict[str, Any]]:
    """One RowSpec per applicable diffusers cache hook (those in ``names``).

    FirstBlockCache and MagCache have a threshold: the one whose block-work bound on ``tuning_images``
    images (noise from ``tuning_seed``, not the eval's) is closest to ``target_bound`` is chosen.
    FirstBlockCache decides per call from a batch-wide statistic, so it runs one image per call (what a
    user generating one image gets, and what its latency is measured on). MagCache's mag_ratios come
    from its own calibration mode on the tuning images.
    """
    from .generate import torch_generate

    inputs = _tuning_inputs(setup, tuning_images, tuning_seed)
    base = setup.torch_model_factory()
    work = LinearWork(base)
    torch_generate(base, setup.scheduler_config, inputs[0][:1], inputs[1][:1], setup.negative, inputs[2][:1],
                   guidance_scale=setup.guidance, num_steps=num_steps)
    work.close()
    full_per_image = work.macs
    report: dict[str, Any] = {"target_bound": target_bound, "tuning_images": tuning_images,
                              "tuning_seed": tuning_seed}
    rows = []

    # FirstBlockCache: per-image calls.
    if "FirstBlockCache" in names:
        sweep = {}
        for th in FBC_THRESHOLDS:
            sweep[th] = _hook_bound(setup, "FirstBlockCache", {"threshold": th}, num_steps, inputs, 1, full_per_image)
            if sweep[th] > 1.5 * target_bound:
                break
        th = min(sweep, key=lambda k: (abs(sweep[k] - target_bound), k))
        report["FirstBlockCache"] = {"chosen": {"threshold": th}, "sweep_bound": {str(k): v for k, v in sweep.items()}}
        log(f"  FirstBlockCache: threshold {th} (tuning bound {sweep[th]:.2f}×)")
        rows.append(RowSpec("FirstBlockCache", "pytorch", num_steps, hook="FirstBlockCache", params={"threshold": th},
                            chunk=1, note="threshold tuned to delta-dit's bound; one image per call"))
    fixed_notes = {
        "PyramidAttentionBroadcast": "attention-only: MLPs always run",
        "FasterCache": "attention reuse only (is_guidance_distilled=True): its CFG part needs 5-D video latents",
        "TaylorSeer": "attn1/attn2/ff outputs forecast (order 1) on 8 of 20 steps",
    }
    for name, note in fixed_notes.items():
        if name in names:
            rows.append(RowSpec(name, "pytorch", num_steps, hook=name, params=FIXED_HOOK_PARAMS[name], note=note))
    if "MagCache" in names:
        rows.append(_tune_magcache(setup, num_steps, target_bound, log, inputs, full_per_image, report))
    report["not_applicable"] = NOT_APPLICABLE
    return rows, report


def _tune_magcache(setup, num_steps, target_bound, log, inputs, full_per_image, report) -> RowSpec:
    """MagCache: its own calibration mode gives the magnitude ratios, then the threshold closest to the target."""
    from .generate import torch_generate

    tuning_images = len(inputs[2])
    model = apply_hook("MagCache", setup.torch_model_factory(), {"calibrate": True}, num_steps)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        torch_generate(model, setup.scheduler_config, *inputs[:2], setup.negative, inputs[2],
                       guidance_scale=setup.guidance, num_steps=num_steps)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip().startswith("[")]
    ratios = [float(r) for r in ast.literal_eval(lines[-1])]
    base_params = {"max_skip_steps": 3, "retention_ratio": 0.2, "mag_ratios": ratios}
    sweep = {}
    for th in MAG_THRESHOLDS:
        p = dict(base_params, threshold=th)
        sweep[th] = _hook_bound(setup, "MagCache", p, num_steps, (inputs[0][:1], inputs[1][:1], inputs[2][:1]),
                                1, full_per_image)
        if sweep[th] > 1.5 * target_bound:
            break
    th = min(sweep, key=lambda k: (abs(sweep[k] - target_bound), k))
    report["MagCache"] = {"chosen": dict(base_params, threshold=th),
                          "sweep_bound": {str(k): v for k, v in sweep.items()}}
    log(f"  MagCache: threshold {th} (bound {sweep[th]:.2f}×; ratios calibrated on {tuning_images} images)")
    return RowSpec("MagCache", "pytorch", num_steps, hook="MagCache", params=dict(base_params, threshold=th),
                   note="mag_ratios from its calibration mode; threshold tuned to delta-dit's bound")


# ================================================================ timing


def time_rows(setup: EvalSetup, rows: list[RowSpec], repeats: int, log: Callable[[str], None],
              runtime=None) -> dict[str, dict]:
    """Per-image latency (guidance batch 2) of every row: median of ``repeats`` round-robin runs.

    Repeat r generates image r mod 10 (a different digit and noise each repeat, the same for every row):
    data-dependent caches (FirstBlockCache) are timed on a spread of images, not one lucky one.
    """
    from .generate import runtime_generate, torch_generate

    runtime = runtime or setup.runtime
    models: dict[str, Any] = {}
    fns: dict[str, Callable[[int], Any]] = {}
    n_inputs = min(10, len(setup.noise))
    picks = [int(np.flatnonzero(setup.digits == d % 10)[0]) if np.any(setup.digits == d % 10) else d
             for d in range(n_inputs)]
    for row in rows:
        if row.engine == "runtime":
            schedule = runtime.schedule(row.policy, num_steps=row.num_steps)

            def fn(i, schedule=schedule):
                k = picks[i]
                return runtime_generate(runtime, schedule, setup.embeds[k:k + 1], setup.mask[k:k + 1],
                                        setup.negative, setup.noise[k:k + 1], guidance_scale=setup.guidance)
        else:
            model = setup.torch_model_factory()
            if row.hook:
                apply_hook(row.hook, model, row.params, row.num_steps)
            models[row.name] = model

            def fn(i, model=model, row=row):
                k = picks[i]
                return torch_generate(model, setup.scheduler_config, setup.embeds[k:k + 1], setup.mask[k:k + 1],
                                      setup.negative, setup.noise[k:k + 1], guidance_scale=setup.guidance,
                                      num_steps=row.num_steps)
        fns[row.name] = fn
    for name, fn in fns.items():  # warm-up
        fn(0)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(r % n_inputs)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        ts = np.asarray(ts)
        out[name] = {"median_ms": float(np.median(ts) * 1e3), "min_ms": float(ts.min() * 1e3),
                     "max_ms": float(ts.max() * 1e3), "repeats": repeats}
    return out


# ================================================================ report


def _fmt(v: float | None, spec: str, inf: str = "∞") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return inf
    return format(v, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'row':<26} {'engine':<8} {'T':>3} {'bound':>6} {'ms/img':>7} {'speedup':>8} {'acc %':>6} "
            f"{'FD':>7} {'±':>5} {'PSNR dB':>8} {'max|Δ|':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name']:<26} {r['engine']:<8} {r['num_steps']:>3} {_fmt(r['bound'], '.2f'):>6} "
            f"{_fmt(r['latency_ms'], '.1f'):>7} {_fmt(r['speedup'], '.2f'):>7}× {100 * r['accuracy']:>6.1f} "
            f"{r['fd']:>7.2f} {_fmt(r.get('fd_bootstrap_std'), '.2f'):>5} {_fmt(r['psnr'], '.1f'):>8} "
            f"{_fmt(r['max_abs'], '.3f'):>7}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
    full = next(r for r in rows if r["name"] == "full")
    ax.axhline(full["fd"], color="0.6", lw=0.8, ls="--", label="full compute FD")
    ax.axhspan(full["fd"], full["fd"] * (1 + TARGETS["fd_relative"]), color="0.9", label="within 10% of full FD")
    pts = [r for r in rows if r["speedup"] is not None]
    for r in pts:
        style = {"runtime": ("o", "C0"), "pytorch": ("s", "C1")}[r["engine"]]
        if r["name"].startswith("delta-dit"):
            style = ("*", "C3")
        ax.scatter(r["speedup"], r["fd"], marker=style[0], color=style[1], s=80 if style[0] == "*" else 36, zorder=3)
    # Labels: stack the ones of nearby points vertically so that they stay readable.
    xs = [r["speedup"] for r in pts]
    ys = [r["fd"] for r in pts]
    xr = (max(xs) - min(xs)) or 1.0
    yr = (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    for r in sorted(pts, key=lambda r: (r["fd"], r["speedup"])):
        near = sum(1 for (x, y) in placed if abs(x - r["speedup"]) / xr < 0.12 and abs(y - r["fd"]) / yr < 0.06)
        placed.append((r["speedup"], r["fd"]))
        ax.annotate(r["name"], (r["speedup"], r["fd"]), textcoords="offset points", xytext=(5, -3 + 9 * near),
                    fontsize=7)
    ax.scatter([], [], marker="o", color="C0", label="deltadit runtime (ONNX Runtime) vs its full compute")
    ax.scatter([], [], marker="s", color="C1", label="diffusers hooks (PyTorch) vs PyTorch full compute")
    ax.set_xlabel("measured speedup over full compute (per image, guidance batch 2)")
    ax.set_ylabel("Fréchet distance to real digits (classifier features)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def verdicts(rows: dict[str, dict[str, Any]], boot: dict[str, np.ndarray] | None = None) -> list[str]:
    """Plain sentences: targets met or not, and whether delta-dit beats fewer steps and the output cache.

    With ``boot`` (paired bootstrap FDs per row), each FD comparison also gets the 95% interval of the
    FD difference, so a reader can tell a real difference from sampling noise."""
    full, d = rows["full"], rows["delta-dit"]
    out = []
    acc_gap = 100 * (full["accuracy"] - d["accuracy"])
    fd_rel = d["fd"] / full["fd"] - 1 if full["fd"] > 0 else float("inf")
    checks = [
        (f"delta-dit measured speedup {d['speedup']:.2f}× ≥ {TARGETS['speedup']}×", d["speedup"] >= TARGETS["speedup"]),
        (f"delta-dit accuracy {100 * d['accuracy']:.1f}% within {TARGETS['accuracy_points']:.0f} points of full "
         f"{100 * full['accuracy']:.1f}% (gap {acc_gap:+.1f})", acc_gap <= TARGETS["accuracy_points"]),
        (f"delta-dit FD {d['fd']:.2f} within {100 * TARGETS['fd_relative']:.0f}% of full {full['fd']:.2f} "
         f"({100 * fd_rel:+.1f}%)", fd_rel <= TARGETS["fd_relative"]),
    ]
    out += [f"target {'MET' if ok else 'MISSED'}: {text}" for text, ok in checks]

    for name, r in rows.items():
        if name.startswith("fewer steps") or name == "output-cache":
            out.append(compare_rows(d, r, boot))
    return out


def compare_rows(d: dict[str, Any], other: dict[str, Any], boot: dict[str, np.ndarray] | None = None) -> str:
    """One sentence: does ``d`` beat ``other`` on quality (lower FD and accuracy at least as high)?"""
    fd_better, fd_worse = d["fd"] < other["fd"], d["fd"] > other["fd"]
    acc_better, acc_worse = d["accuracy"] > other["accuracy"], d["accuracy"] < other["accuracy"]
    if (fd_better and not acc_worse) or (acc_better and not fd_worse):
        word = "beats"
    elif (fd_worse and not acc_better) or (acc_worse and not fd_better):
        word = "does NOT beat"
    elif not (fd_better or fd_worse or acc_better or acc_worse):
        word = "ties with"
    else:
        word = "is mixed against"
    return (f"{d['name']} {word} {other['name']} on quality: FD {d['fd']:.2f} vs {other['fd']:.2f}, accuracy "
            f"{100 * d['accuracy']:.1f}% vs {100 * other['accuracy']:.1f}%, PSNR vs full {_fmt(d['psnr'], '.1f')} vs "
            f"{_fmt(other['psnr'], '.1f')} dB; bound {_fmt(d.get('bound'), '.2f')}× vs {_fmt(other.get('bound'), '.2f')}×, "
            f"measured speedup {_fmt(d.get('speedup'), '.2f')}× vs {_fmt(other.get('speedup'), '.2f')}×"
            + _fd_interval(d, other, boot))


def _fd_interval(d, other, boot) -> str:
    if not boot or d["name"] not in boot or other["name"] not in boot:
        return ""
    diff = boot[d["name"]] - boot[other["name"]]
    lo, hi = np.percentile(diff, [2.5, 97.5])
    sig = "significant" if (lo > 0 or hi < 0) else "not significant"
    return (f"; FD difference {d['fd'] - other['fd']:+.2f}, paired-bootstrap 95% interval [{lo:+.2f}, {hi:+.2f}] "
            f"({sig})")


# ================================================================ CLI


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--engines", type=click.Path(file_okay=False), default=None,
              help=f"Export folder (default {DEFAULT_EVAL_ENGINES}, exported from the shipped model with "
                   f"--max-batch {EVAL_MAX_BATCH}; re-exported when the weights change).")
@click.option("--samples-per-digit", type=int, default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise (shared by all rows).")
@click.option("--steps", "num_steps", type=int, default=20, show_default=True)
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance scale (default: the shipped model's, from its model card).")
@click.option("--repeats", type=int, default=15, show_default=True, help="Timed runs per row (median reported).")
@click.option("--threads", type=int, default=None,
              help="CPU threads of ONNX Runtime and PyTorch for the latency measurement (default: all cores).")
@click.option("--gen-threads", type=int, default=None,
              help="Threads for generating the samples (default: --threads); on a shared machine 1 is often faster.")
@click.option("--rows", "only", default=None,
              help="Comma-separated subset of rows (e.g. full,delta-dit,FirstBlockCache); full rows always run.")
@click.option("--no-hooks", is_flag=True, help="Skip the diffusers cache-hook rows.")
@click.option("--tuning-images", type=int, default=10, show_default=True,
              help="Images (other noise than the eval's) on which hook thresholds are chosen.")
@click.option("--out", type=click.Path(file_okay=False), default=str(DEFAULT_OUT), show_default=True,
              help="Folder for quality.json, speedup_vs_fd.png and sample grids.")
@click.option("--work", type=click.Path(file_okay=False), default=None,
              help="Cache of per-row samples (default <engines>.eval-cache next to the export); --work '' disables it.")
@click.option("--trust-artifacts", is_flag=True,
              help="Allow backends whose artifacts can run code when loaded (TensorRT plans, torch .pt2 programs): only "
              "for exports you made or trust. Without it auto uses ONNX Runtime.")
def main(engines, samples_per_digit, seed, num_steps, guidance, repeats, threads, gen_threads, only, no_hooks,
         tuning_images, out, work, trust_artifacts):
    """Measure Δ-DiT's quality and speed on pixart-digits against full compute, fewer steps and other caches."""
    from runtime import DeltaDiTRuntime, ManifestError
    from runtime.schedule import ScheduleError

    from .cli import user_errors
    from .digits import load_digit_split, prompt_for_digit
    from .generate import (
        comparison_image, encode_prompts, grid_image, initial_noise, load_text_encoder,
        rebuild_torch_model, save_png, scheduler_config_of, to_uint8,
    )
    from .models import model_guidance

    t_start = time.perf_counter()
    log = lambda s: click.echo(s, err=True)  # noqa: E731
    torch.set_grad_enabled(False)
    threads = threads or len(os.sched_getaffinity(0))
    gen_threads = gen_threads or threads
    torch.set_num_threads(gen_threads)
    try:
        if engines:
            folder = Path(engines)
        else:
            folder = DEFAULT_EVAL_ENGINES
            from .exporter import ExportOptions, export
            from .progress import Progress

            from runtime.manifest import load_manifest

            from .generate import stale_extras

            opts = ExportOptions(out=str(folder), max_batch=EVAL_MAX_BATCH)
            if (folder / "manifest.json").is_file() and stale_extras(load_manifest(folder)):
                log(f"the shipped model's sampler/encoder config changed since {folder} was exported: re-exporting")
                opts = dataclasses.replace(opts, force=True)
            res = export(opts, Progress(stream=sys.stderr))
            if not res.reused:
                log(res.summary())
        runtime = DeltaDiTRuntime(folder, threads=gen_threads, trust_artifacts=trust_artifacts)
        timing_runtime = runtime if gen_threads == threads else DeltaDiTRuntime(folder, threads=threads,
                                                                                 trust_artifacts=trust_artifacts)
    except (ManifestError, ScheduleError) + user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    m = runtime.manifest
    encoder = load_text_encoder(m, warn=lambda s: log(f"warning: {s}"))
    guidance = guidance if guidance is not None else model_guidance(m.model["name"])
    digits = np.repeat(np.arange(10), samples_per_digit)
    embeds, mask = encode_prompts(encoder, [prompt_for_digit(int(d)) for d in digits])
    negative = encode_prompts(encoder, [""])
    noise = initial_noise(len(digits), tuple(m.sample_shape), seed)
    sched_cfg = scheduler_config_of(m)
    torch_model = rebuild_torch_model(m)
    state = {k: v.clone() for k, v in torch_model.state_dict().items()}

    def factory():
        mdl = type(torch_model).from_config(torch_model.config)
        mdl.load_state_dict(state)
        return mdl.eval().requires_grad_(False)

    # Next to the export, not inside it: a re-export replaces the whole export folder.
    work_dir = None if work == "" else Path(work) if work else folder.parent / f"{folder.name}.eval-cache"
    # Everything a row's samples depend on besides the row itself: engines, sampler config, text encoder, noise.
    fingerprint = json.dumps({"manifest": m.export.get("cache_key"), "segments": [s.sha256 for s in m.segments],
                              "scheduler": sched_cfg, "encoder": encoder.to_config(), "seed": seed, "n": len(digits),
                              "guidance": guidance}, sort_keys=True, default=str)
    setup = EvalSetup(runtime, m, factory, sched_cfg, embeds, mask, negative, noise, digits, guidance, work_dir,
                      fingerprint)

    log(f"training the reference classifier (seed {CLASSIFIER_SEED}) ...")
    clf = reference_classifier(m.sample_shape[-1])
    (xtr, _), (xho, _) = load_digit_split(m.sample_shape[-1])
    ref_stats = feature_stats(clf.features(xtr))
    fd_floor = frechet_distance_from_stats(*feature_stats(clf.features(xho)), *ref_stats)
    log(f"classifier held-out accuracy {clf.held_out_accuracy:.4f}; FD floor (real held-out vs real train) "
        f"{fd_floor:.2f}")

    try:
        rows = runtime_rows(runtime, num_steps)
    except ScheduleError as exc:
        raise click.ClickException(str(exc)) from None
    rows.append(RowSpec("pytorch full", "pytorch", num_steps))
    target = runtime.schedule("delta-dit", num_steps=num_steps).bound
    tuning = {}
    wanted = None if not only else {s.strip() for s in only.split(",")} | {"full", "pytorch full", "delta-dit"}
    hook_names = tuple(h for h in HOOK_ROWS if wanted is None or h in wanted)
    if not no_hooks and hook_names:
        log("choosing diffusers cache-hook settings ...")
        hook_rows, tuning = tune_hooks(setup, num_steps, target, log, tuning_images=tuning_images, names=hook_names)
        rows += hook_rows
    if wanted is not None:
        rows = [r for r in rows if r.name in wanted]

    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, torch.Tensor] = {}
    features: dict[str, np.ndarray] = {}  # classifier features per row: FD now, the paired bootstrap after
    for row in rows:
        g = generate_row(setup, row, log)
        samples[row.name] = g["samples"]
        x = g["samples"]
        pred = clf.predict(x)
        features[row.name] = clf.features(x)
        results[row.name] = {
            "name": row.name, "engine": row.engine, "num_steps": row.num_steps, "policy": row.policy,
            "hook": row.hook, "params": row.params, "note": row.note, "reference": row.reference,
            "accuracy": float(np.mean(pred == digits)),
            "per_digit_accuracy": [float(np.mean(pred[digits == d] == d)) for d in range(10)],
            "fd": frechet_distance_from_stats(*feature_stats(features[row.name]), *ref_stats),
            "generation_seconds": round(g["seconds"], 1), "macs": g["macs"],
            "nonfinite": int((~torch.isfinite(x)).sum()),
        }
        if row.engine == "runtime" and row.policy != "none":
            s = runtime.schedule(row.policy, num_steps=row.num_steps)
            results[row.name].update(bound=s.bound, schedule=s.to_dict())
        elif row.engine == "runtime":
            results[row.name]["bound"] = num_steps / row.num_steps
        took = "cached" if g["cached"] else f"{g['seconds']:.0f} s"
        log(f"  {row.name}: accuracy {100 * results[row.name]['accuracy']:.1f}%, FD {results[row.name]['fd']:.2f} "
            f"({took})")
    boot = bootstrap_fd(features, ref_stats)
    for name, r in results.items():
        r["fd_bootstrap_std"] = float(boot[name].std(ddof=1))
    full_macs = results.get("pytorch full", {}).get("macs")
    for name, r in results.items():
        ref = samples[r["reference"]] if r["reference"] in samples else None
        r["psnr"] = psnr(samples[name], ref) if ref is not None else None
        r["max_abs"] = max_abs(samples[name], ref) if ref is not None else None
        if r["engine"] == "pytorch":
            r["bound"] = full_macs / r["macs"] if full_macs and r["macs"] else None
    if "pytorch full" in results and "full" in samples:
        # Sanity: PyTorch eager and the ONNX Runtime engines compute the same full-compute samples.
        results["pytorch full"]["psnr_vs_runtime_full"] = psnr(samples["pytorch full"], samples["full"])
        results["pytorch full"]["max_abs_vs_runtime_full"] = max_abs(samples["pytorch full"], samples["full"])

    log(f"timing one image per row, {repeats} round-robin repeats ...")
    torch.set_num_threads(threads)
    lat = time_rows(setup, rows, repeats, log, runtime=timing_runtime)
    for name, r in results.items():
        r["latency"] = lat[name]
        r["latency_ms"] = lat[name]["median_ms"]
        r["speedup"] = lat[r["reference"]]["median_ms"] / lat[name]["median_ms"] if r["reference"] in lat else None
    ordered = [results[r.name] for r in rows]

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = (f"{m.model['name']}: {len(digits)} samples/row, T={num_steps}, guidance {guidance}, "
             f"{threads} CPU threads")
    plot_path = plot(ordered, out_dir / "speedup_vs_fd.png", title)
    per = samples_per_digit
    grid_idx = np.concatenate([np.arange(min(10, per)) + d * per for d in range(10)])
    grid_path = save_png(grid_image(to_uint8(samples["delta-dit"][grid_idx]), cols=min(10, per), scale=3),
                         out_dir / "samples_delta-dit.png")
    cmp_path = save_png(comparison_image(samples["full"][grid_idx], samples["delta-dit"][grid_idx], 10,
                                         min(10, per), shown=min(3, per)), out_dir / "compare_full_vs_delta-dit.png")
    lines = verdicts(results, boot) if "delta-dit" in results and "full" in results else []
    report = {
        "model": {"name": m.model["name"], "params": m.model.get("params"), "num_layers": m.num_layers,
                  "cached_blocks": m.cached_blocks, "default_schedule": m.schedule,
                  "weights": m.model.get("source", {}).get("kind")},
        "setup": {"samples_per_row": len(digits), "samples_per_digit": per, "seed": seed, "num_steps": num_steps,
                  "guidance": guidance, "sampler": "DPM-Solver++ (export's scheduler/scheduler_config.json)",
                  "threads": threads, "generation_threads": gen_threads, "timing": f"per image (guidance batch 2), median of {repeats} round-robin "
                  "runs after one warm-up; runtime rows vs runtime full, pytorch rows vs pytorch full",
                  "eval_max_batch": m.max_batch // 2, "cpu": _cpu_name(),
                  "psnr": "pooled over all pixels of all samples, pixels clamped to [-1, 1], range 2",
                  "fd": "Fréchet distance of classifier penultimate features (64-d) to the real train split"},
        "classifier": {"seed": CLASSIFIER_SEED, "held_out_accuracy": clf.held_out_accuracy,
                       "train_accuracy": clf.train_accuracy},
        "fd_floor_real_held_out": fd_floor,
        "hook_tuning": tuning,
        "rows": ordered,
        "verdicts": lines,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    json_path = out_dir / "quality.json"
    json_path.write_text(json.dumps(_finite(report), indent=2, default=_json_default) + "\n")
    click.echo(f"{title}; classifier held-out accuracy {100 * clf.held_out_accuracy:.1f}%; FD floor (real held-out "
               f"digits) {fd_floor:.2f}")
    click.echo(format_table(ordered))
    for line in lines:
        click.echo(line)
    click.echo(f"wrote {json_path}, {plot_path}, {grid_path}, {cmp_path} in {time.perf_counter() - t_start:.0f} s")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _finite(o):
    """JSON has no infinity: ``inf`` (PSNR of identical sets) becomes null."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and math.isinf(o):
        return None
    return str(o)


if __name__ == "__main__":
    main()
