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

import math
from dataclasses import dataclass, field

import torch

from specdit.config import SettingError
from specdit.scheduler_config import DIT_SCHEDULE, TrainingSchedule

TRAIN_STEPS = 1000


def training_betas(num_steps: int = TRAIN_STEPS, start: float = 1e-4, end: float = 0.02,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """DiT's linear beta schedule, float64, shape (num_steps,), on ``device``."""
    return torch.linspace(start, end, num_steps, dtype=torch.float64, device=device)


def betas_of(training: TrainingSchedule, device: torch.device | str = "cpu") -> torch.Tensor:
    """The betas of a training schedule, float64, shape (T,), built as diffusers builds them (its
    ``DDPMScheduler``/``DDIMScheduler.__init__``) but in float64: ``linear`` (DiT's), ``scaled_linear``
    (``linspace(sqrt(start), sqrt(end))**2``), ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021, eq. 17,
    capped at 0.999) or ``trained_betas``; then ``rescale_betas_zero_snr`` (Lin et al. 2024, Algorithm 1),
    after which ``abar`` at the last step is exactly 0."""
    t = training.num_train_timesteps
    if training.trained_betas is not None:
        betas = torch.tensor(training.trained_betas, dtype=torch.float64)
    elif training.beta_schedule == "linear":
        betas = torch.linspace(training.beta_start, training.beta_end, t, dtype=torch.float64)
    elif training.beta_schedule == "scaled_linear":
        betas = torch.linspace(training.beta_start**0.5, training.beta_end**0.5, t, dtype=torch.float64) ** 2
    else:  # squaredcos_cap_v2
        def abar_fn(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - abar_fn((i + 1) / t) / abar_fn(i / t), 0.999) for i in range(t)],
                             dtype=torch.float64)
    if training.rescale_betas_zero_snr:
        root = torch.cumprod(1.0 - betas, dim=0).sqrt()  # sqrt(abar)
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        abar = root**2
        betas = 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return betas.to(device)


def alphas_cumprod_of(training: TrainingSchedule, device: torch.device | str = "cpu") -> torch.Tensor:
    """``abar_t`` of a training schedule for t = 0..T-1, float64, shape (T,)."""
    return torch.cumprod(1.0 - betas_of(training, device), dim=0)


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
    """Raise ``SettingError`` on ``steps`` (a ValueError, one line) unless 2 <= num_steps <= train_steps (a
    pipeline folder's ``num_train_timesteps`` may be below ``MAX_STEPS``). One step is refused: DiT's
    respacing keeps only t = 0 then (``space_timesteps(T, 1) == [0]``), a step whose kernel returns
    (almost) its input, so the "sample" would be the starting noise."""
    if num_steps == 1:
        raise SettingError("steps", "steps must be >= 2: with 1 step the respaced schedule keeps only t = 0 "
                                    "and the sampler would return its input noise")
    if not 2 <= num_steps <= train_steps:
        raise SettingError("steps", f"steps must lie in [2, {train_steps}], got {num_steps}")


