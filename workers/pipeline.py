"""Speculative sampling and sharded target calls over "executors" (no Ray in this module).

An *executor* is anything with the methods below, returning either a value or a
``concurrent.futures.Future`` of it (a Ray ``ObjectRef.future()``, a thread pool's future, or a plain value
for in-process use). Each call returns ``(result, (t_start, t_end[, cpu_s]))``: the interval the executor
was busy, in ``time.time()`` seconds (and the CPU seconds its thread used), from which the pipeline reports
how long both devices worked at once (and, on CPUs, whether a device got a whole core while busy).

- drafter executor: ``draft(seeds, ctx, draft_length) -> DraftBatch`` (step 1 of a round,
  ``specdit.samplers.round_steps.propose``);
- verifier executor: ``verify(draft, y) -> TargetScores`` (step 2, ``round_steps.score``);
- model executor (DRiffusion): ``evaluate(x, t, y) -> ModelOutput``.

The rounds themselves are driven by the one round loop, ``specdit.samplers.rounds.run_rounds``
(:class:`ExecutorRounds` adapts the two executors to it): ``groups`` groups of chains advance
independently, and with ``overlap`` the drafter drafts one group's round while the verifier evaluates
another's. Results equal the in-process sampler's (bit-identical for row-wise float64 models; float32 DiTs
differ at ~1e-5 where batch composition changes).

**Devices.** The coordinator (this process) keeps the chains' state, statistics and verification maths on
:data:`COORDINATOR_DEVICE`, the CPU, whatever devices the executors use: a round's tensors cross to an
executor's device and back once per call (:func:`to_device`), which is cheap next to a target call and
keeps the coordinator free of any accelerator.
"""
from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from specdit.drafters.base import DraftContext
from specdit.models.base import ModelOutput
from specdit.noise import NoiseStreams
from specdit.relaxation import scale_table
from specdit.samplers.chains import Chains
from specdit.samplers.proposals import DraftBatch, TargetScores
from specdit.samplers.round_steps import propose, score
from specdit.samplers.rounds import RoundRule, as_future, check_round_settings, run_rounds
from specdit.schedule import Schedule
from specdit.stats import SampleStats

COORDINATOR_DEVICE = torch.device("cpu")  # where the pipeline keeps chain state (see the module doc)


