"""Scoring of ``deltadit-eval``'s rows: generate every row's samples (cached, eval_rows.py) and measure them
against the reference statistics: class accuracy, FD with a paired bootstrap (eval_metrics.py), PSNR and
max|Δ| against the row's reference row, and the work bound of its schedule."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .console import bar, log
from .eval_metrics import bootstrap_fd, feature_stats, frechet_distance_from_stats
from .eval_rows import EvalSetup, RowSpec, generate_row
from .imaging import max_abs, psnr


def score_rows(setup: EvalSetup, rows: list[RowSpec], clf, ref_stats, num_steps: int):
    """Generate every row's samples and score them: accuracy, FD (with paired bootstrap), PSNR, max|Δ|, bound.
    Returns (results by row name, samples by row name, bootstrap FDs by row name)."""
    runtime, digits = setup.runtime, setup.digits
    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, torch.Tensor] = {}
    features: dict[str, np.ndarray] = {}  # classifier features per row: FD now, the paired bootstrap after
    for row in bar(rows, desc="eval rows", unit="row", leave=True):
        g = generate_row(setup, row)
        samples[row.name] = g["samples"]
        x = g["samples"]
        pred = clf.predict(x)
        features[row.name] = clf.features(x)
        results[row.name] = {
            "name": row.name, "engine": row.engine, "precision": row.precision, "num_steps": row.num_steps,
            "policy": row.policy,
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
        log.info("  %s: accuracy %.1f%%, FD %.2f (%s)", row.name, 100 * results[row.name]["accuracy"],
                 results[row.name]["fd"], took)
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
    return results, samples, boot
