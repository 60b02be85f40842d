"""DDPM noise schedule, timestep respacing and the eta-family Gaussian kernel.

Notation (docs/design.md): the training schedule has 1000 linear betas from 1e-4 to
0.02 and ``abar_t = prod_{s<=t} (1 - beta_s)``. Sampling uses S respaced timesteps
``tau_1 < ... < tau_S`` (DiT's ``space_timesteps``) with ``abar(tau_0) = 1`` and

    beta'_k   = 1 - abar(tau_k) / abar(tau_{k-1})
    btilde_k  = beta'_k (1 - abar(tau_{k-1})) / (1 - abar(tau_k))
    sigma_k   = eta * sqrt(btilde_k)

A chain is at *state index* k in {S, ..., 0}: x_S is pure noise, x_0 the sample. The step at index k
calls the model at the original timestep ``tau_k`` and moves x_k -> x_{k-1}:

    x0   = (x - sqrt(1 - abar_k) e) / sqrt(abar_k)
    mean = sqrt(abar_{k-1}) x0 + sqrt(1 - abar_{k-1} - sigma_k^2) e
    x_{k-1} = mean + sigma_k z

eta = 1 is DDPM with the fixed posterior variance, eta = 0 is DDIM. sigma_1 = 0 (abar_0 = 1), so the
last step is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

TRAIN_STEPS = 1000


def training_betas(num_steps: int = TRAIN_STEPS, start: float = 1e-4, end: float = 0.02,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """DiT's linear beta schedule, float64, shape (num_steps,), on ``device``."""
    return torch.linspace(start, end, num_steps, dtype=torch.float64, device=device)


def training_alphas_cumprod(num_steps: int = TRAIN_STEPS, device: torch.device | str = "cpu") -> torch.Tensor:
    """``abar_t`` for t = 0..num_steps-1, float64, shape (num_steps,), on ``device``."""
    return torch.cumprod(1.0 - training_betas(num_steps, device=device), dim=0)


