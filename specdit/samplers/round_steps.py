"""The three calls of a speculative round (FREE Alg. 1-2; Sun et al.; split as vLLM's spec decode):

1. :func:`propose` (the drafter) -> :class:`DraftBatch`: means mh_1..mh_{L_b} drafted autoregressively,
   xh_j = mh_j + sigma_{k-j+1} z_j;
2. :func:`score` (the target) -> :class:`TargetScores`: ONE batched call on [xh_0 = x, ..., xh_{L_b - 1}]
   (each at its own timestep) gives the target means m_1..m_{L_b};
3. :func:`verify` (pure maths) -> ``Verdict``: token-wise RMC or block verification decides how many drafts to
   keep and draws the next state.

Device policy: every tensor a call makes lives on the device of the chains' states (``ctx.x`` /
``draft.states``); the schedule must already be there (``Schedule.to``). Models and drafters may live
elsewhere: their outputs are brought to the chains' device at the call. Verification maths is float64.
All random numbers are keyed by (seed, purpose, kind, k[, position]), each draw site with its own purpose
(``DRAFT``, ``ACCEPT``, ``BLOCK``, ``RESIDUAL_COORD``): no draw is reused by a later round or another site.
"""
from __future__ import annotations

from typing import Any, Literal, Union

import torch

from specdit.drafters.base import DraftContext, Drafter
from specdit.drafters.free import latest_target_eps
from specdit.models.base import EpsModel
from specdit.noise import NoiseStreams, Purpose
from specdit.samplers.common import call_model
from specdit.samplers.draft_noise import DraftNoiseSource
from specdit.samplers.proposals import DraftBatch, TargetScores
from specdit.relaxation import temper as relaxed_temper
from specdit.schedule import Schedule
from specdit.verify import Proposal, Verdict, verify_block, verify_token

Verification = Literal["token", "block"]
VERIFICATIONS = ("token", "block")

EPS_LIMIT = 1e6  # a drafted eps with a larger entry is treated like a non-finite one


def unusable_drafts(eps_hat: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(B,) bool: chains whose drafted eps (B, *shape) is not finite or has an entry above ``EPS_LIMIT`` in
    magnitude, or whose draft mean (B, *shape) is not finite. Below the limit, means, distances and
    log-ratios stay far from float64 overflow (|eps| <= 1e6 moves a mean by at most ~1e6 per coordinate)."""
    finite = torch.isfinite(eps_hat).flatten(1).all(1) & torch.isfinite(mean).flatten(1).all(1)
    small = eps_hat.abs().flatten(1).amax(1) <= EPS_LIMIT  # False for NaN too
    return ~(finite & small)


def all_usable(eps_hat: torch.Tensor, mean: torch.Tensor) -> bool:
    """True when no row of ``unusable_drafts(eps_hat, mean)`` is flagged, in three reductions over the whole
    round (NaN fails the comparison, so a NaN eps is caught by the same test as a huge one)."""
    return bool((eps_hat.abs().amax() <= EPS_LIMIT) & torch.isfinite(mean).all())


def keep_finite_carry(old: Any, new: Any, bad: torch.Tensor) -> Any:
    """A drafter's carry after a replaced draft: rows of ``new`` that are not finite (e.g. a FREE feature
    gone to inf) take the previous carry's rows, so later positions do not inherit the fault."""
    if not (isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and new.shape == old.shape):
        return new
    broken = bad & ~torch.isfinite(new).flatten(1).all(1)  # (B,)
    return torch.where(broken.view(-1, *([1] * (new.dim() - 1))), old, new)


def _rows(mask: torch.Tensor, dims: int) -> torch.Tensor:
    """(B,) mask -> (B, 1, ..., 1) with ``dims`` trailing singleton dims (for torch.where on samples)."""
    return mask.view(-1, *([1] * dims))


DraftLength = Union[int, torch.Tensor]  # L everywhere, or a (S+1,) int64 table L(k) (entry 0 unused)