@dataclass
class Timeline:
    """Busy intervals per role (drafter / verifier / model:<i>) and the wall interval of a run."""

    busy: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds used in the calls, per role
    start: float = 0.0
    end: float = 0.0

    def add(self, role: str, interval: tuple) -> None:
        self.busy.setdefault(role, []).append((interval[0], interval[1]))
        if len(interval) > 2:
            self.cpu[role] = self.cpu.get(role, 0.0) + interval[2]

    @property
    def wall(self) -> float:
        return self.end - self.start

    def busy_time(self, role: str) -> float:
        return sum(b - a for a, b in _union(self.busy.get(role, [])))

    def both_busy(self, a: str, b: str) -> float:
        """Seconds during which roles ``a`` and ``b`` both worked."""
        return _measure_intersection(_union(self.busy.get(a, [])), _union(self.busy.get(b, [])))

    def summary(self, a: str = "drafter", b: str = "verifier") -> dict[str, float]:
        w = max(self.wall, 1e-12)
        out = {"wall_s": self.wall, f"{a}_busy": self.busy_time(a) / w, f"{b}_busy": self.busy_time(b) / w,
               "both_busy": self.both_busy(a, b) / w}
        for r in (a, b):  # CPU seconds / busy seconds: < 1 when a CPU "device" had to share its core
            if r in self.cpu:
                out[f"{r}_cpu_per_busy"] = self.cpu[r] / max(self.busy_time(r), 1e-12)
        return out


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _measure_intersection(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


# ------------------------------------------------------------------------------------------------------
# In-process executors (tests, single-device runs) and the plain computations the actors wrap
# ------------------------------------------------------------------------------------------------------
def to_device(obj, device: torch.device | str):
    """Tensors (inside tuples and dataclasses) moved to ``device``: what crosses between the coordinator and
    an executor's device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj)})
    return obj


class DraftComputer:
    """Step 1 on this process's drafter, on ``device`` (results come back on the coordinator's device)."""

    def __init__(self, drafter, schedule: Schedule, device: torch.device | str = "cpu"):
        self.drafter, self.device, self.schedule = drafter, torch.device(device), schedule.to(device)

    def draft(self, seeds: torch.Tensor, ctx: DraftContext, draft_length: int):
        t0, c0 = time.time(), time.thread_time()
        with torch.no_grad():
            streams = NoiseStreams(seeds, device=self.device)
            out = propose(self.drafter, self.schedule, streams, to_device(ctx, self.device), draft_length)
        return to_device(out, COORDINATOR_DEVICE), (t0, time.time(), time.thread_time() - c0)


class VerifyComputer:
    """Step 2 (and DRiffusion evaluations) on this process's target model, on ``device``."""

    def __init__(self, model, schedule: Schedule | None = None, device: torch.device | str = "cpu"):
        self.model, self.device = model, torch.device(device)
        self.schedule = None if schedule is None else schedule.to(device)

    def verify(self, draft: DraftBatch, y: torch.Tensor | None):
        t0, c0 = time.time(), time.thread_time()
        with torch.no_grad():
            out = score(self.model, self.schedule, to_device(draft, self.device),
                        None if y is None else y.to(self.device))
        return to_device(out, COORDINATOR_DEVICE), (t0, time.time(), time.thread_time() - c0)

    def evaluate(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, features: bool = False):
        t0, c0 = time.time(), time.thread_time()
        with torch.no_grad():
            out = self.model(x, t, y)
        feats = out.features if features else None
        return to_device(ModelOutput(out.eps, feats), COORDINATOR_DEVICE), (t0, time.time(), time.thread_time() - c0)


class ThreadExecutor:
    """Runs an object's methods on one background thread (a 'device' in this process); returns futures."""

    def __init__(self, obj):
        from concurrent.futures import ThreadPoolExecutor

        self.obj = obj
        self.pool = ThreadPoolExecutor(max_workers=1)

    def __getattr__(self, name):
        fn = getattr(self.obj, name)
        return lambda *a, **kw: self.pool.submit(fn, *a, **kw)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------------
