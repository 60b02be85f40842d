"""Bootstrap 95% intervals of sample-set metrics (domain FID against fixed reference statistics, class
accuracy) and of paired differences between two samplers run on the same seeds, shared by the quality
benchmarks (``benchmarks/driffusion_quality.py``, ``benchmarks/speed_quality.py``, ``benchmarks/relax_paired.py``).

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


def paired_fid_difference(features_a: np.ndarray, features_b: np.ndarray, reference: "FeatureStats | GaussianStats",
                          n_boot: int = BOOTSTRAP, seed: int = 0) -> tuple[float, list[float]]:
    """(FID(a) - FID(b) against the fixed ``reference``, its basic 95% bootstrap interval) for *paired* sample
    sets: row i of ``features_a`` and ``features_b`` (N, D) come from the same seed (e.g. two samplers sharing
    every noise key), so each resample draws the same rows from both and their shared noise cancels out of
    the difference. ValueError for N < 2 or unequal N."""
    from specdit.metrics.fid import FeatureStats, frechet_distance

    a, b = (np.asarray(f, dtype=np.float64) for f in (features_a, features_b))
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired FID difference needs two sets of the same size >= 2, got {len(a)} and {len(b)}")
    name = reference.extractor
    fid = lambda f: frechet_distance(FeatureStats.from_features(f, extractor=name), reference)  # noqa: E731
    est = fid(a) - fid(b)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        rows = rng.integers(0, len(a), len(a))
        boots.append(fid(a[rows]) - fid(b[rows]))
    lo, hi = float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))
    return est, [2 * est - hi, 2 * est - lo]  # basic interval (a difference may be negative: no clamp at 0)


def paired_proportion_difference(hits_a: np.ndarray, hits_b: np.ndarray, n_boot: int = 2000,
                                 seed: int = 0) -> tuple[float, list[float], float]:
    """(mean(a) - mean(b), its percentile 95% interval over paired resamples, the exact two-sided McNemar
    p-value: a binomial test of the discordant pairs, McNemar 1947) for paired 0/1 arrays (N,) (row i of both
    from the same seed). ValueError for N = 0 or unequal N."""
    from scipy.stats import binomtest

    a, b = (np.asarray(h, dtype=np.float64).reshape(-1) for h in (hits_a, hits_b))
    if a.size != b.size or a.size == 0:
        raise ValueError(f"a paired difference needs two arrays of the same size >= 1, got {a.size} and {b.size}")
    diff = a - b  # (N,) in {-1, 0, 1}
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, (n_boot, diff.size))].mean(axis=1)
    only_a, only_b = int((diff > 0).sum()), int((diff < 0).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return float(diff.mean()), [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))], p
