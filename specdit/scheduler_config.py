"""The training schedule a model was trained with: DiT's default or a diffusers pipeline's scheduler config.

A diffusers pipeline folder ships ``scheduler/scheduler_config.json``; its ``DDPMScheduler`` /
``DDIMScheduler`` fields that define the *training* diffusion (the betas, the prediction type, the
clipping of the predicted x0) are read here into a :class:`TrainingSchedule`. Keys absent from the JSON
take diffusers' class defaults, as ``from_config`` does (note ``clip_sample`` defaults to True there);
keys diffusers would ignore are ignored. The *sampling* keys (``timestep_spacing``, ``steps_offset``) are
not used: specdit's samplers always take DiT's respacing (``specdit.schedule.space_timesteps``) and their
own ``eta``.

Supported (everything else is refused in one line naming the field, :class:`SchedulerConfigError`):

- ``_class_name``: ``DDPMScheduler`` or ``DDIMScheduler``;
- ``beta_schedule``: ``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` (or explicit ``trained_betas``),
  with ``beta_start``, ``beta_end``, ``num_train_timesteps``; ``rescale_betas_zero_snr`` (Lin et al. 2024,
  Algorithm 1);
- ``prediction_type``: ``epsilon``, ``v_prediction``, ``sample``; ``epsilon`` with zero terminal SNR is
  refused (x0 = (x - eps) / sqrt(abar) is 0/0 at abar = 0, the first step of DiT's respacing);
- ``clip_sample`` / ``clip_sample_range`` and ``thresholding`` (``dynamic_thresholding_ratio``,
  ``sample_max_value``): both are deterministic functions of the step's input, so the kernel stays a
  Gaussian with a computable mean and the exact samplers carry them (the mean uses the noise implied by
  the clipped x0, DDPM's posterior mean; diffusers' DDIM does so with ``use_clipped_model_output``);
- ``variance_type`` (DDPM): ``fixed_small`` / ``fixed_small_log`` (the posterior variance, specdit's
  eta = 1) and ``learned`` / ``learned_range`` (learned-variance channels are dropped, as for DiT);
  ``fixed_large*`` is refused; ``set_alpha_to_one`` (DDIM) must be true (abar_0 = 1 ends every chain).

This module is torch-free (the service's client reads configs without the sampling library).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "learned", "learned_range")
SCHEDULER_JSON = ("scheduler", "scheduler_config.json")


class SchedulerConfigError(ValueError):
    """A scheduler config specdit cannot sample faithfully; the message is one line naming the field."""


@dataclass(frozen=True)
class TrainingSchedule:
    """The training diffusion of a model. Defaults are DiT's (1000 linear betas 1e-4..0.02, epsilon, no
    clipping), which is also what every model without a scheduler config gets."""

    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    trained_betas: tuple[float, ...] | None = None
    rescale_betas_zero_snr: bool = False
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    @property
    def is_default(self) -> bool:
        return self == DIT_SCHEDULE

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that differ from DiT's schedule (empty for DiT's): the job spec's record."""
        default = asdict(DIT_SCHEDULE)
        out = {k: v for k, v in asdict(self).items() if v != default[k]}
        if out.get("trained_betas") is not None:
            out["trained_betas"] = list(out["trained_betas"])
        return out

    @staticmethod
    def from_dict(data: dict[str, Any], where: str = "schedule") -> "TrainingSchedule":
        """Inverse of :meth:`to_dict` (missing fields take DiT's values), checked as a scheduler config is.
        Raises :class:`SchedulerConfigError` (one line, starting with ``where``)."""
        lead = f"{where}: " if where else ""
        if not isinstance(data, dict):
            raise SchedulerConfigError(f"{lead}expected a mapping, got {type(data).__name__}")
        names = {f.name for f in fields(TrainingSchedule)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SchedulerConfigError(f"{lead}unknown field {unknown[0]!r} (known: {', '.join(sorted(names))})")
        return _checked({**asdict(DIT_SCHEDULE), **data}, where)

    def describe(self) -> str:
        """One line, e.g. ``linear betas 1e-4..0.02 x1000, epsilon``."""
        betas = ("trained betas" if self.trained_betas is not None
                 else f"{self.beta_schedule} betas {self.beta_start:g}..{self.beta_end:g}")
        parts = [f"{betas} x{self.num_train_timesteps}", self.prediction_type]
        if self.rescale_betas_zero_snr:
            parts.append("zero terminal SNR")
        if self.thresholding:
            parts.append(f"thresholding {self.dynamic_thresholding_ratio:g} max {self.sample_max_value:g}")
        elif self.clip_sample:
            parts.append(f"x0 clipped to +-{self.clip_sample_range:g}")
        return ", ".join(parts)


DIT_SCHEDULE = TrainingSchedule()

# diffusers' class defaults (DDPMScheduler / DDIMScheduler.__init__, diffusers 0.2x-0.4x) of the fields read.
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    clip_sample=True, clip_sample_range=1.0, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, rescale_betas_zero_snr=False,
)


