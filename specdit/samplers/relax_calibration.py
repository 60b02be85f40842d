"""Calibrating a drafter's relaxation scale (``specdit.relaxation``; ``specdit calibrate-relax``).

Runs exact speculative chains (relax = 0, block verification) with the drafter and records, for every draft
that the target scores, its uncertainty u = mean((eps_hat - eps)^2) at the draft's timestep; the scale at
timestep t is the median of u over every draft at t divided by 32 (``specdit.relaxation.DEFAULT_DIVISOR``),
so that lambda = 1 divides the median draft's log q/p by 33. Chains follow the target's law whatever the
drafter, so the scale describes the states the sampler meets.
"""
from __future__ import annotations

import torch

from specdit.drafters.base import DraftContext, Drafter
from specdit.models.base import EpsModel
from specdit.noise import NoiseStreams
from specdit.relaxation import DEFAULT_DIVISOR, DEFAULT_QUANTILE, RelaxCalibration
from specdit.samplers.chains import Chains
from specdit.samplers.proposals import DraftBatch, TargetScores
from specdit.samplers.rounds import LocalRounds, RoundRule, run_rounds
from specdit.schedule import Schedule


class _RecordingRounds(LocalRounds):
    """:class:`LocalRounds` that appends each scored draft's uncertainty u = mean((eps_hat - eps)^2) to
    ``values[k]`` (a list of floats per state index k of the draft)."""

    def __init__(self, *args, values: dict[int, list[float]]):
        super().__init__(*args)
        self.values = values
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
        for k, v in zip(kk[items].tolist(), u[items].double().cpu().tolist()):
            self.values.setdefault(int(k), []).append(float(v))
        return scores


def measure_uncertainty(model: EpsModel, drafter: Drafter, schedule: Schedule, streams: NoiseStreams,
                        y: torch.Tensor | None, draft_length: int) -> dict[int, list[float]]:
    """Every scored draft's u, by state index k (1..S), over exact block-verified chains
    (B = len(streams), labels y (B,) or None), run by the one round loop (``run_rounds``)."""
    schedule = schedule.to(streams.device)
    S = schedule.num_steps
    chains = Chains.start(streams, tuple(model.sample_shape), S)
    y = None if y is None else y.to(chains.device)
    values: dict[int, list[float]] = {}
    rounds = _RecordingRounds(model, drafter, schedule, streams, draft_length, values=values)
    run_rounds(chains, rounds, streams, y, RoundRule(schedule, "block"))
    return values


def calibrate(model: EpsModel, drafter: Drafter, schedule: Schedule, streams: NoiseStreams, y: torch.Tensor | None,
              *, draft_length: int, cfg_scale: float, drafter_name: str, model_name: str,
              quantile: float = DEFAULT_QUANTILE, divisor: float = DEFAULT_DIVISOR) -> RelaxCalibration:
    """The drafter's :class:`RelaxCalibration` from ``len(streams)`` exact chains: at each timestep, the
    ``quantile`` (in (0, 1); 0.5: the median) of u over the drafts scored there. Timesteps no draft reached
    (e.g. the last, deterministic step) or with a zero quantile are left out; raises ValueError if none is
    left."""
    values = measure_uncertainty(model, drafter, schedule, streams, y, draft_length)
    return calibration_from_values(values, schedule, quantile=quantile, divisor=divisor, steps=schedule.num_steps,
                                   draft_length=draft_length, cfg_scale=cfg_scale, samples=len(streams),
                                   drafter=drafter_name, model=model_name)


def calibration_from_values(values: dict[int, list[float]], schedule: Schedule, *, quantile: float = DEFAULT_QUANTILE,
                            divisor: float = DEFAULT_DIVISOR, **meta) -> RelaxCalibration:
    """:class:`RelaxCalibration` from the uncertainties ``values`` by state index k (as
    :func:`measure_uncertainty` returns them): the ``quantile`` of u at each timestep over ``divisor``; ``meta``: the
    remaining fields (steps, draft_length, cfg_scale, samples, drafter, model)."""
    t = schedule.timesteps.cpu()
    q = {k: float(torch.quantile(torch.tensor(v, dtype=torch.float64), quantile)) / divisor
         for k, v in values.items() if v}
    pairs = sorted((int(t[k]), c) for k, c in q.items() if 1 <= k <= schedule.num_steps and c > 0)
    if not pairs:
        raise ValueError("no draft was scored: nothing to calibrate")
    return RelaxCalibration(timesteps=tuple(p[0] for p in pairs), scale=tuple(p[1] for p in pairs),
                            statistic=f"quantile {quantile:g} / {divisor:g}", **meta)
