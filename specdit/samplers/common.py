"""Helpers shared by the samplers: model calls on float64 chain states, the initial noise."""
from __future__ import annotations

import torch

from specdit.models.base import EpsModel, ModelOutput
from specdit.noise import NoiseStreams, Purpose


def call_model(model: EpsModel, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> ModelOutput:
    """Evaluate ``model`` on float64 states x (N, *shape); eps comes back as float64."""
    dtype = getattr(model, "dtype", torch.float64)
    out = model(x.to(dtype), t, y)
    return ModelOutput(out.eps.double(), out.features)


def initial_noise(streams: NoiseStreams, shape: tuple[int, ...]) -> torch.Tensor:
    """x_S ~ N(0, I) from each sample's own stream, (B, *shape) float64."""
    return streams.normal(Purpose.INIT, shape=shape)

