"""Pure mathematics of exact speculative verification for equal-variance Gaussian kernels.

Draft kernel p = N(mh, s^2 I), target kernel q = N(m, s^2 I); norms run over the whole sample, so every
function takes flattened float64 tensors ``(B, D)`` (means, states) and ``(B,)`` scalars.
With ``d = |m - mh| / s``:

- reflection maximal coupling (RMC, FREE, arXiv 2511.20390, supplementary §B, eqs. 13-14): accept the draft xh with
  probability min(1, q(xh)/p(xh)), else output ``m + (I - 2 e e^T)(xh - mh)``, ``e = (mh - m)/|mh - m|``;
  P(reject) = TV(p, q) = 2 Phi(d/2) - 1.
- block verification (Sun et al. 2025, Alg. 2; arXiv 2606.13426) with the residual mass
  ``R(c, d) = c Phi(d/2 + ln c / d) - Phi(-d/2 + ln c / d)`` and the continuous residual sampler of
  ``norm(max(0, c q - p))``.

Everything is evaluated in float64 and in log space where a naive ratio would overflow.
A step with s = 0 (the deterministic last step) is handled as a point mass: d = inf, the draft is
rejected unless it equals the target mean, and the residual is the target mean itself.
"""
from __future__ import annotations

import math

import torch
from torch.special import log_ndtr


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _bcast(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64, device=like.device).expand(like.shape[0])


