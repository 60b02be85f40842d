"""Calibrating a drafter's relaxation scale (``specdit.relaxation``; ``specdit calibrate-relax``).

Runs exact speculative chains (relax = 0, block verification) with the drafter and records, for every draft
that the target scores, its uncertainty u = mean((eps_hat - eps)^2) at the draft's timestep; the scale at
timestep t is the mean of u over every draft at t. Chains follow the target's law whatever the drafter, so
the scale describes the states the sampler meets.
"""
from __future__ import annotations

import torch

from specdit.drafters.base import Drafter
from specdit.models.base import EpsModel
from specdit.noise import NoiseStreams
from specdit.relaxation import RelaxCalibration
from specdit.samplers.chains import Chains
from specdit.samplers.round_steps import speculative_round
from specdit.schedule import Schedule


def measure_uncertainty(model: EpsModel, drafter: Drafter, schedule: Schedule, streams: NoiseStreams,
                        y: torch.Tensor | None, draft_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of u, count) per state index k, both (S + 1,) float64, over exact block-verified chains
    (B = len(streams), labels y (B,) or None)."""
    schedule = schedule.to(streams.device)
    S = schedule.num_steps
    chains = Chains.start(streams, tuple(model.sample_shape), S)
    y = None if y is None else y.to(chains.device)
    total = torch.zeros(S + 1, dtype=torch.float64)
    count = torch.zeros(S + 1, dtype=torch.float64)
    while True:
        rows = chains.active()
        if rows.numel() == 0:
            return total, count
        ctx = chains.context(rows, y)
        verdict, scores, draft = speculative_round(model, drafter, schedule, streams.subset(rows), ctx,
                                                   draft_length=draft_length, verification="block")
        Lmax = scores.eps.shape[1]
        pos = torch.arange(Lmax, device=ctx.k.device)[None, :]  # (1, Lmax)
        items = pos < draft.length[:, None]  # (R, Lmax) drafts the target scored
        kk = (ctx.k[:, None] - pos).clamp_min(1)  # (R, Lmax) state index of each draft step
        u = (draft.eps_hat - scores.eps).flatten(2).pow(2).mean(-1)  # (R, Lmax)
        total.index_add_(0, kk[items].cpu(), u[items].double().cpu())
        count.index_add_(0, kk[items].cpu(), torch.ones(int(items.sum()), dtype=torch.float64))
        chains.advance(rows, ctx.k, verdict, scores, draft)


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
