"""Distribution tests used for exactness claims.

Kolmogorov-Smirnov tests on 1-D projections: the coordinate axes plus fixed random unit directions.
The p-value of the family is Bonferroni's ``min(1, m * min_i p_i)``, so rejecting at level alpha has a
false-alarm rate of at most alpha when the distributions are equal. Against the analytic mixture the
projected CDF is exact (one-sample KS); against another sampler it is the two-sample KS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import stats


def projection_directions(dim: int, num_random: int = 8, max_axes: int = 8, seed: int = 0) -> torch.Tensor:
    """(m, dim) unit directions: the first ``max_axes`` axes and ``num_random`` fixed random ones."""
    axes = torch.eye(dim, dtype=torch.float64)[: min(dim, max_axes)]
    g = torch.Generator().manual_seed(seed)
    rnd = torch.randn(num_random, dim, generator=g, dtype=torch.float64)
    return torch.cat([axes, rnd / rnd.norm(dim=1, keepdim=True)])


@dataclass
class ProjectedKS:
    p_value: float  # Bonferroni-combined
    statistic: float  # largest KS distance over the projections
    p_values: np.ndarray  # per projection


def _combine(results) -> ProjectedKS:
    ps = np.array([r.pvalue for r in results])
    return ProjectedKS(float(min(1.0, len(ps) * ps.min())), float(max(r.statistic for r in results)), ps)


def ks_two_sample(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor | None = None) -> ProjectedKS:
    """Two-sample KS on projections of a (N, D) and b (M, D)."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    v = projection_directions(a.shape[1]) if directions is None else directions
    pa, pb = (a @ v.T).numpy(), (b @ v.T).numpy()
    return _combine([stats.ks_2samp(pa[:, i], pb[:, i]) for i in range(v.shape[0])])


def ks_against_cdf(
    a: torch.Tensor, cdf: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], directions: torch.Tensor | None = None
) -> ProjectedKS:
    """One-sample KS of a (N, D) against exact projected CDFs ``cdf(direction, values)``."""
    a = a.reshape(a.shape[0], -1).double()
    v = projection_directions(a.shape[1]) if directions is None else directions
    proj = a @ v.T
    res = [
        stats.ks_1samp(proj[:, i].numpy(), lambda s, i=i: cdf(v[i], torch.from_numpy(np.asarray(s))).numpy())
        for i in range(v.shape[0])
    ]
    return _combine(res)
