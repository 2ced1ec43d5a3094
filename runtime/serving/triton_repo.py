"""Write a Triton Inference Server model repository for an engine folder.

Layout (one model; a repository may hold others next to it, which are left alone)::

    <out>/<name>/config.pbtxt        the instance group of --device (CPU by default)
    <out>/<name>/configs/cpu.pbtxt   CPU instances (tritonserver --model-config-name=cpu)
    <out>/<name>/configs/gpu.pbtxt   GPU instances: written to Triton's documented API, NOT run on a GPU yet
    <out>/<name>/1/model.py          the Python-backend model (imports runtime.serving.triton_model)
    <out>/<name>/1/engines/          a verified copy of the engine folder (omitted with link=True)

The model folder is built under a temporary name and renamed into place, so a reader never sees half of
it; an existing model folder is replaced only with ``force`` and only when this tool wrote it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..integrity import verify_companion_files, verify_segment_files
from ..manifest import load_manifest
from .batching import load_text_encoder
from .schema import Limits
from .triton_model import input_specs, output_specs

MARKER = "# Written by `deltadit serve triton-repo`"
MODEL_PY = '''"""Triton Python-backend model written by `deltadit serve triton-repo`.

The model's code is the deltadit package (runtime/serving/triton_model.py): install deltadit in the Python
that runs Triton's Python-backend stub (the python3 first on PATH; see the deltadit README, "Serving").
"""

from runtime.serving.triton_model import TritonPythonModel  # noqa: F401
'''


class RepositoryError(ValueError):
    """The repository cannot be written as asked; the message says why and what to do."""


@dataclass(frozen=True)
class RepoOptions:
    name: str = "deltadit"
    instances: int = 1
    threads: int | None = None  # per instance; None: the machine's cores split between the instances
    device: str = "cpu"  # which instance group config.pbtxt holds
    batching: bool = True  # Triton's dynamic batcher
    batch_delay_us: int = 5000  # how long the batcher may hold a request to fill a batch
    link: bool = False  # reference the engine folder by absolute path instead of copying it
    force: bool = False
    max_steps: int | None = None
    max_guidance: float | None = None
    max_prompt_chars: int | None = None
    default_guidance: float | None = None

    def instance_threads(self) -> int:
        return self.threads or max(1, len(os.sched_getaffinity(0)) // max(1, self.instances))


def _tensor_block(spec: dict) -> str:
    lines = [f'    name: "{spec["name"]}"', f"    data_type: {spec['data_type']}",
             f"    dims: [ {', '.join(str(d) for d in spec['dims'])} ]"]
    if spec.get("ragged"):
        lines.append("    allow_ragged_batch: true")
    if spec.get("optional"):
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def config_text(manifest, limits: Limits, options: RepoOptions, device: str, engines: str) -> str:
    """config.pbtxt for one instance-group variant (``device`` cpu or gpu)."""
    threads = options.instance_threads()
    header = [f"{MARKER} for {manifest.model.get('name')} ({manifest.root}).",
              "# One Python-backend model; every instance runs its own DeltaDiTRuntime (its own delta caches).",
              f"# max_batch_size: images per generation with classifier-free guidance (manifest max_batch "
              f"{manifest.max_batch} rows, 2 per image)."]
    if device == "gpu":
        header += ["# GPU VARIANT: UNVERIFIED. Written to Triton's documented instance_group API (KIND_GPU) and the",
                   "# runtime's CUDA backends (backend auto: tensorrt, onnxruntime-cuda, torch-cuda); never run on a GPU."]
    parts = ["\n".join(header), f'name: "{options.name}"', 'backend: "python"', f"max_batch_size: {limits.max_images}"]
    if options.batching:
        parts.append("dynamic_batching {\n  max_queue_delay_microseconds: " + str(options.batch_delay_us) + "\n}")
    parts.append("input [\n" + ",\n".join(_tensor_block(s) for s in input_specs(limits)) + "\n]")
    parts.append("output [\n" + ",\n".join(_tensor_block(s) for s in output_specs(limits, manifest.sample_shape))
                 + "\n]")
    group = [f"    count: {options.instances}", "    kind: KIND_CPU" if device == "cpu" else "    kind: KIND_GPU"]
    if device == "gpu":
        group.append("    gpus: [ 0 ]")
    parts.append("instance_group [\n  {\n" + "\n".join(group) + "\n  }\n]")
    params = {"engines": engines, "threads": str(threads), "backend": "onnxruntime" if device == "cpu" else "auto"}
    for key in ("max_steps", "max_guidance", "max_prompt_chars", "default_guidance"):
        if getattr(options, key) is not None:
            params[key] = str(getattr(options, key))
    parts.append("parameters [\n" + ",\n".join(f'  {{\n    key: "{k}"\n    value: {{ string_value: "{v}" }}\n  }}'
                                                for k, v in params.items()) + "\n]")
    return "\n".join(parts) + "\n"


def copy_engine_folder(src: Path, dst: Path) -> None:
    """Copy the regular files of an engine folder (no links: a link could read outside it), then verify the copy."""
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(root).relative_to(src)
        for name in [*files, *dirs]:
            path = Path(root) / name
            if path.is_symlink():
                raise RepositoryError(f"{path} is a link; the repository gets a copy of the engine folder, and a link "
                                      "could point outside it: copy the file in instead of linking it")
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if not name.startswith("."):
                shutil.copy2(Path(root) / name, dst / rel / name)
    copied = load_manifest(dst)
    verify_segment_files(copied)
    verify_companion_files(copied)


def write_repository(engines: str | os.PathLike, out: str | os.PathLike, options: RepoOptions = RepoOptions()) -> Path:
    """Write ``<out>/<options.name>/`` for the engine folder ``engines``; returns the model folder."""
    if options.device not in ("cpu", "gpu"):
        raise RepositoryError(f"device {options.device!r} is not one of cpu, gpu")
    if not 1 <= options.instances <= 64:
        raise RepositoryError(f"instances={options.instances} is out of range: expected 1..64")
    if not options.name or any(c in options.name for c in "/\\\0") or options.name.startswith("."):
        raise RepositoryError(f"model name {options.name!r} is not a plain folder name")
    src = Path(engines).resolve()
    manifest = load_manifest(src)
    verify_segment_files(manifest)
    verify_companion_files(manifest)
    limits = Limits.from_manifest(manifest, text_encoder=load_text_encoder(manifest) is not None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / options.name
    if final.exists() and not options.force:
        raise RepositoryError(f"{final} already exists: pass --force to replace it, or --out another repository")
    if final.exists() and not (final / "config.pbtxt").read_text(errors="replace").startswith(MARKER):
        raise RepositoryError(f"{final} was not written by deltadit (its config.pbtxt lacks our header): it is left "
                              "alone; choose another --name or --out")
    tmp = out / f".{options.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        version = tmp / "1"
        version.mkdir(parents=True)
        engines_param = str(src) if options.link else "engines"
        if not options.link:
            copy_engine_folder(src, version / "engines")
        (version / "model.py").write_text(MODEL_PY)
        (tmp / "configs").mkdir()
        for device in ("cpu", "gpu"):
            (tmp / "configs" / f"{device}.pbtxt").write_text(config_text(manifest, limits, options, device,
                                                                         engines_param))
        (tmp / "config.pbtxt").write_text(config_text(manifest, limits, options, options.device, engines_param))
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
