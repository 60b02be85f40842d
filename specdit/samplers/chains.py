"""The per-chain state of a speculative sampler and its statistics (FREE Alg. 1's outer loop state).

Chains advance by different amounts per round, so each keeps its own state index k. Every tensor lives on
the device of the chains' states, fixed by the caller's noise streams (``NoiseStreams.device``).
"""
from __future__ import annotations

import torch

from specdit.drafters.base import DraftContext
from specdit.noise import NoiseStreams
from specdit.samplers.common import initial_noise
from specdit.samplers.proposals import DraftBatch, TargetScores
from specdit.stats import SampleStats
from specdit.verify import Verdict


def record_round(stats: SampleStats, rows: torch.Tensor, k: torch.Tensor, verdict: Verdict,
                 draft: DraftBatch) -> None:
    """Add one round of chains ``rows`` (R,) (round started at ``k`` (R,)) to the statistics."""
    length = draft.length  # (R,)
    pos = torch.arange(1, int(length.max()) + 1, device=k.device)[None, :]  # (1, Lmax)
    idx = (k[:, None] - pos + 1).clamp_min(0)  # (R, Lmax) state index of each position
    judged = (pos <= torch.minimum(verdict.kept + 1, length)[:, None]).long()  # (R, Lmax)
    kept = (pos <= verdict.kept[:, None]).long()  # (R, Lmax)
    # rows are distinct chains: index_add_ is +=; (row, idx) pairs repeat only at padding, where 0 is added
    stats.draft_fallbacks.index_add_(0, rows, draft.fallbacks)
    stats.rounds.index_add_(0, rows, torch.ones_like(length))
    stats.target_evals.index_add_(0, rows, length)
    stats.draft_evals.index_add_(0, rows, draft.draft_evals)
    at = (rows[:, None].expand_as(idx), idx)
    stats.proposed.index_put_(at, judged, accumulate=True)
    stats.accepted.index_put_(at, kept, accumulate=True)


class Chains:
    """Current states x (B, *shape) float64, state indices k (B,) int64, each chain's latest target output
    (for drafters that reuse it: eps (B, *shape), its denoised estimate x0_hat (B, *shape), features
    (B, *feature_shape) or None, has_last (B,) bool)
    and the statistics. The rows of a round are any subset of the chains."""

    def __init__(self, x, k, last_eps, last_feats, has_last, stats: SampleStats):
        self.x, self.k, self.last_eps, self.last_feats, self.has_last = x, k, last_eps, last_feats, has_last
        self.last_x0 = torch.zeros_like(x)  # (B, *shape) the target's x0_hat where last_eps was computed
        self.stats = stats

    @staticmethod
    def start(streams: NoiseStreams, shape: tuple[int, ...], steps: int) -> "Chains":
        """Chains at x_S ~ N(0, I) from each sample's stream, on the streams' device."""
        B, dev = len(streams), streams.device
        x = initial_noise(streams, shape)  # (B, *shape)
        return Chains(x, torch.full((B,), steps, dtype=torch.int64, device=dev), torch.zeros_like(x), None,
                      torch.zeros(B, dtype=torch.bool, device=dev), SampleStats.zeros(B, steps, dev))

    @property
    def device(self) -> torch.device:
        return self.x.device

    def active(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of unfinished chains (among ``rows`` if given)."""
        if rows is None:
            return (self.k > 0).nonzero().squeeze(1)
        return rows[self.k[rows] > 0]

    def context(self, rows: torch.Tensor, y: torch.Tensor | None) -> DraftContext:
        """The drafter's view of chains ``rows`` at the start of their round."""
        return DraftContext(
            x=self.x[rows], k=self.k[rows], y=None if y is None else y[rows], last_eps=self.last_eps[rows],
            last_features=None if self.last_feats is None else self.last_feats[rows], has_last=self.has_last[rows],
            last_x0=self.last_x0[rows],
        )

    def advance(self, rows: torch.Tensor, k: torch.Tensor, verdict: Verdict, scores: TargetScores,
                draft: DraftBatch) -> None:
        """Apply a round's verdict to chains ``rows`` (R,) whose round started at ``k`` (R,)."""
        record_round(self.stats, rows, k, verdict, draft)
        self.x[rows] = verdict.state.view(-1, *self.x.shape[1:])
        self.k[rows] = k - verdict.steps
        # The latest target output of each chain: item steps-1 (the state one step before the new one).
        latest = (verdict.steps - 1).clamp_min(0)  # (R,)
        ar = torch.arange(rows.numel(), device=rows.device)
        self.last_eps[rows] = scores.eps[ar, latest]
        if scores.features is not None:
            if self.last_feats is None:
                self.last_feats = torch.zeros(self.x.shape[0], *scores.features.shape[2:],
                                              dtype=scores.features.dtype, device=self.device)
            self.last_feats[rows] = scores.features[ar, latest]
        if scores.x0 is not None:
            self.last_x0[rows] = scores.x0[ar, latest]
        self.has_last[rows] = True
