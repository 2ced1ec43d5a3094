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
    precision: str = "fp32"  # runtime rows: fp32 (the export), int8 (its int8 export) or bf16 (OpenVINO, bf16)

    @property
    def reference(self) -> str:
        return "full" if self.engine == "runtime" else "pytorch full"

    def key(self) -> dict[str, Any]:
        key = {"name": self.name, "engine": self.engine, "num_steps": self.num_steps, "policy": self.policy,
               "hook": self.hook, "params": self.params, "chunk": self.chunk}
        if self.precision != "fp32":  # fp32 rows keep the keys (and cached samples) they had before precisions
            key["precision"] = self.precision
        return key


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


PRECISIONS = ("int8", "bf16")
PRECISION_ENGINES = {
    "int8": "the int8 export of the same model (ONNX Runtime dynamic quantization of the block MatMuls; embed and "
            "head fp32), next to the eval export",
    "bf16": "the eval export's fp32 ONNX on OpenVINO with bf16 inference precision",
}


def parse_precisions(value: str) -> tuple[str, ...]:
    """``--precisions``: a comma-separated subset of int8,bf16, or none."""
    import click

    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if names in ((), ("none",)):
        return ()
    bad = [n for n in names if n not in PRECISIONS]
    if bad:
        raise click.BadParameter(f"{','.join(bad)}: expected none or a comma-separated subset of "
                                 f"{','.join(PRECISIONS)}", param_hint="'--precisions'")
    return tuple(p for p in PRECISIONS if p in names)


def precision_rows(num_steps: int, precisions: tuple[str, ...]) -> list[RowSpec]:
    """Full compute and delta-dit on each reduced-precision engine set (the quality gate's rows)."""
    return [RowSpec(f"{p} {policy}", "runtime", num_steps, "none" if policy == "full" else policy, precision=p,
                    note=PRECISION_ENGINES[p]) for p in precisions for policy in ("full", "delta-dit")]


def open_precision_runtimes(folder: Path, precisions: tuple[str, ...], threads: int, trust_artifacts: bool = False,
                            quiet_progress: bool = True, weights: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Runtimes of the reduced-precision engine sets: ({precision: runtime}, {precision: why it is left out}).

    int8: the int8 export of the eval export (``variants.export_variant``), exported next to it once and
    reused. bf16: the eval export on OpenVINO with ``inference_precision="bf16"``; left out (with the reason)
    when OpenVINO is not installed or the CPU has no bf16 instructions: never fp32 under a bf16 name."""
    from runtime import DeltaDiTRuntime
    from runtime.backends import BackendError

    from .variants import export_variant

    runtimes: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for p in precisions:
        if p == "int8":
            out = export_variant(folder, "int8", weights=weights, quiet_progress=quiet_progress)
            runtimes[p] = DeltaDiTRuntime(out, backend="onnxruntime", threads=threads)
        elif p == "bf16":
            try:
                runtimes[p] = DeltaDiTRuntime(folder, backend="openvino", threads=threads, inference_precision="bf16",
                                              trust_artifacts=trust_artifacts)
            except BackendError as exc:
                missing[p] = str(exc)
                log.warning("bf16 rows left out: %s", exc)
        else:
            raise ValueError(f"unknown precision {p!r}: expected one of {', '.join(PRECISIONS)}")
    return runtimes, missing


def engines_key(runtime) -> dict[str, Any]:
    """What a runtime's samples depend on besides the inputs: its segment files, backend and its precision."""
    return {"segments": [s.sha256 for s in runtime.manifest.segments], "backend": runtime.backend.name,
            "backend_note": getattr(runtime.backend, "precision_note", None)}


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
    weights: str | None = None  # --weights DIR of the PyTorch rows' timing workers (rebuild.py)
    runtimes: dict[str, Any] = dataclasses.field(default_factory=dict)  # reduced-precision runtimes, by precision

    def runtime_of(self, row: RowSpec):
        return self.runtime if row.precision == "fp32" else self.runtimes[row.precision]


def _row_cache_path(setup: EvalSetup, row: RowSpec) -> Path | None:
    if setup.cache_dir is None:
        return None
    material = {"row": row.key(), "fp": setup.fingerprint}
    if row.precision != "fp32":
        material["engines"] = engines_key(setup.runtime_of(row))
    key = json.dumps(material, sort_keys=True, default=str)
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
        runtime = setup.runtime_of(row)
        schedule = runtime.schedule(row.policy, num_steps=row.num_steps)
        samples = runtime_generate(runtime, schedule, setup.embeds, setup.mask, setup.negative, setup.noise,
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
            rt = setup.runtime_of(row)
            options = {"inference_precision": "bf16"} if row.precision == "bf16" else {}
            out.append(sample_rows.runtime(row.name, rt.manifest.root, row.policy, row.num_steps, inputs,
                                           setup.guidance, setup.runtime.trust_artifacts,
                                           backend=rt.backend.name if row.precision != "fp32" else "auto",
                                           backend_options=options, verify=verify))
        else:
            out.append(sample_rows.eager(row.name, engines, row.num_steps, inputs, setup.guidance, hook=row.hook,
                                         params=row.params, weights=setup.weights))
    return out