# The overlapped speculative pipeline
# ------------------------------------------------------------------------------------------------------
def split_groups(n: int, groups: int) -> list[torch.Tensor]:
    """Contiguous, nearly equal row groups of a batch of n chains (empty groups dropped)."""
    groups = max(1, min(groups, n))
    bounds = [n * g // groups for g in range(groups + 1)]
    return [torch.arange(bounds[g], bounds[g + 1]) for g in range(groups) if bounds[g + 1] > bounds[g]]


class ExecutorRounds:
    """The round loop's executor (``specdit.samplers.rounds.RoundExecutor``) over a drafter executor and a
    verifier executor; records each call's busy interval in ``timeline``."""

    def __init__(self, drafter_ex, verifier_ex, seeds: torch.Tensor, draft_length: int, timeline: "Timeline"):
        self.drafter_ex, self.verifier_ex, self.seeds = drafter_ex, verifier_ex, seeds
        self.draft_length, self.timeline = draft_length, timeline

    def propose(self, rows: torch.Tensor, ctx: DraftContext) -> Future:
        return self._timed("drafter", self.drafter_ex.draft(self.seeds[rows], ctx, self.draft_length))

    def score(self, draft: DraftBatch, ctx: DraftContext) -> Future:
        return self._timed("verifier", self.verifier_ex.verify(draft, ctx.y))

    def _timed(self, role: str, call) -> Future:
        """A future of the call's result, its busy interval added to the timeline once it is known."""
        out: Future = Future()

        def done(f: Future) -> None:
            try:
                result, busy = f.result()
            except BaseException as e:  # noqa: BLE001 - handed on to whoever waits for the result
                out.set_exception(e)
                return
            self.timeline.add(role, busy)
            out.set_result(result)

        as_future(call).add_done_callback(done)
        return out


def speculative_pipeline(
    drafter_ex,
    verifier_ex,
    schedule: Schedule,
    seeds: torch.Tensor,
    y: torch.Tensor | None,
    shape: tuple[int, ...],
    *,
    draft_length: int,
    verification: str,
    relax: float = 0.0,
    relax_scale: torch.Tensor | None = None,
    groups: int = 2,
    overlap: bool = True,
    callback: Callable[[int], None] | None = None,
    timeline: Timeline | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Speculative sampling with the drafter and the verifier on two executors, driven by
    ``specdit.samplers.rounds.run_rounds``.

    ``overlap=True`` keeps one round of every group in flight (the drafter works on one group while the
    verifier works on another); ``overlap=False`` runs the groups' rounds strictly one after another (the
    baseline: one device idles while the other works). Returns (samples (B, *shape) float64, stats), both on
    the coordinator's CPU and equal to ``sample_speculative``'s for the same seeds. ``callback(n)`` reports
    steps advanced. Raises ``NonFiniteTargetError`` naming the chain's row if the target returns NaN/inf."""
    check_round_settings(draft_length, relax, schedule.eta)
    seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).to(COORDINATOR_DEVICE)
    schedule = schedule.to(COORDINATOR_DEVICE)
    streams = NoiseStreams(seeds, device=COORDINATOR_DEVICE)
    chains = Chains.start(streams, tuple(shape), schedule.num_steps)
    tl = timeline if timeline is not None else Timeline()
    tl.start = time.time()
    parts = split_groups(len(seeds), groups)
    if relax > 0 and relax_scale is None:  # no calibration given: the default scale (specdit.relaxation)
        relax_scale = scale_table(schedule, None, math.prod(shape))
    rule = RoundRule(schedule, verification, relax, None if relax_scale is None else relax_scale.to(COORDINATOR_DEVICE))
    try:
        run_rounds(chains, ExecutorRounds(drafter_ex, verifier_ex, seeds, draft_length, tl), streams,
                   None if y is None else y.to(COORDINATOR_DEVICE), rule,
                   groups=parts, in_flight=len(parts) if overlap else 1, callback=callback)
    finally:
        tl.end = time.time()
    return chains.x, chains.stats


# ------------------------------------------------------------------------------------------------------
# A target model sharded over several executors (DRiffusion's parallel evaluations across devices)
# ------------------------------------------------------------------------------------------------------
class ShardedModel:
    """An ``EpsModel`` whose calls are split into contiguous chunks, one per executor, evaluated
    concurrently and concatenated. With one executor it is the model itself. For row-wise float64 models
    results are bit-identical to the unsharded model; float32 DiTs differ at ~1e-5 (batch composition)."""

    def __init__(self, executors: list, sample_shape, num_classes, dtype=torch.float64, min_chunk: int = 1,
                 timeline: Timeline | None = None):
        if not executors:
            raise ValueError("need at least one executor")
        self.executors = list(executors)
        self.sample_shape, self.num_classes, self.dtype = tuple(sample_shape), num_classes, dtype
        self.min_chunk = max(1, min_chunk)
        self.timeline = timeline

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> ModelOutput:
        n = x.shape[0]
        parts = max(1, min(len(self.executors), n // self.min_chunk))
        bounds = [n * i // parts for i in range(parts + 1)]
        futs = []
        for i in range(parts):
            sl = slice(bounds[i], bounds[i + 1])
            futs.append(as_future(self.executors[i].evaluate(x[sl], t[sl], None if y is None else y[sl])))
        outs = []
        for i, f in enumerate(futs):
            out, busy = f.result()
            if self.timeline is not None:
                self.timeline.add(f"model:{i}", busy)
            outs.append(out)
        return ModelOutput(torch.cat([o.eps for o in outs]), None)
