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

Everything is evaluated in float64 and in log space where a naive ratio would overflow; the residual's
one-dimensional maths (R, its CDF and their inverse) runs on the host in Python floats (``specdit.residual``).
A step with s = 0 (the deterministic last step) is handled as a point mass: d = inf, the draft is
rejected unless it equals the target mean, and the residual is the target mean itself.
"""
from __future__ import annotations

import math

import torch

from specdit import residual


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


def _floats(a, shape: torch.Size | tuple[int, ...]) -> list[float]:
    """``a`` broadcast to ``shape``, as a flat list of Python floats on the host (the arguments of
    ``specdit.residual``'s scalar functions): a tensor (any device and float dtype, broadcastable), a sequence of
    that many numbers, or one number (Python or numpy scalar)."""
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).expand(shape).reshape(-1).tolist()
    try:
        return [float(v) for v in a]
    except TypeError:  # one number
        return [float(a)] * math.prod(shape)


def log_residual_mass(log_c: torch.Tensor | float, d: torch.Tensor) -> torch.Tensor:
    """log R(c, d), R = integral max(0, c q - p) = c Phi(u*) - Phi(u* - d), for c in (0, 1], d >= 0, u* = d/2 +
    ln(c)/d (same shape and device as d). R = 0 (log R = -inf) when d = 0 (c <= 1) or c = 0; R = c when d = inf
    (point-mass target). Computed on the host (``specdit.residual.log_residual_mass``)."""
    out = [residual.log_residual_mass(a, b) for a, b in zip(_floats(log_c, d.shape), _floats(d, d.shape))]
    return torch.tensor(out, dtype=torch.float64, device=d.device).view(d.shape)


def residual_mass(c: torch.Tensor | float, d: torch.Tensor) -> torch.Tensor:
    """R(c, d) = c Phi(d/2 + ln c / d) - Phi(-d/2 + ln c / d) (docs/design.md)."""
    c = torch.as_tensor(c, dtype=torch.float64).expand_as(d)
    return log_residual_mass(torch.log(c), d).exp()


def sample_residual_coordinate(log_c: torch.Tensor, d: torch.Tensor, w: torch.Tensor,
                               iters: int = residual.NEWTON_MAX_ITERS) -> torch.Tensor:
    """u ~ norm(max(0, c phi(u) - phi(u - d))) by Newton's method on the log CDF
    (``specdit.residual.sample_coordinate``: arithmetic, accuracy and stopping rule there).

    log_c, d, w: (B,), w uniform in (0, 1). Requires d in (0, inf) and c > 0; returns u (B,) on d's device,
    measured from the target mean towards the draft mean in units of s."""
    u = [residual.sample_coordinate(a, b, c, iters) for a, b, c in zip(*(_floats(x, d.shape) for x in (log_c, d, w)))]
    return torch.tensor(u, dtype=torch.float64, device=d.device).view(d.shape)


def ratio_and_gap(dot: float, n: float, s: float) -> tuple[float, float]:
    """From dot = (m - mh).(2x - m - mh), n = |m - mh| and s (host floats), the log density ratio
    log q(x)/p(x) = dot / (2 s^2) (:func:`log_density_ratio`) and the gap d = n / s (:func:`mean_gap`); a point
    mass (s = 0) has log q/p = 0 and d = 0 if n = 0, else -inf and inf."""
    if s > 0:
        twice_var = 2.0 * (s * s)  # 0 once s^2 underflows (s < ~1e-162): then +-inf, or nan for dot = 0, as numpy
        log_r = dot / twice_var if twice_var > 0 else (math.copysign(math.inf, dot) if dot != 0 and dot == dot
                                                       else math.nan)  # as numpy: +-inf, or nan for 0/0 and nan/0
        return log_r, (0.0 if n == 0 else n / s)
    return (0.0, 0.0) if n == 0 else (-math.inf, math.inf)


def ratio_and_gap_rows(dot: torch.Tensor, n: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ratio_and_gap` on float64 tensors of one shape, the same floats bit for bit (one IEEE multiply and
    divide per value, edge cases as there): the form for many chains at once, where per-value Python costs
    more than a few vectorised operations."""
    twice_var = 2.0 * (s * s)
    point = n == 0  # the means agree
    inf = torch.full_like(n, math.inf)
    positive = s > 0
    log_r = torch.where(positive, dot / twice_var, torch.where(point, torch.zeros_like(n), -inf))
    gap = torch.where(point, torch.zeros_like(n), torch.where(positive, n / s, inf))
    return log_r, gap


def sample_residual(
    m_target: torch.Tensor,
    m_draft: torch.Tensor,
    sigma,
    log_c,
    w,
    x_draft: torch.Tensor,
) -> torch.Tensor:
    """A draw from norm(max(0, c q - p)), (B, D), that keeps the rejected draft's orthogonal noise.

    m_target, m_draft, x_draft: (B, D); sigma, log_c, w: (B,) tensors, sequences of B numbers or single numbers
    (w uniforms in (0, 1)).
    Computed as m + v + (mh - m) (s u / n - ((mh - m).v / n) / n) with v = x_draft - mh and n = |mh - m|, i.e.
    m + s u e + (v minus its e-component); the scalars run on the host (one transfer each way).

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

    A point-mass target (s = 0) returns m; equal means (d = 0) return the draft.
    """
    diff, v = m_draft - m_target, x_draft - m_draft  # (B, D)
    n, dot = torch.stack([torch.linalg.vector_norm(diff, dim=1), torch.linalg.vecdot(diff, v)]).cpu().tolist()
    B = len(n)
    s, log_c, w = (_floats(a, (B,)) for a in (sigma, log_c, w))
    scale = []  # per row: (1 if s > 0, the coefficient of diff)
    for n_b, dot_b, s_b, lc_b, w_b in zip(n, dot, s, log_c, w):
        d = 0.0 if n_b == 0 else (n_b / s_b if s_b > 0 else math.inf)
        ok = 0 < d < math.inf  # else (equal means, or a point-mass target) no coordinate to draw
        u = residual.sample_coordinate(lc_b, d, w_b) if ok else 0.0
        scale.append((1.0 if s_b > 0 else 0.0, s_b * u / n_b - dot_b / n_b / n_b if ok else 0.0))
    scale_t = torch.tensor(scale, dtype=torch.float64, device=diff.device).view(B, 2)  # (B, 2)
    return m_target + v * scale_t[:, :1] + diff * scale_t[:, 1:]
