"""Bootstrap 95% intervals of sample-set metrics (domain FID against fixed reference statistics, class
accuracy), shared by the quality benchmarks (``benchmarks/driffusion_quality.py``,
``benchmarks/speed_quality.py``).

FID computed on a resample (which repeats samples) is biased upwards, so its interval is the basic (pivot)
bootstrap interval ``[max(0, 2 est - q97.5), 2 est - q2.5]`` around the full-sample estimate; a proportion
(accuracy) takes the percentile interval ``[q2.5, q97.5]``. Efron & Tibshirani, *An Introduction to the
Bootstrap* (1993), ch. 13. No torch here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from specdit.metrics.fid import FeatureStats, GaussianStats

BOOTSTRAP = 200  # resamples of the sample indices: FID of 128-d features costs ~5 ms each


def basic_interval(estimate: float, lo_hi: list[float]) -> list[float]:
    """The basic bootstrap interval [max(0, 2 est - q97.5), 2 est - q2.5] from percentile bounds [q2.5, q97.5]."""
    return [max(0.0, 2 * estimate - lo_hi[1]), 2 * estimate - lo_hi[0]]


def fid_with_interval(features: np.ndarray, reference: "FeatureStats | GaussianStats", n_boot: int = BOOTSTRAP,
                      seed: int = 0) -> tuple[float, list[float]]:
    """(FID of ``features`` (N, D) against the fixed ``reference`` stats, its basic 95% bootstrap interval)
    over ``n_boot`` resamples of the N samples (the reference is not resampled). ValueError for N < 2."""
    from specdit.metrics.fid import FeatureStats, frechet_distance

    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise ValueError(f"a FID needs >= 2 samples, got {len(features)}")
    name = reference.extractor
    est = frechet_distance(FeatureStats.from_features(features, extractor=name), reference)
    rng = np.random.default_rng(seed)
    boots = [frechet_distance(FeatureStats.from_features(features[rng.integers(0, len(features), len(features))],
                                                         extractor=name), reference) for _ in range(n_boot)]
    return est, basic_interval(est, [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))])


def proportion_with_interval(hits: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, list[float]]:
    """(mean of the 0/1 array ``hits`` (N,), its percentile 95% bootstrap interval). ValueError for N = 0."""
    hits = np.asarray(hits, dtype=np.float64).reshape(-1)
    if hits.size == 0:
        raise ValueError("a proportion needs >= 1 sample")
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, hits.size, (n_boot, hits.size))].mean(axis=1)
    return float(hits.mean()), [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
