"""Block verification's one-dimensional maths in float64: the residual mass R(c, d), the residual's CDF along the
mean gap, and its inverse (Sun et al. 2025, Alg. 2, continuous form; docs/design.md, "Block verification").

Every function here takes one chain's (or one position's) Python floats (sampler arithmetic version 5): a
round at batch 1 handles a few dozen numbers, and right after a network call has evicted numpy's code from the
caches each numpy function cost ~20 us there, each torch operation several (issue 24: this maths was the
largest part of a round's work outside the networks). ``specdit.coupling`` and ``specdit.verify`` bring their
(B,) and (B, L) inputs to the host as lists and the results back; a chain's values never depend on the
other rows of its batch. The bisection reference stays vectorised numpy with scipy's ``log_ndtr``.

With u measured from the target mean towards the draft mean in units of the kernel std s, the residual
c q - p restricted to that line is g(u) = c phi(u) - phi(u - d), positive exactly on u < u* = d/2 + ln(c)/d;
its CDF is G(u) = c Phi(u) - Phi(u - d) and its mass R(c, d) = G(u*).
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from scipy.special import log_ndtr as _log_ndtr_np

NEWTON_MAX_ITERS = 40
NEWTON_STALL = 1e-12  # a step this short (relative to 1 + |u|) that does not shrink ends the iteration
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_SQRT2 = math.sqrt(2.0)
_MINUS_LOG2 = -math.log(2.0)
_STANDARD_NORMAL = NormalDist()
# log Phi(x) ~ -x^2/2 - log(-x) - log sqrt(2 pi) + log(1 + sum_k (-1)^k (2k-1)!! / x^(2k)) for x <= -20
_ASYMPTOTIC = [(-1) ** k * math.prod(range(1, 2 * k, 2)) for k in range(1, 11)]


def _log(x: float) -> float:
    return math.log(x) if x > 0 else (-math.inf if x == 0 else math.nan)


def _log1p(x: float) -> float:
    return math.log1p(x) if x > -1 else (-math.inf if x == -1 else math.nan)


def safe_exp(x: float) -> float:
    """math.exp, inf on overflow (as numpy's exp)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def safe_expm1(x: float) -> float:
    """math.expm1, inf on overflow."""
    try:
        return math.expm1(x)
    except OverflowError:
        return math.inf


def log_ndtr(x: float) -> float:
    """log Phi(x) in float64 for every x: log1p(-Phi(-x)) above 0 (Phi(-x) = erfc(x / sqrt 2) / 2 keeps its
    relative accuracy), log(erfc(-x / sqrt 2) / 2) on (-20, 0], and the asymptotic series (10 terms, relative
    error < 1e-16) at and below -20. Checked against mpmath and scipy's ``log_ndtr``
    (tests/test_overheads.py)."""
    if x > 0.0:  # -Phi(-x) in [-1/2, 0): log1p needs no guard
        return math.log1p(-0.5 * math.erfc(x / _SQRT2))
    if x > -20.0:  # Phi(x) >= Phi(-20) ~ 3e-89 > 0: log needs no guard
        return math.log(0.5 * math.erfc(-x / _SQRT2))
    if x != x or x == -math.inf:
        return x
    t = 1.0 / (x * x)
    series = 0.0
    for coef in reversed(_ASYMPTOTIC):  # Horner in t: sum_k coef_k t^k
        series = (series + coef) * t
    return -0.5 * x * x - _log(-x) - _LOG_SQRT_2PI + _log1p(series)


def log1mexp(x: float) -> float:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x (Maechler 2012)."""
    if x > _MINUS_LOG2:  # log(0) at x = 0 is -inf; x > 0 (outside the domain) gives NaN, as before
        e = -safe_expm1(x)
        return math.log(e) if e > 0 else (-math.inf if e == 0 else math.nan)
    return math.log1p(-math.exp(x))  # exp(x) <= 1/2 (NaN passes through)


def residual_threshold(log_c: float, d: float) -> float:
    """u* = d/2 + ln(c)/d: the residual c phi(u) - phi(u - d) is positive exactly on u < u*."""
    return d / 2.0 + log_c / d


def log_residual_cdf(u: float, log_c: float, d: float) -> float:
    """log G(u), G(u) = c Phi(u) - Phi(u - d), valid for u <= u* (where G is increasing)."""
    lp = log_ndtr(u)
    return log_c + lp + log1mexp(min(log_ndtr(u - d) - lp - log_c, 0.0))


def log_residual_density(u: float, log_c: float, d: float) -> float:
    """log g(u), g(u) = c phi(u) (1 - exp(u d - d^2/2 - ln c)), for u < u*."""
    return log_c - 0.5 * u * u - _LOG_SQRT_2PI + log1mexp(min(u * d - 0.5 * d * d - log_c, 0.0))


def log_residual_mass(log_c: float, d: float) -> float:
    """log R(c, d), R = integral max(0, c q - p) = c Phi(u*) - Phi(u* - d), for c in (0, 1], d >= 0.

    R = 0 (log R = -inf) when d = 0 (c <= 1) or c = 0; R = c when d = inf (point-mass target)."""
    if d == math.inf:
        return log_c
    if not (d > 0 and math.isfinite(d) and math.isfinite(log_c)):
        return -math.inf
    return log_residual_cdf(residual_threshold(log_c, d), log_c, d)


def _newton_start(target: float, log_c: float, u_star: float) -> float:
    """A start left of the root of log G(u) = target: the root of log c + log Phi(u) = target (G <= c Phi),
    or, where exp underflows, -sqrt(-2 (target - ln c)) (log Phi(u) < -u^2/2 for u < 0), capped at u*."""
    lt = min(target - log_c, 0.0)
    if not lt > -700.0:
        return min(-math.sqrt(-2.0 * lt) if lt == lt else lt, u_star)
    p = math.exp(lt)
    return min(_STANDARD_NORMAL.inv_cdf(p) if p < 1.0 else math.inf, u_star)


def sample_coordinate(log_c: float, d: float, w: float, iters: int = NEWTON_MAX_ITERS) -> float:
    """Draw u ~ norm(max(0, c phi(u) - phi(u - d))) by inverting its CDF G(u)/R: Newton's method on
    F(u) = log G(u) - log(w R) in float64 with Python floats (sampler arithmetic version 5; version 4 ran the
    same iteration in numpy, versions 2-3 in torch, version 1 bisected, see
    :func:`sample_coordinate_bisection`; all agree to float64 accuracy). One chain's scalars: a round handles
    a few, and right after a network call numpy's per-call cost (~20 us per function then) dominated.

    G is the CDF of a log-concave density (log phi and the log of a positive concave function are concave),
    so F is concave and increasing on u < u*: Newton steps from a start left of the root
    (:func:`_newton_start`) increase monotonically to it. The iteration stops once its step is below
    float64 resolution, or is below ``NEWTON_STALL`` (1 + |u|) and no shorter than the previous step (F's own
    rounding, ~1e-14 relative, then bounces u between neighbouring floats), after at most ``iters`` steps.
    Where log G underflows to -inf (extreme c and d, reached with vanishing probability) the bisection's
    value is taken.

    Requires d in (0, inf), c > 0 and w in (0, 1); returns u, measured from the target mean towards the draft
    mean in units of s."""
    u_star = residual_threshold(log_c, d)
    target = _log(w) + log_residual_cdf(u_star, log_c, d)  # log(w R)
    u, last = _newton_start(target, log_c, u_star), math.inf
    for _ in range(iters):
        log_G = log_residual_cdf(u, log_c, d)
        new = min(u - (log_G - target) * safe_exp(log_G - log_residual_density(u, log_c, d)), u_star)
        if not math.isfinite(new):
            break
        moved = abs(new - u)
        stalled = last <= moved <= NEWTON_STALL * (1 + abs(new))
        u, last = new, moved
        if moved <= 1e-15 + 4e-16 * abs(new) or stalled:
            break
    if not math.isfinite(u):
        u = float(sample_coordinate_bisection(np.array([log_c]), np.array([d]), np.array([w]))[0])
    return u


def _log_residual_cdf_np(u: np.ndarray, log_c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """:func:`log_residual_cdf` on numpy arrays with scipy's ``log_ndtr`` (the bisection's own arithmetic)."""
    lp = _log_ndtr_np(u)
    x = np.minimum(_log_ndtr_np(u - d) - lp - log_c, 0.0)
    return log_c + lp + np.where(x > -math.log(2.0), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def sample_coordinate_bisection(log_c: np.ndarray, d: np.ndarray, w: np.ndarray, iters: int = 80) -> np.ndarray:
    """The reference inverse CDF by bisection (sampler arithmetic version 1), vectorised in numpy with scipy's
    ``log_ndtr``: 80 halvings of a bracket, in float64 and log space. An independent check of
    :func:`sample_coordinate` (other arithmetic, other algorithm) and its fallback. log_c, d, w: (B,)."""
    u_star = d / 2.0 + log_c / d
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        target = np.log(w) + _log_residual_cdf_np(u_star, log_c, d)  # log(w R)
        # G(u) <= c Phi(u), so G(lo) <= w R once c Phi(lo) <= w R: a safe lower bracket.
        lo = np.minimum(u_star, -40.0)
        lo = np.where(_log_ndtr_np(lo) + log_c <= target, lo, lo - 40.0)
        hi = u_star.copy()
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            below = _log_residual_cdf_np(mid, log_c, d) < target
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)
