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


def record_rounds(stats: SampleStats, rounds: list[tuple[torch.Tensor, ...]]) -> None:
    """Add rounds to the statistics in one pass. Each round is (rows (R,), k (R,) the state index its chains
    started at, kept (R,) drafts kept, length (R,) L_b, fallbacks (R,), draft_evals (R,)); the rounds are
    concatenated, so a chain may appear several times: index_add_ and index_put_(accumulate) sum repeats,
    and integer sums do not depend on their order (the counts equal those of one update per round)."""
    rows, k, kept, length, fallbacks, draft_evals = (torch.cat(part) for part in zip(*rounds))  # (N,) each
    pos = torch.arange(1, int(length.max()) + 1, device=k.device)[None, :]  # (1, Lmax)
    idx = (k[:, None] - pos + 1).clamp_min(0)  # (N, Lmax) state index of each position
    judged = (pos <= torch.minimum(kept + 1, length)[:, None]).long()  # (N, Lmax), 0 at padding
    accepted = (pos <= kept[:, None]).long()  # (N, Lmax)
    stats.draft_fallbacks.index_add_(0, rows, fallbacks)
    stats.rounds.index_add_(0, rows, torch.ones_like(length))
    stats.target_evals.index_add_(0, rows, length)
    stats.draft_evals.index_add_(0, rows, draft_evals)
    at = (rows[:, None].expand_as(idx), idx)
    stats.proposed.index_put_(at, judged, accumulate=True)
    stats.accepted.index_put_(at, accepted, accumulate=True)


class Chains:
    """Current states x (B, *shape) float64, state indices k (B,) int64, each chain's latest target output
    (for drafters that reuse it: eps (B, *shape), its denoised estimate x0_hat (B, *shape), features
    (B, *feature_shape) or None, has_last (B,) bool)
    and the statistics. The rows of a round are any subset of the chains.

    A round's counts are kept as its own small tensors and folded into the statistics when they are read
    (:attr:`stats`): one vectorised update for the whole run instead of ~25 tensor operations per round."""

    def __init__(self, x, k, last_eps, last_feats, has_last, stats: SampleStats):
        self.x, self.k, self.last_eps, self.last_feats, self.has_last = x, k, last_eps, last_feats, has_last
        self.last_x0 = torch.zeros_like(x)  # (B, *shape) the target's x0_hat where last_eps was computed
        self._stats = stats
        self._unrecorded: list[tuple[torch.Tensor, ...]] = []  # rounds not yet in _stats (record_rounds)

    @property
    def stats(self) -> SampleStats:
        """The statistics of every round so far."""
        if self._unrecorded:
            record_rounds(self._stats, self._unrecorded)
            self._unrecorded = []
        return self._stats

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

    def context(self, rows: torch.Tensor, y: torch.Tensor | None, *, whole: bool = False) -> DraftContext:
        """The drafter's view of chains ``rows`` at the start of their round. ``whole``: the rows are every
        chain, 0..B-1 in order (the chains' own tensors, no gathers; ``advance`` replaces them, never writes
        into them, except ``has_last``, which a finished round no longer reads)."""
        if whole:
            return DraftContext(x=self.x, k=self.k, y=y, last_eps=self.last_eps, last_features=self.last_feats,
                                has_last=self.has_last, last_x0=self.last_x0)
        return DraftContext(
            x=self.x[rows], k=self.k[rows], y=None if y is None else y[rows], last_eps=self.last_eps[rows],
            last_features=None if self.last_feats is None else self.last_feats[rows], has_last=self.has_last[rows],
            last_x0=self.last_x0[rows],
        )

    def advance(self, rows: torch.Tensor, k: torch.Tensor, verdict: Verdict, scores: TargetScores,
                draft: DraftBatch, *, whole: bool = False) -> None:
        """Apply a round's verdict to chains ``rows`` (R,) whose round started at ``k`` (R,). ``whole``: the
        rows are every chain, 0..B-1 in order (the round's new tensors then replace the chains', no scatter)."""
        self._unrecorded.append((rows, k, verdict.kept, draft.length, draft.fallbacks, draft.draft_evals))
        # The latest target output of each chain: item steps-1 (the state one step before the new one).
        latest = (verdict.steps - 1).clamp_min(0)  # (R,)
        ar = torch.arange(rows.numel(), device=rows.device)
        if scores.features is not None and self.last_feats is None and not whole:
            self.last_feats = torch.zeros(self.x.shape[0], *scores.features.shape[2:],
                                          dtype=scores.features.dtype, device=self.device)
        new = {"x": verdict.state.view(-1, *self.x.shape[1:]), "k": k - verdict.steps,
               "last_eps": scores.eps[ar, latest],
               "last_feats": None if scores.features is None else scores.features[ar, latest],
               "last_x0": None if scores.x0 is None else scores.x0[ar, latest]}
        for name, value in new.items():
            if value is None:
                continue
            if whole:
                setattr(self, name, value)
            else:
                getattr(self, name)[rows] = value
        if whole:
            self.has_last.fill_(True)
        else:
            self.has_last[rows] = True
