"""Verification of a round of drafts: token-wise (sequential RMC) and block verification.

The proposer hands over a :class:`Proposal` (drafts, their means and the target means from one batched
target call); a verifier returns a :class:`Verdict`. Both verifiers are pure functions of the proposal
and the uniforms passed in, so they can be compared on identical drafts.

Shapes: B chains, L = longest draft in the batch, D = flattened sample size. Chain b uses positions
1..length[b]; position j is the step from state index k - j + 1 of the round started at k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from specdit import coupling, residual


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@dataclass
class Proposal:
    x_draft: torch.Tensor  # (B, L, D) draft states xh_1..xh_L, float64
    m_draft: torch.Tensor  # (B, L, D) draft kernel means mh_j
    m_target: torch.Tensor  # (B, L, D) target kernel means m_j (from xh_{j-1})
    sigma: torch.Tensor  # (B, L) kernel std of each position
    length: torch.Tensor  # (B,) int64 number of valid positions, >= 1
    temper: torch.Tensor | None = None  # (B, L) >= 1: relaxation divides log q/p by it (None: exact)

    def host_scalars(self) -> tuple[np.ndarray, np.ndarray]:
        """(log_r, d), both (B, L) float64 numpy on the host, from one device-to-host transfer: log q_j(xh_j) /
        p_j(xh_j) (relaxed by ``temper`` when given) and d_j = |m_j - mh_j| / s_j (``coupling.ratio_and_gap``)."""
        diff = self.m_target - self.m_draft  # (B, L, D)
        dot = torch.linalg.vecdot(diff, 2.0 * self.x_draft - self.m_target - self.m_draft)  # (B, L)
        n, dot = torch.stack([torch.linalg.vector_norm(diff, dim=-1), dot]).cpu().numpy()
        log_r, d = coupling.ratio_and_gap(dot, n, _host(self.sigma))
        return (log_r if self.temper is None else log_r / _host(self.temper)), d

    def log_ratio(self) -> torch.Tensor:
        """(B, L) log q_j(xh_j) / p_j(xh_j), relaxed by ``temper`` when given."""
        return torch.from_numpy(self.host_scalars()[0]).to(self.x_draft.device)

    def gaps(self) -> torch.Tensor:
        """(B, L) d_j = |m_j - mh_j| / s_j."""
        return torch.from_numpy(self.host_scalars()[1]).to(self.x_draft.device)

    def valid(self) -> torch.Tensor:
        L = self.x_draft.shape[1]
        return torch.arange(1, L + 1, device=self.length.device)[None, :] <= self.length[:, None]  # (B, L)


@dataclass
class Verdict:
    state: torch.Tensor  # (B, D) the chain's next state, after `steps` steps
    kept: torch.Tensor  # (B,) int64 drafts kept (tau)
    steps: torch.Tensor  # (B,) int64 steps advanced = min(tau + 1, length)


def _pick(a: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """a[b, pos[b]] for a (B, L, ...) and 0-based positions (B,)."""
    idx = pos.clamp(0, a.shape[1] - 1)
    return a[torch.arange(a.shape[0], device=a.device), idx]


def verify_token(p: Proposal, log_u: torch.Tensor) -> Verdict:
    """Token-wise verification (FREE Alg. 2): RMC at positions 1, 2, ... until the first rejection,
    whose reflected draft is the next state. ``log_u``: (B, L) log uniforms."""
    valid = p.valid()
    accept = (log_u <= p.log_ratio()) | ~valid  # (B, L)
    # tau = number of leading accepted drafts, capped by the chain's length.
    kept = torch.cumprod(accept.long(), dim=1).sum(dim=1).clamp_max(p.length)
    rejected = kept < p.length
    at = kept  # 0-based index of position tau + 1
    reflected = coupling.reflect(_pick(p.x_draft, at), _pick(p.m_draft, at), _pick(p.m_target, at))
    last = _pick(p.x_draft, p.length - 1)
    state = torch.where(rejected[:, None], reflected, last)
    return Verdict(state, kept, torch.where(rejected, kept + 1, kept))


def block_weights(log_r: np.ndarray, gaps: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block verification's acceptance weights (Sun et al. 2025, Alg. 2, continuous form), in float64 numpy.

    ``log_r`` (B, L): log q_j(xh_j)/p_j(xh_j); ``gaps`` (B, L): d_j; ``length`` (B,) ints. Returns (log_p, h),
    both (B, L + 1) with index j = 0..L: ``p_0 = 1, p_j = min(1, p_{j-1} r_j)``; ``h_j = R_j / (R_j + 1 - p_j)``
    for j < length, ``h_length = p_length``, 0 beyond, with ``R_j = R(p_j, d_{j+1})``. h_0 is unused (0)."""
    B, L = log_r.shape
    log_p = np.zeros((B, L + 1))
    for j in range(1, L + 1):
        log_p[:, j] = np.minimum(log_p[:, j - 1] + log_r[:, j - 1], 0.0)
    h = np.zeros_like(log_p)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        R = np.exp(residual.log_residual_mass(log_p[:, 1:L], gaps[:, 1:L]))  # (B, L-1): R_j for j = 1..L-1
        one_minus_p = -np.expm1(log_p[:, 1:L])
        h[:, 1:L] = np.where(one_minus_p > 0, R / (R + one_minus_p), 1.0)
        j = np.arange(L + 1)[None, :]
        h = np.where(j == length[:, None], np.exp(log_p), h)
    return log_p, np.where(j > length[:, None], 0.0, h)


