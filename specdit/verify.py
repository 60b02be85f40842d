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

import torch

from specdit import coupling


@dataclass
class Proposal:
    x_draft: torch.Tensor  # (B, L, D) draft states xh_1..xh_L, float64
    m_draft: torch.Tensor  # (B, L, D) draft kernel means mh_j
    m_target: torch.Tensor  # (B, L, D) target kernel means m_j (from xh_{j-1})
    sigma: torch.Tensor  # (B, L) kernel std of each position
    length: torch.Tensor  # (B,) int64 number of valid positions, >= 1
    temper: torch.Tensor | None = None  # (B, L) >= 1: relaxation divides log q/p by it (None: exact)

    def log_ratio(self) -> torch.Tensor:
        """(B, L) log q_j(xh_j) / p_j(xh_j), relaxed by ``temper`` when given."""
        B, L, D = self.x_draft.shape
        flat = lambda a: a.reshape(B * L, D)  # noqa: E731
        lr = coupling.log_density_ratio(
            flat(self.x_draft), flat(self.m_target), flat(self.m_draft), self.sigma.reshape(-1)
        ).view(B, L)
        return lr if self.temper is None else lr / self.temper

    def gaps(self) -> torch.Tensor:
        """(B, L) d_j = |m_j - mh_j| / s_j."""
        B, L, D = self.x_draft.shape
        return coupling.mean_gap(
            self.m_target.reshape(B * L, D), self.m_draft.reshape(B * L, D), self.sigma.reshape(-1)
        ).view(B, L)

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


def block_decisions(p: Proposal) -> tuple[torch.Tensor, torch.Tensor]:
    """Block verification's acceptance weights (Sun et al. 2025, Alg. 2, continuous form).

    Returns (log_p, h), both (B, L + 1) with index j = 0..L:
    ``p_0 = 1, p_j = min(1, p_{j-1} r_j)``; ``h_j = R_j / (R_j + 1 - p_j)`` for j < length,
    ``h_length = p_length``, with ``R_j = R(p_j, d_{j+1})``. h_0 is unused (0)."""
    B, L, _ = p.x_draft.shape
    log_r = p.log_ratio()
    gaps = p.gaps()
    log_p = torch.zeros(B, L + 1, dtype=torch.float64, device=log_r.device)
    for j in range(1, L + 1):
        log_p[:, j] = (log_p[:, j - 1] + log_r[:, j - 1]).clamp_max(0.0)
    h = torch.zeros_like(log_p)
    log_R = coupling.log_residual_mass(log_p[:, 1:L], gaps[:, 1:L])  # (B, L-1): R_j for j = 1..L-1
    R = log_R.exp()
    one_minus_p = -torch.expm1(log_p[:, 1:L])
    h_mid = torch.where(one_minus_p > 0, R / (R + one_minus_p), torch.ones_like(R))
    h[:, 1:L] = h_mid
    j = torch.arange(L + 1, device=log_r.device)[None, :]
    h = torch.where(j == p.length[:, None], log_p.exp(), h)
    h = torch.where(j > p.length[:, None], torch.zeros_like(h), h)
    return log_p, h


def verify_block(p: Proposal, eta: torch.Tensor, w: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]) -> Verdict:
    """Block verification: tau = max{j : eta_j <= h_j} (0 if none), keep xh_1..xh_tau and, if
    tau < length, draw the next state from the residual norm(max(0, p_tau q_{tau+1} - p_{tau+1})).

    eta: (B, L) uniforms; w: (B,) uniforms for the residual's coordinate along e, or a function of the rejected
    rows (R,) returning their (R,) uniforms (drawn only where a residual is sampled). The residual keeps the
    rejected draft xh_{tau+1}'s noise orthogonal to e (exact: see ``coupling.sample_residual``)."""
    B, L, _ = p.x_draft.shape
    log_p, h = block_decisions(p)
    hit = eta <= h[:, 1:]  # (B, L)
    pos = torch.arange(1, L + 1, device=eta.device)[None, :]
    kept = torch.where(hit, pos, torch.zeros_like(pos)).amax(dim=1)  # (B,)
    rejected = kept < p.length
    state = _pick(p.x_draft, p.length - 1).clone()
    rows = rejected.nonzero().squeeze(1)  # the residual sampler runs only where a draft was rejected
    if rows.numel():
        at = kept[rows]
        state[rows] = coupling.sample_residual(
            _pick(p.m_target[rows], at), _pick(p.m_draft[rows], at), _pick(p.sigma[rows], at),
            log_p[rows, at], w(rows) if callable(w) else w[rows], _pick(p.x_draft[rows], at),
        )
    return Verdict(state, kept, torch.where(rejected, kept + 1, kept))
