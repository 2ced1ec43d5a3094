"""The rows of ``deltadit-eval``: what each row runs (:class:`RowSpec`), the inputs every row shares
(:class:`EvalSetup`), and the generation of a row's samples (cached on disk per row)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import sample_rows
from .console import log
from .eval_hooks import LinearWork, apply_hook
from .publish import write_file
from .sampling import runtime_generate, torch_generate

EVAL_MAX_BATCH = 100  # images per engine call in the eval export (engines take 200 rows with guidance)


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


def generate_row(setup: EvalSetup, row: RowSpec) -> dict[str, Any]:
    """Samples of one row (cached on disk) plus, for PyTorch rows, the Linear multiply-adds executed."""
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
                                   guidance_scale=setup.guidance, chunk=row.chunk, desc=row.name)
    else:
        model = setup.torch_model_factory()
        if row.hook:
            apply_hook(row.hook, model, row.params, row.num_steps)
        work = LinearWork(model)
        samples = torch_generate(model, setup.scheduler_config, setup.embeds, setup.mask, setup.negative,
                                 setup.noise, guidance_scale=setup.guidance, num_steps=row.num_steps,
                                 chunk=row.chunk or EVAL_MAX_BATCH, desc=row.name)
        macs = work.macs
        work.close()
    seconds = time.perf_counter() - t0
    if not torch.isfinite(samples).all():
        log.warning("row %r produced NaN/Inf samples", row.name)
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, samples=samples.numpy(), macs=macs, seconds=seconds)
        write_file(path, buf.getvalue())
    return {"samples": samples, "macs": macs, "seconds": seconds, "cached": False}


def timing_rows(setup: EvalSetup, rows: list[RowSpec], verify: bool = True) -> list:
    """The harness rows (:mod:`.timing`) of the eval rows: one image per run, guidance batch 2.

    Run r generates image r mod 10 (a different digit and noise each repeat, the same for every row):
    data-dependent caches (FirstBlockCache) are timed on a spread of images, not one lucky one.
    """
    n_inputs = min(10, len(setup.noise))
    picks = [int(np.flatnonzero(setup.digits == d % 10)[0]) if np.any(setup.digits == d % 10) else d
             for d in range(n_inputs)]
    inputs = [(setup.embeds[k:k + 1], setup.mask[k:k + 1], setup.negative, setup.noise[k:k + 1]) for k in picks]
    engines = setup.runtime.manifest.root
    out = []
    for row in rows:
        if row.engine == "runtime":
            out.append(sample_rows.runtime(row.name, engines, row.policy, row.num_steps, inputs, setup.guidance,
                                           setup.runtime.trust_artifacts, verify=verify))
        else:
            out.append(sample_rows.eager(row.name, engines, row.num_steps, inputs, setup.guidance, hook=row.hook,
                                         params=row.params))
    return out