def mean_gap(m_target: torch.Tensor, m_draft: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """d = |m - mh| / s, (B,); inf where s = 0 and the means differ, 0 where they agree."""
    gap = (m_target - m_draft).norm(dim=1)  # (B,)
    s = _bcast(sigma, gap)
    return torch.where(gap == 0, torch.zeros_like(gap), gap / s)


def log_density_ratio(
    x: torch.Tensor, m_target: torch.Tensor, m_draft: torch.Tensor, sigma: torch.Tensor | float
) -> torch.Tensor:
    """log q(x)/p(x) = (|x - mh|^2 - |x - m|^2) / (2 s^2) = (m - mh).(2x - m - mh) / (2 s^2), (B,).

    The second form never forms a density, so it is exact for huge gaps. s = 0: 0 if m = mh else -inf."""
    num = ((m_target - m_draft) * (2.0 * x - m_target - m_draft)).sum(dim=1)  # (B,)
    s = _bcast(sigma, num)
    same = (m_target == m_draft).all(dim=1)
    point = torch.where(same, torch.zeros_like(num), torch.full_like(num, -math.inf))
    return torch.where(s > 0, num / (2.0 * s.clamp_min(1e-300) ** 2), point)


def reflect(x_draft: torch.Tensor, m_draft: torch.Tensor, m_target: torch.Tensor) -> torch.Tensor:
    """Reflection map S(x) = m + (I - 2 e e^T)(x - mh), e = (mh - m)/|mh - m| (FREE eq. 14), (B, D)."""
    diff = m_draft - m_target  # (B, D)
    norm = diff.norm(dim=1, keepdim=True)
    e = diff / torch.where(norm > 0, norm, torch.ones_like(norm))
    v = x_draft - m_draft
    return m_target + v - 2.0 * e * (e * v).sum(dim=1, keepdim=True)


def rmc(
    x_draft: torch.Tensor,
    m_draft: torch.Tensor,
    m_target: torch.Tensor,
    sigma: torch.Tensor | float,
    log_u: torch.Tensor,
    log_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reflection maximal coupling: returns (output (B, D), accepted (B,) bool).

    ``log_u``: (B,) log of uniforms; accept iff log u <= log q(xh)/p(xh). The output is distributed
    exactly as q whatever the draft mean. ``log_ratio`` may be given (e.g. relaxed) instead of computed.
    """
    if log_ratio is None:
        log_ratio = log_density_ratio(x_draft, m_target, m_draft, sigma)
    accepted = log_u <= log_ratio
    out = torch.where(accepted[:, None], x_draft, reflect(x_draft, m_draft, m_target))
    return out, accepted


def tv_distance(d: torch.Tensor) -> torch.Tensor:
    """TV(N(m, s^2 I), N(mh, s^2 I)) = 2 Phi(d/2) - 1 = erf(d / (2 sqrt 2))."""
    return torch.erf(d / (2.0 * math.sqrt(2.0)))


def _log_residual_cdf(u: torch.Tensor, log_c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """log G(u), G(u) = c Phi(u) - Phi(u - d), valid for u <= u* (where G is increasing)."""
    lp = log_ndtr(u)
    return log_c + lp + log1mexp((log_ndtr(u - d) - lp - log_c).clamp_max(0.0))


def residual_threshold(log_c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """u* = d/2 + ln(c)/d: the residual c phi(u) - phi(u - d) is positive exactly on u < u*."""
    return d / 2.0 + log_c / d


def log_residual_mass(log_c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """log R(c, d), R = integral max(0, c q - p) = c Phi(u*) - Phi(u* - d), for c in (0, 1], d >= 0.

    R = 0 (log R = -inf) when d = 0 (c <= 1) or c = 0; R = c when d = inf (point-mass target)."""
    log_c = torch.as_tensor(log_c, dtype=torch.float64, device=d.device).expand_as(d)
    finite = (d > 0) & torch.isfinite(d) & torch.isfinite(log_c)
    d_safe = torch.where(finite, d, torch.ones_like(d))
    lc_safe = torch.where(finite, log_c, torch.zeros_like(log_c))
    val = _log_residual_cdf(residual_threshold(lc_safe, d_safe), lc_safe, d_safe)
    out = torch.where(finite, val, torch.full_like(d, -math.inf))
    return torch.where(torch.isinf(d) & (d > 0), log_c, out)


def residual_mass(c: torch.Tensor | float, d: torch.Tensor) -> torch.Tensor:
    """R(c, d) = c Phi(d/2 + ln c / d) - Phi(-d/2 + ln c / d) (docs/design.md)."""
    c = torch.as_tensor(c, dtype=torch.float64).expand_as(d)
    return log_residual_mass(torch.log(c), d).exp()


NEWTON_MAX_ITERS = 40
NEWTON_STALL = 1e-12  # a step this short (relative to 1 + |u|) that does not shrink ends the iteration
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _log_residual_density(u: torch.Tensor, log_c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """log g(u), g(u) = c phi(u) - phi(u - d) = c phi(u) (1 - exp(u d - d^2/2 - ln c)), for u < u*."""
    return log_c - 0.5 * u * u - _LOG_SQRT_2PI + log1mexp((u * d - 0.5 * d * d - log_c).clamp_max(0.0))


def _newton_start(target: torch.Tensor, log_c: torch.Tensor, u_star: torch.Tensor) -> torch.Tensor:
    """A start left of the root of log G(u) = target: the root of log c + log Phi(u) = target (G <= c Phi),
    or, where exp underflows, -sqrt(-2 (target - ln c)) (log Phi(u) < -u^2/2 for u < 0), capped at u*."""
    lt = (target - log_c).clamp_max(0.0)
    far = -torch.sqrt(-2.0 * lt)
    near = torch.special.ndtri(torch.exp(lt.clamp_min(-700.0)))
    return torch.minimum(torch.where(lt > -700.0, near, far), u_star)


def sample_residual_coordinate(
    log_c: torch.Tensor, d: torch.Tensor, w: torch.Tensor, iters: int = NEWTON_MAX_ITERS
) -> torch.Tensor:
    """Draw u ~ norm(max(0, c phi(u) - phi(u - d))) by inverting its CDF G(u)/R: Newton's method on
    F(u) = log G(u) - log(w R) in float64 (arithmetic version 3: version 2 stopped only on a step below
    1e-15 + 4e-16 |u| and ran ~5% of draws to the 40-iteration cap, bouncing between floats 1e-14 apart;
    version 1 bisected 80 times, see :func:`sample_residual_coordinate_bisection`; all agree to float64
    accuracy).

    G is the CDF of a log-concave density (g = c phi (1 - e^{ud - d^2/2 - ln c}): log phi and the log of a
    positive concave function are concave), so F is concave and increasing on u < u*: Newton steps from a
    start left of the root (:func:`_newton_start`) increase monotonically to it. Each row stops on its own
    once its step is below float64 resolution (so a row's value never depends on the other rows), after at
    most ``iters`` steps; the run time depends only on (c, d, w), never on random state. Rows where log G
    underflows to -inf (extreme c and d, reached with vanishing probability) take the bisection's value.

    log_c, d, w: (B,), w uniform in (0, 1). Requires d in (0, inf) and c > 0; returns u (B,), measured
    from the target mean towards the draft mean in units of s."""
    u_star = residual_threshold(log_c, d)
    target = torch.log(w) + _log_residual_cdf(u_star, log_c, d)  # log(w R)
    u = _newton_start(target, log_c, u_star)
    live = torch.ones_like(u, dtype=torch.bool)  # rows still iterating (every row is computed; dead rows kept)
    last = torch.full_like(u, math.inf)  # each row's previous step length
    for _ in range(iters):
        log_G = _log_residual_cdf(u, log_c, d)
        step = (log_G - target) * torch.exp(log_G - _log_residual_density(u, log_c, d))  # F / F'
        new = torch.minimum(u - step, u_star)
        ok = torch.isfinite(new)
        new = torch.where(ok, new, u)
        moved = (new - u).abs()
        # converged: a step below float64 resolution, or (version 3) a tiny step no shorter than the last one:
        # F's own rounding (up to ~1e-14 relative in log space) then bounces u between neighbouring floats
        stalled = (moved >= last) & (moved <= NEWTON_STALL * (1 + new.abs()))
        done = ~ok | (moved <= 1e-15 + 4e-16 * new.abs()) | stalled
        u = torch.where(live, new, u)
        last = moved
        live = live & ~done
        if not bool(live.any()):
            break
    bad = ~torch.isfinite(u)  # log G underflows everywhere (extreme c, d): the bisection's answer
    if bool(bad.any()):
        u[bad] = sample_residual_coordinate_bisection(log_c[bad], d[bad], w[bad])
    return u


def sample_residual_coordinate_bisection(
    log_c: torch.Tensor, d: torch.Tensor, w: torch.Tensor, iters: int = 80
) -> torch.Tensor:
    """The reference inverse CDF by bisection (sampler arithmetic version 1): 80 halvings of a bracket, in
    float64 and log space. Kept to test :func:`sample_residual_coordinate` against.

    log_c, d, w: (B,), w uniform in (0, 1). Requires d in (0, inf) and c > 0; returns u (B,), measured
    from the target mean towards the draft mean in units of s."""
    u_star = residual_threshold(log_c, d)
    target = torch.log(w) + _log_residual_cdf(u_star, log_c, d)  # log(w R)
    # G(u) <= c Phi(u), so G(lo) <= w R once c Phi(lo) <= w R: a safe lower bracket.
    lo = torch.minimum(u_star, torch.full_like(u_star, -40.0))
    lo = torch.where(log_ndtr(lo) + log_c <= target, lo, lo - 40.0)
    hi = u_star.clone()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = _log_residual_cdf(mid, log_c, d) < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def sample_residual(
    m_target: torch.Tensor,
    m_draft: torch.Tensor,
    sigma: torch.Tensor | float,
    log_c: torch.Tensor,
    w: torch.Tensor,
    x_draft: torch.Tensor,
) -> torch.Tensor:
    """A draw from norm(max(0, c q - p)), (B, D), that keeps the rejected draft's orthogonal noise.

    Only the component along e = (mh - m)/|mh - m| differs from q: along e, ``w`` (B,) uniforms give the
    coordinate by inverting the residual's CDF (``sample_residual_coordinate``); orthogonal to e the
    residual is the target's own Gaussian, and the output takes the draft's displacement
    ``x_draft - mh`` (B, D) with its e-component removed, so output and draft differ only along e (a
    tighter coupling than fresh normals, and no extra draws).

    Why reusing the draft's orthogonal noise is exact. In token-wise verification the decision at position
    j depends on xh_j only through r_j = q_j(xh_j)/p_j(xh_j), a function of its e-component. In block
    verification (Sun et al. 2025, Alg. 2) the decision also depends on later drafts, but not once they
    are integrated out: with tau = max{j : eta_j <= h_j}, backward induction gives
    P(tau >= j | xh_1..xh_j) = p_j (at j = L, h_L = p_L; below, E[p_{j+1} | xh_1..xh_j] = p_j - R_j and
    h_j (1 - p_j + R_j) = R_j), so P(tau = i | xh_1..xh_{i+1}) = h_i (1 - p_{i+1}), where h_i depends on
    xh_1..xh_i only and p_{i+1} = min(1, p_i r_{i+1}) on xh_{i+1} only through its e-component. Given
    the prefix and tau = i, the orthogonal part of xh_{i+1}'s noise is therefore still N(0, s^2 I) and
    independent of everything the output uses; the e-coordinate is drawn fresh from ``w`` because the
    draft's own e-coordinate is biased by the rejection. Fresh orthogonal normals would be exact too; we
    keep the draft's noise deliberately (tighter coupling; block and token outputs on the same drafts
    then differ only along e).

    A point-mass target (s = 0) returns m.
    """
    d = mean_gap(m_target, m_draft, sigma)  # (B,)
    s = _bcast(sigma, d)
    diff = m_draft - m_target
    norm = diff.norm(dim=1, keepdim=True)
    e = diff / torch.where(norm > 0, norm, torch.ones_like(norm))  # (B, D)
    ok = (d > 0) & torch.isfinite(d)
    u = sample_residual_coordinate(
        torch.where(ok, log_c, torch.zeros_like(log_c)), torch.where(ok, d, torch.ones_like(d)), w
    )
    u = torch.where(ok, u, torch.zeros_like(u))
    v = x_draft - m_draft  # (B, D) the draft's displacement sigma * z
    perp = v - e * (e * v).sum(dim=1, keepdim=True)
    perp = torch.where((s > 0)[:, None], perp, torch.zeros_like(perp))
    return m_target + s[:, None] * u[:, None] * e + perp