def block_decisions(p: Proposal) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_weights` of a proposal, as (B, L + 1) float64 tensors on its device."""
    log_p, h = block_weights(_host(p.log_ratio()), _host(p.gaps()), _host(p.length))
    return torch.from_numpy(log_p).to(p.x_draft.device), torch.from_numpy(h).to(p.x_draft.device)


def verify_block(p: Proposal, eta: torch.Tensor, w: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]) -> Verdict:
    """Block verification: tau = max{j : eta_j <= h_j} (0 if none), keep xh_1..xh_tau and, if
    tau < length, draw the next state from the residual norm(max(0, p_tau q_{tau+1} - p_{tau+1})).

    eta: (B, L) uniforms; w: (B,) uniforms for the residual's coordinate along e, or a function of the rejected
    rows (R,) returning their (R,) uniforms (drawn only where a residual is sampled). The residual keeps the
    rejected draft xh_{tau+1}'s noise orthogonal to e (exact: see ``coupling.sample_residual``). The scalar
    maths (weights, tau, the residual's coordinate) runs in numpy on the host (``specdit.residual``)."""
    B, L, _ = p.x_draft.shape
    dev, length = p.x_draft.device, _host(p.length)
    log_r, gaps = p.host_scalars()
    log_p, h = block_weights(log_r, gaps, length)
    kept = np.where(_host(eta) <= h[:, 1:], np.arange(1, L + 1)[None, :], 0).max(axis=1)  # (B,) tau
    rejected = kept < length
    flat = lambda a: a.flatten(0, 1)  # noqa: E731 (B, L, ...) -> (B L, ...), item b L + j - 1 is position j
    state = flat(p.x_draft)[torch.from_numpy(np.arange(B) * L + length - 1).to(dev)]  # (B, D) xh_length, a copy
    rows = np.flatnonzero(rejected)  # the residual sampler runs only where a draft was rejected
    if rows.size:
        at = kept[rows]  # 0-based index of position tau + 1
        item, rows_t = (torch.from_numpy(a).to(dev) for a in (rows * L + at, rows))
        w_rows = w(rows_t) if callable(w) else w[rows_t]
        state[rows_t] = coupling.sample_residual(flat(p.m_target)[item], flat(p.m_draft)[item],
                                                 _host(p.sigma)[rows, at], log_p[rows, at], w_rows, flat(p.x_draft)[item])
    kept_t = torch.from_numpy(kept).to(dev)
    return Verdict(state, kept_t, torch.where(torch.from_numpy(rejected).to(dev), kept_t + 1, kept_t))
