#!/usr/bin/env python
"""Train the embedded ``pixart-digits`` model: a 12-block PixArt transformer on sklearn digits.

Why: the product must export and generate real images on a fresh machine with no downloads,
and the Δ-DiT cache's quality claims are measured on this model. It is a real
``diffusers.PixArtTransformer2DModel`` (adaLN-single, cross-attention on caption states),
only small, trained in pixel space on 16x16 digits, conditioned on captions from the
weight-free ``runtime.text_encoder.HashedWordEncoder``.

Recipe (all seeded; defaults):
  * data: the train split of ``deltadit_export.digits`` (1438 of 1797 digits; the held-out
    359 are never trained on), 16x16 pixels in [-1, 1], 1 channel;
  * model: 12 blocks x width 96 (4 heads x 24), patch 2 (64 tokens), caption_channels 64,
    in_channels = out_channels = 1 (no learned sigma: the sampler is DPM-Solver++, which
    does not use a variance), PixArt's own initialisation (xavier linears, zeroed
    cross-attention output and final projection);
  * diffusion: 1000-step DDPM, "squaredcos_cap_v2" (cosine) betas, epsilon prediction.
    Cosine, because at 16x16 a linear schedule destroys the signal early and wastes most
    timesteps on near-pure noise (Nichol & Dhariwal 2021, "Improved DDPM", Sec. 3.2);
    Min-SNR-5 loss weighting (Hang et al. 2023) for faster convergence;
  * captions "a handwritten digit D", dropped to "" (the unconditional prompt) with p=0.1;
  * AdamW (lr 5e-4, betas 0.9/0.999, wd 0.01), linear warmup then cosine decay to 10%,
    grad-norm clip 1.0, EMA of the weights (decay 0.999 with the usual 1+n/10+n warmup);
    the EMA weights are shipped;
  * sampling check: DPM-Solver++ (2nd order, 20 steps, x0 clipped to [-1, 1]) from the
    shipped scheduler config, classifier-free guidance (default 3.0), full compute in
    PyTorch, 50 samples per digit from fixed seeds, classified by
    ``deltadit_export.digits.train_digit_classifier``; also a Fréchet distance of its
    features to the held-out real digits, and the samples' value range.

Output (written to a temporary sibling directory, then renamed into place)::

    OUT/transformer/{config.json, diffusion_pytorch_model.safetensors}
    OUT/scheduler/scheduler_config.json     DPMSolverMultistepScheduler, training betas
    OUT/text_encoder/config.json            HashedWordEncoder
    OUT/model_card.md, loss_curve.png, samples.png, loss.csv, training_summary.json

``--resample`` re-runs only the sampling check (e.g. another guidance scale) on an existing
OUT and rewrites its card, samples and summary, without training.

Usage::

    python tools/train_digits.py --iterations 6000 --minutes 55
    python tools/train_digits.py --resample --guidance 3 --guidance-sweep 2,4.5
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from deltadit_export.digits import (  # noqa: E402
    load_digit_split,
    prompt_for_digit,
    train_digit_classifier,
)
from runtime.text_encoder import HashedWordEncoder, HashedWordEncoderConfig  # noqa: E402

DEFAULT_OUT = REPO / "deltadit_export" / "weights" / "pixart-digits"
NUM_LAYERS = 12  # the schedule math (N_c = round(0.75 * 12) = 9) assumes exactly 12 blocks
SIZE = 16
PATCH = 2


# ----------------------------------------------------------------------------------------
# model, schedulers, conditioning
# ----------------------------------------------------------------------------------------
def build_model(width: int, heads: int, caption_dim: int, layers: int = NUM_LAYERS):
    from diffusers import PixArtTransformer2DModel

    if width % heads:
        raise SystemExit(f"--width {width} is not divisible by --heads {heads}")
    model = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        in_channels=1,
        out_channels=1,
        num_layers=layers,
        cross_attention_dim=width,
        sample_size=SIZE,
        patch_size=PATCH,
        norm_type="ada_norm_single",
        caption_channels=caption_dim,
        use_additional_conditions=False,
    )
    pixart_init(model)
    return model


def pixart_init(model) -> None:
    """PixArt-α's initialisation (its ``initialize_weights``), mapped onto diffusers names.

    xavier-uniform linears with zero bias; patch embedding as a flattened linear; N(0, 0.02)
    for the timestep MLP, the adaLN-single projection and the caption MLP; zero for every
    cross-attention output projection and for the final projection, so the untrained
    model predicts eps = 0 and each block starts close to identity in its caption path.
    """
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    w = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.pos_embed.proj.bias)
    te = model.adaln_single.emb.timestep_embedder
    nn.init.normal_(te.linear_1.weight, std=0.02)
    nn.init.normal_(te.linear_2.weight, std=0.02)
    nn.init.normal_(model.adaln_single.linear.weight, std=0.02)
    nn.init.normal_(model.caption_projection.linear_1.weight, std=0.02)
    nn.init.normal_(model.caption_projection.linear_2.weight, std=0.02)
    for block in model.transformer_blocks:
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=False,
        variance_type="fixed_small",
    )


def sampling_scheduler(train_sched, thresholding: bool):
    """The DPM-Solver++ shipped in ``scheduler/``: training betas, 2nd order, 20 steps.

    ``thresholding`` (default on) clips DPM-Solver++'s x0 prediction to [-1, 1] (dynamic
    thresholding with ``sample_max_value=1``, i.e. plain clipping for pixel data). It is
    needed here: the cosine schedule has near-zero SNR at t=999 (alpha_999 ~ 1e-4), so the
    x0 = (x - sigma*eps)/alpha conversion at the first step multiplies the eps error by
    ~1e4, and without clipping the samples end at |x| ~ 1e3-1e4 (seen: the classifier
    still reads 96% of those from their sign pattern, so accuracy alone hides it).
    """
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(
        train_sched.config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        variance_type=None,
        lower_order_final=True,
        thresholding=thresholding,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0,
    )


def write_scheduler(work: Path, scheduler) -> dict:
    """``save_pretrained`` (not a dump of ``.config``): it drops diffusers' private
    ``_use_default_values`` list, whose keys ``from_config`` would otherwise silently reset
    to defaults, and adds ``_class_name`` so ``from_pretrained`` works."""
    scheduler.save_pretrained(work / "scheduler")
    return json.loads((work / "scheduler" / "scheduler_config.json").read_text())


def encode(encoder: HashedWordEncoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    states, mask = encoder.encode(prompts)
    return torch.from_numpy(states), torch.from_numpy(mask)


def model_eps(model, x, t, states, mask):
    return model(
        x,
        encoder_hidden_states=states,
        timestep=t,
        encoder_attention_mask=mask,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]


# ----------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------
def lr_at(it: int, args, time_fraction: float = 0.0) -> float:
    """Linear warmup, then cosine decay to ``final_lr_fraction * lr``.

    Progress is the larger of iteration progress and wall-clock progress (``time_fraction``
    of ``--minutes``), so the decay always finishes by the time budget even when the shared
    CPU is slower than planned. With a generous ``--minutes`` it is purely iteration-based.
    """
    if it < args.warmup:
        return args.lr * (it + 1) / args.warmup
    p = (it - args.warmup) / max(1, args.iterations - args.warmup)
    p = min(1.0, max(p, time_fraction))
    lo = args.lr * args.final_lr_fraction
    return lo + 0.5 * (args.lr - lo) * (1 + math.cos(math.pi * p))


class ThreadTuner:
    """Picks torch's thread count on a shared machine.

    With 2 threads on 2 cores that other jobs also use, every parallel region waits for
    whichever thread was descheduled, and an iteration can take 3-5x longer than with 1
    thread (measured here). ``"auto"`` re-measures every ``window`` iterations: 8 timed
    iterations at each candidate count, then the faster one for the rest of the window.
    A fixed number disables this.
    """

    def __init__(self, spec: str, window: int = 200, probe: int = 8) -> None:
        self.auto = spec == "auto"
        self.candidates = [1, 2] if self.auto else [int(spec)]
        self.window, self.probe = window, probe
        self.current = self.candidates[-1]
        self.times: dict[int, list[float]] = {}
        self.history: list[tuple[int, int]] = []  # (iteration, chosen threads)
        self._t = 0.0
        torch.set_num_threads(self.current)
        if not self.auto:
            self.history.append((0, self.current))

    def before(self, it: int) -> None:
        if self.auto:
            k = it % self.window
            n = len(self.candidates) * self.probe
            if k < n:
                want = self.candidates[k // self.probe]
            elif k == n:
                med = {c: float(np.median(v[1:])) for c, v in self.times.items()}  # drop the first (warm-up)
                want = min(med, key=med.get)
                self.history.append((it, want))
                self.times = {}
            else:
                want = self.current
            if want != self.current:
                torch.set_num_threads(want)
                self.current = want
        self._t = time.perf_counter()

    def after(self, it: int) -> None:
        if self.auto and it % self.window < len(self.candidates) * self.probe:
            self.times.setdefault(self.current, []).append(time.perf_counter() - self._t)


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model, step: int, max_decay: float) -> None:
    decay = min(max_decay, (1 + step) / (10 + step))
    for name, p in model.named_parameters():
        ema[name].lerp_(p.detach(), 1 - decay)


@torch.no_grad()
def held_out_mse(model, sched, x0, y, cond_states, cond_mask, seed: int) -> float:
    """Unweighted eps-MSE on held-out digits at fixed (t, noise): a comparable validation curve."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = sched.add_noise(x0, noise, t)
    model.eval()
    err = []
    for i in range(0, len(x0), 256):
        sl = slice(i, i + 256)
        eps = model_eps(model, xt[sl], t[sl], cond_states[y[sl]], cond_mask[y[sl]])
        err.append(((eps - noise[sl]) ** 2).mean(dim=(1, 2, 3)))
    model.train()
    return float(torch.cat(err).mean())


