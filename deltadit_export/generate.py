"""``deltadit-generate``: run the exported engines for prompts and write PNGs.

What it does, on the shipped ``pixart-digits`` model by default:

1. loads the export at ``engines/pixart-digits-16-fp32`` (exporting it first, through the exporter
   library, when that folder has no manifest yet);
2. encodes the prompts with the text encoder shipped next to the engines (``text_encoder/``);
3. generates ``--samples`` images per prompt with the Δ-DiT cache and writes ``grid.png`` (one row
   per prompt);
4. generates the same seeds with full compute (runtime policy ``none``) and writes
   ``compare.png``: per prompt, full compute | Δ-DiT | 4× amplified absolute difference;
5. times one image (classifier-free guidance, so the engines run batch 2) with PyTorch eager (the
   diffusers model rebuilt from the weights the manifest records, same scheduler, same noise),
   runtime ``none`` and runtime ``delta-dit``: warm-up, then the median of ``--repeats`` runs taken
   round-robin, so a load change on the machine hits every mode alike.

The helpers here (text encoder, scheduler, the PyTorch eager sampling loop, image grids) are shared
with the quality harness (``deltadit-eval``) and calibration (``deltadit-export --calibrate``).
Pixel-space models only: a latent model (pixart-alpha, DiT-XL/2) would need its VAE to make images.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import click
import numpy as np
import torch

from .models import DEFAULT_GUIDANCE, model_guidance

DEFAULT_MODEL = "pixart-digits"
DEFAULT_ENGINES = Path("engines") / "pixart-digits-16-fp32"
DEFAULT_SAMPLES = 8
IMAGE_SCALE = 4  # nearest-neighbour upscaling of the 16×16 digits in the PNGs


def default_prompts() -> list[str]:
    from .digits import prompt_for_digit

    return [prompt_for_digit(d) for d in range(10)]


# ---------------------------------------------------------------- export, runtime, conditioning


def ensure_export(folder: str | Path, *, model: str = DEFAULT_MODEL, max_batch: int = 4, quiet: bool = False,
                  **options) -> Path:
    """The export at ``folder``; exports ``model`` there first (exporter library) when it has no manifest."""
    from runtime.manifest import MANIFEST_NAME

    folder = Path(folder)
    if (folder / MANIFEST_NAME).is_file():
        return folder
    from .exporter import ExportOptions, export
    from .progress import Progress

    if not quiet:
        click.echo(f"no export at {folder}: exporting {model} first", err=True)
    result = export(ExportOptions(model=model, out=str(folder), max_batch=max_batch, **options),
                    Progress(stream=sys.stderr, quiet=quiet))
    if not quiet:
        click.echo(result.summary(), err=True)
    return folder


def stale_extras(manifest) -> list[str]:
    """Config files of the shipped model's ``text_encoder/`` and ``scheduler/`` that differ from (or are missing
    in) the copies next to the engines. The export's reuse check hashes the transformer weights only, so an
    updated scheduler config alone does not trigger a re-export: callers warn or re-export with ``force``."""
    from .models import PACKAGE_WEIGHTS, REGISTRY

    spec = REGISTRY.get(manifest.model.get("name"))
    if spec is None or not spec.bundled or manifest.root is None:
        return []
    src = PACKAGE_WEIGHTS / spec.bundled
    out = []
    for sub in ("text_encoder", "scheduler"):
        for f in sorted((src / sub).glob("*.json")) if (src / sub).is_dir() else []:
            copy = manifest.root / sub / f.name
            if not copy.is_file() or copy.read_bytes() != f.read_bytes():
                out.append(f"{sub}/{f.name}")
    return out


def load_text_encoder(manifest, warn: Callable[[str], None] | None = None):
    """The caption encoder shipped next to the engines (``text_encoder/config.json``).

    Falls back to a fresh ``HashedWordEncoder`` of the engines' caption shape when the folder has none
    (e.g. an export of an untrained stand-in model); ``warn`` is told so.
    """
    from runtime.text_encoder import HashedWordEncoder, HashedWordEncoderConfig

    cond = manifest.conditioning
    if cond.get("kind") != "caption":
        raise click.ClickException(f"{manifest.model['name']} is not caption-conditioned; deltadit-generate takes "
                                   "prompts (pixart-digits)")
    sub = cond.get("text_encoder")
    if sub and manifest.root is not None and (manifest.root / sub / "config.json").is_file():
        return HashedWordEncoder.load(manifest.root / sub)
    encoder = HashedWordEncoder(HashedWordEncoderConfig(dim=int(cond["channels"]), max_tokens=int(cond["tokens"])))
    if warn is not None:
        warn(f"no text_encoder/ next to the engines in {manifest.root}: using {encoder!r}; prompts mean nothing to a "
             "model that was not trained with it")
    return encoder


def encode_prompts(encoder, prompts: Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
    states, mask = encoder.encode(list(prompts))
    return torch.from_numpy(states), torch.from_numpy(mask)


def scheduler_config_of(manifest) -> dict:
    """The DPM-Solver++ config the runtime samples with (shipped ``scheduler/`` or the runtime default)."""
    from runtime.sampling import default_scheduler

    class _Root:  # default_scheduler only reads ``.root``
        root = manifest.root

    return dict(default_scheduler(_Root()).config)


def make_scheduler(config: dict):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config)


def rebuild_torch_model(manifest):
    """The diffusers model the export came from, fp32 eval mode, from what the manifest records."""
    from .models import WeightsSource, build_model, get_spec

    src = dict(manifest.model["source"])
    source = WeightsSource(**src)
    return build_model(get_spec(manifest.model["name"]), source, manifest.model["config"])


def initial_noise(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise of ``count`` samples from one ``torch.Generator(seed)``, in order: sample i always gets the same noise."""
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


