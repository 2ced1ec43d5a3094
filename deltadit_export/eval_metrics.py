"""Quality metrics of ``deltadit-eval``: the reference digits classifier and the Fréchet distance of its
features (with bootstrap resamples for error bars and paired comparisons between rows)."""

from __future__ import annotations

import functools

import numpy as np
import torch

CLASSIFIER_SEED = 0
# The reference classifier's documented held-out accuracy (digits.py: 0.9805 for seed 0, i.e. 352 of 359),
# less one image of slack for float differences between CPUs (training is deterministic on one machine).
CLASSIFIER_DOCUMENTED_ACCURACY = 0.9805
CLASSIFIER_MIN_ACCURACY = CLASSIFIER_DOCUMENTED_ACCURACY - 1 / 359


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
