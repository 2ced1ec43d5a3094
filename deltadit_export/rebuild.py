"""The diffusers model an export came from, rebuilt for the PyTorch baselines (``deltadit bench``, ``generate``,
``eval`` and their timing workers).

The manifest records where the weights came from (``model.source``), but an export folder from elsewhere is
untrusted input: a recorded path may point anywhere on this machine, and ``.bin`` weights are torch pickles.
So no path is ever taken from the manifest:

- ``random``: rebuilt from the recorded config, seed and ``--set`` overrides (nothing is read);
- ``bundled``: the weights shipped inside this package, found by the model's registry entry;
- ``hf-cache``: the local Hugging Face cache, resolved by the registry's repo id for the export's model and
  resolution (the recorded repo id must be that one);
- ``local`` (``deltadit-export --weights DIR``): only a folder the user names (``weights=``, CLI
  ``--weights DIR``); without one :class:`WeightsNotNamed` says so and how to go on.

Every folder used is checked against the weights fingerprint the manifest records (``export.weights_fingerprint``,
the hash in the exporter's cache key) before anything in it is loaded.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .model_weights import WeightsSource, build_model, locate_weights, weights_fingerprint
from .models import ModelError, get_spec

log = logging.getLogger("deltadit")
SOURCE_KINDS = ("random", "bundled", "hf-cache", "local")


class WeightsNotNamed(ModelError):
    """The export's weights are a local folder and the user named none: nothing is read."""


def _where(manifest) -> str:
    return f"the export at {manifest.root}" if getattr(manifest, "root", None) is not None else "this export"


def _recorded_source(manifest) -> dict[str, Any]:
    src = manifest.model.get("source")
    if not isinstance(src, dict) or src.get("kind") not in SOURCE_KINDS:
        kind = src.get("kind") if isinstance(src, dict) else src
        raise ModelError(f"{_where(manifest)} records the weights source {kind!r} (manifest model.source.kind), not "
                         f"one of {', '.join(SOURCE_KINDS)}: re-export it (deltadit-export ... --force)")
    return src


def _check_fingerprint(manifest, source: WeightsSource, named: bool) -> None:
    """The folder's weights must be the ones the export was made from (when the manifest records which)."""
    recorded = manifest.export.get("weights_fingerprint")
    if recorded is None:
        if named:
            log.warning("%s predates the recorded weights fingerprint: --weights %s is used as given (re-export to "
                        "have it checked)", _where(manifest), source.path)
        return
    found = weights_fingerprint(source, {})
    if found == recorded:
        return
    if named:
        raise ModelError(f"--weights {source.path}: these are not the weights {_where(manifest)} was exported from "
                         f"(weights fingerprint {found[:12]}…, the manifest's {str(recorded)[:12]!r}…); pass the "
                         "folder it was exported from, or re-export from this one (deltadit-export --weights DIR "
                         "--force)")
    raise ModelError(f"the {source.kind} weights in {source.path} changed since {_where(manifest)} was made (weights "
                     f"fingerprint {found[:12]}…, the manifest's {str(recorded)[:12]!r}…): the PyTorch baseline "
                     "would not be the exported model; re-export (deltadit-export ... --force)")


def resolve_weights(manifest, weights: str | os.PathLike | None = None, *, refusal_hint: str = "") -> WeightsSource:
    """Where the baseline's weights are read from, checked, without loading them (cheap: hashes the files).

    ``weights``: a folder the user named (CLI ``--weights DIR``); required for a ``local`` source, allowed for
    ``bundled``/``hf-cache`` (then used instead, if its fingerprint matches), refused for ``random``.
    ``refusal_hint``: the command's other way out, appended to the refusal of a ``local`` source without
    ``weights`` (e.g. ``"or leave out the PyTorch rows (--modes none,delta-dit)"``).
    """
    src = _recorded_source(manifest)
    kind = src["kind"]
    spec = get_spec(manifest.model.get("name"))
    if kind == "random":
        if weights is not None:
            raise ModelError(f"--weights {weights}: {_where(manifest)} was made from seeded random weights, which "
                             "are rebuilt from the manifest; drop --weights")
        seed, overrides = src.get("seed", 0), src.get("overrides", {})
        if isinstance(seed, bool) or not isinstance(seed, int) or not isinstance(overrides, dict):
            raise ModelError(f"{_where(manifest)} records random weights with seed {seed!r} and overrides "
                             f"{overrides!r} (manifest model.source): re-export it (deltadit-export ... --force)")
        return WeightsSource("random", seed=seed, overrides=dict(overrides))
    if weights is not None:
        source = locate_weights(spec, manifest.resolution, weights)
        _check_fingerprint(manifest, source, named=True)
        return source
    if kind == "local":
        raise WeightsNotNamed(
            f"{_where(manifest)} was exported from a local weights folder (deltadit-export --weights "
            f"{src.get('path')!r}); the PyTorch baseline reads a folder only when you name it (a folder from "
            "elsewhere must not make it read outside itself, and .bin weights are pickles): pass --weights DIR (the "
            "folder it was exported from; checked against the export's weights fingerprint)"
            + (f", {refusal_hint}" if refusal_hint else ""))
    if kind == "bundled" and not spec.bundled:
        raise ModelError(f"{_where(manifest)} records shipped weights for {spec.name}, which ships none: re-export "
                         "it (deltadit-export ... --force), or pass --weights DIR")
    if kind == "hf-cache":
        expected = spec.repo_ids.get(manifest.resolution)
        if spec.bundled or expected is None or src.get("repo_id") != expected:
            raise ModelError(f"{_where(manifest)} records Hugging Face weights {src.get('repo_id')!r}, but {spec.name} "
                             f"at {manifest.resolution} has {expected!r}: re-export it (deltadit-export ... --force), "
                             "or pass --weights DIR")
    source = locate_weights(spec, manifest.resolution, None)  # the package's or the cache's own folder
    _check_fingerprint(manifest, source, named=False)
    return source


def rebuild_model(manifest, weights: str | os.PathLike | None = None, *, as_exported: bool = False,
                  refusal_hint: str = ""):
    """The diffusers transformer the export came from, in eval mode (weights as :func:`resolve_weights` finds
    them). fp32, or with ``as_exported`` the export's precision as the exporter built it (fp16 with its
    LayerNorms kept in fp32; int8 exports were quantized from the fp32 model)."""
    import torch

    source = resolve_weights(manifest, weights, refusal_hint=refusal_hint)
    if source.kind == "random":
        exported_with = manifest.export.get("torch")
        if exported_with and exported_with != torch.__version__:
            log.warning("random weights were drawn with torch %s, this is torch %s: the init may differ (the "
                        "none-vs-eager error will show it)", exported_with, torch.__version__)
    config = manifest.model.get("config")
    if source.kind == "random" and not isinstance(config, dict):
        raise ModelError(f"{_where(manifest)} records no model config (manifest model.config): re-export it "
                         "(deltadit-export ... --force)")
    model = build_model(get_spec(manifest.model["name"]), source, config)
    if len(model.transformer_blocks) != manifest.num_layers:
        raise ModelError(f"the rebuilt model has {len(model.transformer_blocks)} blocks, the manifest "
                         f"{manifest.num_layers}: the weights changed since the export; re-export with --force")
    if as_exported and manifest.precision == "fp16":
        from .export_build import keep_norms_fp32

        model = model.half()
        keep_norms_fp32(model)  # as the exporter did
    return model.eval().requires_grad_(False)