def draft_lengths(draft_length: DraftLength, k: torch.Tensor) -> torch.Tensor:
    """(B,) int64 L_b = min(L(k_b), k_b) for chains at state indices ``k`` (B,). ``draft_length``: an int L
    or a (S+1,) table L(k) (a deterministic per-timestep schedule; any such schedule keeps exactness, since
    a round's length is then a function of the chain's own state index only)."""
    if isinstance(draft_length, torch.Tensor):
        return torch.minimum(draft_length.to(k.device)[k], k)
    return k.clamp_max(draft_length)


def longest_draft(draft_length: DraftLength) -> int:
    """The most positions any round drafts with ``draft_length`` (an int L or a (S+1,) table L(k))."""
    return int(draft_length[1:].max()) if isinstance(draft_length, torch.Tensor) else int(draft_length)


def propose(drafter: Drafter, schedule: Schedule, noise: DraftNoiseSource, ctx: DraftContext,
            draft_length: DraftLength) -> DraftBatch:
    """Step 1: autoregressive drafts of L_b = min(L(k_b), k_b) positions per chain (``draft_lengths``), with
    the draft noise of ``noise`` (the chains' ``NoiseStreams`` or a ``draft_noise.DraftNoiseWindow``'s rows).

    Fallback proposal: a drafted eps that ``unusable_drafts`` flags is replaced, before z_j is drawn, by the
    chain's latest target eps (the free drafter's proposal; x itself in the first round). Both verifiers
    are exact for ANY draft kernel N(mh_j, s_j^2 I) whose mean is a finite function of the prefix, and
    whether a draft is replaced depends only on the drafter's output (itself a function of the prefix), so
    no special acceptance rule is needed. Every state entering the target batch is therefore finite.

    The check costs a few operations per position, so a round is first drafted unchecked and checked once
    as a whole; only a round with an unusable draft is drafted again, checked at every position (the
    drafter's outputs are functions of its inputs, so both passes see the same drafts up to the first
    unusable one)."""
    length = draft_lengths(draft_length, ctx.k)  # (B,)
    Lmax = int(length.max())
    dims, shape, dev = ctx.x.dim() - 1, tuple(ctx.x.shape[1:]), ctx.x.device
    kk = (ctx.k[:, None] - torch.arange(Lmax, device=dev)[None, :]).clamp_min(1)  # (B, Lmax) index of step j
    z = noise.draft_noise(ctx.k, Lmax, shape)  # (B, Lmax, *shape)
    kernel_noise = schedule.sigma[kk].view(*kk.shape, *([1] * dims)) * z  # (B, Lmax, *shape) s_j z_j
    states, means, eps_hats = _draft(drafter, schedule, ctx, kk, kernel_noise, None)
    replaced = torch.zeros(ctx.x.shape[0], dtype=torch.int64, device=dev)
    if not all_usable(eps_hats, means):
        states, means, eps_hats = _draft(drafter, schedule, ctx, kk, kernel_noise, (replaced, length))
    return DraftBatch(states, means, eps_hats, length, replaced, drafter.cost * length, kk)


