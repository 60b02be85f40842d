"""The networks' compute precision (``SamplerConfig.precision``): fp32 as stored, or bf16 under autocast.

Only the target's and the drafter's forward passes change precision; the sampler's arithmetic (keyed noise,
kernel means, verification) stays float64 as before, and eps/features come back as float32. bf16 changes the
target, hence the samples: a job's precision is part of its settings (and of its id when not fp32).
Sampling stays exact for the bf16 target (the law sampled is the bf16 network's chain).
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import torch

from specdit.models.base import EpsModel, ModelOutput

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_units() -> bool | None:
    """Whether this CPU advertises bf16 arithmetic (:func:`bf16_in_cpuinfo` of /proc/cpuinfo); None where that
    file is not readable (not Linux)."""
    try:
        return bf16_in_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def bf16_in_cpuinfo(text: str) -> bool | None:
    """``avx512_bf16`` or ``amx_bf16`` among an x86 CPU's ``flags``, or ``bf16`` among an Arm CPU's ``Features``,
    in /proc/cpuinfo's ``text``; None when it lists neither line."""
    lines = [ln.split(":", 1)[1] for ln in text.splitlines() if ln.startswith(("flags", "Features")) and ":" in ln]
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(lines[0].split())) if lines else None


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


class AutocastModel:
    """``model`` evaluated under ``torch.autocast(dtype)``; outputs float32. Other attributes pass through."""

    def __init__(self, model: EpsModel, dtype: torch.dtype):
        self.model, self.autocast_dtype = model, dtype
        self._checked = False  # the CPU's bf16 units, looked at on the first call

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.model, attr)

    def _cast(self, device: torch.device):
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> ModelOutput:
        if not self._checked:
            self._checked = True
            if x.device.type == "cpu" and self.autocast_dtype == torch.bfloat16 and cpu_has_bf16_units() is False:
                warnings.warn("this CPU has no bf16 units (avx512_bf16 or amx_bf16): bf16 is emulated here and "
                              "usually slower than fp32")
        with self._cast(x.device):
            out = self.model(x, t, y)
        return ModelOutput(out.eps.float(), _float(out.features))


class AutocastDrafter:
    """A drafter whose ``start`` and ``step`` run under ``torch.autocast(dtype)``; eps and carry float32."""

    def __init__(self, drafter: Any, dtype: torch.dtype):
        self.drafter, self.autocast_dtype, self.cost = drafter, dtype, drafter.cost

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.drafter, attr)

    def start(self, ctx):
        with torch.autocast(device_type=ctx.x.device.type, dtype=self.autocast_dtype):
            carry = self.drafter.start(ctx)
        return carry.float() if isinstance(carry, torch.Tensor) and carry.is_floating_point() else carry

    def step(self, x, t, y, carry):
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
            eps, carry = self.drafter.step(x, t, y, carry)
        if isinstance(carry, torch.Tensor) and carry.dtype == torch.bfloat16:
            carry = carry.float()
        return eps.float(), carry


def at_precision(model: EpsModel, drafter: Any, precision: str) -> tuple[EpsModel, Any]:
    """(target, drafter) computing at ``precision`` ("fp32": unchanged; "bf16": autocast). ValueError for
    another name. Build the drafter from the unwrapped target first (it may inspect the target's type)."""
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[precision]
    if dtype is None:
        return model, drafter
    return AutocastModel(model, dtype), None if drafter is None else AutocastDrafter(drafter, dtype)
