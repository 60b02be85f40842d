"""Test-only models and drafters that return NaN / inf / huge values on a band of timesteps (issue 12).

Not a user-facing drafter spec: tests wrap a model with :class:`BandFault` and use it as a target, or as a
drafter through ``ModelDrafter``.
"""
from __future__ import annotations

import torch

from specdit.models.base import ModelOutput


class BandFault:
    """``model`` whose eps is replaced by ``value`` (nan, inf, 1e30...) for items with timestep in
    [lo, hi] (and, if ``label`` is given, label == ``label``; if ``where`` is given, where(x) is True)."""

    def __init__(self, model, lo: int, hi: int, value: float, label: int | None = None, where=None):
        self.model, self.lo, self.hi, self.value, self.label, self.where = model, lo, hi, value, label, where
        self.sample_shape = tuple(model.sample_shape)
        self.num_classes = model.num_classes
        self.dtype = model.dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> ModelOutput:
        out = self.model(x, t, y)
        hit = (t >= self.lo) & (t <= self.hi)  # (N,)
        if self.label is not None:
            hit = hit & (y == self.label)
        if self.where is not None:
            hit = hit & self.where(x)
        mask = hit.view(-1, *([1] * (out.eps.dim() - 1)))
        return ModelOutput(torch.where(mask, torch.full_like(out.eps, self.value), out.eps), out.features)
