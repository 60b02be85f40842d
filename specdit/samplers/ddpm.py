"""Baseline ancestral sampler of the eta family (DDPM at eta = 1, DDIM at eta = 0).

One target call per step: x_{k-1} = mean_k(x_k, eps(x_k, tau_k)) + sigma_k z_k, z_k keyed by (seed, k).
"""
from __future__ import annotations

from typing import Callable

import torch

from specdit.models.base import EpsModel
from specdit.noise import NoiseStreams, Purpose
from specdit.samplers.common import call_model, initial_noise
from specdit.schedule import Schedule
from specdit.stats import SampleStats


def sample_ddpm(
    model: EpsModel,
    schedule: Schedule,
    streams: NoiseStreams,
    *,
    y: torch.Tensor | None = None,
    callback: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Returns (samples (B, *shape) float64, stats). ``callback(n)`` reports n more chain-steps done.
    Raises ``NonFiniteTargetError`` (naming the step and the sample's row) if the model returns NaN/inf."""
    shape = tuple(model.sample_shape)
    B, S = len(streams), schedule.num_steps
    schedule = schedule.to(streams.device)  # the streams fix the device (see specdit.samplers.speculative)
    y = None if y is None else y.to(streams.device)
    x = initial_noise(streams, shape)  # (B, *shape) on the streams' device
    for k in range(S, 0, -1):
        kk = torch.full((B,), k, dtype=torch.int64, device=x.device)
        eps = call_model(model, x, schedule.timesteps[kk], y, steps=kk).eps  # NonFiniteTargetError if not finite
        x = schedule.step_mean(x, eps, kk)
        if schedule.sigma[k] > 0:
            x = x + schedule.sigma[k] * streams.normal(Purpose.STEP, k, shape=shape)
        if callback is not None:
            callback(B)
    stats = SampleStats.zeros(B, S)
    stats.rounds += S
    stats.target_evals += S
    return x, stats