def schedule_from_scheduler_config(config: dict[str, Any], where: str = "scheduler_config.json") -> TrainingSchedule:
    """A diffusers ``DDPMScheduler``/``DDIMScheduler`` config dict -> :class:`TrainingSchedule`, absent keys
    taking diffusers' class defaults. Raises :class:`SchedulerConfigError` (one line naming the field)."""
    if not isinstance(config, dict):
        raise SchedulerConfigError(f"{where}: expected a JSON object")
    name = config.get("_class_name")
    if name not in SCHEDULER_CLASSES:
        raise SchedulerConfigError(f"{where}: _class_name {name!r} is not supported (specdit samples "
                                   f"{' or '.join(SCHEDULER_CLASSES)} configs only)")
    if name == "DDPMScheduler":
        variance = config.get("variance_type", "fixed_small")
        if variance not in VARIANCE_TYPES:
            raise SchedulerConfigError(f"{where}: variance_type {variance!r} is not supported (specdit's kernel "
                                       f"has the posterior variance: {', '.join(VARIANCE_TYPES)})")
        if config.get("beta_schedule") == "sigmoid":
            raise SchedulerConfigError(f"{where}: beta_schedule 'sigmoid' is not supported "
                                       f"({', '.join(BETA_SCHEDULES)})")
    elif config.get("set_alpha_to_one", True) is not True:
        raise SchedulerConfigError(f"{where}: set_alpha_to_one {config['set_alpha_to_one']!r} is not supported "
                                   "(specdit's chains end at abar = 1)")
    values = {k: config.get(k, default) for k, default in _DIFFUSERS_DEFAULTS.items()}
    return _checked(values, where)


def _checked(v: dict[str, Any], where: str) -> TrainingSchedule:
    """Type and range checks of every field, then the rules across fields; one line naming the field."""
    def bad(key: str, why: str) -> SchedulerConfigError:
        return SchedulerConfigError(f"{where + ': ' if where else ''}{key} {v[key]!r} {why}")

    for key in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
        if not isinstance(v[key], bool):
            raise bad(key, "must be true or false")
    if v["beta_schedule"] not in BETA_SCHEDULES:
        raise bad("beta_schedule", f"is not supported ({', '.join(BETA_SCHEDULES)})")
    if v["prediction_type"] not in PREDICTION_TYPES:
        raise bad("prediction_type", f"is not supported ({', '.join(PREDICTION_TYPES)})")
    t = v["num_train_timesteps"]
    if not isinstance(t, int) or isinstance(t, bool) or not 2 <= t <= 100_000:
        raise bad("num_train_timesteps", "must be an integer in [2, 100000]")
    for key, low, high, low_ok in (("beta_start", 0.0, 1.0, False), ("beta_end", 0.0, 1.0, False),
                                   ("clip_sample_range", 0.0, math.inf, False),
                                   ("dynamic_thresholding_ratio", 0.0, 1.0, False),
                                   ("sample_max_value", 1.0, math.inf, True)):
        x = v[key]
        number = isinstance(x, (int, float)) and not isinstance(x, bool)
        if not number or not (low < x <= high or (low_ok and x == low)):
            raise bad(key, f"must be a number in {'[' if low_ok else '('}{low:g}, {high:g}]")
        v[key] = float(x)
    v["trained_betas"] = _trained_betas(v, where)
    if v["prediction_type"] == "epsilon" and v["rescale_betas_zero_snr"]:
        raise SchedulerConfigError(f"{where + ': ' if where else ''}prediction_type 'epsilon' with "
                                   "rescale_betas_zero_snr is not supported "
                                   "(x0 is undefined at zero terminal SNR: use v_prediction or sample)")
    return TrainingSchedule(**v)


def _trained_betas(v: dict[str, Any], where: str) -> tuple[float, ...] | None:
    betas = v["trained_betas"]
    if betas is None:
        return None
    ok = isinstance(betas, (list, tuple)) and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 < b < 1.0 for b in betas)
    if not ok or len(betas) != v["num_train_timesteps"]:
        raise SchedulerConfigError(f"{where + ': ' if where else ''}trained_betas must be num_train_timesteps "
                                   f"({v['num_train_timesteps']}) "
                                   "numbers in (0, 1)")
    return tuple(float(b) for b in betas)


def read_scheduler_config(folder: str | Path) -> TrainingSchedule:
    """The training schedule of a model folder: ``<folder>/scheduler/scheduler_config.json`` of a diffusers
    pipeline when present, else DiT's. Raises :class:`SchedulerConfigError` (one line) for an unreadable or
    unsupported config."""
    path = Path(folder).joinpath(*SCHEDULER_JSON)
    if not path.is_file():
        return DIT_SCHEDULE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SchedulerConfigError(f"{path}: cannot read the scheduler config: "
                                   f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    return schedule_from_scheduler_config(config, str(path))
