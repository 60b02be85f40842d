"""Speculative sampling of a diffusion chain (docs/design.md; FREE Alg. 1-2; Sun et al.).

Each round, for every chain at state index k with draft length L_b = min(L, k):

1. the drafter proposes means mh_1..mh_{L_b} autoregressively, xh_j = mh_j + sigma_{k-j+1} z_j;
2. ONE batched target call on [xh_0 = x, xh_1, ..., xh_{L_b - 1}] (each at its own timestep) gives the
   target means m_1..m_{L_b};
3. token-wise RMC or block verification decides how many drafts to keep and draws the next state.

Chains advance by different amounts, so each keeps its own state index and target calls are batched
with per-item timesteps. All random numbers of a round are keyed by (seed, purpose, kind, k[, position]),
each draw site with its own purpose (``DRAFT``, ``ACCEPT``, ``BLOCK``, ``RESIDUAL_COORD``): the round
start k is unique per chain, so no draw is ever reused by a later round or by another site.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from specdit.drafters.base import DraftContext, Drafter
from specdit.drafters.free import latest_target_eps
from specdit.models.base import EpsModel
from specdit.noise import NoiseStreams, Purpose
from specdit.samplers.common import NonFiniteTargetError, call_model, initial_noise
from specdit.schedule import Schedule
from specdit.stats import SampleStats
from specdit.verify import Proposal, Verdict, verify_block, verify_token

Verification = Literal["token", "block"]


EPS_LIMIT = 1e6  # a drafted eps with a larger entry is treated like a non-finite one


def unusable_drafts(eps_hat: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(B,) bool: chains whose drafted eps (B, *shape) is not finite or has an entry above ``EPS_LIMIT`` in
    magnitude, or whose draft mean (B, *shape) is not finite. Below the limit, means, distances and
    log-ratios stay far from float64 overflow (|eps| <= 1e6 moves a mean by at most ~1e6 per coordinate)."""
    finite = torch.isfinite(eps_hat).flatten(1).all(1) & torch.isfinite(mean).flatten(1).all(1)
    small = eps_hat.abs().flatten(1).amax(1) <= EPS_LIMIT  # False for NaN too
    return ~(finite & small)


def _keep_finite_carry(old, new, bad: torch.Tensor):
    """A drafter's carry after a replaced draft: rows of ``new`` that are not finite (e.g. a FREE feature
    gone to inf) take the previous carry's rows, so later positions do not inherit the fault."""
    if not (isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and new.shape == old.shape):
        return new
    broken = bad & ~torch.isfinite(new).flatten(1).all(1)  # (B,)
    return torch.where(broken.view(-1, *([1] * (new.dim() - 1))), old, new)


