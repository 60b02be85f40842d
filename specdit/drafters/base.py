"""The drafter contract and the generic "model as drafter" adapter.

A drafter proposes the eps of each draft step of a round, autoregressively:

    carry = drafter.start(context)                       # once per round
    eps_hat_j, carry = drafter.step(xh_{j-1}, t_j, y, carry)   # j = 1..L

``context`` carries the latest target output of each chain (computed in the previous round's batch), so a
drafter may reuse it at no cost. Any drafter keeps the speculative samplers exact; only acceptance
depends on its quality.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from specdit.models.base import EpsModel


@dataclass
class DraftContext:
    x: torch.Tensor  # (B, *shape) round start states, float64
    k: torch.Tensor  # (B,) int64 state index of the round start
    y: torch.Tensor | None  # (B,) labels
    last_eps: torch.Tensor | None  # (B, *shape) latest target eps of each chain (rows valid where has_last)
    last_features: torch.Tensor | None  # (B, ...) latest target top-block features, if the target has them
    has_last: torch.Tensor  # (B,) bool
    last_x0: torch.Tensor | None = None  # (B, *shape) float64 target's denoised estimate at that state (x0_hat)


class Drafter(Protocol):
    cost: int  # network evaluations per draft step (0: free)

    def start(self, ctx: DraftContext) -> Any: ...

    def step(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, carry: Any) -> tuple[torch.Tensor, Any]: ...


@runtime_checkable
class Calibrated(Protocol):
    """A drafter that carries its relaxation scale (``specdit.relaxation.RelaxCalibration``, None: none
    stored) and the sampling steps it was trained on (None: not recorded), e.g. the FREE feature drafter."""

    relax_calibration: Any
    trained_sample_steps: int | None


@runtime_checkable
class DeclaresX0Use(Protocol):
    """A drafter that says whether it reads ``DraftContext.last_x0`` (the target's x0_hat). A round computes
    x0_hat for its context unless the drafter declares ``reads_last_x0 = False`` (a wrapper that does not
    forward the attribute keeps the safe default: computed)."""

    reads_last_x0: bool


def reads_last_x0(drafter: Any) -> bool:
    """Whether rounds must give ``drafter`` the target's x0_hat (``DeclaresX0Use``; True when undeclared)."""
    return not isinstance(drafter, DeclaresX0Use) or bool(drafter.reads_last_x0)


class ModelDrafter:
    """Any (cheaper or perturbed) eps model used as a drafter: eps_hat_j = drafter_model(xh_{j-1}, t_j, y)."""

    cost = 1
    reads_last_x0 = False

    def __init__(self, model: EpsModel):
        self.model = model

    def start(self, ctx: DraftContext) -> None:
        return None

    def step(self, x, t, y, carry):
        return self.model(x, t, y).eps.double(), carry
