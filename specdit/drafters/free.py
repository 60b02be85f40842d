"""The training-free "Free Drafter" (frozen-target draft; De Bortoli et al. 2025, ASD; arXiv
2606.13426): every draft step of a round reuses one target eps.

Following ASD, the eps reused is the chain's latest target eps, already computed in the previous round's
verification batch (at the state one step before the round start), so drafting costs no target call.
The first round of a chain has no target eps yet; it drafts with eps_hat = x (exact at abar = 0, where
x_T is pure noise), and its round still advances at least one step.
"""
from __future__ import annotations

import torch

from specdit.drafters.base import DraftContext


def latest_target_eps(ctx: DraftContext) -> torch.Tensor:
    """(B, *shape) float64: each chain's latest target eps, or its state x where it has none yet (the
    first round). A function of the chain's prefix only, and finite (target outputs are checked)."""
    if ctx.last_eps is None:
        return ctx.x.double().clone()
    mask = ctx.has_last.view(-1, *([1] * (ctx.x.dim() - 1)))
    return torch.where(mask, ctx.last_eps.double(), ctx.x.double())


class FreeDrafter:
    cost = 0
    reads_last_x0 = False

    def start(self, ctx: DraftContext) -> torch.Tensor:
        return latest_target_eps(ctx)  # (B, *shape)

    def step(self, x, t, y, carry):
        return carry, carry
