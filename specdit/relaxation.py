"""Uncertainty-guided relaxation with a per-timestep scale (docs/design.md, "Relaxation"). Not exact for
lambda > 0.

Each draft j of a round (state index k_j, original timestep t_j) has the uncertainty
u_j = mean((eps_hat_j - eps_j)^2) (FREE's epsilon_delta: drafted against target eps, over every coordinate);
verification divides its log q/p by

    temper_j = 1 + lambda * u_j / c(t_j)

where c(t) is the drafter's *relaxation scale*:

- **calibrated** (``specdit calibrate-relax``): c(t) = median(u at t) / 32, the median over every draft
  scored in exact speculative chains of that drafter, stored beside the drafter as ``relax_scale.json``
  and interpolated linearly in t for other step counts. The median draft then has u / c = 32, so lambda = 1
  divides its log q/p by 33: parallel efficiency about doubles on the built-in models, with the first
  quality loss a paired 1,000-sample comparison resolves (README "Relaxation"); lambda = 1/8 is the
  earlier median / 4 rule (+34-43%, no loss resolved);
- **default** (drafters without a calibration: free, perturbed, model, an uncalibrated feature drafter):
  the u at which the drafted step's mean lies one kernel standard deviation from the target's,
  c_k = sigma_k^2 / (g_k^2 D) with g_k the eps coefficient of the kernel mean and D the sample size, so
  u / c = d^2 with d = |m - mh| / sigma (the gap that sets the rejection rate, 2 Phi(d/2) - 1).

lambda = 0 never computes a scale: the samplers take their exact path, bit for bit.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from specdit.schedule import Schedule

CALIBRATION_FILE = "relax_scale.json"
CALIBRATION_VERSION = 1
DEFAULT_QUANTILE = 0.5  # the calibrated scale is this quantile of u per timestep (the median) ...
DEFAULT_DIVISOR = 32.0  # ... divided by this: lambda = 1 divides the median draft's log q/p by 1 + 32 = 33


@dataclass(frozen=True)
class RelaxCalibration:
    """A drafter's relaxation scale: ``scale[i]`` (> 0) is the scale c of the uncertainty u at original timestep
    ``timesteps[i]`` (increasing ints in [0, 999]), measured on ``samples`` exact chains of ``steps`` steps,
    draft length ``draft_length``, guidance ``cfg_scale``, by drafter ``drafter`` on ``model``; ``statistic``
    names the statistic of u per timestep ("quantile 0.5 / 32": the median over 32; "mean" in files written
    before it was recorded)."""

    timesteps: tuple[int, ...]
    scale: tuple[float, ...]
    steps: int
    draft_length: int
    cfg_scale: float
    samples: int
    drafter: str
    model: str
    version: int = CALIBRATION_VERSION
    statistic: str = "mean"

    def __post_init__(self):
        if len(self.timesteps) != len(self.scale) or not self.timesteps:
            raise ValueError("relaxation calibration: timesteps and scale must be non-empty and of equal length")
        if list(self.timesteps) != sorted(set(self.timesteps)):
            raise ValueError("relaxation calibration: timesteps must increase")
        if not all(math.isfinite(c) and c > 0 for c in self.scale):
            raise ValueError("relaxation calibration: every scale must be finite and > 0")

    def at(self, t: torch.Tensor) -> torch.Tensor:
        """c(t) for original timesteps t (any shape, int): linear interpolation in t, constant beyond the ends."""
        ts = torch.tensor(self.timesteps, dtype=torch.float64)
        cs = torch.tensor(self.scale, dtype=torch.float64)
        tf = t.double().cpu().clamp(float(ts[0]), float(ts[-1]))
        hi = torch.searchsorted(ts, tf.reshape(-1)).clamp(1, len(ts) - 1) if len(ts) > 1 else None
        if hi is None:
            return cs[0].expand(t.shape).clone()
        lo = hi - 1
        w = (tf.reshape(-1) - ts[lo]) / (ts[hi] - ts[lo])
        return (cs[lo] * (1 - w) + cs[hi] * w).view(t.shape)


def save_calibration(cal: RelaxCalibration, folder: str | Path) -> Path:
    """Write ``cal`` as ``<folder>/relax_scale.json`` (atomically); returns the path."""
    from specdit.atomic import atomic_write_text

    path = Path(folder) / CALIBRATION_FILE
    atomic_write_text(path, json.dumps(asdict(cal), indent=1) + "\n")
    return path


def load_calibration(folder: str | Path | None) -> RelaxCalibration | None:
    """The calibration stored in ``folder`` (None when there is none). Raises ValueError (one line) for a
    damaged or newer file."""
    if folder is None or not (Path(folder) / CALIBRATION_FILE).is_file():
        return None
    path = Path(folder) / CALIBRATION_FILE
    try:
        data = json.loads(path.read_text())
        if int(data.get("version", 0)) > CALIBRATION_VERSION:
            raise ValueError(f"version {data['version']} is newer than this specdit reads ({CALIBRATION_VERSION})")
        data["timesteps"], data["scale"] = tuple(int(v) for v in data["timesteps"]), tuple(float(v) for v in data["scale"])
        return RelaxCalibration(**data)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"cannot read relaxation calibration {path}: {e}") from None


def default_scale(schedule: Schedule, dim: int) -> torch.Tensor:
    """(S + 1,) float64 c_k = sigma_k^2 / (g_k^2 D): u / c_k = d^2, the squared gap between drafted and
    target kernel means in kernel standard deviations. Index 0 and steps with sigma_k = 0 get inf (no
    relaxation where the step is deterministic)."""
    a = schedule.abar.double().cpu()
    sigma = schedule.sigma.double().cpu()
    out = torch.full((schedule.num_steps + 1,), math.inf, dtype=torch.float64)
    for k in range(1, schedule.num_steps + 1):
        g = math.sqrt(max(1 - float(a[k - 1]) - float(sigma[k]) ** 2, 0.0)) - math.sqrt(
            float(a[k - 1]) * (1 - float(a[k])) / float(a[k]))
        if float(sigma[k]) > 0 and g != 0:
            out[k] = float(sigma[k]) ** 2 / (g * g * dim)
    return out


def scale_table(schedule: Schedule, calibration: RelaxCalibration | None, dim: int) -> torch.Tensor:
    """(S + 1,) float64 relaxation scale by state index k (index 0 unused): the calibration at the
    schedule's timesteps, else :func:`default_scale`."""
    if calibration is None:
        return default_scale(schedule, dim)
    out = calibration.at(schedule.timesteps.cpu())
    out[0] = math.inf
    return out


def temper(relax: float, uncertainty: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """1 + relax * u / c: uncertainty u (B, L) >= 0, scale c (B, L) > 0 (inf: no relaxation)."""
    return 1.0 + relax * uncertainty / scale
