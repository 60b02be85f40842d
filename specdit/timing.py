"""Wall-clock accounting of a sampler's parts: the target's and the drafter's forward passes, and the rest.

:class:`Stopwatch` sums seconds per named part; :class:`TimedModel` and :class:`TimedDrafter` wrap an eps
model and a drafter so that every call adds its time (the target's: ``"target"``; the drafter's whole
cost, including the target's final layer it calls: ``"drafter"``). What is left of a round's wall time is
the sampler's own work: verification maths, keyed noise, bookkeeping, Python. Used by ``specdit bench``'s
cost model and ``benchmarks/profile_round.py``. Timing never changes what is computed.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from specdit.models.base import EpsModel, ModelOutput


class Stopwatch:
    """Seconds and calls per part (``parts[name] = [seconds, calls]``)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            part = self.parts[name]
            part[0] += time.perf_counter() - start
            part[1] += 1

    def seconds(self, name: str) -> float:
        return self.parts[name][0] if name in self.parts else 0.0

    def calls(self, name: str) -> int:
        return int(self.parts[name][1]) if name in self.parts else 0

    def reset(self) -> None:
        self.parts.clear()


class TimedModel:
    """An :class:`EpsModel` that adds each call's seconds to ``watch`` under ``name`` (and the items per
    call to ``sizes``); attributes not overridden are the wrapped model's (features, embeddings...)."""

    def __init__(self, model: EpsModel, watch: Stopwatch, name: str = "target"):
        self.model, self.watch, self.name = model, watch, name
        self.sizes: list[int] = []
        self.seconds: list[float] = []  # each call's seconds, beside its size

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.model, attr)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> ModelOutput:
        start = time.perf_counter()
        with self.watch.timed(self.name):
            out = self.model(x, t, y)
        self.seconds.append(time.perf_counter() - start)
        self.sizes.append(int(x.shape[0]))
        return out

    def clear(self) -> None:
        """Forget the calls recorded so far (sizes and seconds)."""
        self.sizes.clear()
        self.seconds.clear()

    def cost_by_size(self) -> dict[int, float]:
        """Mean seconds per call by batch size over the recorded calls: c(n) as measured in place."""
        total: dict[int, list[float]] = {}
        for n, sec in zip(self.sizes, self.seconds):
            total.setdefault(n, []).append(sec)
        return {n: sum(v) / len(v) for n, v in sorted(total.items())}


class TimedDrafter:
    """A drafter whose ``start`` and ``step`` add their seconds to ``watch`` under ``name``."""

    def __init__(self, drafter: Any, watch: Stopwatch, name: str = "drafter"):
        self.drafter, self.watch, self.name = drafter, watch, name
        self.cost = drafter.cost

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.drafter, attr)

    def start(self, ctx):
        with self.watch.timed(self.name + "_start"):
            return self.drafter.start(ctx)

    def step(self, x, t, y, carry):
        with self.watch.timed(self.name):
            return self.drafter.step(x, t, y, carry)