def space_timesteps(num_timesteps: int, section_counts: int | str | list[int]) -> list[int]:
    """Respaced timesteps exactly as DiT's / ADM's ``respace.space_timesteps``; returns the sorted list.

    ``section_counts``: an int S (one section), a list of counts, a comma-separated string of counts
    (``"10,15,20"``) or ``"ddimN"``. Counts split [0, T) into equal sections (the first ``T mod n`` one
    longer) and take ``count`` timesteps from each, starting at the section's first timestep with the
    fractional stride ``(size - 1) / (count - 1)`` *accumulated in floating point* and the running sum
    rounded (Python's ``round``, half to even): rounding ``j * stride`` instead differs for 278 of the
    1000 step counts. A count of 0 takes nothing from its section. ``"ddimN"`` is ``range(0, T, i)`` for
    the smallest integer stride i with N elements (the DDIM paper's uniform striding).
    Raises ``ValueError`` (one line) for a negative count, a count larger than its section, an empty
    list or a ``ddimN`` with no integer stride."""
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            return _ddim_timesteps(num_timesteps, text)
        try:
            counts = [int(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"timestep sections must be comma-separated integers or ddimN, got {text!r}") from None
    else:
        counts = [section_counts] if isinstance(section_counts, int) else [int(c) for c in section_counts]
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"timestep section counts must be non-negative integers, got {section_counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, taken = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # the running float sum DiT rounds (not j * stride)
        for _ in range(count):
            taken.append(start + round(position))
            position += stride
        start += size
    return sorted(set(taken))


def _ddim_timesteps(num_timesteps: int, text: str) -> list[int]:
    try:
        desired = int(text[len("ddim"):])
    except ValueError:
        raise ValueError(f"expected ddimN with an integer N, got {text!r}") from None
    for stride in range(1, num_timesteps):
        steps = range(0, num_timesteps, stride)
        if len(steps) == desired:
            return list(steps)
    raise ValueError(f"cannot take exactly {desired} of {num_timesteps} timesteps with an integer stride ({text})")


def check_num_steps(num_steps: int, train_steps: int = TRAIN_STEPS) -> None:
    """Raise ``ValueError`` (one line) unless 2 <= num_steps <= train_steps. One step is refused: DiT's
    respacing keeps only t = 0 then (``space_timesteps(T, 1) == [0]``), a step whose kernel returns
    (almost) its input, so the "sample" would be the starting noise."""
    if num_steps == 1:
        raise ValueError("steps must be >= 2: with 1 step the respaced schedule keeps only t = 0 and the "
                         "sampler would return its input noise")
    if not 2 <= num_steps <= train_steps:
        raise ValueError(f"steps must lie in [2, {train_steps}], got {num_steps}")


@dataclass(frozen=True)
class Schedule:
    """A respaced sampling schedule with stochasticity ``eta``.

    Arrays are indexed by state index k = 0..S (entry 0 is the clean end, ``abar[0] = 1``).
    """

    timesteps: torch.Tensor  # (S+1,) int64; timesteps[k] = tau_k for k >= 1, timesteps[0] = -1 (unused)
    abar: torch.Tensor  # (S+1,) float64
    sigma: torch.Tensor  # (S+1,) float64; sigma[k] is the noise std of the step x_k -> x_{k-1}
    eta: float
    # Coefficients of the kernel written as mean = a_k * x + b_k * e (derived, float64, (S+1,)).
    coef_x: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    coef_e: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]

    @staticmethod
    def create(num_steps: int = 250, eta: float = 1.0, train_steps: int = TRAIN_STEPS) -> "Schedule":
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        check_num_steps(num_steps, train_steps)
        taus = torch.tensor(space_timesteps(train_steps, num_steps), dtype=torch.int64)  # (S,)
        abar_train = training_alphas_cumprod(train_steps)
        abar = torch.cat([torch.ones(1, dtype=torch.float64), abar_train[taus]])  # (S+1,)
        timesteps = torch.cat([torch.full((1,), -1, dtype=torch.int64), taus])
        beta = torch.zeros_like(abar)
        beta[1:] = 1.0 - abar[1:] / abar[:-1]
        btilde = torch.zeros_like(abar)
        btilde[1:] = beta[1:] * (1.0 - abar[:-1]) / (1.0 - abar[1:])
        sigma = eta * btilde.sqrt()
        # mean = sqrt(abar_{k-1}) (x - sqrt(1-abar_k) e)/sqrt(abar_k) + sqrt(1-abar_{k-1}-sigma_k^2) e
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])  # prev[k] = abar_{k-1}
        coef_x = (prev / abar).sqrt()
        coef_e = (1.0 - prev - sigma**2).clamp_min(0.0).sqrt() - coef_x * (1.0 - abar).sqrt()
        coef_x[0] = coef_e[0] = float("nan")  # no step leaves x_0
        return Schedule(timesteps, abar, sigma, float(eta), coef_x, coef_e)

    @property
    def num_steps(self) -> int:
        return self.abar.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.abar.device

    def to(self, device: torch.device | str) -> "Schedule":
        """This schedule with its tensors on ``device`` (itself when they already are): a sampler moves its
        schedule to its chains' device once, so that indexing by per-chain state indices stays there."""
        device = torch.device(device)
        if self.abar.device == device:
            return self
        move = {f: getattr(self, f).to(device) for f in ("timesteps", "abar", "sigma", "coef_x", "coef_e")}
        return Schedule(eta=self.eta, **move)

    def step_mean(self, x: torch.Tensor, eps: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Kernel mean of the step x_k -> x_{k-1}; ``k`` is (N,) per-item state indices >= 1.

        x, eps: (N, *shape). Computed in float64 and returned in float64."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        a = self.coef_x.to(x.device)[k].view(shape)
        b = self.coef_e.to(x.device)[k].view(shape)
        return a * x.double() + b * eps.double()

    def skip_mean_std(
        self, x: torch.Tensor, eps: torch.Tensor, k: torch.Tensor, i: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DRiffusion skip transition x_k -> x_{k-i} (DRiffusion supplementary eq. 14) with
        sigma = eta * sqrt(DDPM skip posterior variance). Returns (mean float64 (N, *shape), std (N,))."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        abar = self.abar.to(x.device)
        a_k, a_j = abar[k], abar[k - i]
        var = (1.0 - a_k / a_j) * (1.0 - a_j) / (1.0 - a_k)
        std = self.eta * var.clamp_min(0.0).sqrt()
        x0 = (x.double() - (1.0 - a_k).sqrt().view(shape) * eps.double()) / a_k.sqrt().view(shape)
        mean = a_j.sqrt().view(shape) * x0 + (1.0 - a_j - std**2).clamp_min(0.0).sqrt().view(shape) * eps.double()
        return mean, std
