"""Analytic Gaussian-mixture model: exact eps(x, t) in closed form (docs/design.md).

Data x0 ~ sum_c w_c N(mu_c, s_c^2 I) in R^D. Under the forward process
x_t = sqrt(abar) x0 + sqrt(1 - abar) eps the marginal is again a mixture,
x_t ~ sum_c w_c N(sqrt(abar) mu_c, v_c I), v_c = abar s_c^2 + 1 - abar, so

    score(x, t) = sum_c pi_c(x) (sqrt(abar) mu_c - x) / v_c,     eps(x, t) = -sqrt(1 - abar) score(x, t),

with responsibilities pi_c(x) proportional to w_c N(x; sqrt(abar) mu_c, v_c I). Components may carry class
labels: label y restricts the mixture to its components; the null label (``num_classes``) uses all.
Everything is computed in float64, so a sample's eps never depends on what else is in the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specdit.models.base import ModelOutput
from specdit.schedule import TRAIN_STEPS, training_alphas_cumprod


@dataclass(frozen=True)
class GaussianMixture:
    means: torch.Tensor  # (C, D)
    stds: torch.Tensor  # (C,)
    weights: torch.Tensor  # (C,) sum to 1
    classes: torch.Tensor | None = None  # (C,) int64 class of each component, None: unconditional

    def __post_init__(self):
        C = self.means.shape[0]
        if self.stds.shape != (C,) or self.weights.shape != (C,):
            raise ValueError("means (C, D), stds (C,) and weights (C,) must agree")
        if (self.stds <= 0).any() or (self.weights <= 0).any():
            raise ValueError("mixture stds and weights must be positive")

    # -- EpsModel contract -------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.means.shape[1],)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64  # closed forms in float64

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else int(self.classes.max()) + 1

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> ModelOutput:
        abar = training_alphas_cumprod(TRAIN_STEPS, device=x.device)[t.to(x.device)]  # (N,)
        return ModelOutput(self.eps_at(x, abar, y).to(x.dtype))

    # -- closed forms ------------------------------------------------------------------------
    def _log_weights(self, y: torch.Tensor | None, n: int, device) -> torch.Tensor:
        """(N, C) log mixture weights given labels (components of other classes get -inf)."""
        logw = self.weights.double().log().to(device).expand(n, -1)
        if y is None or self.classes is None:
            return logw
        y = y.to(device)
        own = self.classes.to(device)[None, :] == y[:, None]  # (N, C)
        null = (y == self.num_classes)[:, None]
        return torch.where(own | null, logw, torch.full_like(logw, -math.inf))

    def eps_at(self, x: torch.Tensor, abar: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Exact eps at states x (N, D) with per-item abar (N,), float64."""
        x = x.double()
        mu = self.means.double().to(x.device)  # (C, D)
        s2 = self.stds.double().to(x.device) ** 2  # (C,)
        a = abar.double()[:, None]  # (N, 1)
        v = a * s2[None, :] + 1.0 - a  # (N, C)
        centre = a.sqrt()[:, :, None] * mu[None]  # (N, C, D)
        sq = ((x[:, None, :] - centre) ** 2).sum(-1)  # (N, C)
        D = x.shape[1]
        logits = self._log_weights(y, x.shape[0], x.device) - 0.5 * D * v.log() - 0.5 * sq / v
        resp = torch.softmax(logits, dim=1)  # (N, C)
        score = ((resp / v)[:, :, None] * (centre - x[:, None, :])).sum(1)  # (N, D)
        return -(1.0 - a).sqrt() * score

    def sample_data(self, n: int, generator: torch.Generator, y: torch.Tensor | None = None) -> torch.Tensor:
        """n exact draws from the data distribution (given labels y), (n, D) float64."""
        logw = self._log_weights(y, n, "cpu")
        comp = torch.multinomial(logw.exp(), 1, generator=generator).squeeze(1)  # (n,)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means.double()[comp] + self.stds.double()[comp, None] * z

    def projected_cdf(self, direction: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Exact CDF of <x0, v> (unconditional data) at ``values``: a 1-D mixture of Gaussians."""
        v = direction.double()
        m = self.means.double() @ v  # (C,)
        s = self.stds.double() * v.norm()
        z = (values.double()[:, None] - m[None]) / s[None]
        return (torch.special.ndtr(z) * self.weights.double()[None]).sum(1)

    def perturbed(self, error: float, seed: int = 0) -> "GaussianMixture":
        """A copy with means moved by ``error`` (in units of the component std) along random directions
        and stds scaled by (1 + error / 4): a drafter with controllable error."""
        g = torch.Generator().manual_seed(seed)
        direction = torch.randn(self.means.shape, generator=g, dtype=torch.float64)
        direction = direction / direction.norm(dim=1, keepdim=True)
        means = self.means.double() + error * self.stds.double()[:, None] * direction
        return GaussianMixture(means, self.stds.double() * (1 + error / 4), self.weights, self.classes)


def make_mixture(dim: int, components: int, *, spread: float = 2.0, std: float = 0.5,
                 conditional: bool = True, seed: int = 0) -> GaussianMixture:
    """A reproducible random mixture: means ~ spread * N(0, I)/sqrt(dim) * sqrt(dim) (norm ~ spread * sqrt(dim)
    per unit axis), stds in [std/2, std], uneven weights; component c has class c when conditional."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
    stds = std * (0.5 + 0.5 * torch.rand(components, generator=g, dtype=torch.float64))
    weights = torch.linspace(1.0, 2.0, components, dtype=torch.float64)
    weights = weights / weights.sum()
    classes = torch.arange(components) if conditional else None
    return GaussianMixture(means, stds, weights, classes)


# Named analytic models for the registry: name -> zero-argument factory.
GMM_PRESETS = {
    "gmm-2d": lambda: make_mixture(2, 3, spread=1.0, std=0.8, seed=3),
    "gmm-16d": lambda: make_mixture(16, 5, spread=0.6, std=1.0, seed=1),
    "gmm-4096d": lambda: make_mixture(4096, 3, spread=0.05, seed=2),
}
