"""Helpers shared by the samplers: model calls on float64 chain states, the initial noise, and the error
raised when the target model returns a non-finite value."""
from __future__ import annotations

from typing import Callable

import torch

from specdit.models.base import EpsModel, ModelOutput
from specdit.noise import NoiseStreams, Purpose


class NonFiniteTargetError(ValueError):
    """The target model returned a non-finite eps (NaN or inf). The target defines the law being sampled,
    so there is nothing to fall back to: the job stops. ``step`` is the state index k of the step
    x_k -> x_{k-1} (None if unknown), ``timestep`` the model's timestep tau_k, ``sample`` the sample's row
    (renumbered by the callers to the sample's index in the job)."""

    def __init__(self, step: int | None, timestep: int, sample: int):
        self.step, self.timestep, self.sample = step, timestep, sample
        where = f"step {step} (timestep {timestep})" if step is not None else f"timestep {timestep}"
        super().__init__(f"the target model returned a non-finite eps at {where} for sample {sample}")

    def with_sample(self, sample: int) -> "NonFiniteTargetError":
        """The same error naming the sample by another index (e.g. its index in the job)."""
        return NonFiniteTargetError(self.step, self.timestep, int(sample))


def call_model(model: EpsModel, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, *,
               steps: torch.Tensor | None = None, row_of: Callable[[int], int] | None = None) -> ModelOutput:
    """Evaluate the target ``model`` on float64 states x (N, *shape); eps comes back as float64 and, like the
    features, on x's device (the model may live on another one).

    Raises :class:`NonFiniteTargetError` if any eps is not finite, naming the first such item i by its state
    index ``steps[i]`` (N,), its timestep ``t[i]`` and its sample row ``row_of(i)`` (default: i)."""
    out = model(x.to(model.dtype), t, y)
    eps = out.eps.to(device=x.device, dtype=torch.float64)  # the model may live on another device
    if not bool(torch.isfinite(eps).all()):  # one reduction in the usual case; the culprit found only on failure
        i = int((~torch.isfinite(eps).flatten(1).all(1)).nonzero()[0, 0])
        raise NonFiniteTargetError(None if steps is None else int(steps[i]), int(t[i]),
                                   i if row_of is None else row_of(i))
    return ModelOutput(eps, None if out.features is None else out.features.to(x.device))


def initial_noise(streams: NoiseStreams, shape: tuple[int, ...]) -> torch.Tensor:
    """x_S ~ N(0, I) from each sample's own stream, (B, *shape) float64."""
    return streams.normal(Purpose.INIT, shape=shape)