def _draft(drafter: Drafter, schedule: Schedule, ctx: DraftContext, kk: torch.Tensor, noise: torch.Tensor,
           checked: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draft positions 1..Lmax: states (B, Lmax+1, *shape), means and eps_hat (B, Lmax, *shape). ``kk`` (B, Lmax)
    state indices, ``noise`` (B, Lmax, *shape) the kernel noise s_j z_j. ``checked``: None, or (replaced (B,),
    length (B,)) to apply the fallback rule at every position, counting replaced non-padding drafts."""
    dims, dev = ctx.x.dim() - 1, ctx.x.device
    t = schedule.timesteps[kk]  # (B, Lmax)
    coefs = _coefficient_columns(schedule, kk, dims)  # Lmax pairs (a_j, b_j) (B, 1, ...), or None
    carry = drafter.start(ctx)
    fallback = None if checked is None else latest_target_eps(ctx)  # (B, *shape) finite
    states, means, eps_hats = [ctx.x], [], []
    # Column j - 1 of kk, t and noise for position j, as views made in one operation each
    k_cols, t_cols, noise_cols = kk.unbind(1), t.unbind(1), noise.unbind(1)
    for j in range(1, kk.shape[1] + 1):
        kj = k_cols[j - 1]  # (B,) state index of the step taken at position j
        eps_hat, new_carry = drafter.step(states[-1], t_cols[j - 1], ctx.y, carry)
        eps_hat = eps_hat.to(device=dev, dtype=torch.float64)
        if coefs is None:
            mean = schedule.step_mean(states[-1], eps_hat, kj)
        else:  # step_mean's arithmetic, bit for bit, on coefficients gathered once per round
            mean = coefs[j - 1][0] * states[-1].double() + coefs[j - 1][1] * eps_hat
        if checked is not None:
            bad = unusable_drafts(eps_hat, mean)  # (B,)
            if bad.any():
                eps_hat = torch.where(_rows(bad, dims), fallback, eps_hat)
                mean = torch.where(_rows(bad, dims), schedule.step_mean(states[-1], fallback, kj), mean)
                new_carry = keep_finite_carry(carry, new_carry, bad)
                checked[0].add_((bad & (j <= checked[1])).long())  # padding positions are not counted
        carry = new_carry
        states.append(mean + noise_cols[j - 1])
        means.append(mean)
        eps_hats.append(eps_hat)
    return torch.stack(states, 1), torch.stack(means, 1), torch.stack(eps_hats, 1)


def _coefficient_columns(schedule: Schedule, kk: torch.Tensor, dims: int) -> list[tuple] | None:
    """Per position j = 1..Lmax, (a_j, b_j) (B, 1, ..., 1) with ``schedule.step_mean`` = a_j x + b_j eps at
    state indices kk[:, j - 1]; None when the schedule clips. Two gathers per round instead of two per
    position (at batch 1 a round's cost outside the networks is mostly per-operation dispatch)."""
    coefs = schedule.step_mean_coefficients(kk.T)  # (Lmax, B) each
    if coefs is None:
        return None
    a, b = (c.view(*c.shape, *([1] * dims)).unbind(0) for c in coefs)  # Lmax views (B, 1, ..., 1) each
    return list(zip(a, b))


def score(model: EpsModel, schedule: Schedule, draft: DraftBatch, y: torch.Tensor | None, *,
          x0: bool = True) -> TargetScores:
    """Step 2: one batched target call on xh_0..xh_{L_b-1} of every chain, each at its own step
    (``draft.step_index``); ``y`` (B,) labels or None. ``x0``: also the denoised estimates x0_hat (for a
    drafter that reads them, ``drafters.base.reads_last_x0``; else ``TargetScores.x0`` is None).

    Raises ``NonFiniteTargetError`` naming the step and the chain's row in this batch if the target returns
    NaN/inf (the round loop renames the row to the sample's index)."""
    states, length, kk = draft.states, draft.length, draft.step_index  # kk (B, Lmax): state index k - j
    Lmax = kk.shape[1]
    if int(length.min()) == Lmax:  # every position evaluated (the usual round): no gather, no scatter
        eps, feats = _score_all(model, schedule, states, kk, y)
    else:
        eps, feats = _score_items(model, schedule, states, kk, y, length)
    flat_x, flat_e, flat_k = states[:, :Lmax].flatten(0, 1), eps.flatten(0, 1), kk.flatten()
    if x0:
        means, x0_hat = (v.view(eps.shape) for v in schedule.step_mean_and_x0(flat_x, flat_e, flat_k))
        return TargetScores(eps, means, feats, x0_hat)
    return TargetScores(eps, schedule.step_mean(flat_x, flat_e, flat_k).view(eps.shape), feats, None)


def _score_all(model: EpsModel, schedule: Schedule, states: torch.Tensor, kk: torch.Tensor,
               y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target on all B * Lmax items, in (chain, position) order: eps (B, Lmax, *shape), features or None."""
    B, Lmax = kk.shape
    yy = None if y is None else y.repeat_interleave(Lmax)  # (B Lmax,)
    out = call_model(model, states[:, :Lmax].flatten(0, 1), schedule.timesteps[kk].flatten(), yy,
                     steps=kk.flatten(), row_of=lambda i: i // Lmax)  # item i is chain i // Lmax
    feats = None if out.features is None else out.features.view(B, Lmax, *out.features.shape[1:])
    return out.eps.view(B, Lmax, *states.shape[2:]), feats


def _score_items(model: EpsModel, schedule: Schedule, states: torch.Tensor, kk: torch.Tensor,
                 y: torch.Tensor | None, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target on the items j < L_b only; eps (B, Lmax, *shape) and features are 0 at padding."""
    B, Lmax = kk.shape
    dev = kk.device
    items = torch.arange(Lmax, device=dev)[None, :] < length[:, None]  # (B, Lmax) evaluated pairs
    yy = None if y is None else y[:, None].expand(B, Lmax)[items]
    rows = torch.arange(B, device=dev)[:, None].expand(B, Lmax)[items]  # chain row of each item
    out = call_model(model, states[:, :Lmax][items], schedule.timesteps[kk[items]], yy, steps=kk[items],
                     row_of=lambda i: int(rows[i]))
    eps = torch.zeros(B, Lmax, *states.shape[2:], dtype=torch.float64, device=dev)
    eps[items] = out.eps
    feats = None
    if out.features is not None:
        feats = torch.zeros(B, Lmax, *out.features.shape[1:], dtype=out.features.dtype, device=dev)
        feats[items] = out.features
    return eps, feats


def verify(schedule: Schedule, streams: NoiseStreams, k: torch.Tensor, draft: DraftBatch, scores: TargetScores,
           *, verification: Verification, relax: float = 0.0,
           relax_scale: torch.Tensor | None = None) -> Verdict:
    """Step 3: token-wise or block verification of the drafts against the target means (pure float64 maths).

    ``relax`` > 0 is uncertainty-guided relaxation (not exact, ``specdit.relaxation``): log q/p is divided
    by 1 + relax * u / c(k), u = mean((eps_hat - eps)^2), with ``relax_scale`` c (S + 1,) by state index on
    the chains' device (required when relax > 0). relax = 0 takes the exact path."""
    kk = draft.step_index  # (B, Lmax)
    Lmax = kk.shape[1]
    temper = None
    if relax > 0:
        if relax_scale is None:
            raise ValueError("relaxation needs a relax scale (specdit.relaxation.scale_table)")
        u = (draft.eps_hat - scores.eps).flatten(2).pow(2).mean(-1)  # (B, Lmax)
        temper = relaxed_temper(relax, u, relax_scale[kk])
    proposal = Proposal(
        x_draft=draft.states[:, 1:].flatten(2), m_draft=draft.m_draft.flatten(2), m_target=scores.means.flatten(2),
        sigma=schedule.sigma[kk], length=draft.length, temper=temper,
    )
    if verification == "token":
        log_u = streams.uniform(Purpose.ACCEPT, k, n=Lmax).log()  # (B, Lmax)
        return verify_token(proposal, log_u)
    if verification == "block":
        eta = streams.uniform(Purpose.BLOCK, k, n=Lmax)  # (B, Lmax)
        def residual_uniform(rows: torch.Tensor) -> torch.Tensor:  # (R,), drawn only for the rejecting rows
            return streams.subset(rows).uniform(Purpose.RESIDUAL_COORD, k[rows], n=1)[:, 0]

        return verify_block(proposal, eta, residual_uniform)
    raise ValueError(f"verification must be 'token' or 'block', got {verification!r}")


def speculative_round(model: EpsModel, drafter: Drafter, schedule: Schedule, streams: NoiseStreams,
                      ctx: DraftContext, *, draft_length: DraftLength, verification: Verification,
                      relax: float = 0.0, relax_scale: torch.Tensor | None = None
                      ) -> tuple[Verdict, TargetScores, DraftBatch]:
    """One round for a batch of chains (all with k >= 1), the three calls in a row."""
    draft = propose(drafter, schedule, streams, ctx, draft_length)
    scores = score(model, schedule, draft, ctx.y)
    verdict = verify(schedule, streams, ctx.k, draft, scores, verification=verification, relax=relax,
                     relax_scale=relax_scale)
    return verdict, scores, draft