def train(args, work: Path) -> dict:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    (xtr, ytr), (xho, yho) = load_digit_split(SIZE)
    xtr, ytr = torch.from_numpy(xtr), torch.from_numpy(ytr)
    xho, yho = torch.from_numpy(xho), torch.from_numpy(yho)

    encoder = HashedWordEncoder(HashedWordEncoderConfig(dim=args.caption_dim, max_tokens=args.max_tokens,
                                                        seed=args.encoder_seed))
    # Rows 0..9: the digit prompts; row 10: the empty (unconditional) prompt.
    cond_states, cond_mask = encode(encoder, [prompt_for_digit(d) for d in range(10)] + [""])
    uncond = 10

    sched = training_scheduler()
    alphas_cumprod = sched.alphas_cumprod.to(torch.float32)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=args.min_snr_gamma) / snr if args.min_snr_gamma > 0 else torch.ones_like(snr)

    model = build_model(args.width, args.heads, args.caption_dim).train()
    n_params = sum(p.numel() for p in model.parameters())
    ema = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    print(f"model: 12 blocks x {args.width} ({args.heads} heads), {n_params:,} params; "
          f"{len(xtr)} train / {len(xho)} held-out digits", flush=True)

    csv_path = work / "loss.csv"
    fcsv = open(csv_path, "w", newline="")
    writer = csv.writer(fcsv)
    writer.writerow(["iteration", "elapsed_s", "lr", "loss", "mse", "held_out_mse"])

    threads = ThreadTuner(args.threads)
    t_start = time.time()
    deadline = t_start + args.minutes * 60
    perm, pos = torch.randperm(len(xtr), generator=g), 0
    it = 0
    recent = []
    for it in range(args.iterations):
        if time.time() > deadline:
            print(f"time budget of {args.minutes} min reached at iteration {it}", flush=True)
            break
        if pos + args.batch > len(perm):
            perm, pos = torch.randperm(len(xtr), generator=g), 0
        idx = perm[pos : pos + args.batch]
        pos += args.batch
        x0, y = xtr[idx], ytr[idx].clone()
        y[torch.rand(len(y), generator=g) < args.prompt_dropout] = uncond
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = sched.add_noise(x0, noise, t)

        lr = lr_at(it, args, (time.time() - t_start) / (args.minutes * 60))
        threads.before(it)
        for group in opt.param_groups:
            group["lr"] = lr
        eps = model_eps(model, xt, t, cond_states[y], cond_mask[y])
        per_sample = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        ema_update(ema, model, it, args.ema_decay)
        threads.after(it)

        mse = float(per_sample.detach().mean())
        recent.append((float(loss.detach()), mse))
        val = ""
        if (it + 1) % args.eval_every == 0 or it == args.iterations - 1:
            # Validate the EMA weights (the ones shipped).
            live = {k: p.detach().clone() for k, p in model.named_parameters()}
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(ema[k])
            val = held_out_mse(model, sched, xho, yho, cond_states, cond_mask, seed=1234)
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(live[k])
        writer.writerow([it + 1, f"{time.time() - t_start:.1f}", f"{lr:.6g}", f"{float(loss):.6f}",
                         f"{mse:.6f}", "" if val == "" else f"{val:.6f}"])
        if (it + 1) % args.log_every == 0 or val != "":
            fcsv.flush()
            el = time.time() - t_start
            last = recent[-args.log_every:]
            print(f"it {it + 1:5d}  {el / 60:6.1f} min  {el / (it + 1):.2f} s/it  {threads.current}T  lr {lr:.2e}  "
                  f"loss {np.mean([a for a, _ in last]):.4f}  mse {np.mean([b for _, b in last]):.4f}"
                  + ("" if val == "" else f"  held-out mse (EMA) {val:.4f}"), flush=True)
        if args.checkpoint_every and (it + 1) % args.checkpoint_every == 0:
            torch.save({"ema": ema, "iteration": it + 1}, work / "checkpoint_ema.pt")
    else:
        it = args.iterations
    iterations_done = it if it < args.iterations else args.iterations
    train_seconds = time.time() - t_start
    fcsv.close()

    # Ship the EMA weights.
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(ema[k])
    model.eval()
    model.save_pretrained(work / "transformer", safe_serialization=True)
    (work / "checkpoint_ema.pt").unlink(missing_ok=True)
    encoder.save(work / "text_encoder")
    write_scheduler(work, sampling_scheduler(sched, args.thresholding))

    tail = recent[-100:]
    rows = list(csv.DictReader(open(csv_path)))
    vals = [float(r["held_out_mse"]) for r in rows if r["held_out_mse"]]
    plot_loss(rows, work / "loss_curve.png")
    return {
        "architecture": {
            "class": "PixArtTransformer2DModel", "num_layers": NUM_LAYERS, "width": args.width,
            "num_attention_heads": args.heads, "attention_head_dim": args.width // args.heads,
            "caption_channels": args.caption_dim, "caption_tokens": args.max_tokens,
            "in_channels": 1, "out_channels": 1, "sample_size": SIZE, "patch_size": PATCH,
            "tokens": (SIZE // PATCH) ** 2, "parameters": n_params,
        },
        "training": {
            "seed": args.seed, "encoder_seed": args.encoder_seed, "split_seed": 0,
            "train_images": len(xtr), "held_out_images": len(xho),
            "iterations": iterations_done, "iterations_planned": args.iterations, "minutes": args.minutes,
            "batch": args.batch, "train_seconds": round(train_seconds, 1),
            "lr": args.lr, "warmup": args.warmup, "final_lr_fraction": args.final_lr_fraction,
            "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "ema_decay": args.ema_decay,
            "prompt_dropout": args.prompt_dropout, "min_snr_gamma": args.min_snr_gamma,
            "noise_schedule": "DDPM 1000 steps, squaredcos_cap_v2, epsilon prediction",
            "final_loss_weighted_last100": float(np.mean([a for a, _ in tail])),
            "final_mse_last100": float(np.mean([b for _, b in tail])),
            "final_held_out_mse_ema": vals[-1] if vals else None,
            "threads": args.threads,
            "thread_choices": threads.history,
            "torch": torch.__version__,
        },
    }


def plot_loss(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = np.array([int(r["iteration"]) for r in rows])
    mse = np.array([float(r["mse"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])

    def smooth(v, k=50):
        if len(v) < k:
            return v
        c = np.cumsum(np.insert(v, 0, 0.0))
        out = (c[k:] - c[:-k]) / k
        return np.concatenate([v[: k - 1] * 0 + out[0], out])

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(its, mse, color="0.85", lw=0.5)
    ax.plot(its, smooth(mse), label="train eps-MSE (50-it mean)")
    ax.plot(its, smooth(loss), label="train Min-SNR-weighted loss (50-it mean)")
    vi = [(int(r["iteration"]), float(r["held_out_mse"])) for r in rows if r["held_out_mse"]]
    if vi:
        ax.plot(*zip(*vi), "o-", ms=3, label="held-out eps-MSE, EMA weights")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("pixart-digits training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# sampling check
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def sample_digits(model, sched_cfg: dict, encoder: HashedWordEncoder, digits: torch.Tensor, guidance: float,
                  seed: int, steps: int = 20, batch: int = 250) -> torch.Tensor:
    """Full-compute PyTorch sampling with DPM-Solver++ and classifier-free guidance.

    The initial noise for the whole set comes from one ``torch.Generator(seed)`` in order,
    so sample i always starts from the same noise.
    """
    from diffusers import DPMSolverMultistepScheduler

    noise = torch.randn((len(digits), 1, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))
    cs, cm = encode(encoder, [prompt_for_digit(d) for d in range(10)])
    us, um = encode(encoder, [""])
    out = []
    for i in range(0, len(digits), batch):
        d = digits[i : i + batch]
        n = len(d)
        sched = DPMSolverMultistepScheduler.from_config(sched_cfg)
        sched.set_timesteps(steps)
        x = noise[i : i + batch] * sched.init_noise_sigma
        states = torch.cat([us.expand(n, -1, -1), cs[d]])
        mask = torch.cat([um.expand(n, -1), cm[d]])
        for t in sched.timesteps:
            xin = sched.scale_model_input(torch.cat([x, x]), t)
            eps = model_eps(model, xin, t.expand(2 * n), states, mask)
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x, return_dict=False)[0]
        out.append(x)
    return torch.cat(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula)."""
    import scipy.linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(ca @ cb)
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def save_grid(samples: torch.Tensor, path: Path, per_row: int = 10, scale: int = 4) -> None:
    from PIL import Image

    x = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    rows = len(x) // per_row
    h = w = SIZE * scale
    pad = 2
    grid = np.full((rows * (h + pad) + pad, per_row * (w + pad) + pad), 255, dtype=np.uint8)
    for k, img in enumerate(x):
        r, c = divmod(k, per_row)
        big = np.kron(img, np.ones((scale, scale), dtype=np.uint8))
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = big
    Image.fromarray(grid, mode="L").save(path)


def evaluate(work: Path, args, summary: dict) -> dict:
    from diffusers import PixArtTransformer2DModel

    t0 = time.time()
    clf = train_digit_classifier(seed=0)
    (xtr, _), (xho, _) = load_digit_split(SIZE)
    real_feats = clf.features(xho)
    fd_ref = frechet_distance(clf.features(xtr[: len(xho)]), real_feats)
    print(f"classifier held-out accuracy {clf.held_out_accuracy:.4f} ({time.time() - t0:.0f} s)", flush=True)
    model = PixArtTransformer2DModel.from_pretrained(work / "transformer", local_files_only=True).eval()
    encoder = HashedWordEncoder.load(work / "text_encoder")
    sched_cfg = json.loads((work / "scheduler" / "scheduler_config.json").read_text())
    if args.thresholding is not None and (sched_cfg.get("thresholding") != args.thresholding
                                          or "_use_default_values" in sched_cfg):
        sched_cfg = write_scheduler(work, sampling_scheduler(training_scheduler(), args.thresholding))

    digits = torch.arange(10).repeat_interleave(args.samples_per_digit)
    results = {}
    prev = summary.get("evaluation") or {}
    if (prev.get("thresholding") == bool(sched_cfg.get("thresholding"))
            and prev.get("samples_per_digit") == args.samples_per_digit
            and prev.get("sample_seed") == args.sample_seed
            and abs(prev.get("classifier_held_out_accuracy", -1) - clf.held_out_accuracy) < 1e-12):
        # --resample with the same sampler, seeds and classifier: keep the scales measured before.
        results.update({k: v for k, v in prev.get("guidance_sweep", {}).items() if "frechet_distance" in v})
    scales = sorted(set([args.guidance] + list(args.guidance_sweep)))
    chosen_samples = None
    for s in scales:
        t1 = time.time()
        x = sample_digits(model, sched_cfg, encoder, digits, s, seed=args.sample_seed)
        pred = clf.predict(x.numpy())
        acc = float(np.mean(pred == digits.numpy()))
        per_digit = [float(np.mean(pred[digits.numpy() == d] == d)) for d in range(10)]
        fd = frechet_distance(clf.features(x.numpy()), real_feats)
        results[str(s)] = {"accuracy": acc, "per_digit": per_digit, "frechet_distance": fd,
                           "nonfinite": int((~torch.isfinite(x)).sum()), "min": float(x.min()),
                           "max": float(x.max()), "mean": float(x.mean()), "std": float(x.std())}
        print(f"guidance {s}: class accuracy {acc:.4f}  FD {fd:.1f}  range [{x.min():.2f}, {x.max():.2f}]  "
              f"per digit {['%.2f' % p for p in per_digit]}  ({time.time() - t1:.0f} s)", flush=True)
        if not torch.isfinite(x).all() or x.abs().max() > 1.5:
            print(f"WARNING: guidance {s}: samples leave [-1.5, 1.5]; the sampler diverged", flush=True)
        if s == args.guidance:
            chosen_samples = x
    per = min(10, args.samples_per_digit)
    grid_idx = torch.cat([torch.arange(per) + d * args.samples_per_digit for d in range(10)])
    save_grid(chosen_samples[grid_idx], work / "samples.png", per_row=per)
    summary["evaluation"] = {
        "classifier_held_out_accuracy": clf.held_out_accuracy,
        "classifier_train_accuracy": clf.train_accuracy,
        "classifier_seed": 0,
        "sampler": "DPMSolverMultistepScheduler (dpmsolver++, order 2), 20 steps, scheduler/scheduler_config.json",
        "thresholding": bool(sched_cfg.get("thresholding")),
        "samples_per_digit": args.samples_per_digit,
        "sample_seed": args.sample_seed,
        "guidance_scale": args.guidance,
        "sample_class_accuracy": results[str(args.guidance)]["accuracy"],
        "per_digit_accuracy": results[str(args.guidance)]["per_digit"],
        "frechet_distance": results[str(args.guidance)]["frechet_distance"],
        "frechet_distance_real_reference": fd_ref,
        "sample_range": [results[str(args.guidance)]["min"], results[str(args.guidance)]["max"]],
        "guidance_sweep": dict(sorted(results.items(), key=lambda kv: float(kv[0]))),
    }
    return summary


def write_card(work: Path, s: dict) -> None:
    a, t, e = s["architecture"], s["training"], s["evaluation"]
    size_mb = (work / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size / 1e6
    sweep = "\n".join(f"| {k} | {v['accuracy']:.3f} | {v.get('frechet_distance', float('nan')):.1f} |" for k, v in sorted(e["guidance_sweep"].items(), key=lambda kv: float(kv[0])))
    card = f"""# pixart-digits

The embedded default model of deltadit: a small `diffusers.PixArtTransformer2DModel` trained in
pixel space on scikit-learn's handwritten digits, so that export and generation work on a fresh
machine with no downloads, and so that the Δ-DiT cache's quality can be measured on real images.

## Data
- `sklearn.datasets.load_digits` (1797 images, 8x8, grey levels 0..16), mapped to [-1, 1] and
  upsampled bilinearly to 16x16 (`deltadit_export.digits.load_digit_images`).
- Fixed stratified split (seed {t['split_seed']}): {t['train_images']} train / {t['held_out_images']} held-out.
  The diffusion model and the classifier train on the train split only.
- Captions: `"a handwritten digit D"`, encoded by the weight-free `runtime.text_encoder.HashedWordEncoder`
  (`text_encoder/config.json`: dim {a['caption_channels']}, {a['caption_tokens']} tokens). The unconditional
  prompt is `""` (all-zero states, mask `[1,0,...]`).

## Architecture
| | |
|---|---|
| class | `PixArtTransformer2DModel` (`norm_type="ada_norm_single"`) |
| blocks | {a['num_layers']} |
| width | {a['width']} ({a['num_attention_heads']} heads x {a['attention_head_dim']}) |
| parameters | {a['parameters']:,} ({size_mb:.1f} MB fp32 safetensors) |
| input | {a['in_channels']} x {a['sample_size']} x {a['sample_size']} pixels, patch {a['patch_size']} -> {a['tokens']} tokens |
| output | {a['out_channels']} channel: epsilon only (no learned sigma) |
| caption | {a['caption_tokens']} tokens x {a['caption_channels']} channels -> `caption_projection` -> width |

## Training recipe
- Noise: {t['noise_schedule']} (cosine: at 16x16 a linear schedule reaches near-pure noise early).
- Loss: eps-MSE with Min-SNR weighting, gamma = {t['min_snr_gamma']}; timesteps uniform in 0..999.
- Prompt dropout to `""` with p = {t['prompt_dropout']} (classifier-free guidance).
- AdamW lr {t['lr']}, wd {t['weight_decay']}, {t['warmup']} warmup iterations then cosine decay to
  {t['final_lr_fraction']} x lr over {t['iterations_planned']} planned iterations; grad clip {t['grad_clip']}; batch {t['batch']}.
- EMA of the weights, decay {t['ema_decay']} (with `(1+n)/(10+n)` warmup); **the EMA weights are shipped**.
- PixArt-α initialisation (xavier linears; zeroed cross-attention output and final projection).
- Seeds: model/data {t['seed']}, text encoder {t['encoder_seed']}, split {t['split_seed']}. CPU, torch {t['torch']},
  threads `{t['threads']}` (shared 2-core machine; `auto` re-picks 1 or 2 threads every 200 iterations).
- The LR decay's progress is max(iteration progress, wall-clock progress of `--minutes {t.get('minutes', '?')}`), so
  the schedule ends by the time budget; `loss.csv` records the learning rate of every iteration.
- Ran {t['iterations']} iterations in {t['train_seconds'] / 60:.1f} min.
- Final training loss (mean of the last 100 iterations): eps-MSE {t['final_mse_last100']:.4f},
  Min-SNR-weighted {t['final_loss_weighted_last100']:.4f}. Held-out eps-MSE of the EMA weights
  (fixed noise and timesteps): {t['final_held_out_mse_ema']:.4f}.
- Loss curve: `loss_curve.png` (data: `loss.csv`).
- Reproduce: `python tools/train_digits.py --iterations {t['iterations_planned']} --seed {t['seed']}
  --width {a['width']} --heads {a['num_attention_heads']} --batch {t['batch']} --minutes {t.get('minutes', 55)}`.

## Evaluation (full compute, PyTorch, no caching)
- Reference classifier (`deltadit_export.digits.train_digit_classifier(seed=0)`, a small CNN):
  held-out accuracy on real digits **{e['classifier_held_out_accuracy']:.4f}**.
- Sampler: {e['sampler']}; dynamic thresholding {'on' if e['thresholding'] else 'off'}
  (`sample_max_value` 1, i.e. x0 clipped to [-1, 1]: the cosine schedule's near-zero SNR at t=999
  makes the first eps->x0 conversion amplify errors ~1e4x; without clipping, samples diverge).
- {e['samples_per_digit']} samples per digit (initial noise from `torch.Generator().manual_seed({e['sample_seed']})`,
  digit-major order), classifier-free guidance scale **{e['guidance_scale']}**.
- Sample class accuracy: **{e['sample_class_accuracy']:.4f}** (per digit 0..9:
  {', '.join(f'{p:.2f}' for p in e['per_digit_accuracy'])}).
- Fréchet distance of the classifier's 64-d features to the held-out real digits:
  **{e['frechet_distance']:.1f}** (reference: {e['frechet_distance_real_reference']:.1f} between
  359 real train digits and the held-out ones). Sample value range: [{e['sample_range'][0]:.2f}, {e['sample_range'][1]:.2f}].
- `samples.png`: 10x10 grid, row d = the first 10 samples of digit d (4x nearest upscaling).

| guidance scale | class accuracy | Fréchet distance |
|---|---|---|
{sweep}

## Use
```python
from diffusers import PixArtTransformer2DModel, DPMSolverMultistepScheduler
from runtime.text_encoder import HashedWordEncoder
model = PixArtTransformer2DModel.from_pretrained("<this dir>/transformer")
scheduler = DPMSolverMultistepScheduler.from_pretrained("<this dir>/scheduler")
encoder = HashedWordEncoder.load("<this dir>/text_encoder")
states, mask = encoder.encode(["a handwritten digit 3"])   # negative: encoder.encode([""])
```
Call the model with `added_cond_kwargs={{"resolution": None, "aspect_ratio": None}}` and
`encoder_attention_mask=mask`; the output is the noise prediction for 1x16x16 pixels in [-1, 1].
"""
    (work / "model_card.md").write_text(card)


# ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="shipped directory (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=6000, help="planned iterations (the LR schedule spans them)")
    p.add_argument("--minutes", type=float, default=55.0, help="wall-clock cap on training; stops early if reached")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=NUM_LAYERS, help="must be 12 (the schedule math assumes it)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--final-lr-fraction", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--prompt-dropout", type=float, default=0.1)
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="0 turns the weighting off")
    p.add_argument("--caption-dim", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--encoder-seed", type=int, default=0)
    p.add_argument("--threads", default="auto", help="torch threads: a number, or auto (1 or 2, re-measured)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale reported and used for samples.png")
    p.add_argument("--guidance-sweep", type=lambda s: [float(v) for v in s.split(",") if v], default=[],
                   help="extra guidance scales to measure, e.g. 3,4,5")
    p.add_argument("--thresholding", type=lambda s: s.lower() in ("1", "true", "yes", "on"), default=None,
                   help="x0 clipping (dynamic thresholding) in the shipped DPM-Solver++ config (default: on)")
    p.add_argument("--samples-per-digit", type=int, default=50)
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--resample", action="store_true", help="only re-run the sampling check on an existing --out")
    p.add_argument("--resample-from", type=Path, default=None,
                   help="with --resample: read the trained folder from here instead of --out")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the temporary directory here (for debugging)")
    args = p.parse_args(argv)
    if args.layers != NUM_LAYERS:
        p.error(f"--layers must be {NUM_LAYERS}: the product's default N_c = round(0.75 * 12) = 9 assumes it")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(2 if args.threads == "auto" else int(args.threads))
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)) if args.work_dir is None else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)  # mkdtemp makes it 0700; the shipped folder must be readable by all
    t0 = time.time()
    if args.resample:
        src = args.resample_from or out
        if not (src / "training_summary.json").is_file():
            raise SystemExit(f"--resample: {src} has no training_summary.json")
        shutil.rmtree(work)
        shutil.copytree(src, work)
        summary = json.loads((work / "training_summary.json").read_text())
    else:
        if args.thresholding is None:
            args.thresholding = True
        summary = train(args, work)
        # Written before sampling, so a failed evaluation leaves a folder --resample can use.
        (work / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"trained weights in {work}", flush=True)
    summary = evaluate(work, args, summary)
    (work / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_card(work, summary)
    total = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
    if total > 25e6:
        print(f"warning: shipped directory is {total / 1e6:.1f} MB (> 25 MB)", flush=True)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        work.rename(out)
        shutil.rmtree(old)
    else:
        work.rename(out)
    print(f"wrote {out} ({total / 1e6:.1f} MB) in {(time.time() - t0) / 60:.1f} min: sample class accuracy "
          f"{summary['evaluation']['sample_class_accuracy']:.4f} at guidance {args.guidance}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
