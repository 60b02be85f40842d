"""A perturbed copy of any eps model: a drafter with a controllable error.

eps_hat(x, t, y) = eps(x, t, y) + error * b, where b is a fixed random direction with unit RMS per
coordinate (|b| = sqrt(D)). Under the kernel this moves the draft mean by |coef_e(k)| * error * sqrt(D),
so the gap d and hence acceptance 2 Phi(-d/2) fall as ``error`` grows.
"""
from __future__ import annotations

import math

import torch

from specdit.models.base import EpsModel, ModelOutput, training_schedule_of


class PerturbedModel:
    def __init__(self, model: EpsModel, error: float, seed: int = 0):
        if not (math.isfinite(error) and error >= 0):
            raise ValueError(f"perturbation error must be a finite number >= 0, got {error}")
        self.model, self.error = model, float(error)
        self.sample_shape = tuple(model.sample_shape)
        self.num_classes = model.num_classes
        g = torch.Generator().manual_seed(seed)
        b = torch.randn(math.prod(self.sample_shape), generator=g, dtype=torch.float64)
        self.bias = (b / b.pow(2).mean().sqrt()).view(self.sample_shape)  # (*shape), unit RMS
        self.dtype = model.dtype
        self.training_schedule = training_schedule_of(model)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> ModelOutput:
        out = self.model(x, t, y)
        return ModelOutput(out.eps + (self.error * self.bias).to(out.eps), out.features)