# ---------------------------------------------------------------- sampling (runtime and PyTorch eager)


def runtime_generate(runtime, policy, embeds: torch.Tensor, mask: torch.Tensor, negative: tuple[torch.Tensor, torch.Tensor],
                     noise: torch.Tensor, *, guidance_scale: float = DEFAULT_GUIDANCE, num_steps: int | None = None,
                     chunk: int | None = None) -> torch.Tensor:
    """Final samples of the runtime for one conditioning row per noise row, in chunks the engines accept."""
    from runtime.sampling import generate

    per_row = 2 if guidance_scale > 1.0 else 1
    chunk = chunk or max(1, runtime.manifest.max_batch // per_row)
    neg_e, neg_m = negative
    out = []
    for i in range(0, len(noise), chunk):
        n = len(noise[i:i + chunk])
        res = generate(runtime, prompt_embeds=embeds[i:i + n], prompt_mask=mask[i:i + n],
                       negative_embeds=neg_e.expand(n, -1, -1), negative_mask=neg_m.expand(n, -1),
                       guidance_scale=guidance_scale, policy=policy, num_steps=num_steps, latents=noise[i:i + n])
        out.append(res.latents)
    return torch.cat(out)


def has_cache_hooks(model) -> bool:
    """Whether any diffusers hook is registered on ``model`` or a submodule."""
    return any(hasattr(mod, "_diffusers_hook") for mod in model.modules())


@contextmanager
def cache_context(model, name: str, **fields):
    """diffusers' per-call cache context (what ``CacheMixin.cache_context`` does; PixArt lacks the mixin).

    Also publishes the current timestep as ``model.current_timestep`` for hooks that take a
    ``current_timestep_callback`` (Pyramid Attention Broadcast, FasterCache).
    """
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    model.current_timestep = fields.get("timestep")
    _set_cache_context(model, CacheContext(name, **fields))
    try:
        yield
    finally:
        _set_cache_context(model, None)


def reset_cache_hooks(model) -> None:
    """Forget every diffusers cache hook's state: a new generation must not start from an old one's cache."""
    from diffusers.hooks import HookRegistry

    if has_cache_hooks(model):
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)