@dataclass(frozen=True)
class Schedule:
    """A respaced sampling schedule with stochasticity ``eta`` over a model's training schedule.

    Arrays are indexed by state index k = 0..S (entry 0 is the clean end, ``abar[0] = 1``). The model's
    output ``out`` is read in the training schedule's ``prediction_type`` (eps, v or x0); every conversion
    is done here, in float64, and none divides by ``sqrt(abar)`` except eps -> x0 (refused at abar = 0).
    """

    timesteps: torch.Tensor  # (S+1,) int64; timesteps[k] = tau_k for k >= 1, timesteps[0] = -1 (unused)
    abar: torch.Tensor  # (S+1,) float64
    sigma: torch.Tensor  # (S+1,) float64; sigma[k] is the noise std of the step x_k -> x_{k-1}
    eta: float
    # Coefficients of the kernel written as mean = a_k * x + b_k * out (derived, float64, (S+1,)).
    coef_x: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    coef_e: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    training: TrainingSchedule = DIT_SCHEDULE
    # x0 = x0_x x + x0_o out, and the mean in terms of (x, x0): mean = post_x x + post_0 x0 (float64, (S+1,)).
    x0_x: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    x0_o: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    post_x: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    post_0: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    # (S+1, 4) columns coef_x, coef_e, x0_x, x0_o: the mean and x0 of a step gathered in one operation.
    linear: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]

    @staticmethod
    def create(num_steps: int = 250, eta: float = 1.0, train_steps: int = TRAIN_STEPS,
               training: TrainingSchedule | None = None) -> "Schedule":
        """DiT's respacing (:func:`space_timesteps`) of ``num_steps`` over ``training`` (None: DiT's
        schedule with ``train_steps`` steps). Raises ``ValueError`` (one line) for eta outside [0, 1] or
        a step count outside [2, T]."""
        if training is not None:
            train_steps = training.num_train_timesteps
        check_num_steps(num_steps, train_steps)
        return Schedule.from_timesteps(space_timesteps(train_steps, num_steps), eta, training, train_steps)

    @staticmethod
    def from_timesteps(taus: list[int], eta: float = 1.0, training: TrainingSchedule | None = None,
                       train_steps: int = TRAIN_STEPS) -> "Schedule":
        """A schedule on explicit increasing training timesteps ``taus`` (S,) (e.g. diffusers' ``leading``
        spacing, to compare with its schedulers)."""
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        training = training or TrainingSchedule(num_train_timesteps=train_steps)  # DiT's betas
        taus_t = torch.tensor(taus, dtype=torch.int64)  # (S,)
        abar_train = alphas_cumprod_of(training)
        abar = torch.cat([torch.ones(1, dtype=torch.float64), abar_train[taus_t]])  # (S+1,)
        timesteps = torch.cat([torch.full((1,), -1, dtype=torch.int64), taus_t])
        beta = torch.zeros_like(abar)
        beta[1:] = 1.0 - abar[1:] / abar[:-1]
        btilde = torch.zeros_like(abar)
        btilde[1:] = beta[1:] * (1.0 - abar[:-1]) / (1.0 - abar[1:])
        sigma = eta * btilde.sqrt()
        coefs = _kernel_coefficients(abar, sigma, training.prediction_type)
        return Schedule(timesteps, abar, sigma, float(eta), training=training, **coefs)

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
        move = {f: getattr(self, f).to(device) for f in _TENSOR_FIELDS}
        return Schedule(eta=self.eta, training=self.training, **move)

    @property
    def clips(self) -> bool:
        """Whether the predicted x0 is clipped or thresholded before the mean (``clip_sample``/``thresholding``)."""
        return self.training.clip_sample or self.training.thresholding

    def step_mean_coefficients(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(a, b), float64 of ``k``'s shape on its device, with the kernel mean a x + b out at state indices
        ``k`` (>= 1); None when the schedule clips (the mean is then not linear in the output)."""
        if self.clips:
            return None
        a, b, _, _ = self.linear.to(k.device)[k].unbind(-1)  # one gather (``linear``: coef_x, coef_e, ...)
        return a, b

    def step_mean(self, x: torch.Tensor, eps: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Kernel mean of the step x_k -> x_{k-1}; ``k`` is (N,) per-item state indices >= 1.

        x, eps: (N, *shape); ``eps`` is the model's output in its prediction type (eps, v or x0). Computed
        in float64 and returned in float64. With clipping the mean is ``post_x x + post_0 clip(x0)`` (DDPM's
        posterior mean, i.e. the noise implied by the clipped x0)."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        coefs = self.step_mean_coefficients(k)
        if coefs is None:
            x0 = self.predicted_x0(x, eps, k)
            return self.post_x.to(x.device)[k].view(shape) * x.double() + self.post_0.to(x.device)[k].view(shape) * x0
        return coefs[0].view(shape) * x.double() + coefs[1].view(shape) * eps.double()

    def step_mean_and_x0(self, x: torch.Tensor, out: torch.Tensor,
                         k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``step_mean(x, out, k)``, ``predicted_x0(x, out, k)``), the same floats, with the coefficients of
        both gathered in one operation where the schedule does not clip (x, out: (N, *shape); k: (N,))."""
        if self.clips:
            return self.step_mean(x, out, k), self.predicted_x0(x, out, k)
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, b, c, d = self.linear.to(x.device)[k].unbind(-1)  # (N,) each: coef_x, coef_e, x0_x, x0_o
        x, out = x.double(), out.double()
        return a.view(shape) * x + b.view(shape) * out, c.view(shape) * x + d.view(shape) * out

    def predicted_x0(self, x: torch.Tensor, out: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """x0 predicted at state index k (N,) from x and the model output (N, *shape), float64, clipped or
        thresholded as the training schedule says (diffusers' ``_threshold_sample``: per-item quantile)."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        x0 = (self.x0_x.to(x.device)[k].view(shape) * x.double()
              + self.x0_o.to(x.device)[k].view(shape) * out.double())
        tr = self.training
        if tr.thresholding:
            flat = x0.flatten(1)  # (N, D)
            s = torch.quantile(flat.abs(), tr.dynamic_thresholding_ratio, dim=1).clamp(1.0, tr.sample_max_value)
            return (torch.maximum(torch.minimum(flat, s[:, None]), -s[:, None]) / s[:, None]).view_as(x0)
        if tr.clip_sample:
            return x0.clamp(-tr.clip_sample_range, tr.clip_sample_range)
        return x0

    def skip_mean_std(
        self, x: torch.Tensor, eps: torch.Tensor, k: torch.Tensor, i: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DRiffusion skip transition x_k -> x_{k-i} (DRiffusion supplementary eq. 14) with
        sigma = eta * sqrt(DDPM skip posterior variance). ``eps`` is the model output in its prediction
        type. Returns (mean float64 (N, *shape), std (N,))."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        abar = self.abar.to(x.device)
        a_k, a_j = abar[k], abar[k - i]
        var = (1.0 - a_k / a_j) * (1.0 - a_j) / (1.0 - a_k)
        std = self.eta * var.clamp_min(0.0).sqrt()
        if self.training.prediction_type == "epsilon" and not self.clips:
            e = eps.double()
            x0 = (x.double() - (1.0 - a_k).sqrt().view(shape) * e) / a_k.sqrt().view(shape)
        else:  # the noise implied by x0 (a_k < 1 for k >= 1): no division by sqrt(abar)
            x0 = self.predicted_x0(x, eps, k)
            e = (x.double() - a_k.sqrt().view(shape) * x0) / (1.0 - a_k).sqrt().view(shape)
        mean = a_j.sqrt().view(shape) * x0 + (1.0 - a_j - std**2).clamp_min(0.0).sqrt().view(shape) * e
        return mean, std


_TENSOR_FIELDS = ("timesteps", "abar", "sigma", "coef_x", "coef_e", "x0_x", "x0_o", "post_x", "post_0", "linear")


def _kernel_coefficients(abar: torch.Tensor, sigma: torch.Tensor, prediction: str) -> dict[str, torch.Tensor]:
    """float64 (S+1,) coefficients of the eta-kernel for a model predicting ``prediction``:

    - x0 from (x, out): eps: ``(x - sqrt(1-a) e) / sqrt(a)``; v: ``sqrt(a) x - sqrt(1-a) v``; sample: ``out``;
    - mean from (x, x0): ``c / sqrt(1-a) x + (sqrt(a') - c sqrt(a) / sqrt(1-a)) x0``, c = sqrt(1 - a' - sigma^2);
    - mean from (x, out): eps keeps DiT's form ``sqrt(a'/a) x + (c - sqrt(a'/a) sqrt(1-a)) e`` (bit-identical
      to earlier versions); v and sample compose the two above, finite at a = 0 (zero terminal SNR).
    Entry 0 (no step leaves x_0) is NaN."""
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])  # prev[k] = abar_{k-1}
    c = (1.0 - prev - sigma**2).clamp_min(0.0).sqrt()
    one_minus = (1.0 - abar).sqrt()
    post_x = c / one_minus
    post_0 = prev.sqrt() - post_x * abar.sqrt()
    if prediction == "epsilon":
        x0_x, x0_o = 1.0 / abar.sqrt(), -one_minus / abar.sqrt()
        coef_x = (prev / abar).sqrt()
        coef_e = c - coef_x * one_minus
    else:
        if prediction == "v_prediction":
            x0_x, x0_o = abar.sqrt(), -one_minus
        else:  # sample
            x0_x, x0_o = torch.zeros_like(abar), torch.ones_like(abar)
        coef_x = post_x + post_0 * x0_x
        coef_e = post_0 * x0_o
    out = dict(coef_x=coef_x, coef_e=coef_e, x0_x=x0_x, x0_o=x0_o, post_x=post_x, post_0=post_0)
    for v in out.values():
        v[0] = float("nan")  # no step leaves x_0
    return {**out, "linear": torch.stack([coef_x, coef_e, x0_x, x0_o], dim=1)}
