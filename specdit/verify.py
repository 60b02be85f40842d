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

from specdit import coupling, residual


# Above this many (chain, position) values a proposal's scalars are computed as tensors, below it value by
# value in Python floats (faster at batch 1, where every vectorised call runs cache-cold after a network call);
# both give the same floats, so the switch never changes a sample.
PER_VALUE_MAX = 256
H_BOUND_SLACK = 1e-9  # relative slack on the bound h_j <= p_j (block_tau)


@dataclass
class Proposal:
    x_draft: torch.Tensor  # (B, L, D) draft states xh_1..xh_L, float64
    m_draft: torch.Tensor  # (B, L, D) draft kernel means mh_j
    m_target: torch.Tensor  # (B, L, D) target kernel means m_j (from xh_{j-1})
    sigma: torch.Tensor  # (B, L) kernel std of each position
    length: torch.Tensor  # (B,) int64 number of valid positions, >= 1
    temper: torch.Tensor | None = None  # (B, L) >= 1: relaxation divides log q/p by it (None: exact)

    def host_scalars(self) -> tuple[list[list[float]], list[list[float]]]:
        """(log_r, d), both B lists of L Python floats on the host, from one device-to-host transfer: log q_j(xh_j) /
        p_j(xh_j) (relaxed by ``temper`` when given) and d_j = |m_j - mh_j| / s_j (``coupling.ratio_and_gap``)."""
        dot, n = self._dot_and_norm()
        if dot.numel() > PER_VALUE_MAX:
            return tuple(t.cpu().tolist() for t in self._scalar_rows(dot, n))
        return self._scalars_by_value(dot, n)

    def _scalars_by_value(self, dot: torch.Tensor, n: torch.Tensor) -> tuple[list[list[float]], list[list[float]]]:
        n, dot = torch.stack([n, dot]).cpu().tolist()
        pairs = [[coupling.ratio_and_gap(*a) for a in zip(*row)] for row in zip(dot, n, self.sigma.tolist())]
        log_r = [[lr for lr, _ in row] for row in pairs]
        if self.temper is not None:
            log_r = [[lr / t for lr, t in zip(row, trow)] for row, trow in zip(log_r, self.temper.tolist())]
        return log_r, [[d for _, d in row] for row in pairs]

    def log_ratio(self) -> torch.Tensor:
        """(B, L) log q_j(xh_j) / p_j(xh_j), relaxed by ``temper`` when given."""
        dot, n = self._dot_and_norm()
        if dot.numel() > PER_VALUE_MAX:
            return self._scalar_rows(dot, n)[0]
        return self._tensor(self._scalars_by_value(dot, n)[0])

    def gaps(self) -> torch.Tensor:
        """(B, L) d_j = |m_j - mh_j| / s_j."""
        return self._tensor(self.host_scalars()[1])

    def _dot_and_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m - mh).(2 xh - m - mh) and |m - mh|, (B, L) each."""
        diff = self.m_target - self.m_draft  # (B, L, D)
        dot = torch.linalg.vecdot(diff, 2.0 * self.x_draft - self.m_target - self.m_draft)  # (B, L)
        return dot, torch.linalg.vector_norm(diff, dim=-1)

    def _scalar_rows(self, dot: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """host_scalars' values as (B, L) tensors (``coupling.ratio_and_gap_rows``, the same floats)."""
        log_r, d = coupling.ratio_and_gap_rows(dot, n, self.sigma.to(torch.float64))
        return (log_r if self.temper is None else log_r / self.temper), d

    def _tensor(self, rows: list[list[float]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.float64, device=self.x_draft.device).view(self.x_draft.shape[:2])

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


def block_weights(log_r: list[float], gaps: list[float], length: int) -> tuple[list[float], list[float]]:
    """One chain's block verification acceptance weights (Sun et al. 2025, Alg. 2, continuous form), in float64.

    ``log_r`` (L floats): log q_j(xh_j)/p_j(xh_j); ``gaps`` (L floats): d_j; ``length`` its draft length. Returns
    (log_p, h), both L + 1 floats with index j = 0..L: ``p_0 = 1, p_j = min(1, p_{j-1} r_j)``;
    ``h_j = R_j / (R_j + 1 - p_j)`` for j < length, ``h_length = p_length``, 0 beyond, with
    ``R_j = R(p_j, d_{j+1})``. h_0 is unused (0)."""
    log_p = acceptance_log_p(log_r)
    return log_p, [0.0] + [block_weight(log_p, gaps, length, j) for j in range(1, len(log_p))]


def acceptance_log_p(log_r: list[float]) -> list[float]:
    """log p_j, j = 0..L, of one chain: p_0 = 1, p_j = min(1, p_{j-1} r_j) (``log_r``: L floats log r_j)."""
    log_p = [0.0]
    for lr in log_r:
        log_p.append(min(log_p[-1] + lr, 0.0))
    return log_p


def block_weight(log_p: list[float], gaps: list[float], length: int, j: int) -> float:
    """h_j of :func:`block_weights` alone (j in 1..L); R_j is computed only where p_j < 1 needs it."""
    if j >= length:
        return residual.safe_exp(log_p[j]) if j == length else 0.0
    one_minus_p = -residual.safe_expm1(log_p[j])
    if not one_minus_p > 0:  # p_j = 1: h_j = R / R
        return 1.0
    R = residual.safe_exp(residual.log_residual_mass(log_p[j], gaps[j]))  # R_j, gaps[j] = d_{j+1}
    return R / (R + one_minus_p)


def block_tau(log_r: list[float], gaps: list[float], length: int, eta: list[float]) -> tuple[int, list[float]]:
    """One chain's tau = max{j : eta_j <= h_j} (0 if none) and its log p (:func:`acceptance_log_p`): the decisions
    of :func:`block_weights`' h, with fewer residual masses. The h_j are visited from j = L down, so none below
    tau is computed; and since R_j <= p_j makes h_j = R_j / (R_j + 1 - p_j) <= p_j, a position with
    eta_j > p_j (1 + ``H_BOUND_SLACK``) fails without R_j. In floats the computed log R_j exceeds log p_j by at
    most the rounding of two additions (log R = log p + log Phi(u*) + log(1 - ...), both terms <= 0), far
    inside the slack, so every decision is the one the computed h_j gives (tests/test_overheads.py)."""
    log_p = acceptance_log_p(log_r)
    for j in range(len(log_r), 0, -1):
        if j < length and eta[j - 1] > residual.safe_exp(log_p[j]) * (1.0 + H_BOUND_SLACK):
            continue
        if eta[j - 1] <= block_weight(log_p, gaps, length, j):
            return j, log_p
    return 0, log_p


def block_decisions(p: Proposal) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_weights` of a proposal's chains, as (B, L + 1) float64 tensors on its device."""
    log_r, gaps = p.host_scalars()
    rows = [block_weights(*a) for a in zip(log_r, gaps, p.length.tolist())]
    return tuple(torch.tensor([r[i] for r in rows], dtype=torch.float64, device=p.x_draft.device) for i in (0, 1))


def verify_block(p: Proposal, eta: torch.Tensor, w: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]) -> Verdict:
    """Block verification: tau = max{j : eta_j <= h_j} (0 if none), keep xh_1..xh_tau and, if
    tau < length, draw the next state from the residual norm(max(0, p_tau q_{tau+1} - p_{tau+1})).

    eta: (B, L) uniforms; w: (B,) uniforms for the residual's coordinate along e, or a function of the rejected
    rows (R,) returning their (R,) uniforms (drawn only where a residual is sampled). The residual keeps the
    rejected draft xh_{tau+1}'s noise orthogonal to e (exact: see ``coupling.sample_residual``). The scalar
    maths (weights, tau, the residual's coordinate) runs on the host in Python floats, chain by chain
    (``specdit.residual``)."""
    B, L, _ = p.x_draft.shape
    dev, length = p.x_draft.device, p.length.tolist()
    log_r, gaps = p.host_scalars()
    kept, rows, at, log_c = [], [], [], []  # tau per chain; the rejecting chains, their tau and log p_tau
    for b, (eta_b, L_b) in enumerate(zip(eta.tolist(), length)):
        tau, log_p = block_tau(log_r[b], gaps[b], L_b, eta_b)
        kept.append(tau)
        if tau < L_b:  # the residual sampler runs only where a draft was rejected
            rows.append(b), at.append(tau), log_c.append(log_p[tau])
    flat = lambda a: a.flatten(0, 1)  # noqa: E731 (B, L, ...) -> (B L, ...), item b L + j - 1 is position j
    state = flat(p.x_draft)[torch.tensor([b * L + n - 1 for b, n in enumerate(length)], device=dev)]  # (B, D)
    if rows:
        item = torch.tensor([b * L + a for b, a in zip(rows, at)], device=dev)  # position tau + 1 of each
        rows_t = torch.tensor(rows, device=dev)
        w_rows = w(rows_t) if callable(w) else w[rows_t]
        sigma = p.sigma.tolist()
        state[rows_t] = coupling.sample_residual(flat(p.m_target)[item], flat(p.m_draft)[item],
                                                 [sigma[b][a] for b, a in zip(rows, at)], log_c, w_rows,
                                                 flat(p.x_draft)[item])
    kept_t = torch.tensor(kept, dtype=torch.int64, device=dev)
    return Verdict(state, kept_t, torch.minimum(kept_t + 1, p.length))