def _draft(drafter: Drafter, ctx: DraftContext, schedule: Schedule, streams: NoiseStreams, length: torch.Tensor):
    """Step 1: autoregressive drafts. Returns states [xh_0..xh_Lmax] (B, Lmax+1, *shape), draft means
    (B, Lmax, *shape), draft eps (B, Lmax, *shape) and the number of replaced drafts per chain (B,);
    positions beyond a chain's length are padding.

    Fallback proposal: a drafted eps that ``unusable_drafts`` flags is replaced, before z_j is drawn, by the
    chain's latest target eps (the free drafter's proposal; x itself in the first round). Both verifiers
    are exact for ANY draft kernel N(mh_j, s_j^2 I) whose mean is a finite function of the prefix (the
    round start, the chain's earlier target outputs and xh_1..xh_{j-1}): RMC's output is q whatever mh
    is, and block verification's proof holds for any prefix-dependent draft kernel. Whether a draft is
    replaced depends only on the drafter's output, itself a function of the prefix, so the replaced kernel
    is one such kernel and no special acceptance rule is needed. Every state entering the target batch is
    therefore finite."""
    shape = ctx.x.shape[1:]
    carry = drafter.start(ctx)
    fallback = latest_target_eps(ctx)  # (B, *shape) finite
    replaced = torch.zeros(ctx.x.shape[0], dtype=torch.int64, device=ctx.x.device)
    states, means, eps_hats = [ctx.x], [], []
    for j in range(1, int(length.max()) + 1):
        kj = (ctx.k - j + 1).clamp_min(1)  # (B,) state index of the step taken at position j
        eps_hat, new_carry = drafter.step(states[-1], schedule.timesteps[kj], ctx.y, carry)
        eps_hat = eps_hat.double()
        mean = schedule.step_mean(states[-1], eps_hat, kj)
        bad = unusable_drafts(eps_hat, mean)  # (B,)
        if bad.any():
            rows = bad.view(-1, *([1] * len(shape)))
            eps_hat = torch.where(rows, fallback, eps_hat)
            mean = torch.where(rows, schedule.step_mean(states[-1], fallback, kj), mean)
            new_carry = _keep_finite_carry(carry, new_carry, bad)
            replaced += (bad & (j <= length)).long()  # padding positions are not counted
        carry = new_carry
        z = streams.normal(Purpose.DRAFT, ctx.k, j, shape=tuple(shape))
        sig = schedule.sigma[kj].view(-1, *([1] * len(shape)))
        states.append(mean + sig * z)
        means.append(mean)
        eps_hats.append(eps_hat)
    return torch.stack(states, 1), torch.stack(means, 1), torch.stack(eps_hats, 1), replaced


def _verify_batch(model: EpsModel, schedule: Schedule, states, k, y, length):
    """Step 2: one batched target call on xh_0..xh_{L_b-1} of every chain.

    Returns target eps (B, Lmax, *shape), target means (B, Lmax, *shape) and features (or None). Raises
    ``NonFiniteTargetError`` (naming the step and the chain's row) if the target returns NaN/inf."""
    B, Lmax = states.shape[0], states.shape[1] - 1
    pos = torch.arange(Lmax)[None, :]
    items = pos < length[:, None]  # (B, Lmax) which (chain, position) pairs are evaluated
    kk = (k[:, None] - pos).clamp_min(1)  # (B, Lmax) state index of item j: k - j
    yy = None if y is None else y[:, None].expand(B, Lmax)[items]
    rows = torch.arange(B)[:, None].expand(B, Lmax)[items]  # chain row of each item
    out = call_model(model, states[:, :Lmax][items], schedule.timesteps[kk[items]], yy, steps=kk[items], rows=rows)
    eps = torch.zeros(B, Lmax, *states.shape[2:], dtype=torch.float64)
    eps[items] = out.eps
    feats = None
    if out.features is not None:
        feats = torch.zeros(B, Lmax, *out.features.shape[1:], dtype=out.features.dtype)
        feats[items] = out.features
    m_target = schedule.step_mean(states[:, :Lmax].flatten(0, 1), eps.flatten(0, 1), kk.flatten())
    return eps, m_target.view(eps.shape), feats


@dataclass
class DraftBatch:
    """What the drafter hands the verifier for one round of a batch of chains (step 1)."""

    states: torch.Tensor  # (B, Lmax+1, *shape) xh_0 = x, xh_1..xh_Lmax (padding beyond a chain's length)
    m_draft: torch.Tensor  # (B, Lmax, *shape) draft kernel means
    eps_hat: torch.Tensor  # (B, Lmax, *shape) draft eps, float64
    length: torch.Tensor  # (B,) int64 draft length L_b = min(L, k)
    fallbacks: torch.Tensor | None = None  # (B,) int64 drafter outputs replaced by the fallback proposal


def draft_round(drafter: Drafter, schedule: Schedule, streams: NoiseStreams, ctx: DraftContext,
                draft_length: int) -> DraftBatch:
    """Step 1 of a round: the drafter's proposals (runs wherever the drafter lives)."""
    length = ctx.k.clamp_max(draft_length)  # (B,)
    states, means, eps_hat, fallbacks = _draft(drafter, ctx, schedule, streams, length)
    return DraftBatch(states, means, eps_hat, length, fallbacks)


