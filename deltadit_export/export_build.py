"""The export's work inside its staging folder: load the transformer, cut it, export each segment, check it,
quantize it (``--precision int8``), build backend artifacts, copy the shipped configs, write the manifest.

Called by :func:`deltadit_export.exporter.export` with a folder that nobody else sees yet; everything heavy
(torch, diffusers, ONNX) is imported here, lazily.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from runtime.manifest import COMPANION_DIRS, Manifest, SegmentSpec, write_manifest
from runtime.integrity import file_sha256

from . import __version__
from .export_options import EXTRA_FOLDERS, PRECISIONS, ResolvedExport, extras_root
from .export_report import SegmentReport, format_reports
from .model_weights import build_model, check_finite_weights
from .models import caption_tokens, model_guidance
from .progress import Progress

def keep_norms_fp32(model) -> None:
    """Run every LayerNorm in fp32 inside an fp16 model: fp16 LayerNorm after attention overflows (§4)."""
    from torch import nn

    class FP32LayerNorm(nn.Module):
        def __init__(self, norm: nn.LayerNorm):
            super().__init__()
            self.norm = norm.float()

        def forward(self, x):
            return self.norm(x.float()).to(x.dtype)

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, FP32LayerNorm(child))


def build(job: ResolvedExport, tmp: Path, progress: Progress, on_model_loaded) -> list[SegmentReport]:
    import torch

    from .onnx_export import TOLERANCES as PARITY_TOLERANCES
    from .onnx_export import ExportError, check_parity, export_segment, measure_chain
    from .quantize import export_int8_segment, int8_record
    from .split import model_shape, random_model_inputs, run_segments, split_model

    torch.set_grad_enabled(False)
    dtype = PRECISIONS[job.options.precision]
    progress.note(f"loading {job.spec.name} ({job.source.kind} weights)")
    model = build_model(job.spec, job.source, job.config)
    check_finite_weights(model, f"{job.spec.name} weights ({job.source.path or 'random'})")
    if on_model_loaded is not None:
        on_model_loaded(model)
    model_config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    if dtype == "float16":
        model = model.half()
        keep_norms_fp32(model)
    tokens = caption_tokens(job.spec)
    segments = split_model(model, job.cuts, caption_tokens=tokens, dtype=dtype)
    shape = model_shape(model, tokens)
    torch_dtype = getattr(torch, dtype)
    # Every segment is checked on its real inputs: the torch chain run on random model inputs.
    batches = sorted(set(job.options.parity_batches) | {2})
    chains = {b: run_segments(segments, random_model_inputs(shape, b, torch.Generator().manual_seed(b),
                                                            dtype=torch_dtype)) for b in batches}
    reports, specs = [], []

    def record(seg, path: Path, extra: list[str], parity, precision: str, tolerance: float, t: float) -> None:
        size = path.stat().st_size + sum((tmp / e).stat().st_size for e in extra)
        blocks = f"{seg.blocks[0]}-{seg.blocks[1] - 1}" if seg.blocks else "-"
        worst = max(parity, key=lambda p: p.rel_err)
        reports.append(SegmentReport(seg.name, blocks, seg.params, size, time.perf_counter() - t, worst.rel_err,
                                     precision, tolerance, worst.batch))
        specs.append(SegmentSpec(seg.name, seg.role, seg.blocks, path.name, file_sha256(path), seg.inputs,
                                 seg.outputs, seg.params, tuple(extra), {e: file_sha256(tmp / e) for e in extra},
                                 precision, worst.rel_err))

    for seg in segments:
        t = time.perf_counter()
        feeds = {b: {**env, "hidden": env.get(f"hidden@{seg.name}", env["hidden"])} for b, env in chains.items()}
        if job.options.precision == "int8" and seg.name not in job.keep_fp32:
            path, extra, parity, precision = export_int8_segment(
                seg, feeds, tmp, progress, opset=job.options.opset, exporter=job.options.exporter,
                batches=job.options.parity_batches)
            record(seg, path, extra, parity, precision,
                   job.int8_tolerance if precision == "int8" else PARITY_TOLERANCES[dtype], t)
            continue
        path = tmp / f"{seg.name}.onnx"
        with progress.segment(seg.name, phases=("export", "parity")) as bar:
            bar.phase("export")
            try:
                extra = export_segment(seg, feeds[2], path, opset=job.options.opset, exporter=job.options.exporter)
            except Exception as exc:
                raise ExportError(f"segment {seg.name!r}: ONNX export failed: {exc}") from exc
            bar.phase("parity")
            try:
                parity = check_parity(seg, path, {b: feeds[b] for b in job.options.parity_batches}, dtype)
            except ExportError as exc:
                kept = job.out.parent / f"{job.out.name}.{seg.name}.failed.onnx"
                shutil.move(path, kept)
                raise ExportError(f"{exc}; the failing ONNX is kept at {kept} for inspection") from None
        record(seg, path, extra, parity, "fp16" if dtype == "float16" else "fp32", PARITY_TOLERANCES[dtype], t)
    chain_rel_err = None
    if job.options.precision == "int8":
        _int8_gate(job, reports)
        chain_rel_err = measure_chain(segments, [tmp / spec.file for spec in specs], chains[2])
    engines: dict[str, Any] = {}
    for backend in job.options.backends:
        if backend == "onnx":
            continue
        from .backends import build_backend_artifacts

        engines[backend] = build_backend_artifacts(backend, job, segments, chains, tmp, progress)
    conditioning: dict[str, Any]
    if shape.family == "pixart":
        conditioning = {"kind": "caption", "tokens": tokens, "channels": shape.caption_channels,
                        "micro_conditions": shape.micro_conditions}
        if job.spec.bundled:
            conditioning["text_encoder"] = "text_encoder"
    else:
        from runtime.guidance import null_class  # here: runtime.guidance imports torch (--print-schedule must not)

        conditioning = {"kind": "class", "num_classes": shape.num_classes, "null_class": null_class(shape.num_classes)}
    conditioning["guidance_scale"] = model_guidance(job.spec.name)  # the model's default (runtime.generate's)
    _copy_bundled_extras(job, tmp)
    # The runtime reads these configs (sampler, text encoder): hashed like the segments, verified at load.
    companions = {f.relative_to(tmp).as_posix(): file_sha256(f) for sub in COMPANION_DIRS
                  for f in sorted((tmp / sub).rglob("*")) if f.is_file()}
    manifest = Manifest(
        model={"name": job.spec.name, "family": shape.family, "diffusers_class": job.spec.diffusers_class,
               "config": model_config, "source": job.source.to_dict(), "params": sum(p.numel() for p in model.parameters())},
        resolution=job.resolution,
        sample_shape=(shape.in_channels, shape.sample_size, shape.sample_size),
        out_channels=shape.out_channels,
        num_layers=job.cuts.num_layers,
        cached_blocks=job.cuts.cached_blocks,
        cuts={"a": job.cuts.a, "c": job.cuts.c},
        schedule=job.schedule,
        precision=job.options.precision,
        max_batch=2 * job.options.max_batch,
        conditioning=conditioning,
        segments=tuple(specs),
        export={"cache_key": job.cache_key, "weights_fingerprint": job.weights_fingerprint, "options": job.record,
                "exporter": job.options.exporter,
                "opset": job.options.opset,
                "deltadit": __version__, "torch": torch.__version__, "tokens": shape.tokens,
                "width": shape.width, "vae_scale_factor": job.spec.vae_scale_factor,
                "parity": {r.name: r.rel_err for r in reports},
                **({} if chain_rel_err is None else
                   {"chain_rel_err": chain_rel_err, "int8": int8_record(job.keep_fp32, job.int8_tolerance)})},
        engines=engines,
        calibration=job.options.calibration,
        companion_files=companions,
    )
    write_manifest(manifest, tmp)
    return reports


def _int8_gate(job: ResolvedExport, reports: list[SegmentReport]) -> None:
    """Refuse the export when an int8 segment is above the tolerance, naming each one and the exact fix."""
    from .onnx_export import ExportError
    from .quantize import gate_refusal

    failing = [(r.name, r.rel_err, r.worst_batch) for r in reports
               if r.precision == "int8" and r.rel_err is not None and r.rel_err > job.int8_tolerance]
    if failing:
        error = ExportError(gate_refusal(failing, job.keep_fp32, job.int8_tolerance))
        error.table = "\n".join(format_reports(reports))  # the CLI shows it above the Error line
        raise error



def _copy_bundled_extras(job: ResolvedExport, tmp: Path) -> None:
    """A shipped model's text encoder and scheduler configs travel with its engines (the runtime reads them)."""
    root = extras_root(job.spec, job.source)
    for sub in EXTRA_FOLDERS if root is not None else ():
        if (root / sub).is_dir():
            shutil.copytree(root / sub, tmp / sub)
