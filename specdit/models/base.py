"""The one model contract: ``model(x, t, y) -> ModelOutput(eps, features)``.

Every denoiser (the analytic mixture, a DiT, a CFG wrapper, a drafter network) is an adapter onto this
contract.

- ``x``: (N, *sample_shape) state, any float dtype;
- ``t``: (N,) int64 *original* training timesteps in [0, 1000);
- ``y``: (N,) int64 class labels, ``num_classes`` meaning "no label" (the null class), or None for an
  unconditional model;
- ``eps``: (N, *sample_shape) the predicted noise;
- ``features``: (N, tokens, hidden) top-block features when the model has them (DiT), else None.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class ModelOutput:
    eps: torch.Tensor  # (N, *sample_shape)
    features: torch.Tensor | None = None  # (N, tokens, hidden)


@runtime_checkable
class EpsModel(Protocol):
    sample_shape: tuple[int, ...]
    num_classes: int | None  # None: unconditional

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> ModelOutput: ...
