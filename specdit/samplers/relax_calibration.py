"""Calibrating a drafter's relaxation scale (``specdit.relaxation``; ``specdit calibrate-relax``).

Runs exact speculative chains (relax = 0, block verification) with the drafter and records, for every draft
that the target scores, its uncertainty u = mean((eps_hat - eps)^2) at the draft's timestep; the scale at
timestep t is the mean of u over every draft at t. Chains follow the target's law whatever the drafter, so
the scale describes the states the sampler meets.
"""
from __future__ import annotations

import torch

from specdit.drafters.base import DraftContext, Drafter
from specdit.models.base import EpsModel
from specdit.noise import NoiseStreams
from specdit.relaxation import RelaxCalibration
from specdit.samplers.chains import Chains
from specdit.samplers.proposals import DraftBatch, TargetScores
from specdit.samplers.rounds import LocalRounds, RoundRule, run_rounds
from specdit.schedule import Schedule


class _RecordingRounds(LocalRounds):
    """:class:`LocalRounds` that adds each scored draft's uncertainty u = mean((eps_hat - eps)^2) to
    ``total[k]`` and ``count[k]`` ((S + 1,) float64, by the draft's state index k)."""

    def __init__(self, *args, total: torch.Tensor, count: torch.Tensor):
        super().__init__(*args)
        self.total, self.count = total, count
        self._drafts: dict[int, DraftBatch] = {}  # id(ctx) -> the full draft (the scorer sees states only)

    def propose(self, rows: torch.Tensor, ctx: DraftContext) -> DraftBatch:
        draft = super().propose(rows, ctx)
        self._drafts[id(ctx)] = draft
        return draft

    def score(self, draft: DraftBatch, ctx: DraftContext) -> TargetScores:
        scores = super().score(draft, ctx)
        full = self._drafts.pop(id(ctx))
        pos = torch.arange(scores.eps.shape[1], device=ctx.k.device)[None, :]  # (1, Lmax)
        items = pos < full.length[:, None]  # (R, Lmax) drafts the target scored
        kk = (ctx.k[:, None] - pos).clamp_min(1)  # (R, Lmax) state index of each draft step
        u = (full.eps_hat - scores.eps).flatten(2).pow(2).mean(-1)  # (R, Lmax)
        self.total.index_add_(0, kk[items].cpu(), u[items].double().cpu())
        self.count.index_add_(0, kk[items].cpu(), torch.ones(int(items.sum()), dtype=torch.float64))
        return scores


def measure_uncertainty(model: EpsModel, drafter: Drafter, schedule: Schedule, streams: NoiseStreams,
                        y: torch.Tensor | None, draft_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of u, count) per state index k, both (S + 1,) float64, over exact block-verified chains
    (B = len(streams), labels y (B,) or None), run by the one round loop (``run_rounds``)."""
    schedule = schedule.to(streams.device)
    S = schedule.num_steps
    chains = Chains.start(streams, tuple(model.sample_shape), S)
    y = None if y is None else y.to(chains.device)
    total = torch.zeros(S + 1, dtype=torch.float64)
    count = torch.zeros(S + 1, dtype=torch.float64)
    rounds = _RecordingRounds(model, drafter, schedule, streams, draft_length, total=total, count=count)
    run_rounds(chains, rounds, streams, y, RoundRule(schedule, "block"))
    return total, count


def calibrate(model: EpsModel, drafter: Drafter, schedule: Schedule, streams: NoiseStreams, y: torch.Tensor | None,
              *, draft_length: int, cfg_scale: float, drafter_name: str, model_name: str) -> RelaxCalibration:
    """The drafter's :class:`RelaxCalibration` from ``len(streams)`` exact chains. Timesteps no draft reached
    (e.g. the last, deterministic step) are left out; raises ValueError if none was reached."""
    total, count = measure_uncertainty(model, drafter, schedule, streams, y, draft_length)
    ks = [k for k in range(1, schedule.num_steps + 1) if count[k] > 0 and total[k] > 0]
    if not ks:
        raise ValueError("no draft was scored: nothing to calibrate")
    t = schedule.timesteps.cpu()
    pairs = sorted((int(t[k]), float(total[k] / count[k])) for k in ks)
    return RelaxCalibration(timesteps=tuple(p[0] for p in pairs), scale=tuple(p[1] for p in pairs),
                            steps=schedule.num_steps, draft_length=draft_length, cfg_scale=cfg_scale,
                            samples=len(streams), drafter=drafter_name, model=model_name)