def target_batch(model: EpsModel, schedule: Schedule, draft: DraftBatch, k: torch.Tensor, y: torch.Tensor | None):
    """Step 2: the one batched target call (runs wherever the target lives): (eps, means, features)."""
    return _verify_batch(model, schedule, draft.states, k, y, draft.length)


def decide(schedule: Schedule, streams: NoiseStreams, k: torch.Tensor, draft: DraftBatch, eps_t: torch.Tensor,
           m_target: torch.Tensor, *, verification: Verification, relax: float = 0.0) -> Verdict:
    """Step 3: token-wise or block verification of the drafts against the target means (pure maths)."""
    states, m_draft, eps_hat, length = draft.states, draft.m_draft, draft.eps_hat, draft.length
    B, Lmax = eps_t.shape[:2]
    kk = (k[:, None] - torch.arange(Lmax)[None, :]).clamp_min(1)
    temper = None
    if relax > 0:
        # Uncertainty-guided relaxation: divide log q/p by 1 + lambda * mean((eps_hat - eps)^2).
        temper = 1.0 + relax * (eps_hat - eps_t).flatten(2).pow(2).mean(-1)
    proposal = Proposal(
        x_draft=states[:, 1:].flatten(2), m_draft=m_draft.flatten(2), m_target=m_target.flatten(2),
        sigma=schedule.sigma[kk], length=length, temper=temper,
    )
    if verification == "token":
        log_u = streams.uniform(Purpose.ACCEPT, k, n=Lmax).log()
        return verify_token(proposal, log_u)
    if verification == "block":
        eta = streams.uniform(Purpose.BLOCK, k, n=Lmax)  # (B, Lmax)
        w = streams.uniform(Purpose.RESIDUAL_COORD, k, n=1)[:, 0]  # (B,)
        return verify_block(proposal, eta, w)
    raise ValueError(f"verification must be 'token' or 'block', got {verification!r}")


def speculative_round(
    model: EpsModel,
    drafter: Drafter,
    schedule: Schedule,
    streams: NoiseStreams,
    ctx: DraftContext,
    *,
    draft_length: int,
    verification: Verification,
    relax: float = 0.0,
):
    """One round for a batch of chains (all with k >= 1). Returns (verdict, target eps, features, drafts)."""
    draft = draft_round(drafter, schedule, streams, ctx, draft_length)
    eps_t, m_target, feats = target_batch(model, schedule, draft, ctx.k, ctx.y)
    verdict = decide(schedule, streams, ctx.k, draft, eps_t, m_target, verification=verification, relax=relax)
    return verdict, eps_t, feats, draft


def _record(stats: SampleStats, rows: torch.Tensor, k: torch.Tensor, verdict: Verdict, length: torch.Tensor, cost: int,
            fallbacks: torch.Tensor | None = None):
    """Add one round of chains ``rows`` to the statistics."""
    if fallbacks is not None:
        stats.draft_fallbacks[rows] += fallbacks
    Lmax = int(length.max())
    pos = torch.arange(1, Lmax + 1)[None, :]
    idx = (k[:, None] - pos + 1).clamp_min(0)  # state index of each position
    judged = (pos <= torch.minimum(verdict.kept + 1, length)[:, None]).long()
    kept = (pos <= verdict.kept[:, None]).long()
    stats.rounds[rows] += 1
    stats.target_evals[rows] += length
    stats.draft_evals[rows] += cost * length
    stats.proposed[rows] = stats.proposed[rows].scatter_add(1, idx, judged)
    stats.accepted[rows] = stats.accepted[rows].scatter_add(1, idx, kept)


