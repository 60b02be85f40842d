"""The model contract ``model(x, t, y) -> ModelOutput(eps, features)`` and the optional capabilities.

Every denoiser (the analytic mixture, a DiT, a CFG wrapper, a drafter network) is an adapter onto
:class:`EpsModel`:

- ``x``: (N, *sample_shape) state, cast by the caller to ``model.dtype``;
- ``t``: (N,) int64 *original* training timesteps in [0, 1000);
- ``y``: (N,) int64 class labels, ``num_classes`` meaning "no label" (the null class), or None for an
  unconditional model;
- ``eps``: (N, *sample_shape) the predicted noise, on the model's device;
- ``features``: (N, tokens, hidden) top-block features when the model has them (DiT), else None.

What a model can do beyond that is declared by the protocols below (:class:`HasFeatures`,
:class:`DecodesImages`, :class:`HasData`, :class:`HasExactMarginals`) and read ONCE, where the model is loaded,
into :class:`Capabilities`; code that needs a capability asks for it there (or calls :func:`require_features`)
instead of probing attributes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from specdit.scheduler_config import DIT_SCHEDULE, TrainingSchedule


@dataclass
class ModelOutput:
    eps: torch.Tensor  # (N, *sample_shape)
    features: torch.Tensor | None = None  # (N, tokens, hidden)


@runtime_checkable
class EpsModel(Protocol):
    sample_shape: tuple[int, ...]
    num_classes: int | None  # None: unconditional
    dtype: torch.dtype  # the dtype the model computes in (its inputs are cast to it); float64 for analytic models

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> ModelOutput: ...


@runtime_checkable
class HasFeatures(Protocol):
    """A DiT-like target whose frozen final layer is callable on a top-block feature (the FREE drafter's need)."""

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor: ...  # (N, D) conditioning

    def eps_from_features(self, features: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor: ...


@runtime_checkable
class DecodesImages(Protocol):
    """A model whose samples are images (pixels or VAE latents)."""

    image_shape: tuple[int, int, int]  # (H, W, C) of the decoded uint8 images

    def to_images(self, samples: torch.Tensor, batch_size: int | None = None) -> torch.Tensor: ...  # (N, H, W, C)


@runtime_checkable
class HasData(Protocol):
    """An analytic model that can draw exact samples of its data distribution (FID references)."""

    def sample_data(self, n: int, generator: torch.Generator, y: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class HasExactMarginals(Protocol):
    """An analytic model with the exact CDF of a 1-D projection of its data (KS tests in the benchmark)."""

    def projected_cdf(self, direction: torch.Tensor, values: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Capabilities:
    """What a loaded model can do beyond :class:`EpsModel`, read once where it is loaded."""

    features: bool  # HasFeatures
    images: bool  # DecodesImages
    data: bool  # HasData
    exact_marginals: bool  # HasExactMarginals

    @staticmethod
    def of(model: EpsModel) -> "Capabilities":
        """Check ``model`` against the contract (TypeError, one line, if it is no EpsModel) and its protocols."""
        if not isinstance(model, EpsModel):
            raise TypeError(f"{type(model).__name__} is not an eps model (sample_shape, num_classes, dtype, __call__)")
        return Capabilities(isinstance(model, HasFeatures), isinstance(model, DecodesImages),
                            isinstance(model, HasData), isinstance(model, HasExactMarginals))


def require_features(target: EpsModel, name: str | None = None) -> HasFeatures:
    """``target`` (or the DiT it wraps) as a :class:`HasFeatures`; ValueError (one line, naming the model as
    ``name`` when given) for a model without top-block features, e.g. an analytic mixture."""
    if not isinstance(target, HasFeatures):
        what = "this model" if name is None else f"model {name!r}"
        raise ValueError(f"the feature drafter needs a DiT target (top-block features); {what} has none")
    return target


@runtime_checkable
class HasTrainingSchedule(Protocol):
    """A model whose output refers to a declared training schedule (a DiT: a diffusers pipeline's scheduler
    config, else DiT's); models that declare none are read under DiT's schedule."""

    training_schedule: TrainingSchedule


def training_schedule_of(model: EpsModel) -> TrainingSchedule:
    """The training schedule a model's output refers to (:class:`HasTrainingSchedule`), DiT's for models that
    declare none (analytic mixtures, drafters)."""
    return model.training_schedule if isinstance(model, HasTrainingSchedule) else DIT_SCHEDULE
