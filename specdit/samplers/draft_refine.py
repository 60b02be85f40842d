"""DRiffusion draft-and-refine parallel sampling (seed DRiffusion-supplementary, Alg. 2). Approximate.

Conservative iteration at state index k with K = min(parallel, k - 1) parallel slots:

1. eps_k = eps(x_k, tau_k)                                           (one sequential target call)
2. drafts by skip transitions x'_{k-i} = skip(x_k, eps_k, i) + s_{k,i} z, i = 1..K (eq. 14), and
   eps'_{k-i} = eps(x'_{k-i}, tau_{k-i}) for all i in ONE batched call     (K parallel evaluations)
3. refine sequentially without the model: x_{k-1} = x'_{k-1} (a skip of one step is the exact kernel);
   x_{k-i} = mean_{k-i+1}(x_{k-i+1}, eps'_{k-i+1}) + sigma z for i = 2..K+1.

An iteration advances K + 1 steps for two sequential calls. The *aggressive* mode is our reading of the
paper's second mode (the seed gives no algorithm for it): step 1 reuses the eps computed for the last
draft of the previous iteration instead of a fresh call, so an iteration costs one sequential call.
Noise is keyed by (seed, k, i), so results do not depend on batch composition.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch

from specdit.models.base import EpsModel
from specdit.noise import NoiseStreams, Purpose
from specdit.samplers.common import call_model, initial_noise
from specdit.schedule import Schedule
from specdit.stats import SampleStats

RefineMode = Literal["conservative", "aggressive"]


def sample_draft_refine(
    model: EpsModel,
    schedule: Schedule,
    streams: NoiseStreams,
    *,
    y: torch.Tensor | None = None,
    parallel: int = 4,
    mode: RefineMode = "conservative",
    callback: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Returns (samples (B, *shape) float64, stats). All chains share the same k (same schedule).
    ``callback(n)`` reports n more chain-steps done."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    if mode not in ("conservative", "aggressive"):
        raise ValueError(f"mode must be 'conservative' or 'aggressive', got {mode!r}")
    shape = tuple(model.sample_shape)
    B, S = len(streams), schedule.num_steps
    bshape = (-1,) + (1,) * len(shape)
    x = initial_noise(streams, shape)
    stats = SampleStats.zeros(B, S)
    stale_eps: torch.Tensor | None = None  # aggressive mode: eps of the previous iteration's last draft
    k = S
    while k > 0:
        K = min(parallel, k - 1)
        kk = torch.full((B,), k, dtype=torch.int64)
        if mode == "aggressive" and stale_eps is not None:
            eps_k = stale_eps
        else:
            eps_k = call_model(model, x, schedule.timesteps[kk], y, steps=kk).eps  # 1. sequential call
            stats.rounds += 1
            stats.target_evals += 1
        if K == 0:  # the last step: a plain kernel step
            x = schedule.step_mean(x, eps_k, kk)
            if schedule.sigma[k] > 0:
                x = x + schedule.sigma[k] * streams.normal(Purpose.STEP, k, shape=shape)
            k -= 1
            if callback is not None:
                callback(B)
            continue
        # 2. skip-transition drafts x'_{k-i}, i = 1..K, and their eps in one batched call.
        drafts = []
        for i in range(1, K + 1):
            mean, std = schedule.skip_mean_std(x, eps_k, kk, torch.full((B,), i, dtype=torch.int64))
            drafts.append(mean + std.view(bshape) * streams.normal(Purpose.SKIP_DRAFT, k, i, shape=shape))
        d = torch.stack(drafts, 1)  # (B, K, *shape)
        kd = (k - torch.arange(1, K + 1)).repeat(B)  # (B*K,) state indices k - i
        yy = None if y is None else y.repeat_interleave(K)
        eps_d = call_model(model, d.flatten(0, 1), schedule.timesteps[kd], yy, steps=kd,
                           rows=torch.arange(B).repeat_interleave(K)).eps.view(d.shape)
        stats.rounds += 1
        stats.target_evals += K
        # 3. sequential refinement with the drafts' eps.
        x = d[:, 0]
        for i in range(2, K + 2):
            ki = torch.full((B,), k - i + 1, dtype=torch.int64)
            x = schedule.step_mean(x, eps_d[:, i - 2], ki)
            if schedule.sigma[k - i + 1] > 0:
                x = x + schedule.sigma[k - i + 1] * streams.normal(Purpose.REFINE, k, i, shape=shape)
        stale_eps = eps_d[:, -1]
        k -= K + 1
        if callback is not None:
            callback(B * (K + 1))
    return x, stats