class Chains:
    """The per-chain state of a speculative sampler: current states, step indices, each chain's latest target
    output (for drafters that reuse it) and the statistics. Rows of a round are any subset of chains."""

    def __init__(self, x, k, last_eps, last_feats, has_last, stats):
        self.x, self.k, self.last_eps, self.last_feats, self.has_last = x, k, last_eps, last_feats, has_last
        self.stats = stats

    @staticmethod
    def start(streams: NoiseStreams, shape: tuple[int, ...], steps: int) -> "Chains":
        B = len(streams)
        x = initial_noise(streams, shape)  # (B, *shape)
        return Chains(x, torch.full((B,), steps, dtype=torch.int64), torch.zeros_like(x), None,
                      torch.zeros(B, dtype=torch.bool), SampleStats.zeros(B, steps))

    def active(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of unfinished chains (among ``rows`` if given)."""
        if rows is None:
            return (self.k > 0).nonzero().squeeze(1)
        return rows[self.k[rows] > 0]

    def context(self, rows: torch.Tensor, y: torch.Tensor | None) -> DraftContext:
        return DraftContext(
            x=self.x[rows], k=self.k[rows], y=None if y is None else y[rows], last_eps=self.last_eps[rows],
            last_features=None if self.last_feats is None else self.last_feats[rows], has_last=self.has_last[rows],
        )

    def advance(self, rows, k, verdict: Verdict, eps_t, feats, length, cost: int,
                fallbacks: torch.Tensor | None = None) -> None:
        """Apply a round's verdict to chains ``rows`` (whose round started at ``k``); ``fallbacks`` (rows,)
        counts the round's replaced drafts (``DraftBatch.fallbacks``)."""
        _record(self.stats, rows, k, verdict, length, cost, fallbacks)
        shape = self.x.shape[1:]
        self.x[rows] = verdict.state.view(-1, *shape)
        self.k[rows] = k - verdict.steps
        # The latest target output of each chain: item steps-1 (the state one step before the new one).
        latest = (verdict.steps - 1).clamp_min(0)
        ar = torch.arange(rows.numel())
        self.last_eps[rows] = eps_t[ar, latest]
        if feats is not None:
            if self.last_feats is None:
                self.last_feats = torch.zeros(self.x.shape[0], *feats.shape[2:], dtype=feats.dtype)
            self.last_feats[rows] = feats[ar, latest]
        self.has_last[rows] = True


def sample_speculative(
    model: EpsModel,
    drafter: Drafter,
    schedule: Schedule,
    streams: NoiseStreams,
    *,
    y: torch.Tensor | None = None,
    draft_length: int = 8,
    verification: Verification = "block",
    relax: float = 0.0,
    callback: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Exact speculative sampling (for relax = 0). Returns (samples (B, *shape) float64, stats).

    ``callback(n)`` reports n more chain-steps done (the steps all chains advanced in a round)."""
    if draft_length < 1:
        raise ValueError(f"draft length must be >= 1, got {draft_length}")
    if relax < 0:
        raise ValueError(f"relaxation must be >= 0, got {relax}")
    if schedule.eta <= 0:
        raise ValueError("speculative sampling needs a stochastic kernel (eta > 0)")
    chains = Chains.start(streams, tuple(model.sample_shape), schedule.num_steps)
    while True:
        rows = chains.active()
        if rows.numel() == 0:
            break
        ctx = chains.context(rows, y)
        try:
            verdict, eps_t, feats, draft = speculative_round(
                model, drafter, schedule, streams.subset(rows), ctx,
                draft_length=draft_length, verification=verification, relax=relax,
            )
        except NonFiniteTargetError as e:
            raise e.with_sample(int(rows[e.sample])) from None  # name the chain by its row in the batch
        chains.advance(rows, ctx.k, verdict, eps_t, feats, draft.length, drafter.cost, draft.fallbacks)
        if callback is not None:
            callback(int(verdict.steps.sum()))
    return chains.x, chains.stats
