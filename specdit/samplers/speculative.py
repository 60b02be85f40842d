"""Speculative sampling of a diffusion chain in this process (docs/design.md; FREE Alg. 1-2; Sun et al.).

Each round, for every chain at state index k with draft length L_b = min(L, k), the drafter proposes L_b
states, one batched target call scores them, and token-wise RMC or block verification keeps some and draws
the next state (``specdit.samplers.round_steps``). The rounds are driven by the one round loop,
``specdit.samplers.rounds.run_rounds``, with both networks called here (``LocalRounds``).

Device: the caller's noise streams fix the device (``NoiseStreams(seeds, device=...)``): the chains' states,
indices, statistics, schedule tensors and random draws all live there; the target and the drafter may live
elsewhere (their outputs are brought to the chains' device).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from specdit.drafters.base import Calibrated, Drafter
from specdit.models.base import EpsModel
from specdit.noise import NoiseStreams
from specdit.samplers.chains import Chains
from specdit.samplers.round_steps import DraftLength, Verification
from specdit.samplers.rounds import LocalRounds, RoundRule, check_round_settings, run_rounds
from specdit.relaxation import RelaxCalibration, scale_table
from specdit.schedule import Schedule
from specdit.stats import SampleStats


def sample_speculative(
    model: EpsModel,
    drafter: Drafter,
    schedule: Schedule,
    streams: NoiseStreams,
    *,
    y: torch.Tensor | None = None,
    draft_length: DraftLength = 8,
    verification: Verification = "block",
    relax: float = 0.0,
    relax_calibration: RelaxCalibration | None = None,
    callback: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Exact speculative sampling (for relax = 0; relax > 0 divides log q/p by 1 + relax u / c(t) with
    ``relax_calibration``'s scale, else the drafter's ``relax_calibration`` attribute, else the default
    scale: ``specdit.relaxation``). Returns (samples (B, *shape) float64 on the streams'
    device, stats on the CPU). ``y``: (B,) int64 labels or None. ``draft_length``: L, or a (S+1,) int64
    table L(k) of a per-timestep schedule (``round_steps.draft_lengths``). ``callback(n)`` reports n more chain-steps
    done (the steps all chains advanced in a round). Raises ValueError for invalid settings and
    ``NonFiniteTargetError`` naming the sample's row if the target returns NaN/inf."""
    check_round_settings(draft_length, relax, schedule.eta)
    schedule = schedule.to(streams.device)
    chains = Chains.start(streams, tuple(model.sample_shape), schedule.num_steps)
    y = None if y is None else y.to(chains.device)
    rounds = LocalRounds(model, drafter, schedule, streams, draft_length)
    scale = None
    if relax > 0:  # relax = 0: the exact path, no scale computed
        cal = relax_calibration
        if cal is None and isinstance(drafter, Calibrated):
            cal = drafter.relax_calibration
        scale = scale_table(schedule, cal, math.prod(model.sample_shape)).to(chains.device)
    run_rounds(chains, rounds, streams, y, RoundRule(schedule, verification, relax, scale), callback=callback)
    return chains.x, chains.stats.to("cpu")
