"""Weights of the registry models, offline only: a local diffusers directory (``--weights``), the local
Hugging Face cache, the weights shipped inside this package (``pixart-digits``), or a seeded random init.
Locating them, fingerprinting them for the export's cache key, loading them and refusing NaN/Inf in them.
Every failure names where it looked and the ways out, before any heavy work starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import models as registry
from .model_config import model_class, check_config, read_transformer_config
from .models import ModelError, ModelSpec

@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from; recorded in the manifest so the benchmark can rebuild the same model."""

    kind: str  # "local", "hf-cache", "bundled" or "random"
    path: str | None = None  # the transformer folder (local, hf-cache, bundled)
    repo_id: str | None = None
    seed: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {})}


def _transformer_folder(path: Path) -> Path:
    """Accept a pipeline folder (with transformer/) or the transformer folder itself."""
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    return path



WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")


def check_weight_files(folder: Path, where: str) -> None:
    """A config without weights fails deep inside diffusers; say so before any work starts."""
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(
            f"{where} has a config.json but no weights (looked for {', '.join(WEIGHT_FILES[:2])} and their "
            "sharded .index.json): the folder is incomplete; save_pretrained or download it again, or pass "
            "--random-weights"
        )


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment at call time (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def locate_weights(spec: ModelSpec, resolution: int, weights: str | os.PathLike | None) -> WeightsSource:
    """Find the transformer folder offline, or raise a ModelError naming where it looked and the ways out."""
    if weights is not None:
        folder = Path(weights).expanduser()
        if not folder.is_dir():
            what = "is a file, not a directory" if folder.exists() else "does not exist"
            raise ModelError(
                f"--weights {folder} {what}: pass a local diffusers folder (a pipeline folder or its transformer/ "
                "sub-folder, as written by save_pretrained), or leave --weights out to use the Hugging Face "
                "cache, or pass --random-weights"
            )
        folder = _transformer_folder(folder)
        check_config(spec, read_transformer_config(folder), resolution, f"--weights {folder}")
        check_weight_files(folder, f"--weights {folder}")
        return WeightsSource("local", path=str(folder.resolve()))
    if spec.bundled:
        folder = registry.PACKAGE_WEIGHTS / spec.bundled / "transformer"
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"the shipped {spec.name} weights are missing from {folder.parent}: reinstall deltadit, or train "
                "them with `python tools/train_digits.py`"
            )
        check_config(spec, read_transformer_config(folder), resolution, f"shipped weights {folder}")
        return WeightsSource("bundled", path=str(folder))
    repo_id = spec.repo_ids[resolution]
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(
            repo_id, local_files_only=True, allow_patterns=["transformer/*", "model_index.json"],
            cache_dir=hf_cache_dir(),
        )
    except Exception:  # LocalEntryNotFoundError and friends: nothing in the cache
        root = None
    if root is None or not (Path(root) / "transformer" / "config.json").is_file():
        raise ModelError(
            f"no local weights for {spec.name} at {resolution}: looked for {repo_id!r} in the Hugging Face cache "
            f"({hf_cache_dir()}) and found "
            f"nothing (downloads are off). Either pass --weights DIR (a local diffusers folder of {repo_id}), or "
            "pass --random-weights to build the same architecture with seeded random weights"
        )
    folder = Path(root) / "transformer"
    check_config(spec, read_transformer_config(folder), resolution, f"cached {repo_id}")
    check_weight_files(folder, f"cached {repo_id} ({folder})")
    return WeightsSource("hf-cache", path=str(folder), repo_id=repo_id)



def build_model(spec: ModelSpec, source: WeightsSource, config: dict[str, Any] | None = None):
    """Instantiate the diffusers transformer (fp32, eval mode) from a source. ``config`` is for random weights."""
    import torch

    cls = model_class(spec)
    if source.kind == "random":
        torch.manual_seed(source.seed or 0)
        try:
            model = cls(**config)
        except TypeError as exc:
            raise ModelError(f"--set: {exc}; valid keys are the {spec.diffusers_class} config fields") from None
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            raise ModelError(f"--set: the {spec.diffusers_class} architecture cannot be built from these "
                             f"values ({type(exc).__name__}: {exc}); check the --set values") from None
    else:
        if source.overrides:
            raise ModelError("--set only applies to --random-weights (it changes the architecture)")
        try:
            # Without accelerate diffusers falls back to a full-memory load anyway, with a warning per load.
            lean = importlib.util.find_spec("accelerate") is not None
            model = cls.from_pretrained(source.path, torch_dtype=torch.float32, local_files_only=True,
                                        low_cpu_mem_usage=lean)
        except (OSError, ValueError, RuntimeError, KeyError, EnvironmentError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ModelError(
                f"cannot load the {spec.diffusers_class} weights in {source.path} ({type(exc).__name__}: {first}); "
                "the weight files are damaged or incomplete: save_pretrained or download them again"
            ) from exc
    return model.eval().requires_grad_(False)


def check_finite_weights(model, where: str) -> None:
    """NaN/Inf in a checkpoint poisons every image; refuse it before exporting anything (names the tensor)."""
    import torch

    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelError(
                f"{where}: weight {name!r} holds {bad} NaN/Inf value(s) of {tensor.numel()}; the checkpoint is "
                "corrupted: download or save_pretrained it again (or pass --random-weights)"
            )


def weights_fingerprint(source: WeightsSource, config: dict[str, Any]) -> str:
    """A hash identifying the weights without loading them: file contents, or (config, seed) for random."""
    h = hashlib.sha256()
    if source.kind == "random":
        h.update(json.dumps({"config": config, "seed": source.seed}, sort_keys=True).encode())
        return h.hexdigest()
    folder = Path(source.path)
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin", ".json") or f.name.endswith(".index.json")):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()

