"""The cost model of a speculative round and the speed-up it allows (issue 24; docs/design.md).

A round of ``b`` chains with draft length L costs ``c(bL) + L d(b) + v(b)`` seconds: one target call on bL
states, L drafter steps and the sampler's own work (verification maths, noise, bookkeeping, Python). A plain
step costs ``c(b) + p(b)``. With parallel efficiency PE(L) = steps per round, speculation's speed-up over the
plain sampler is at most

    speedup_limit = PE(L) * (c(b) + p(b)) / (c(bL) + L d(b) + v(b))        (at b = 1: PE(L) c(1) / (c(L) + L d + v))

``c`` is measured (:func:`measure_call_costs`), ``d``, ``v`` and ``p`` from timed runs
(``specdit.timing``). :func:`break_even_batch` is the smallest batch at which the limit falls to 1.
Timings are medians in seconds; nothing here changes what a sampler computes.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from specdit.models.base import EpsModel


def measure_call_costs(model: EpsModel, sizes: tuple[int, ...], repeats: int = 10, device: str = "cpu",
                       label: int = 0) -> dict[int, float]:
    """c(n): median seconds of one target call on a batch of n states (n in ``sizes``), at timestep 500.

    The sizes are timed round-robin (``repeats`` passes over all sizes, after one warm-up pass), not one size
    after another, so that every size meets the same machine state and a slow spell spreads over all of them
    instead of inflating one point of the curve."""
    calls = {}
    for n in sizes:
        x = torch.randn(n, *model.sample_shape, dtype=torch.float64, device=device).to(model.dtype)
        t = torch.full((n,), 500, dtype=torch.int64, device=device)
        y = None if model.num_classes is None else torch.full((n,), label, dtype=torch.int64, device=device)
        calls[n] = (x, t, y)
    seconds: dict[int, list[float]] = {n: [] for n in sizes}
    with torch.no_grad():
        for n in sizes:
            model(*calls[n])  # warm-up
        for _ in range(max(1, repeats)):
            for n in sizes:
                start = time.perf_counter()
                model(*calls[n])
                seconds[n].append(time.perf_counter() - start)
    return {n: statistics.median(v) for n, v in seconds.items()}


def interpolate(curve: dict[int, float], n: int) -> float:
    """c(n) from a measured curve: exact at measured sizes, linear between them, linear beyond the largest
    (by the slope of the last two points) and c(min) below the smallest."""
    sizes = sorted(curve)
    if n in curve:
        return curve[n]
    if n <= sizes[0]:
        return curve[sizes[0]]
    for lo, hi in zip(sizes, sizes[1:]):
        if lo < n < hi:
            return curve[lo] + (curve[hi] - curve[lo]) * (n - lo) / (hi - lo)
    if len(sizes) == 1:
        return curve[sizes[0]] * n / sizes[0]
    a, b = sizes[-2], sizes[-1]
    return curve[b] + (curve[b] - curve[a]) * (n - b) / (b - a)


@dataclass
class CostModel:
    """Measured costs in seconds: ``call`` c(n) by batch size n, ``draft`` d per drafter step of one chain,
    ``verify`` v per round of one chain (all the sampler's own work), ``plain`` p per plain step outside the
    model call. ``d`` and ``v`` at batch b are scaled like the target (``scale``), an approximation stated
    beside every break-even figure."""

    call: dict[int, float]
    draft: float
    verify: float
    plain: float = 0.0
    threads: int = 1
    notes: list[str] = field(default_factory=list)

    def scale(self, b: int) -> float:
        return interpolate(self.call, b) / interpolate(self.call, 1)

    def round_cost(self, L: int, b: int = 1) -> float:
        """c(bL) + L d(b) + v(b): one round of b chains with draft length L."""
        return interpolate(self.call, b * L) + (L * self.draft + self.verify) * self.scale(b)

    def step_cost(self, b: int = 1) -> float:
        """c(b) + p(b): one plain step of b chains."""
        return interpolate(self.call, b) + self.plain * self.scale(b)

    def speedup_limit(self, pe: float, L: int, b: int = 1) -> float:
        """PE(L) (c(b) + p(b)) / (c(bL) + L d(b) + v(b)): the speed-up over the plain sampler at efficiency
        ``pe``. With ``plain`` = 0 this is the issue's formula PE(L) c(1) / (c(L) + L d + v)."""
        return pe * self.step_cost(b) / self.round_cost(L, b)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["call"] = {str(k): v for k, v in self.call.items()}
        return d

    @staticmethod
    def from_dict(d: dict) -> "CostModel":
        return CostModel({int(k): float(v) for k, v in d["call"].items()}, float(d["draft"]), float(d["verify"]),
                         float(d.get("plain", 0.0)), int(d.get("threads", 1)), list(d.get("notes", [])))


def break_even_batch(costs: CostModel, pe: dict[int, float], limit: int = 4096) -> int | None:
    """The smallest batch b (a power of 2 up to ``limit``) at which no draft length L in ``pe`` (L -> PE(L))
    gives a speed-up limit above 1; None if speculation still pays at ``limit``."""
    b = 1
    while b <= limit:
        if all(costs.speedup_limit(p, L, b) <= 1.0 for L, p in pe.items()):
            return b
        b *= 2
    return None


def best_limit(costs: CostModel, pe: dict[int, float], b: int = 1) -> tuple[int, float]:
    """(L, limit) with the largest speed-up limit at batch ``b``."""
    return max(((L, costs.speedup_limit(p, L, b)) for L, p in pe.items()), key=lambda lv: (lv[1], -lv[0]))


def finite_or_none(x: float) -> float | None:
    return x if x is not None and math.isfinite(x) else None
