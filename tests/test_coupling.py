"""Reflection maximal coupling, residual mass and the residual sampler against independent references.

Every statistical assertion is a test at level alpha = 1e-3 (false-alarm rate 0.1% per assertion) with
a fixed seed; the references are closed forms, scipy's numerical integration, or rejection sampling.
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from specdit import coupling

ALPHA = 1e-3


def _gaussian_pair(dim: int, d: float, sigma: float, gen: torch.Generator):
    m = torch.randn(dim, generator=gen, dtype=torch.float64)
    e = torch.randn(dim, generator=gen, dtype=torch.float64)
    mh = m + d * sigma * e / e.norm()
    return m, mh


@pytest.mark.parametrize("dim", [1, 16, 4096])
@pytest.mark.parametrize("d", [0.3, 2.0, 60.0])
def test_rmc_output_is_target_and_rejects_at_tv(dim, d):
    """20k draws: (x - m)/s is N(0, I) along e, along a random direction and in squared norm, and the
    rejection rate is TV = 2 Phi(d/2) - 1. d = 60 puts log q/p near -1800: exp overflows float32/64."""
    gen = torch.Generator().manual_seed(dim * 1000 + int(d * 10))
    sigma, n, chunk = 0.7, 20_000, 2_000
    m, mh = _gaussian_pair(dim, d, sigma, gen)
    e = (mh - m) / (mh - m).norm()
    v = torch.randn(dim, generator=gen, dtype=torch.float64)
    v = v / v.norm()
    along, across, sq, rejected = [], [], [], 0
    for _ in range(n // chunk):
        xh = mh + sigma * torch.randn(chunk, dim, generator=gen, dtype=torch.float64)
        log_u = torch.rand(chunk, generator=gen, dtype=torch.float64).log()
        out, acc = coupling.rmc(xh, mh.expand(chunk, -1), m.expand(chunk, -1), sigma, log_u)
        z = (out - m) / sigma
        along.append(z @ e)
        across.append(z @ v)
        sq.append((z * z).sum(1))
        rejected += int((~acc).sum())
    along, across, sq = torch.cat(along).numpy(), torch.cat(across).numpy(), torch.cat(sq).numpy()
    assert np.isfinite(along).all()
    assert stats.kstest(along, "norm").pvalue > ALPHA
    assert stats.kstest(across, "norm").pvalue > ALPHA
    assert stats.kstest(sq, stats.chi2(dim).cdf).pvalue > ALPHA
    tv = float(coupling.tv_distance(torch.tensor(d, dtype=torch.float64)))
    assert abs(tv - (2 * stats.norm.cdf(d / 2) - 1)) < 1e-12
    assert stats.binomtest(rejected, n, min(max(tv, 1e-12), 1 - 1e-12)).pvalue > ALPHA


def test_log_ratio_is_finite_where_naive_ratio_overflows():
    m = torch.zeros(1, 8, dtype=torch.float64)
    mh = torch.full((1, 8), 1e3, dtype=torch.float64)
    x = mh + 0.01
    lr = coupling.log_density_ratio(x, m, mh, 0.01)
    assert torch.isfinite(lr).all() and lr.item() < -1e9
    naive = torch.distributions.Normal(m.float(), 0.01).log_prob(x.float()).sum().exp() / \
        torch.distributions.Normal(mh.float(), 0.01).log_prob(x.float()).sum().exp()
    assert not torch.isfinite(naive) or naive == 0  # the naive form is useless here


def _residual_density(c: float, d: float):
    return lambda u: max(0.0, c * stats.norm.pdf(u) - stats.norm.pdf(u - d))


@pytest.mark.parametrize("c", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("d", [0.1, 1.0, 5.0])
def test_residual_mass_matches_numerical_integration(c, d):
    u_star = d / 2 + math.log(c) / d
    numeric, _ = integrate.quad(_residual_density(c, d), -np.inf, u_star, epsabs=1e-14, epsrel=1e-10)
    closed = float(coupling.residual_mass(c, torch.tensor([d], dtype=torch.float64)))
    assert closed == pytest.approx(numeric, rel=1e-6, abs=1e-13)
    if c == 1.0:
        assert closed == pytest.approx(float(coupling.tv_distance(torch.tensor(d, dtype=torch.float64))), rel=1e-9)


def test_residual_mass_limits():
    d = torch.tensor([0.0, 1e-8, math.inf, 50.0], dtype=torch.float64)
    R = coupling.residual_mass(0.5, d)
    assert R[0] == 0 and R[1] == 0 and R[2] == pytest.approx(0.5) and R[3] == pytest.approx(0.5)
    # c = e^-1e4 underflows, but log R stays finite and below log c.
    log_R = coupling.log_residual_mass(torch.tensor(-1e4, dtype=torch.float64), d[3:])
    assert torch.isfinite(log_R).all() and log_R.item() <= -1e4


@pytest.mark.parametrize("c", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("d", [0.1, 1.0, 5.0])
def test_residual_sampler_matches_its_density(c, d):
    """20k inverse-CDF draws against the CDF obtained by numerically integrating the density."""
    gen = torch.Generator().manual_seed(int(100 * c + 10 * d))
    n = 20_000
    w = torch.rand(n, generator=gen, dtype=torch.float64)
    u = coupling.sample_residual_coordinate(
        torch.full((n,), math.log(c), dtype=torch.float64), torch.full((n,), d, dtype=torch.float64), w
    ).numpy()
    u_star = d / 2 + math.log(c) / d
    assert (u <= u_star + 1e-9).all()
    grid = np.linspace(u_star - 12.0, u_star, 20_001)
    dens = np.maximum(0.0, c * stats.norm.pdf(grid) - stats.norm.pdf(grid - d))
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(grid))])
    cdf /= cdf[-1]
    assert stats.kstest(u, lambda s: np.interp(s, grid, cdf)).pvalue > ALPHA


@pytest.mark.parametrize("c,d", [(0.3, 1.5), (1.0, 0.5), (0.8, 4.0)])
def test_residual_sample_matches_rejection_sampler(c, d):
    """The full D-dim residual sampler against an independent rejection sampler of max(0, c q - p):
    draw x ~ q, keep it with probability max(0, 1 - p(x) / (c q(x)))."""
    gen = torch.Generator().manual_seed(7)
    dim, sigma, n = 3, 0.5, 20_000
    m, mh = _gaussian_pair(dim, d, sigma, gen)
    out = coupling.sample_residual(
        m.expand(n, -1), mh.expand(n, -1), sigma, torch.full((n,), math.log(c), dtype=torch.float64),
        torch.rand(n, generator=gen, dtype=torch.float64),
        mh + sigma * torch.randn(n, dim, generator=gen, dtype=torch.float64),  # a draft whose noise it keeps
    )
    ref = []
    while sum(len(r) for r in ref) < n:
        x = m + sigma * torch.randn(200_000, dim, generator=gen, dtype=torch.float64)
        log_pq = -coupling.log_density_ratio(x, m.expand_as(x), mh.expand_as(x), sigma)  # log p/q
        keep = torch.rand(len(x), generator=gen, dtype=torch.float64) < (1 - log_pq.exp() / c).clamp_min(0)
        ref.append(x[keep])
    ref = torch.cat(ref)[:n]
    e = (mh - m) / (mh - m).norm()
    basis = torch.linalg.qr(torch.stack([e, *torch.eye(dim, dtype=torch.float64)[:dim - 1]], 1))[0].T
    for v in basis:
        assert stats.ks_2samp((out @ v).numpy(), (ref @ v).numpy()).pvalue > ALPHA