def _call(model, x, t, states, mask):
    return model(x, encoder_hidden_states=states, timestep=t, encoder_attention_mask=mask,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


@torch.no_grad()
def torch_generate(model, scheduler_config: dict, embeds: torch.Tensor, mask: torch.Tensor,
                   negative: tuple[torch.Tensor, torch.Tensor], noise: torch.Tensor, *,
                   guidance_scale: float = DEFAULT_GUIDANCE, num_steps: int = 20, chunk: int | None = None,
                   forward: Callable | None = None) -> torch.Tensor:
    """The same sampling loop as ``runtime.sampling.generate``, on the diffusers model in PyTorch eager.

    Same scheduler config, same noise scaling, guided batch (runtime/guidance.py), guidance and timesteps as
    float32 (what the engines take). diffusers cache hooks on ``model`` get a fresh state per chunk and
    one cache context per call (``"cond_uncond"``: both halves run as one batch). ``forward(x, t, states,
    mask)`` replaces the model call (calibration's Δ-DiT stepper uses it).
    """
    from runtime.guidance import Guidance

    chunk = chunk or len(noise)
    neg_e, neg_m = negative
    channels = noise.shape[1]
    # PixArt's guided batch and step, as PixArtAlphaPipeline (and runtime.generate) do them.
    guide = Guidance("pixart", guidance_scale, channels, int(getattr(model, "out_channels", None) or channels))
    hooked = forward is None and has_cache_hooks(model)
    out = []
    for i in range(0, len(noise), chunk):
        n = len(noise[i:i + chunk])
        sched = make_scheduler(scheduler_config)
        sched.set_timesteps(num_steps)
        x = guide.start(noise[i:i + n].to(torch.float32) * sched.init_noise_sigma, sched)
        states = guide.batch(embeds[i:i + n], neg_e.expand(n, -1, -1))
        m = guide.batch(mask[i:i + n], neg_m.expand(n, -1))
        rows = len(states)
        if hooked:
            reset_cache_hooks(model)
        for step, t in enumerate(sched.timesteps):
            xin = sched.scale_model_input(guide.model_input(x), t)
            tt = torch.full((rows,), float(t), dtype=torch.float32)
            if forward is not None:
                eps = forward(xin, tt, states, m)
            elif hooked:
                sigma = float(sched.sigmas[step]) if hasattr(sched, "sigmas") else None
                with cache_context(model, "cond_uncond", step_index=step, num_inference_steps=num_steps,
                                   timestep=float(t), sigma=sigma):
                    eps = _call(model, xin, tt, states, m)
            else:
                eps = _call(model, xin, tt, states, m)
            x = guide.step(sched, eps.float(), t, x, num_steps=num_steps)
        if hooked:
            reset_cache_hooks(model)
        out.append(guide.result(x))
    return torch.cat(out)


# ---------------------------------------------------------------- images


def to_uint8(samples: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[N,1,H,W]`` pixels in [-1, 1] → uint8 ``[N,H,W]`` (clamped, as the PNGs show them)."""
    x = torch.as_tensor(samples).float().clamp(-1, 1)
    return ((x[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()


def grid_image(images: np.ndarray, cols: int, scale: int = IMAGE_SCALE, pad: int = 2, gap_every: int = 0,
               gap: int = 6) -> np.ndarray:
    """uint8 ``[N,H,W]`` → one uint8 grid (row-major, white padding; an extra gap after every ``gap_every`` cols)."""
    n, h, w = images.shape
    rows = (n + cols - 1) // cols
    H, W = h * scale, w * scale
    extra = lambda c: (c // gap_every) * gap if gap_every else 0  # noqa: E731
    width = pad + cols * (W + pad) + extra(cols - 1)
    grid = np.full((pad + rows * (H + pad), width), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad) + extra(c)
        grid[y:y + H, x:x + W] = np.kron(img, np.ones((scale, scale), dtype=np.uint8))
    return grid


def save_png(array: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="L").save(path)
    return path


def comparison_image(full: torch.Tensor, delta: torch.Tensor, prompts: int, per_prompt: int, shown: int) -> np.ndarray:
    """Per prompt row: ``shown`` triples (full | Δ-DiT | 4×|difference|, inverted so white = equal)."""
    a, b = to_uint8(full), to_uint8(delta)
    diff = 255 - np.clip(4 * np.abs(a.astype(np.int16) - b.astype(np.int16)), 0, 255).astype(np.uint8)
    tiles = []
    for p in range(prompts):
        for s in range(shown):
            k = p * per_prompt + s
            tiles += [a[k], b[k], diff[k]]
    return grid_image(np.stack(tiles), cols=3 * shown, gap_every=3)


# ---------------------------------------------------------------- timing


def median_latency(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function; repeats are taken round-robin across the functions."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------- CLI


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--engines", type=click.Path(file_okay=False), default=None,
              help=f"Export folder (default {DEFAULT_ENGINES}; exported first if it has no manifest).")
@click.option("--prompt", "prompts", multiple=True, help="Prompt (repeatable). Default: 'a handwritten digit 0'..'9'.")
@click.option("--samples", type=int, default=DEFAULT_SAMPLES, show_default=True, help="Images per prompt.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--steps", "num_steps", type=int, default=None, help="Denoising steps T (default: the manifest's, 20).")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance scale (default: the shipped model's, from its model card; else 4.5).")
@click.option("--policy", default="delta-dit", show_default=True,
              help="Cache policy of the grid: delta-dit, delta-front, delta-rear, output-cache, none.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for grid.png and compare.png (default: the export folder).")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed runs per mode (median reported).")
@click.option("--no-timing", is_flag=True, help="Skip the latency comparison.")
@click.option("--threads", type=int, default=None, help="CPU threads of ONNX Runtime and PyTorch (default: all cores).")
@click.option("--trust-artifacts", is_flag=True,
              help="Allow backends whose artifacts can run code when loaded (TensorRT plans, torch .pt2 programs): only "
              "for exports you made or trust. Without it auto uses ONNX Runtime.")
@click.option("-q", "--quiet", is_flag=True, help="No export progress output.")
def main(engines, prompts, samples, seed, num_steps, guidance, policy, out, repeats, no_timing, threads, trust_artifacts,
         quiet):
    """Generate images with the exported engines and the Δ-DiT cache; compare with full compute and PyTorch eager."""
    from runtime import DeltaDiTRuntime, ManifestError
    from runtime.schedule import ScheduleError

    from .cli import user_errors
    from .evaluate import psnr

    t_start = time.perf_counter()
    torch.set_grad_enabled(False)
    if samples < 1 or repeats < 1 or (threads is not None and threads < 1):
        raise click.ClickException("--samples, --repeats and --threads must be ≥ 1")
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    try:
        folder = Path(engines) if engines else ensure_export(DEFAULT_ENGINES, quiet=quiet)
        runtime = DeltaDiTRuntime(folder, threads=threads, trust_artifacts=trust_artifacts)
        m = runtime.manifest
        if m.export.get("vae_scale_factor", 8) != 1:
            raise click.ClickException(f"{m.model['name']} works in a VAE latent space; deltadit-generate writes "
                                       "images for pixel-space models (pixart-digits) only")
        encoder = load_text_encoder(m, warn=lambda s: click.echo(f"warning: {s}", err=True))
        stale = stale_extras(m)
        if stale:
            click.echo(f"warning: {', '.join(stale)} in {folder} differ from the shipped {m.model['name']}: this export "
                       "predates the model's current sampler/encoder config; re-export with `deltadit-export --force`",
                       err=True)
        guidance = guidance if guidance is not None else model_guidance(m.model["name"])
        schedule = runtime.schedule(policy, num_steps=num_steps)
        full_schedule = runtime.schedule("none", num_steps=schedule.num_steps)
    except (ManifestError, ScheduleError) + user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    prompts = list(prompts) or default_prompts()
    out_dir = Path(out) if out else folder
    P, S = len(prompts), samples
    embeds, mask = encode_prompts(encoder, [p for p in prompts for _ in range(S)])
    negative = encode_prompts(encoder, [""])
    noise = initial_noise(P * S, tuple(m.sample_shape), seed)

    t0 = time.perf_counter()
    delta = runtime_generate(runtime, schedule, embeds, mask, negative, noise, guidance_scale=guidance)
    t_delta = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = runtime_generate(runtime, full_schedule, embeds, mask, negative, noise, guidance_scale=guidance)
    t_full = time.perf_counter() - t0
    if not (torch.isfinite(delta).all() and torch.isfinite(full).all()):
        raise click.ClickException("the generated samples contain NaN/Inf")
    grid_path = save_png(grid_image(to_uint8(delta), cols=S), out_dir / "grid.png")
    cmp_path = save_png(comparison_image(full, delta, P, S, shown=min(S, 3)), out_dir / "compare.png")

    s = schedule
    click.echo(f"{m.model['name']}: {P} prompts × {S} samples, T={s.num_steps}, guidance {guidance}, seed {seed}; "
               f"policy {s.policy} (N={s.interval}, N_c={s.cached_blocks}, b={s.boundary}: {s.block_runs} of "
               f"{s.num_steps * s.num_layers} block-runs, bound {s.bound:.2f}×)")
    click.echo(f"  batched generation: {s.policy} {t_delta:.1f} s, full compute {t_full:.1f} s "
               f"({t_full / t_delta:.2f}×) for {P * S} images, {runtime.manifest.max_batch // 2} per engine call")
    click.echo(f"  {s.policy} vs full compute, same seeds: PSNR {psnr(delta, full):.1f} dB, "
               f"max |Δpixel| {float((delta.clamp(-1, 1) - full.clamp(-1, 1)).abs().max()):.3f} (range [-1, 1])")

    if not no_timing:
        model = rebuild_torch_model(m)
        sched_cfg = scheduler_config_of(m)
        one = (embeds[:1], mask[:1], negative, noise[:1])
        fns = {
            "pytorch eager": lambda: torch_generate(model, sched_cfg, *one, guidance_scale=guidance,
                                                    num_steps=s.num_steps),
            "runtime none": lambda: runtime_generate(runtime, full_schedule, *one, guidance_scale=guidance),
            f"runtime {s.policy}": lambda: runtime_generate(runtime, schedule, *one, guidance_scale=guidance),
        }
        lat = median_latency(fns, repeats)
        eager, none = lat["pytorch eager"], lat["runtime none"]
        click.echo(f"latency per image (T={s.num_steps}, guidance batch 2, fp32, {torch.get_num_threads()} threads; "
                   f"median of {repeats} round-robin runs after a warm-up):")
        click.echo(f"  {'mode':<22} {'ms/image':>9} {'vs eager':>9} {'vs none':>8}")
        for name, sec in lat.items():
            click.echo(f"  {name:<22} {sec * 1e3:>9.1f} {eager / sec:>8.2f}× {none / sec:>7.2f}×")
    click.echo(f"wrote {grid_path} (grid, {s.policy}: one row per prompt) and {cmp_path} (per prompt: full | "
               f"{s.policy} | 4×|difference|) in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
